"""Diffusion Transformer: shapes of every preset, adaLN-Zero init, patches, embeddings, attention."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.models.dit import (
    DIT_PRESETS,
    Attention,
    DiT,
    DiTConfig,
    LabelEmbedder,
    add_gated,
    dit_config,
    dit_forward_flops,
    gelu_tanh,
    modulate,
    patchify,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
)

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine the thread handoffs dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PAPER_PRESETS = [name for name in DIT_PRESETS if name.split("-")[1].split("/")[0] in ("S", "B", "L", "XL")]


def tiny_config(**overrides) -> DiTConfig:
    """A 2-block DiT on 8x8x4 latents, small enough for a test to run in milliseconds."""
    return dit_config("DiT-T/2", **{"depth": 2, "hidden_size": 64, "num_heads": 4, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with N(0, 0.1) noise, so that no zero-initialised path hides a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def inputs(config: DiTConfig, n: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    y = torch.randint(0, config.num_classes, (n,), generator=generator)
    return x, t, y


# ----------------------------------------------------------------------------- presets


def test_paper_presets_have_the_paper_depth_width_and_heads():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert len(PAPER_PRESETS) == 12
    for size, (depth, hidden, heads) in sizes.items():
        for patch in (2, 4, 8):
            c = dit_config(f"DiT-{size}/{patch}")
            assert (c.depth, c.hidden_size, c.num_heads, c.patch_size) == (depth, hidden, heads, patch)
            assert (c.input_size, c.in_channels, c.num_classes, c.learn_sigma) == (32, 4, 1000, True)


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_every_preset_maps_latents_to_outputs_of_the_same_size(name):
    # Full width, heads and patch of the preset; one block and an 8x8 latent keep it fast.
    config = dit_config(name, depth=1, input_size=8)
    model = randomize_(DiT(config)).eval()
    attention = model.blocks[0].attn
    assert attention.num_heads * attention.head_dim == config.hidden_size == DIT_PRESETS[name].hidden_size
    assert attention.num_heads == DIT_PRESETS[name].num_heads
    assert model.x_embedder.proj.kernel_size == (config.patch_size, config.patch_size)
    x, t, y = inputs(config, n=2)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, config.out_channels, 8, 8)
    assert torch.isfinite(out).all()


def test_paper_presets_have_the_published_parameter_counts():
    def count(name: str) -> int:
        with torch.device("meta"):  # no memory: DiT-XL/2 has 675M parameters
            return sum(p.numel() for p in DiT(dit_config(name)).parameters())

    # DiT's train.py reports 675,129,632 for DiT-XL/2; that count includes its frozen position
    # embedding parameter (256 tokens x 1152), which here is a non-persistent buffer.
    assert count("DiT-XL/2") + 256 * 1152 == 675_129_632
    # The rounded sizes quoted for S/B/L/XL (DiT, SiT papers).
    assert [round(count(f"DiT-{s}/2") / 1e6) for s in ("S", "B", "L")] == [33, 130, 458]


def test_analytic_flops_match_the_paper_gflops_table():
    # Peebles & Xie 2023, Table 4 (forward Gflops per 256 px image, counting multiply-adds).
    paper_gflops = {
        "S/8": 0.36, "S/4": 1.41, "S/2": 6.06,
        "B/8": 1.42, "B/4": 5.56, "B/2": 23.01,
        "L/8": 5.01, "L/4": 19.70, "L/2": 80.71,
        "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64,
    }  # fmt: skip
    for name, gflops in paper_gflops.items():
        multiply_adds = dit_forward_flops(dit_config(f"DiT-{name}")) / 2
        assert multiply_adds / 1e9 == pytest.approx(gflops, rel=0.015), name


def test_dit_config_applies_overrides_and_rejects_unknown_names():
    config = dit_config("DiT-F/2", depth=3, qk_norm=True)
    assert config.depth == 3 and config.qk_norm and config.hidden_size == DIT_PRESETS["DiT-F/2"].hidden_size
    assert DIT_PRESETS["DiT-F/2"].depth != 3, "presets must not be mutated by overrides"
    with pytest.raises(KeyError, match="DiT-XL/2"):
        dit_config("DiT-XXL/2")
    with pytest.raises(TypeError, match="hidden_size"):
        dit_config("DiT-S/2", hidden=3)
    with pytest.raises(ValueError, match="divisible"):
        dit_config("DiT-S/2", input_size=30, patch_size=4)


def test_forward_refuses_latents_of_another_size():
    config = tiny_config()
    x, t, y = inputs(config)
    with pytest.raises(ValueError, match="8x8"):
        DiT(config)(x[..., :4, :4], t, y)


# ----------------------------------------------------------------------------- adaLN-Zero


def test_fresh_model_predicts_exactly_zero_and_still_gets_gradients():
    config = tiny_config()
    model = DiT(config).train()
    x, t, y = inputs(config)
    out = model(x, t, y)
    assert torch.equal(out, torch.zeros_like(out))
    out.square().add(out).sum().backward()  # d/d(out) = 1 at out = 0
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_a_few_adamw_steps_fit_a_fixed_batch():
    torch.manual_seed(0)
    config = tiny_config(class_dropout_prob=0.0)
    model = DiT(config).train()
    x, t, y = inputs(config, n=8)
    target = torch.randn_like(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(x, t, y), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_learn_sigma_doubles_the_output_channels():
    x, t, y = inputs(tiny_config())
    assert DiT(tiny_config(learn_sigma=False))(x, t, y).shape[1] == 4
    assert DiT(tiny_config(learn_sigma=True))(x, t, y).shape[1] == 8
    assert tiny_config(learn_sigma=True).out_channels == 8


# ----------------------------------------------------------------------------- patches


def test_patchify_and_unpatchify_are_exact_inverses():
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 2 * 3, 4 * 4 * 3)
    assert torch.equal(unpatchify(tokens, 4, (2, 3)), x)
    tokens = torch.randn(2, 6, 48)
    assert torch.equal(patchify(unpatchify(tokens, 4, (2, 3)), 4), tokens)


def test_patch_tokens_are_row_major_with_channels_last_inside_a_patch():
    x = torch.randn(1, 3, 8, 12)
    tokens = patchify(x, 4)  # (1, 6, 48)
    for row in range(2):
        for col in range(3):
            patch = x[0, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]  # (C, p, q)
            assert torch.equal(tokens[0, row * 3 + col], patch.permute(1, 2, 0).flatten())


def test_patch_embedding_is_a_linear_map_of_patchified_latents():
    config = tiny_config(patch_size=4)
    model = randomize_(DiT(config))
    x, _, _ = inputs(config)
    weight = model.x_embedder.proj.weight.permute(0, 2, 3, 1).flatten(1)  # (D, p*q*C), same order as patchify
    expected = patchify(x, 4) @ weight.T + model.x_embedder.proj.bias
    torch.testing.assert_close(model.x_embedder(x), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- conditioning


def test_label_dropout_uses_the_null_class_and_only_in_training():
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.5)
    table = embedder.embedding_table.weight
    labels = torch.arange(10).repeat(20)  # (200,)
    embedder.eval()
    assert torch.equal(embedder(labels), table[labels])
    embedder.train()
    torch.manual_seed(0)
    out = embedder(labels)
    dropped = (out == table[10]).all(dim=1)
    kept = (out == table[labels]).all(dim=1)
    assert (dropped | kept).all()
    assert 60 < dropped.sum() < 140  # about half of 200
    torch.manual_seed(0)
    assert torch.equal(embedder(labels), out), "dropout must draw from the torch RNG"


def test_forced_label_drop_works_in_eval_and_no_dropout_means_no_drops():
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.0).train()
    labels = torch.tensor([1, 2, 3, 4])
    dropped = embedder.drop_labels(labels, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(dropped, torch.tensor([10, 2, 10, 4]))
    assert torch.equal(embedder(labels), embedder.embedding_table.weight[labels])
    embedder.eval()
    out = embedder(labels, force_drop_ids=torch.tensor([0, 0, 0, 1]))
    assert torch.equal(out[3], embedder.embedding_table.weight[10])


def test_null_class_is_the_extra_embedding_row():
    model = DiT(tiny_config(num_classes=7))
    assert model.null_class == 7
    assert model.y_embedder.embedding_table.num_embeddings == 8


def test_eval_forward_is_deterministic_and_conditioned_on_the_label():
    config = tiny_config()
    model = randomize_(DiT(config)).eval()
    x, t, y = inputs(config)
    torch.testing.assert_close(model(x, t, y), model(x, t, y), rtol=0, atol=0)
    assert not torch.allclose(model(x, t, y), model(x, t, torch.full_like(y, model.null_class)))


def test_timestep_embedding_matches_the_sinusoid_formula():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    dim = 10
    got = timestep_embedding(t, dim)
    assert got.dtype == torch.float32 and got.shape == (4, dim)
    for i, ti in enumerate(t.tolist()):
        for j in range(dim // 2):
            freq = 10000.0 ** (-j / (dim // 2))
            assert got[i, j].item() == pytest.approx(math.cos(ti * freq), abs=2e-4)
            assert got[i, dim // 2 + j].item() == pytest.approx(math.sin(ti * freq), abs=2e-4)
    odd = timestep_embedding(t, dim + 1)
    assert torch.equal(odd[:, :dim], got) and torch.equal(odd[:, dim], torch.zeros(4))


def test_timestep_features_stay_float32_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert timestep_embedding(torch.tensor([999]), 256).dtype == torch.float32


def numpy_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE / DiT reference in float64: meshgrid(w, h), first half of channels from the w grid."""
    grid = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))  # w first

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(embed_dim // 2, grid[0]), one_axis(embed_dim // 2, grid[1])], axis=1)


def test_position_embedding_matches_a_float64_numpy_reference():
    reference = numpy_sincos_pos_embed(64, 16)
    np.testing.assert_allclose(sincos_pos_embed_2d(64, 16).numpy(), reference, rtol=0, atol=1e-6)
    model = DiT(tiny_config())
    assert model.pos_embed.shape == (1, 16, 64) and model.pos_embed.dtype == torch.float32
    np.testing.assert_allclose(model.pos_embed[0].numpy(), numpy_sincos_pos_embed(64, 4), rtol=0, atol=1e-6)


def test_position_embedding_is_fixed_and_not_saved():
    model = DiT(tiny_config())
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()


# ----------------------------------------------------------------------------- attention


def naive_attention(attention: Attention, x: torch.Tensor, normalize_qk: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, written out, from the module's own weights."""
    n, t, d = x.shape
    h, hd = attention.num_heads, attention.head_dim
    qkv = x @ attention.qkv.weight.T + attention.qkv.bias  # (N, T, 3D) laid out [q | k | v]
    q, k, v = (part.reshape(n, t, h, hd).transpose(1, 2) for part in qkv.split(d, dim=-1))  # (N, H, T, hd)
    if normalize_qk:
        q = q / q.square().mean(-1, keepdim=True).add(1e-6).sqrt() * attention.q_norm.weight
        k = k / k.square().mean(-1, keepdim=True).add(1e-6).sqrt() * attention.k_norm.weight
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # (N, H, T, T)
    out = (weights @ v).transpose(1, 2).reshape(n, t, d)
    return out @ attention.proj.weight.T + attention.proj.bias


def test_attention_matches_naive_softmax_attention_in_float64():
    attention = randomize_(Attention(dim=32, num_heads=4)).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(attention(x), naive_attention(attention, x), rtol=1e-10, atol=1e-10)


def test_qk_norm_attention_is_attention_on_rms_normalized_queries_and_keys():
    attention = randomize_(Attention(dim=32, num_heads=4, qk_norm=True)).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(attention(x), naive_attention(attention, x, normalize_qk=True), rtol=1e-10, atol=1e-10)


def test_qk_norm_makes_attention_invariant_to_the_scale_of_queries_and_keys():
    x = torch.randn(2, 9, 32)
    for qk_norm, invariant in ((True, True), (False, False)):
        attention = randomize_(Attention(dim=32, num_heads=4, qk_norm=qk_norm))
        before = attention(x)
        with torch.no_grad():
            attention.qkv.weight[:64] *= 10  # rows producing q and k
            attention.qkv.bias[:64] *= 10
        assert torch.allclose(attention(x), before, atol=1e-4) == invariant


# ----------------------------------------------------------------------------- options


def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    def run(checkpointing: bool):
        config = tiny_config(grad_checkpointing=checkpointing, class_dropout_prob=0.0, qk_norm=True)
        model = randomize_(DiT(config)).train()
        x, t, y = inputs(config)
        out = model(x, t, y)
        out.square().mean().backward()
        return out, {name: p.grad for name, p in model.named_parameters()}

    out_plain, grads_plain = run(False)
    out_ckpt, grads_ckpt = run(True)
    assert torch.equal(out_plain, out_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        assert torch.equal(grads_plain[name], grads_ckpt[name]), name


def test_qk_norm_adds_only_the_norm_weights_and_starts_at_zero_output():
    plain, normed = DiT(tiny_config()), DiT(tiny_config(qk_norm=True))
    extra = {n for n, _ in normed.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert extra and all(name.endswith(("q_norm.weight", "k_norm.weight")) for name in extra)
    x, t, y = inputs(tiny_config())
    assert torch.equal(normed(x, t, y), torch.zeros(3, 4, 8, 8))


def test_bf16_autocast_forward_and_backward_stay_close_to_float32():
    config = tiny_config(qk_norm=True, class_dropout_prob=0.0)
    model = randomize_(DiT(config)).train()
    x, t, y = inputs(config)
    reference = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16
    relative_error = (out.float() - reference).norm() / reference.norm()
    assert relative_error < 0.05
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_no_grad_forward_in_place_computes_the_autograd_function_and_leaves_inputs_alone(autocast):
    config = tiny_config(qk_norm=True)
    model = randomize_(DiT(config)).eval()
    x, t, y = inputs(config)
    x_before = x.clone()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with context:
        with_grad = model(x, t, y)  # grad enabled: the out-of-place blocks
        with torch.no_grad():
            in_place = model(x, t, y)  # the in-place inference blocks
        with torch.inference_mode():
            in_inference_mode = model(x, t, y)
    assert torch.equal(x, x_before)
    assert in_place.dtype == with_grad.dtype
    torch.testing.assert_close(in_place, with_grad.detach(), rtol=0, atol=0)
    torch.testing.assert_close(in_inference_mode, with_grad.detach(), rtol=0, atol=0)


# Every DiTConfig field that changes what a block, the embedders, the final layer or the loop over
# blocks computes; each case is tiny_config with these overrides.
BLOCK_OPTIONS = {
    "defaults": {},
    "qk-norm": {"qk_norm": True},
    "learn-sigma": {"learn_sigma": True},
    "grad-checkpointing": {"grad_checkpointing": True},
    "mlp-norm-eps-1e-5": {"mlp_norm_eps": 1e-5},
    "patch-4": {"patch_size": 4},
    "patch-1": {"patch_size": 1},
    "mlp-ratio-2.5": {"mlp_ratio": 2.5},
    "one-head": {"num_heads": 1},
    "diffusers-timestep-frequencies": {"timestep_freq_shift": 1},
    "all-at-once": {"qk_norm": True, "learn_sigma": True, "grad_checkpointing": True, "mlp_norm_eps": 1e-5,
                    "patch_size": 4, "mlp_ratio": 2.5, "timestep_freq_shift": 1},
}


@pytest.mark.parametrize("options", BLOCK_OPTIONS.values(), ids=BLOCK_OPTIONS.keys())
def test_no_grad_fast_path_computes_the_training_function_for_every_block_option(options):
    config = tiny_config(class_dropout_prob=0.0, **options)
    model = randomize_(DiT(config)).train()  # train mode, so grad_checkpointing takes its branch
    x, t, y = inputs(config)
    training = model(x, t, y)  # grad enabled: out-of-place ops (through checkpoint when configured)
    assert training.requires_grad
    with torch.no_grad():
        fast = model(x, t, y)  # the in-place inference path
    assert fast.shape == (3, config.out_channels, 8, 8) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, training.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", BLOCK_OPTIONS.values(), ids=BLOCK_OPTIONS.keys())
def test_no_grad_fast_path_leaves_the_callers_tensors_alone(options):
    config = tiny_config(**options)
    model = randomize_(DiT(config)).eval()
    x, t, y = inputs(config)
    tokens = torch.randn(3, config.num_patches, config.hidden_size)
    c_act = F.silu(torch.randn(3, config.hidden_size))
    given = [tensor.clone() for tensor in (x, t, y, tokens, c_act)]
    with torch.no_grad():
        model(x, t, y)
        block = model.blocks[0]
        block(tokens, c_act)
        block.mlp(tokens)
        model.final_layer(tokens, c_act)
    for before, after in zip(given, (x, t, y, tokens, c_act)):
        assert torch.equal(before, after)


def test_no_grad_forward_overwrites_only_buffers_it_made_itself():
    config = tiny_config()
    block = randomize_(DiT(config)).blocks[0]
    seen = {}
    hooks = [
        block.norm1.register_forward_hook(lambda module, args, out: seen.__setitem__("normalized", out)),
        block.attn.register_forward_pre_hook(lambda module, args: seen.__setitem__("attention input", args[0])),
        block.mlp.fc1.register_forward_hook(lambda module, args, out: seen.__setitem__("hidden", out)),
        block.mlp.fc2.register_forward_pre_hook(lambda module, args: seen.__setitem__("activated", args[0])),
    ]
    tokens, c_act = torch.randn(3, 16, 64), torch.randn(3, 64)
    reused = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out = block(tokens, c_act)
        reused[grad] = (
            seen["attention input"].data_ptr() == seen["normalized"].data_ptr(),  # modulated in place
            seen["activated"].data_ptr() == seen["hidden"].data_ptr(),  # GELU in place
            out.data_ptr() == tokens.data_ptr(),  # never the caller's x
        )
    for hook in hooks:
        hook.remove()
    assert reused == {True: (False, False, False), False: (True, True, False)}


def test_inplace_helpers_write_into_their_first_argument_and_compute_the_same_values():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=generator)  # (N, T, D)
    shift, scale, gate = torch.randn(3, 2, 1, 8, generator=generator).unbind(0)  # 3 x (N, 1, D)
    update = torch.randn(2, 5, 8, generator=generator)
    cases = {
        "modulate": (lambda a, inplace: modulate(a, shift, scale, inplace), x * (1 + scale) + shift),
        "gelu_tanh": (lambda a, inplace: gelu_tanh(a, inplace), F.gelu(x, approximate="tanh")),
        "add_gated": (lambda a, inplace: add_gated(a, gate, update, inplace), x + gate * update),
    }
    for name, (helper, expected) in cases.items():
        x_before = x.clone()
        out_of_place = helper(x, False)
        assert torch.equal(x, x_before), name
        torch.testing.assert_close(out_of_place, expected, rtol=1e-6, atol=1e-6, msg=name)
        buffer = x.clone()
        in_place = helper(buffer, True)
        assert in_place.data_ptr() == buffer.data_ptr(), name
        assert torch.equal(in_place, out_of_place), name
