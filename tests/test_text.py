"""Text conditioning: tokenizer, encoder, the DiT's masked cross-attention and pooled vector, caption dropout."""

import hashlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from conftest import randomize_
from ldm.caching import BlockCache, CacheSchedule, cached
from ldm.config import to_dict
from ldm.diffusion.schedules import DiffusionConfig
from ldm.interop import InteropError
from ldm.interop.dit import dit_state_dict_to_diffusers
from ldm.loading import dit_configs
from ldm.models.dit import DiT, DiTConfig, dit_config, dit_forward_flops
from ldm.models.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    ByteTokenizer,
    TextEncoder,
    drop_captions,
    text_encoder_config,
)

PROMPTS = ["a sneaker", "Größe 42, naïve café ☕ — 靴"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine the thread handoffs dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_encoder(seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(text_encoder_config("Text-T"))  # width 32, 32 ids per prompt


def tiny_dit_config(**overrides) -> DiTConfig:
    """A 2-block DiT on 8x8x4 latents; text_dim and text_length match the Text-T encoder."""
    return dit_config("DiT-T/2", **{"depth": 2, "hidden_size": 64, "num_heads": 4, **overrides})


def tiny_text_dit(seed: int = 0, **overrides) -> DiT:
    torch.manual_seed(seed)
    return DiT(tiny_dit_config(text_dim=32, text_length=32, **overrides))


def latents(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=generator)
    return x, torch.linspace(10.0, 900.0, n), torch.randint(0, 10, (n,), generator=generator)


TEXT_PARTS = ("text_embedder", "cross_attn")  # the parameters only a text DiT has


def with_text(model: DiT, x, t, y, text: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The DiT's prediction for a prompt as `TextEncoder.encode` returns it: (tokens, mask, pooled)."""
    tokens, mask, pooled = text
    return model(x, t, y, text_tokens=tokens, text_mask=mask, text_pooled=pooled)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_ascii_and_non_ascii_prompts():
    tokenizer = ByteTokenizer(max_length=64)
    ids, mask = tokenizer.encode(PROMPTS)
    assert ids.shape == mask.shape == (2, 64) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert tokenizer.decode(ids) == PROMPTS
    # One id per UTF-8 byte, between BOS and EOS, then padding that the mask marks.
    assert mask.sum(dim=1).tolist() == [len(p.encode("utf-8")) + 2 for p in PROMPTS]
    assert (ids[:, 0] == BOS_ID).all() and (ids[~mask] == PAD_ID).all()


def test_the_empty_prompt_encodes_as_bos_eos():
    ids, mask = ByteTokenizer(max_length=8).encode([""])
    assert ids[0, :2].tolist() == [BOS_ID, EOS_ID] and mask[0].tolist() == [True, True] + [False] * 6


def test_a_long_prompt_is_truncated_to_whole_characters_and_keeps_its_eos():
    tokenizer = ByteTokenizer(max_length=10)  # 8 bytes between BOS and EOS
    ids, mask = tokenizer.encode(["a sneaker and a boot", "ééééé"])  # é is 2 bytes: 4 fit, not 4.5
    assert tokenizer.decode(ids) == ["a sneake", "éééé"]
    assert mask.sum(dim=1).tolist() == [10, 10] and ids[0, -1] == EOS_ID and ids[1, 9] == EOS_ID


def test_tokenizer_refuses_a_bare_string_and_non_strings():
    with pytest.raises(TypeError, match=r"pass \[prompt\]"):
        ByteTokenizer().encode("a sneaker")
    with pytest.raises(TypeError, match="must be a str"):
        ByteTokenizer().encode([3])


# ----------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("preset", ["Text-T", "Text-T/4"])
def test_padding_to_a_longer_length_changes_neither_the_real_token_features_nor_the_pooled_vector(preset):
    encoder = randomize_(TextEncoder(text_encoder_config(preset)), seed=1).eval()
    short_ids, short_mask = ByteTokenizer(max_length=23).encode(PROMPTS[:1])
    long_ids, long_mask = ByteTokenizer(max_length=32).encode(PROMPTS[:1])
    short, short_tokens, short_pooled = encoder(short_ids, short_mask)
    long, long_tokens, long_pooled = encoder(long_ids, long_mask)
    real = short_tokens[0]
    assert int(real.sum()) == -(-int(short_mask.sum()) // encoder.config.downsample)
    assert torch.equal(long_tokens[:, : len(real)], short_tokens) and not bool(long_tokens[:, len(real) :].any())
    torch.testing.assert_close(long[:, : len(real)][:, real], short[:, real], rtol=0, atol=1e-6)
    torch.testing.assert_close(long_pooled, short_pooled, rtol=0, atol=1e-6)


def test_a_downsampling_stem_keeps_one_token_per_four_bytes_each_reading_its_own_bytes():
    encoder = randomize_(TextEncoder(text_encoder_config("Text-T/4")), seed=1).eval()
    ids, mask = encoder.tokenizer.encode(["a red sneaker", "a blue bag"])
    tokens, token_mask, pooled = encoder(ids, mask)
    assert tokens.shape == (2, 8, 32) and pooled.shape == (2, 32)
    assert token_mask.sum(1).tolist() == [4, 3]  # 15 and 12 ids (bytes with BOS and EOS)
    # Changing the last byte of a prompt changes the features of its token, not the stem's view of the start.
    edited_ids, _ = encoder.tokenizer.encode(["a red sneakes", "a blue bag"])

    def stem(ids: torch.Tensor) -> torch.Tensor:  # the tokens before the Transformer
        embedded = encoder.token_embed(ids) + encoder.pos_embed
        return encoder.downsample(encoder.convs[0](embedded, mask), mask)[0]

    with torch.no_grad():
        before, after = stem(ids), stem(edited_ids)
    assert torch.equal(before[0, :2], after[0, :2]) and not torch.allclose(before[0, 3], after[0, 3])
    with pytest.raises(ValueError, match="conv_kernel must be odd"):
        text_encoder_config("Text-T/4", conv_kernel=4)


def test_encode_gives_the_dit_its_three_text_inputs():
    encoder = tiny_encoder()
    tokens, mask, pooled = encoder.encode(PROMPTS)
    longest = max(len(encoder.tokenizer.truncate(p)) for p in PROMPTS) + 2  # the longest with BOS, EOS: not max_length
    assert tokens.shape == (2, longest, 32) and mask.shape == (2, longest) and pooled.shape == (2, 32)
    assert bool(mask[:, -1].any()) and not bool(mask.all())
    full_ids, full_mask = encoder.tokenizer.encode(PROMPTS)  # padded to max_length: the same features and vector
    full_tokens, _, full_pooled = encoder(full_ids, full_mask)
    torch.testing.assert_close(full_tokens[:, :longest], tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(full_pooled, pooled, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exceed the encoder's max_length"):
        encoder(*ByteTokenizer(max_length=40).encode(PROMPTS))


# ----------------------------------------------------------------------------- DiT


def test_the_default_dit_is_bit_identical_to_the_class_dit_before_text_conditioning():
    """Recorded from the DiT before text conditioning existed: the same parameters, init draws and outputs.

    The state dict (names, shapes, values) must match exactly; the forward values are compared to a few
    float32 ulps only because another CPU's matmul kernels may sum in another order.
    """
    torch.manual_seed(0)
    model = DiT(tiny_dit_config())
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.contiguous().numpy().tobytes())
    assert len(model.state_dict()) == 31
    assert digest.hexdigest() == "dbf4629bc41e6655352fec0ba89d1c47a050e69faacb5912e33c1a4c6f18d411"

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    x = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        out = model.eval()(x, torch.tensor([10.0, 500.0]), torch.tensor([3, 10]))
    recorded = [
        "-0x1.d8e3fep-1", "0x1.1e037p-1", "-0x1.e1fe5ep+0", "-0x1.4c742cp-4", "-0x1.08fec6p-1",
        "0x1.6171b2p+0", "-0x1.7ea42p-4", "-0x1.668334p-4", "0x1.123c5cp-1", "-0x1.8be1f8p-1",
        "-0x1.25e81ep-3", "0x1.afdd78p+0", "-0x1.6b4688p-1", "0x1.cb86bcp-2",
    ]  # fmt: skip
    expected = torch.tensor([float.fromhex(value) for value in recorded])
    torch.testing.assert_close(out.flatten()[::37], expected, rtol=0, atol=1e-6)
    assert abs(out.double().sum().item() - float.fromhex("-0x1.1778ace48p+6")) < 1e-4


def test_a_fresh_text_dit_computes_the_class_dit_with_the_same_weights_for_every_prompt():
    class_dit = randomize_(DiT(tiny_dit_config())).eval()
    text_dit = tiny_text_dit().eval()
    missing, unexpected = text_dit.load_state_dict(class_dit.state_dict(), strict=False)
    # Only the text parts are new, and they start at zero output (PixArt-alpha's zero-init cross-attention).
    assert not unexpected and missing and all(any(part in key for part in TEXT_PARTS) for key in missing)
    x, t, y = latents(2)
    encoder = tiny_encoder()
    with torch.no_grad():
        expected = class_dit(x, t, y)
        for prompts in (PROMPTS, ["", "a boot"]):
            assert torch.equal(with_text(text_dit, x, t, y, encoder.encode(prompts)), expected)
        # Once the text parts are trained (here: perturbed), the prompt matters.
        randomize_(text_dit, seed=3, only=TEXT_PARTS)
        first, second = (with_text(text_dit, x, t, y, encoder.encode(prompts)) for prompts in (PROMPTS, ["", "a boot"]))
    assert not torch.allclose(first, second, atol=1e-3)
    assert not torch.allclose(first, expected, atol=1e-3)


def cross_attention_weights(model: DiT, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's cross-attention weights (N, H, T, L) of random image tokens over the prompts' tokens, and the
    mask (N, 1, 1, L) of the real text tokens."""
    tokens, mask, pooled = tiny_encoder().encode(prompts)
    context, attn_mask, _ = model.embed_text(len(prompts), tokens, mask, pooled)
    block = model.blocks[0]
    x = block.norm_cross(torch.randn(len(prompts), 16, model.config.hidden_size))  # (N, T, D)
    attention, (n, t, _) = block.cross_attn, x.shape
    q = attention.q(x).view(n, t, attention.num_heads, attention.head_dim).transpose(1, 2)  # (N, H, T, d)
    kv = attention.kv(context).view(n, context.shape[1], 2, attention.num_heads, attention.head_dim)
    k = kv.permute(2, 0, 3, 1, 4)[0]  # (N, H, L, d)
    logits = (q @ k.transpose(-1, -2)) / attention.head_dim**0.5
    return logits.masked_fill(~attn_mask, float("-inf")).softmax(-1), attn_mask


def test_a_fresh_text_dits_cross_attention_tells_the_text_tokens_apart():
    """Keys at unit scale (text_context_norm): a fresh DiT's image tokens already weigh the text tokens unevenly,
    so the prompt's content reaches the blocks from the first steps. Without the norm every weight is within
    1% of uniform (the projected tokens are ~0.01 in scale), the saddle a jointly trained encoder sat in."""
    with torch.no_grad():
        for norm, low, high in ((True, 1.5, float("inf")), (False, 1.0, 1.05)):
            weights, mask = cross_attention_weights(tiny_text_dit(text_context_norm=norm), PROMPTS)
            peak = (weights.amax(-1) * mask.sum(-1)).mean()  # the largest weight against the uniform 1 / L
            assert low <= peak < high, (norm, peak)


def test_a_text_dit_stored_before_the_context_norm_loads_without_it():
    stored = to_dict(tiny_dit_config(text_dim=32, text_length=32))
    del stored["text_context_norm"]
    artifact = SimpleNamespace(config=lambda: {"model": stored, "diffusion": to_dict(DiffusionConfig())})
    assert dit_configs(artifact)[0].text_context_norm is False
    assert tiny_dit_config(text_dim=32, text_length=32).text_context_norm is True  # new text DiTs have it


def test_cross_attention_ignores_the_features_at_masked_positions():
    model = randomize_(tiny_text_dit()).eval()
    tokens, mask, pooled = tiny_encoder().encode(PROMPTS)
    garbage = tokens.clone()
    garbage[~mask] = 100.0 * torch.randn(int((~mask).sum()), tokens.shape[-1])
    x, t, y = latents(2)
    with torch.no_grad():
        clean = with_text(model, x, t, y, (tokens, mask, pooled))
        assert torch.equal(with_text(model, x, t, y, (garbage, mask, pooled)), clean)
        # The same garbage unmasked does change the output: the mask is what removes it.
        assert not torch.allclose(with_text(model, x, t, y, (garbage, torch.ones_like(mask), pooled)), clean)


@pytest.mark.parametrize("preset", ["Text-T", "Text-T/4"])
def test_padding_the_prompt_to_a_longer_length_leaves_the_dit_output_unchanged(preset):
    model = randomize_(tiny_text_dit()).eval()
    encoder = randomize_(TextEncoder(text_encoder_config(preset)), seed=2).eval()
    x, t, y = latents(1)
    outputs = []
    with torch.no_grad():
        for length in (21, 32):
            tokens, mask, pooled = encoder(*ByteTokenizer(max_length=length).encode(PROMPTS[:1]))
            outputs.append(with_text(model, x, t, y, (tokens, mask, pooled)))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)


def test_a_text_dit_gives_the_same_output_with_and_without_autograd_and_with_checkpointing():
    model = randomize_(tiny_text_dit(grad_checkpointing=True, class_dropout_prob=0.0), seed=4)
    text = tiny_encoder().encode(PROMPTS)
    x, t, y = latents(2)
    with torch.no_grad():
        sampled = with_text(model.eval(), x, t, y, text)  # the residual stream updated in place
    plain = with_text(model.eval(), x, t, y, text)  # autograd, nothing in place
    checkpointed = with_text(model.train(), x, t, y, text)  # blocks recomputed in backward
    torch.testing.assert_close(sampled, plain.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)


def test_a_step_cache_that_skips_nothing_leaves_a_text_dit_output_unchanged():
    model = randomize_(tiny_text_dit()).eval()
    text = tiny_encoder().encode(PROMPTS)
    x, t, y = latents(2)
    with torch.no_grad():
        plain = with_text(model, x, t, y, text)
        cache = BlockCache(CacheSchedule(1, model.config.depth, ()))
        with cached(model, cache):
            assert torch.equal(with_text(model, x, t, y, text), plain)
    assert cache.evaluated == model.config.depth


def test_gradient_reaches_every_text_encoder_parameter_through_the_dit():
    model = randomize_(tiny_text_dit())
    encoder = tiny_encoder()
    x, t, y = latents(2)
    with_text(model, x, t, y, encoder.encode(PROMPTS)).square().mean().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.timeout(60)
def test_a_fresh_dit_and_encoder_trained_jointly_for_a_few_steps_update_the_encoder():
    """The zero-initialised text paths open after a step or two, and then the encoder learns."""
    model, encoder = tiny_text_dit(class_dropout_prob=0.0), tiny_encoder()
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    optimizer = torch.optim.Adam([*model.parameters(), *encoder.parameters()], lr=1e-2)
    x, t, y = latents(2)
    target = torch.randn_like(x)
    for _ in range(4):
        optimizer.zero_grad()
        loss = (with_text(model, x, t, y, encoder.encode(PROMPTS)) - target).square().mean()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(p, before[name]) for name, p in encoder.named_parameters())


def test_a_text_dit_needs_all_three_text_inputs_and_a_class_dit_refuses_them():
    text_dit, class_dit = tiny_text_dit(), DiT(tiny_dit_config())
    tokens, mask, pooled = tiny_encoder().encode(PROMPTS)
    x, t, y = latents(2)
    with pytest.raises(ValueError, match="conditions on text.*text_tokens, text_mask and text_pooled"):
        text_dit(x, t, y, text_tokens=tokens, text_mask=mask)
    with pytest.raises(ValueError, match="no text conditioning"):
        with_text(class_dit, x, t, y, (tokens, mask, pooled))
    with pytest.raises(ValueError, match="bool"):
        with_text(text_dit, x, t, y, (tokens, mask.float(), pooled))
    with pytest.raises(ValueError, match="text_length 32"):
        with_text(text_dit, x, t, y, (torch.zeros(2, 40, 32), torch.ones(2, 40, dtype=torch.bool), pooled))
    with pytest.raises(ValueError, match="text_dim 32"):
        with_text(text_dit, x, t, y, (tokens[..., :16], mask, pooled))


def test_text_dim_and_text_length_are_set_together():
    for fields in ({"text_dim": 32}, {"text_length": 32}, {"text_dim": -1, "text_length": 32}):
        with pytest.raises(ValueError, match="text_dim and text_length"):
            tiny_dit_config(**fields)


def test_analytic_flops_count_the_text_paths_as_a_flop_counter_does():
    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    formulas = {cpu_flash: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v)}
    encoder = tiny_encoder()
    ids, mask = encoder.tokenizer.encode(PROMPTS)  # padded to max_length = text_length, which the count assumes
    tokens, mask, pooled = encoder(ids, mask)
    x, t, y = latents(2)
    for overrides, training in (({}, False), ({"route_ratio": 0.5, "depth": 4}, True)):
        model = tiny_text_dit(class_dropout_prob=0.0, **overrides).train(training)
        with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
            with_text(model, x, t, y, (tokens, mask, pooled))
        assert dit_forward_flops(model.config, training=training) == counter.get_total_flops() // 2, overrides


def test_a_text_dit_cannot_be_exported_to_diffusers():
    model = tiny_text_dit()
    with pytest.raises(InteropError, match="text_dim"):
        dit_state_dict_to_diffusers(model.state_dict(), model.config)


# ----------------------------------------------------------------------------- caption dropout


def test_caption_dropout_drops_the_requested_fraction_deterministically():
    prompts = [f"item {i}" for i in range(20000)]
    dropped = drop_captions(prompts, 0.1, torch.Generator().manual_seed(0))
    empty = [i for i, prompt in enumerate(dropped) if prompt == ""]
    assert abs(len(empty) / len(prompts) - 0.1) < 0.01  # ~5 standard deviations of a Bernoulli(0.1) mean
    assert all(dropped[i] == prompts[i] for i in set(range(len(prompts))) - set(empty))
    assert drop_captions(prompts, 0.1, torch.Generator().manual_seed(0)) == dropped
    assert drop_captions(prompts, 0.1, torch.Generator().manual_seed(1)) != dropped
    assert drop_captions(prompts[:50], 0.0) == prompts[:50] and drop_captions(prompts[:50], 1.0) == [""] * 50
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_captions(prompts, 1.5)
