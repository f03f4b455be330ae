"""Diffusion Transformer: shapes of every preset, adaLN-Zero init, patches, embeddings, attention, recipe options."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked, apply_rot_embed
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from conftest import randomize_
from ldm.interop import InteropError
from ldm.interop.dit import dit_state_dict_to_diffusers
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
    rope_tables,
    sincos_pos_embed,
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
    with pytest.raises(ValueError, match=r"\(N, 4, 8, 8\)"):
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
    np.testing.assert_allclose(sincos_pos_embed(64, (16, 16)).numpy(), reference, rtol=0, atol=1e-6)
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


LIGHTNINGDIT_RECIPE = {"norm": "rmsnorm", "mlp": "swiglu", "pos_embed": "rope"}


@pytest.mark.parametrize(
    "options", [{}, {**LIGHTNINGDIT_RECIPE, "depth": 4, "route_ratio": 0.5}], ids=["dit", "lightningdit-routed"]
)
def test_gradient_checkpointing_gives_identical_outputs_and_gradients(options):
    def run(checkpointing: bool):
        config = tiny_config(grad_checkpointing=checkpointing, class_dropout_prob=0.0, qk_norm=True, **options)
        model = randomize_(DiT(config)).train()
        x, t, y = inputs(config)
        torch.manual_seed(0)  # the same routed tokens in both runs
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


def test_bf16_autocast_training_saves_no_float32_token_tensors_for_backward():
    # The residual stream stays float32; what autograd keeps of it for the norms and modulations must not
    # (bench/memory.py: the float32 copies made our bf16 training step heavier than diffusers'). LayerNorm
    # only: torch's rms_norm keeps a float32 copy of a bf16 input itself.
    config = tiny_config()
    model = randomize_(DiT(config)).train()
    x, t, y = inputs(config)
    stream_shape = (x.shape[0], config.num_patches, config.hidden_size)
    saved = []

    def keep(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, t, y).float().square().mean().backward()
    assert (torch.bfloat16, stream_shape) in saved
    assert (torch.float32, stream_shape) not in saved


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("recipe", [{}, LIGHTNINGDIT_RECIPE], ids=["dit", "lightningdit"])
def test_no_grad_forward_in_place_computes_the_autograd_function_and_leaves_inputs_alone(autocast, recipe):
    config = tiny_config(qk_norm=True, **recipe)
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
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "swiglu-mlp-ratio-2.5": {"mlp": "swiglu", "mlp_ratio": 2.5},
    "rope": {"pos_embed": "rope"},
    "rope-qk-norm": {"pos_embed": "rope", "qk_norm": True},
    "rope-checkpointing": {"pos_embed": "rope", "grad_checkpointing": True},
    "lightningdit-recipe": LIGHTNINGDIT_RECIPE,
    "all-at-once": {
        "qk_norm": True,
        "learn_sigma": True,
        "grad_checkpointing": True,
        "mlp_norm_eps": 1e-5,
        "patch_size": 4,
        "mlp_ratio": 2.5,
        "timestep_freq_shift": 1,
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "pos_embed": "rope",
    },
}
# TREAD routing (route_*) is not a block option here: in train mode with autograd it routes by design,
# so its training function differs from inference; the routing tests below check both.


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
        block(tokens.clone(), c_act)  # a block updates its x in place (test below), never c_act
        block.mlp(tokens)
        model.final_layer(tokens, c_act)
    for before, after in zip(given, (x, t, y, tokens, c_act)):
        assert torch.equal(before, after)


def test_no_grad_block_updates_the_residual_stream_and_its_own_buffers_in_place():
    config = tiny_config()
    block = randomize_(DiT(config)).blocks[0]
    seen = {}
    hooks = [
        block.norm1.register_forward_hook(lambda module, args, out: seen.__setitem__("normalized", out)),
        block.attn.register_forward_pre_hook(lambda module, args: seen.__setitem__("attention input", args[0])),
        block.mlp.fc1.register_forward_hook(lambda module, args, out: seen.__setitem__("hidden", out)),
        block.mlp.fc2.register_forward_pre_hook(lambda module, args: seen.__setitem__("activated", args[0])),
    ]
    c_act = torch.randn(3, 64)
    reused = {}
    for grad in (True, False):
        tokens = torch.randn(3, 16, 64)
        with torch.set_grad_enabled(grad):
            out = block(tokens, c_act)
        reused[grad] = (
            seen["attention input"].data_ptr() == seen["normalized"].data_ptr(),  # modulated in place
            seen["activated"].data_ptr() == seen["hidden"].data_ptr(),  # GELU in place
            out.data_ptr() == tokens.data_ptr(),  # gated residuals added into x
        )
    for hook in hooks:
        hook.remove()
    assert reused == {True: (False, False, False), False: (True, True, True)}


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


# ----------------------------------------------------------------------------- recipe options


def test_recipe_options_default_off_and_are_validated_by_name():
    config = DiTConfig()
    assert (config.norm, config.mlp, config.pos_embed, config.route_ratio) == ("layernorm", "gelu", "sincos", 0.0)
    for preset in DIT_PRESETS.values():
        assert (preset.norm, preset.mlp, preset.pos_embed, preset.route_ratio) == ("layernorm", "gelu", "sincos", 0.0)
    bad = [
        ({"norm": "batchnorm"}, "norm must be one of 'layernorm', 'rmsnorm'"),
        ({"mlp": "relu"}, "mlp must be one of 'gelu', 'swiglu'"),
        ({"pos_embed": "learned"}, "pos_embed must be one of 'sincos', 'rope'"),
        ({"pos_embed": "rope", "hidden_size": 72, "num_heads": 12}, "'rope' needs a head width divisible by 4, got 6"),
        ({"route_ratio": 1.0}, "route_ratio must lie in"),
        ({"route_ratio": -0.1}, "route_ratio must lie in"),
        ({"route_ratio": 0.5, "route_start": 2, "route_end": 2}, "route_start 2 and route_end 2"),
        ({"route_ratio": 0.5, "route_end": 7}, "route_end 7"),
        ({"route_ratio": 0.5, "route_start": 1, "depth": 2}, r"blocks \[1, 1\)"),  # route_end -1 is block 1
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            tiny_config(**overrides)
    # Inactive routing is not checked against the depth: a one-block DiT keeps the default route_start 1.
    assert tiny_config(depth=1).route_blocks == (1, 0)


def test_options_leave_the_state_dict_alone_except_swiglu_which_resizes_the_mlp():
    def layout(**overrides) -> dict[str, tuple[int, ...]]:
        return {name: tuple(tensor.shape) for name, tensor in DiT(tiny_config(**overrides)).state_dict().items()}

    plain = layout()
    for overrides in ({"norm": "rmsnorm"}, {"pos_embed": "rope"}, {"route_ratio": 0.5, "route_end": 2}):
        assert layout(**overrides) == plain, overrides
    swiglu = layout(mlp="swiglu")
    changed = {name for name in plain if swiglu[name] != plain[name]}
    assert swiglu.keys() == plain.keys()
    assert changed == {f"blocks.{b}.mlp.{layer}.weight" for b in range(2) for layer in ("fc1", "fc2")} | {
        f"blocks.{b}.mlp.fc1.bias" for b in range(2)
    }
    assert swiglu["blocks.0.mlp.fc1.weight"] == (2 * 170, 64) and swiglu["blocks.0.mlp.fc2.weight"] == (64, 170)


def test_a_dit_f2_state_dict_of_the_published_layout_loads_into_the_default_config():
    # DiT-F/2 as every artifact so far stores it (facebookresearch/DiT names, adaLN_modulation unnested), written
    # out here so that no option can quietly rename or reshape a tensor of the default model.
    d, hidden, depth, patch, channels, classes = 256, 1024, 6, 2, 4, 10
    layout = {
        "x_embedder.proj.weight": (d, channels, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.adaLN_modulation.weight": (2 * d, d), "final_layer.adaLN_modulation.bias": (2 * d,),
        "final_layer.linear.weight": (patch**2 * channels, d), "final_layer.linear.bias": (patch**2 * channels,),
    }  # fmt: skip
    for b in range(depth):
        layout |= {
            f"blocks.{b}.attn.qkv.weight": (3 * d, d), f"blocks.{b}.attn.qkv.bias": (3 * d,),
            f"blocks.{b}.attn.proj.weight": (d, d), f"blocks.{b}.attn.proj.bias": (d,),
            f"blocks.{b}.mlp.fc1.weight": (hidden, d), f"blocks.{b}.mlp.fc1.bias": (hidden,),
            f"blocks.{b}.mlp.fc2.weight": (d, hidden), f"blocks.{b}.mlp.fc2.bias": (d,),
            f"blocks.{b}.adaLN_modulation.weight": (6 * d, d), f"blocks.{b}.adaLN_modulation.bias": (6 * d,),
        }  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) for name, shape in layout.items()}
    model = DiT(dit_config("DiT-F/2"))
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())


def test_diffusers_conversion_refuses_each_option_it_cannot_express_by_name():
    for name, value in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("pos_embed", "rope")):
        config = tiny_config(**{name: value})
        with pytest.raises(InteropError, match=f"{name}={value!r}"):
            dit_state_dict_to_diffusers(DiT(config).state_dict(), config)
    # Routing changes only training; the routed DiT's inference function is a plain DiT's.
    config = tiny_config(route_ratio=0.5, route_end=2)
    assert (
        dit_state_dict_to_diffusers(DiT(config).state_dict(), config).keys()
        == dit_state_dict_to_diffusers(DiT(tiny_config()).state_dict(), tiny_config()).keys()
    )


def test_analytic_flops_count_every_option_as_a_flop_counter_does():
    def counted(config: DiTConfig, training: bool) -> int:
        model = DiT(config).train(training)
        x, t, y = inputs(config, n=2)
        # PyTorch's counter has no formula for the CPU flash-attention kernel; it is the same q k^T and A v.
        cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        formulas = {cpu_flash: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v)}
        with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
            model(x, t, y)
        return counter.get_total_flops() // 2

    cases = [
        ({}, False),
        ({"mlp": "swiglu"}, False),
        ({"norm": "rmsnorm", "pos_embed": "rope", "qk_norm": True}, False),
        ({"route_ratio": 0.5, "route_start": 1, "route_end": 3}, True),
        ({"route_ratio": 0.3, "mlp": "swiglu", "pos_embed": "rope"}, True),
        ({"route_ratio": 0.5}, False),  # eval: no routing
    ]
    for overrides, training in cases:
        config = tiny_config(depth=4, class_dropout_prob=0.0, **overrides)
        assert dit_forward_flops(config, training=training) == counted(config, training), overrides
    routed, plain = tiny_config(depth=4, route_ratio=0.5), tiny_config(depth=4)
    assert dit_forward_flops(routed, training=True) < dit_forward_flops(routed) == dit_forward_flops(plain)


# RMSNorm (LightningDiT use_rmsnorm)


def test_rmsnorm_option_gives_affine_free_pre_norms_of_unit_rms_per_token_as_a_float64_reference():
    model = DiT(tiny_config(norm="rmsnorm", mlp_norm_eps=1e-5))
    x = 3 * torch.randn(2, 16, 64, dtype=torch.float64) + 1
    norms = {"norm1": (model.blocks[0].norm1, 1e-6), "norm2": (model.blocks[0].norm2, 1e-5),
             "norm_final": (model.final_layer.norm_final, 1e-6)}  # fmt: skip
    for name, (norm, eps) in norms.items():
        assert isinstance(norm, torch.nn.RMSNorm) and not list(norm.parameters()), name
        out = norm(x)
        reference = torch.stack([token / math.sqrt(token.square().mean().item() + eps) for token in x.reshape(-1, 64)])
        torch.testing.assert_close(out.reshape(-1, 64), reference, rtol=1e-12, atol=1e-12, msg=name)
        unit = torch.ones(2, 16, dtype=torch.float64)
        torch.testing.assert_close(out.square().mean(-1), unit, rtol=1e-5, atol=0, msg=name)  # eps keeps it just below


# SwiGLU (Shazeer 2020; LightningDiT use_swiglu)


def test_swiglu_width_is_two_thirds_of_the_mlp_width_truncated_as_lightningdit():
    # LightningDiT: SwiGLUFFN(hidden_size, int(2/3 * int(hidden_size * mlp_ratio))).
    for hidden, ratio, width in ((64, 4.0, 170), (256, 4.0, 682), (1152, 4.0, 3072), (64, 2.5, 106)):
        gelu = dit_config("DiT-T/2", hidden_size=hidden, num_heads=4, mlp_ratio=ratio)
        swiglu = dit_config("DiT-T/2", hidden_size=hidden, num_heads=4, mlp_ratio=ratio, mlp="swiglu")
        assert swiglu.mlp_hidden_size == width
        assert gelu.mlp_hidden_size == int(hidden * ratio)


def test_swiglu_mlp_is_w2_of_silu_w1_x_times_w3_x_with_its_own_weights():
    config = tiny_config(mlp="swiglu")
    mlp = randomize_(DiT(config)).blocks[0].mlp.double()
    h = config.mlp_hidden_size
    w1, w3 = mlp.fc1.weight[:h], mlp.fc1.weight[h:]
    b1, b3 = mlp.fc1.bias[:h], mlp.fc1.bias[h:]
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    reference = torch.empty_like(x)
    for index in np.ndindex(2, 5):  # one token at a time
        token = x[index]
        reference[index] = mlp.fc2.weight @ (F.silu(w1 @ token + b1) * (w3 @ token + b3)) + mlp.fc2.bias
    with torch.no_grad():
        in_place = mlp(x)
    torch.testing.assert_close(mlp(x), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(in_place, reference, rtol=1e-12, atol=1e-12)


def test_swiglu_weights_have_the_packed_layout_of_lightningdit_and_timm():
    # LightningDiT's SwiGLUFFN (w12 = [gate; value], w3) and timm's SwiGLUPacked (fc1, fc2) stack W1 and W3 alike.
    config = tiny_config(mlp="swiglu")
    ours = randomize_(DiT(config)).blocks[0].mlp
    timm_swiglu = SwiGLUPacked(64, 2 * config.mlp_hidden_size)
    timm_swiglu.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(ours(x), timm_swiglu(x), rtol=1e-6, atol=1e-6)


# RoPE (LightningDiT use_rope, EVA-02's 2-D rotary embedding)


def lightningdit_rope(head_dim: int, grid_size: int) -> tuple[np.ndarray, np.ndarray]:
    """LightningDiT's VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid_size) tables, in float64 numpy."""
    dim = head_dim // 2
    freqs = 1.0 / 10000 ** (np.arange(0, dim, 2)[: dim // 2] / dim)  # (head_dim / 4,)
    angles = np.repeat(np.arange(grid_size)[:, None] * freqs, 2, axis=-1)  # (G, head_dim / 2), '... n -> ... (n r)'
    rows = np.broadcast_to(angles[:, None, :], (grid_size, grid_size, dim))
    cols = np.broadcast_to(angles[None, :, :], (grid_size, grid_size, dim))
    full = np.concatenate([rows, cols], axis=-1).reshape(grid_size**2, head_dim)  # broadcat(..., dim=-1)
    return np.sin(full), np.cos(full)


def rotate_pairs(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Turn each channel pair (2i, 2i+1) of x (..., T, d) by the angle whose sin and cos the tables (T, d) repeat."""
    out = torch.empty_like(x)
    even, odd = x[..., 0::2], x[..., 1::2]
    s, c = sin[:, 0::2], cos[:, 0::2]
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


def test_rope_tables_are_lightningdits_eva_rotary_embedding():
    for head_dim, grid in ((16, 4), (72, 16)):
        sin, cos = rope_tables(head_dim, (grid, grid))
        reference_sin, reference_cos = lightningdit_rope(head_dim, grid)
        assert sin.shape == cos.shape == (grid * grid, head_dim)
        np.testing.assert_allclose(sin.numpy(), reference_sin, rtol=0, atol=2e-5)
        np.testing.assert_allclose(cos.numpy(), reference_cos, rtol=0, atol=2e-5)


def test_rope_is_the_identity_at_the_first_token():
    sin, cos = rope_tables(16, (4, 4))
    q = torch.randn(3, 16)
    assert torch.equal(apply_rot_embed(q, sin[0], cos[0]), q)


def test_rope_attention_logits_depend_only_on_the_2d_offset_between_query_and_key():
    grid, head_dim = 8, 16
    sin, cos = rope_tables(head_dim, (grid, grid))
    sin, cos = sin.double(), cos.double()
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, generator=generator, dtype=torch.float64)

    def logit(query_at: tuple[int, int], key_at: tuple[int, int]) -> float:
        i, j = query_at[0] * grid + query_at[1], key_at[0] * grid + key_at[1]  # row-major tokens
        return (apply_rot_embed(q, sin[i], cos[i]) @ apply_rot_embed(k, sin[j], cos[j])).item()

    for query_at, key_at, shift in (((0, 0), (2, 5), (3, 1)), ((4, 1), (1, 3), (2, 4)), ((7, 7), (5, 6), (-5, -6))):
        shifted_query = (query_at[0] + shift[0], query_at[1] + shift[1])
        shifted_key = (key_at[0] + shift[0], key_at[1] + shift[1])
        assert logit(shifted_query, shifted_key) == pytest.approx(logit(query_at, key_at), abs=1e-5)
    # ... and does depend on that offset, along rows and along columns apart.
    assert logit((0, 0), (0, 0)) != pytest.approx(logit((0, 0), (1, 0)), abs=1e-3)
    assert logit((0, 0), (1, 0)) != pytest.approx(logit((0, 0), (0, 1)), abs=1e-3)


def test_rope_attention_is_attention_on_rotated_queries_and_keys_after_qk_norm():
    attention = randomize_(Attention(dim=32, num_heads=4, qk_norm=True)).double()
    sin, cos = (table.double() for table in rope_tables(8, (3, 3)))  # head width 8, 3x3 tokens
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    n, t, d, h, hd = 2, 9, 32, 4, 8
    qkv = x @ attention.qkv.weight.T + attention.qkv.bias
    q, k, v = (part.reshape(n, t, h, hd).transpose(1, 2) for part in qkv.split(d, dim=-1))  # (N, H, T, hd)
    q = q / q.square().mean(-1, keepdim=True).add(1e-6).sqrt() * attention.q_norm.weight
    k = k / k.square().mean(-1, keepdim=True).add(1e-6).sqrt() * attention.k_norm.weight
    q, k = rotate_pairs(q, sin, cos), rotate_pairs(k, sin, cos)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    reference = (weights @ v).transpose(1, 2).reshape(n, t, d) @ attention.proj.weight.T + attention.proj.bias
    torch.testing.assert_close(attention(x, (sin, cos)), reference, rtol=1e-10, atol=1e-10)


def test_rope_dit_keeps_lightningdits_absolute_sincos_embedding_and_saves_no_tables():
    model = DiT(tiny_config(pos_embed="rope"))
    assert torch.equal(model.pos_embed, DiT(tiny_config()).pos_embed)  # LightningDiT adds both
    sin, cos = rope_tables(16, (4, 4))
    assert torch.equal(model.rope_sin, sin) and torch.equal(model.rope_cos, cos)
    assert not any(name.startswith("rope") for name in model.state_dict())


# Intermediate tokens for a representation loss


def test_return_block_gives_the_residual_stream_after_that_block_as_running_the_blocks_by_hand():
    config = tiny_config(depth=3, pos_embed="rope")
    model = randomize_(DiT(config)).eval()
    x, t, y = inputs(config)
    by_hand = []
    tokens = model.x_embedder(x) + model.pos_embed
    c_act = F.silu(model.t_embedder(t) + model.y_embedder(y))
    for block in model.blocks:
        tokens = block(tokens, c_act, (model.rope_sin, model.rope_cos))
        by_hand.append(tokens.detach())
    plain = model(x, t, y).detach()
    for grad in (True, False):  # without autograd the later blocks update the stream in place
        with torch.set_grad_enabled(grad):
            for k in range(3):
                out, after_k = model(x, t, y, return_block=k)
                assert torch.equal(out.detach(), plain), (grad, k)
                torch.testing.assert_close(after_k.detach(), by_hand[k], rtol=0, atol=0, msg=f"grad {grad}, block {k}")


def test_return_block_must_name_a_block():
    config = tiny_config()
    x, t, y = inputs(config)
    for block in (-1, 2):
        with pytest.raises(ValueError, match="return_block"):
            DiT(config)(x, t, y, return_block=block)


# TREAD token routing (Krause et al. 2025)


def routed_and_plain(seed: int = 0, **overrides) -> tuple[DiT, DiT]:
    """A routed 5-block DiT and a plain one with the same weights."""
    routed = randomize_(DiT(tiny_config(depth=5, class_dropout_prob=0.0, **overrides)), seed)
    plain = DiT(tiny_config(depth=5, class_dropout_prob=0.0))
    plain.load_state_dict(routed.state_dict())
    return routed, plain


def test_route_ratio_zero_is_bit_identical_to_the_plain_forward_and_draws_no_randomness():
    routed, plain = routed_and_plain(route_ratio=0.0, route_start=1, route_end=3)
    routed.train(), plain.train()
    x, t, y = inputs(routed.config)
    rng = torch.get_rng_state()
    out = routed(x, t, y)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(out, plain(x, t, y))
    out.square().mean().backward()
    plain(x, t, y).square().mean().backward()
    for (name, p), q in zip(routed.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_routing_is_off_at_inference_in_eval_mode_or_without_autograd():
    routed, plain = routed_and_plain(route_ratio=0.5, pos_embed="sincos")
    x, t, y = inputs(routed.config)
    routed.eval(), plain.eval()
    assert torch.equal(routed(x, t, y), plain(x, t, y))  # eval mode, autograd on
    routed.train(), plain.train()
    with torch.no_grad():
        assert torch.equal(routed(x, t, y), plain(x, t, y))  # train mode, no autograd
    assert not torch.equal(routed(x, t, y), plain(x, t, y))  # training: routed


def test_routing_draws_its_token_subsets_from_the_global_rng():
    routed, _ = routed_and_plain(route_ratio=0.5)
    routed.train()
    x, t, y = inputs(routed.config)
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append(routed(x, t, y))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


def record_block_inputs_and_outputs(model: DiT) -> tuple[dict, list]:
    """Hooks that record each block's input tokens, rope argument and output tokens."""
    seen = {}

    def before(index):
        return lambda module, args: seen.__setitem__(("in", index), (args[0].detach(), args[2]))

    def after(index):
        return lambda module, args, out: seen.__setitem__(("out", index), out.detach())

    hooks = [block.register_forward_pre_hook(before(i)) for i, block in enumerate(model.blocks)]
    hooks += [block.register_forward_hook(after(i)) for i, block in enumerate(model.blocks)]
    return seen, hooks


def rows_of(tokens: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """For tokens (N, K, D), the index (N, K) of the identical row of among (N, T, D) (random rows are distinct)."""
    matches = (tokens[:, :, None, :] == among[:, None, :, :]).all(-1)  # (N, K, T)
    assert (matches.sum(-1) == 1).all(), "every token must be one row of the stream"
    return matches.int().argmax(-1)


def test_routed_tokens_skip_the_routed_blocks_unchanged_and_the_rest_go_through():
    routed, _ = routed_and_plain(route_ratio=0.5, route_start=1, route_end=3)  # blocks 1, 2 skipped by half the tokens
    routed.train()
    seen, hooks = record_block_inputs_and_outputs(routed)
    x, t, y = inputs(routed.config)
    routed(x, t, y)
    for hook in hooks:
        hook.remove()
    before_route = seen["out", 0]  # (N, 16, D)
    assert seen["in", 1][0].shape == seen["in", 2][0].shape == (3, 8, 64)  # 16 - int(0.5 * 16) tokens kept
    assert seen["in", 0][0].shape == seen["in", 3][0].shape == seen["in", 4][0].shape == (3, 16, 64)
    kept = rows_of(seen["in", 1][0], before_route)  # (N, 8): the kept tokens, as block 0 left them
    assert torch.equal(seen["in", 2][0], seen["out", 1])
    after_route = seen["in", 3][0]  # (N, 16, D)
    for sample in range(3):
        routed_away = [i for i in range(16) if i not in kept[sample].tolist()]
        assert torch.equal(after_route[sample, routed_away], before_route[sample, routed_away])  # unchanged
        assert torch.equal(after_route[sample, kept[sample]], seen["out", 2][sample])  # through blocks 1 and 2
    assert len(set(map(tuple, kept.sort(-1).values.tolist()))) > 1, "each sample draws its own subset"


def test_routed_blocks_give_the_kept_tokens_their_own_rotary_positions():
    routed, _ = routed_and_plain(route_ratio=0.5, route_start=1, route_end=3, pos_embed="rope")
    routed.train()
    seen, hooks = record_block_inputs_and_outputs(routed)
    x, t, y = inputs(routed.config)
    routed(x, t, y)
    for hook in hooks:
        hook.remove()
    kept = rows_of(seen["in", 1][0], seen["out", 0])  # (N, 8)
    sin, cos = seen["in", 1][1]
    assert torch.equal(sin, routed.rope_sin[kept].unsqueeze(1)) and torch.equal(cos, routed.rope_cos[kept].unsqueeze(1))
    assert seen["in", 3][1][0] is routed.rope_sin  # all tokens again after the route


def test_return_block_inside_the_route_gives_the_stream_with_the_routed_tokens_waiting():
    routed, _ = routed_and_plain(route_ratio=0.5, route_start=1, route_end=3)
    routed.train()
    seen, hooks = record_block_inputs_and_outputs(routed)
    x, t, y = inputs(routed.config)
    _, tokens = routed(x, t, y, return_block=1)
    for hook in hooks:
        hook.remove()
    kept = rows_of(seen["in", 1][0], seen["out", 0])
    for sample in range(3):
        expected = seen["out", 0][sample].clone()
        expected[kept[sample]] = seen["out", 1][sample]
        assert torch.equal(tokens[sample].detach(), expected)


# All options together


OPTION_COMBINATIONS = list(
    itertools.product(("layernorm", "rmsnorm"), ("gelu", "swiglu"), ("sincos", "rope"), (0.0, 0.5))
)


@pytest.mark.parametrize(
    ("norm", "mlp", "pos_embed", "route_ratio"),
    OPTION_COMBINATIONS,
    ids=["-".join(map(str, combination)) for combination in OPTION_COMBINATIONS],
)
def test_every_option_combination_trains_one_step(norm, mlp, pos_embed, route_ratio):
    config = tiny_config(
        depth=3, class_dropout_prob=0.0, qk_norm=True, norm=norm, mlp=mlp, pos_embed=pos_embed, route_ratio=route_ratio
    )
    model = randomize_(DiT(config)).train()
    x, t, y = inputs(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    out, tokens = model(x, t, y, return_block=1)
    loss = F.mse_loss(out, torch.randn_like(out)) + 1e-3 * tokens.square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    optimizer.step()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())


# Sequences: the same DiT over 1-D latents (sound)


def sequence_config(**overrides) -> DiTConfig:
    """A 2-block DiT on (4, 16) sequence latents, patch 2: 8 tokens."""
    return tiny_config(spatial_dims=1, input_size=16, **overrides)


def test_patchify_of_a_sequence_cuts_runs_of_p_steps_with_channels_last_inside_a_run():
    x = torch.randn(2, 3, 12)
    tokens = patchify(x, 4)  # (2, 3, 12)
    assert tokens.shape == (2, 3, 4 * 3)
    for run in range(3):
        assert torch.equal(tokens[1, run], x[1, :, 4 * run : 4 * run + 4].T.flatten())
    assert torch.equal(unpatchify(tokens, 4, (3,)), x)


def test_sequence_sincos_embedding_spends_every_channel_on_the_one_axis():
    table = sincos_pos_embed(8, (5,))  # (5, 8): sin then cos of pos * 10000^(-i/4)
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    omega = 1.0 / 10000.0 ** (torch.arange(4, dtype=torch.float64) / 4)
    torch.testing.assert_close(table, torch.cat([torch.sin(pos * omega), torch.cos(pos * omega)], 1).float())


def test_sequence_rope_logits_depend_only_on_the_offset_and_cover_the_whole_head():
    sin, cos = (table.double() for table in rope_tables(8, (12,)))
    assert sin.shape == (12, 8)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, generator=generator, dtype=torch.float64)

    def logit(i: int, j: int) -> float:
        return (apply_rot_embed(q, sin[i], cos[i]) @ apply_rot_embed(k, sin[j], cos[j])).item()

    assert logit(7, 3) == pytest.approx(logit(4, 0), abs=1e-6)
    assert logit(0, 1) != pytest.approx(logit(0, 2), abs=1e-3)
    # Every channel pair turns (none is left at angle 0 for all positions): the whole head is rotary.
    assert (sin[1].abs() > 0).all()


def test_grid_and_sequence_dits_differ_only_in_the_patch_maps():
    grid, sequence = DiT(tiny_config()).state_dict(), DiT(sequence_config()).state_dict()
    assert grid.keys() == sequence.keys()
    differing = {name for name in grid if grid[name].shape != sequence[name].shape}
    assert differing == {"x_embedder.proj.weight", "final_layer.linear.weight", "final_layer.linear.bias"}


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_sequence_dit_matches_a_token_by_token_reference(pos_embed):
    model = randomize_(DiT(sequence_config(pos_embed=pos_embed))).eval()
    cfg = model.config
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, generator=generator)
    t, y = torch.tensor([5.0, 500.0, 999.0]), torch.tensor([0, 3, cfg.null_class])
    with torch.no_grad():
        out = model(x, t, y)
        weight, bias = model.x_embedder.proj.weight, model.x_embedder.proj.bias  # (D, C, p)
        tokens = torch.stack(
            [
                torch.stack([torch.einsum("dcp,cp->d", weight, x[n, :, 2 * j : 2 * j + 2]) + bias for j in range(8)])
                for n in range(3)
            ]
        ) + sincos_pos_embed(cfg.hidden_size, (8,))  # (N, 8, D)
        c_act = torch.nn.functional.silu(model.t_embedder(t) + model.y_embedder(y))
        rope = rope_tables(cfg.hidden_size // cfg.num_heads, (8,)) if pos_embed == "rope" else None
        for block in model.blocks:
            tokens = block(tokens.clone(), c_act, rope)
        patches = model.final_layer(tokens, c_act)  # (N, 8, p * C_out)
    assert out.shape == (3, 4, 16)
    for j in range(8):
        torch.testing.assert_close(out[:, :, 2 * j : 2 * j + 2], patches[:, j].reshape(3, 2, 4).transpose(1, 2))


def test_sequence_dit_refuses_a_grid_latent_by_shape():
    with pytest.raises(ValueError, match=r"\(N, 4, 16\)"):
        DiT(sequence_config())(torch.randn(1, 4, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long))
