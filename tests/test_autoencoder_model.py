"""The stage-1 KL autoencoder: shapes, posterior maths, gradients, presets, parity with diffusers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm.interop.autoencoder import state_dict_from_diffusers
from ldm.models.autoencoder import (
    AUTOENCODER_PRESETS,
    AttentionBlock,
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    Upsample,
)


def tiny_config(**overrides) -> AutoencoderConfig:
    """A few-thousand-parameter autoencoder for 16x16 images."""
    fields = dict(in_channels=1, resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4)
    return AutoencoderConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
    "ch_mult, latent_channels, factor",
    [((1, 2, 2), 4, 4), ((1, 2, 2, 4), 8, 8), ((1, 1, 2, 2, 4), 16, 16), ((1, 2), 3, 2)],
)
def test_latent_is_f_times_smaller_and_reconstruction_keeps_the_image_shape(ch_mult, latent_channels, factor):
    config = tiny_config(in_channels=3, resolution=32, ch_mult=ch_mult, latent_channels=latent_channels)
    model = AutoencoderKL(config)
    x = torch.randn(2, 3, 32, 32)
    posterior = model.encode(x)
    recon, _ = model(x)
    assert config.downsample_factor == factor
    assert config.latent_shape == (latent_channels, 32 // factor, 32 // factor)
    assert posterior.mean.shape == posterior.std.shape == (2, *config.latent_shape)
    assert model.decode(posterior.mode()).shape == recon.shape == (2, 3, 32, 32)


def test_out_channels_default_to_in_channels_and_can_differ():
    x = torch.randn(1, 3, 16, 16)
    assert AutoencoderKL(tiny_config(in_channels=3))(x)[0].shape == (1, 3, 16, 16)
    assert AutoencoderKL(tiny_config(in_channels=3, out_channels=1))(x)[0].shape == (1, 1, 16, 16)


def test_network_runs_at_any_multiple_of_f_not_only_the_training_resolution():
    model = AutoencoderKL(tiny_config(resolution=16))
    assert model(torch.randn(1, 1, 24, 40))[0].shape == (1, 1, 24, 40)


def test_group_norm_groups_are_lowered_to_a_divisor_of_small_channel_counts():
    model = AutoencoderKL(tiny_config(ch=8, ch_mult=(1, 6), norm_groups=32))
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8: 8, 48: 24}


def test_config_accepts_yaml_lists_and_rejects_inconsistent_shapes():
    assert AutoencoderConfig(ch_mult=[1, 2, 4], resolution=32).ch_mult == (1, 2, 4)
    with pytest.raises(ValueError, match="multiple of f=8"):
        AutoencoderConfig(ch_mult=(1, 2, 2, 2), resolution=36)
    with pytest.raises(ValueError, match="ch_mult"):
        AutoencoderConfig(ch_mult=())


def test_kl_matches_the_closed_form_in_float64():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    posterior = DiagonalGaussian(mean, logvar)
    m, lv = mean.double(), logvar.double()
    # KL(N(m, s^2) || N(0, 1)) = 0.5 (m^2 + s^2 - 1 - log s^2), summed over the latent of each sample.
    expected = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))
    assert posterior.kl().shape == (3,)
    torch.testing.assert_close(posterior.kl().double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.all(DiagonalGaussian(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).kl() == 0)


def test_nll_matches_torch_distributions_normal():
    torch.manual_seed(0)
    mean, logvar, z = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    reference = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    expected = -reference.log_prob(z.double()).sum(dim=(1, 2, 3))
    torch.testing.assert_close(DiagonalGaussian(mean, logvar).nll(z).double(), expected, rtol=1e-5, atol=1e-4)


def test_logvar_is_clamped_so_std_stays_finite():
    posterior = DiagonalGaussian(torch.zeros(1, 1, 1, 2), torch.tensor([[[[-1e4, 1e4]]]]))
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.isfinite(posterior.std).all() and torch.isfinite(posterior.kl()).all()


def test_sample_is_mean_plus_std_times_generator_noise_and_mode_is_mean():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    posterior = DiagonalGaussian(mean, logvar)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    sample = posterior.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, mean + (0.5 * logvar).exp() * noise)
    assert not torch.allclose(sample, posterior.mode())
    assert posterior.mode() is mean


def test_samples_have_the_posterior_moments():
    shape = (1, 1, 100, 200)  # 20000 independent draws of one scalar posterior
    posterior = DiagonalGaussian(torch.full(shape, 2.0), torch.full(shape, math.log(0.25)))
    draws = posterior.sample(torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 2.0) < 0.01  # std of the estimate: 0.5 / sqrt(20000) = 0.0035
    assert abs(draws.std().item() - 0.5) < 0.01


def test_forward_without_sampling_decodes_the_posterior_mean():
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_config())
    x = torch.randn(2, 1, 16, 16)
    recon, posterior = model(x, sample_posterior=False)
    torch.testing.assert_close(recon, model.decode(posterior.mean))
    sampled, _ = model(x, sample_posterior=True)
    assert not torch.allclose(recon, sampled)


def test_last_layer_is_the_decoder_output_conv_weight_and_receives_gradient():
    model = AutoencoderKL(tiny_config())
    assert model.last_layer is model.decoder.conv_out.weight
    recon, _ = model(torch.randn(2, 1, 16, 16))
    # The adaptive GAN weight takes d(loss)/d(last_layer) with autograd.grad, keeping the graph.
    (grad,) = torch.autograd.grad(recon.abs().mean(), model.last_layer, retain_graph=True)
    assert grad.shape == model.last_layer.shape and grad.abs().sum() > 0


def test_every_parameter_receives_gradient():
    model = AutoencoderKL(tiny_config())
    recon, posterior = model(torch.randn(2, 1, 16, 16))
    (recon.abs().mean() + posterior.kl().mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_attention_block_matches_softmax_attention_written_out():
    torch.manual_seed(0)
    block = AttentionBlock(channels=8, norm_groups=4).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    tokens = block.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
    q, k, v = block.qkv(tokens).chunk(3, dim=-1)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1)  # (N, HW, HW)
    expected = x + block.proj(weights @ v).transpose(1, 2).reshape(2, 8, 3, 5)
    torch.testing.assert_close(block(x), expected)


def test_upsample_equals_nearest_upsampling_followed_by_its_3x3_conv():
    torch.manual_seed(0)
    upsample = Upsample(channels=5).double()
    x = torch.randn(2, 5, 4, 7, dtype=torch.float64)
    expected = upsample.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(upsample(x), expected)


def test_channels_last_gives_the_same_result_and_stays_channels_last():
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_config())
    x = torch.randn(2, 1, 16, 16)
    expected = model(x, sample_posterior=False)[0]
    model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last), sample_posterior=False)[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = AutoencoderKL(tiny_config())
    checkpointed = AutoencoderKL(tiny_config(gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 16, 16)
    for model in (plain, checkpointed):
        model(x, sample_posterior=False)[0].square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_presets_have_the_documented_shapes():
    fmnist = AUTOENCODER_PRESETS["fmnist-f4"]
    assert (fmnist.in_channels, fmnist.downsample_factor, fmnist.latent_shape) == (1, 4, (4, 8, 8))
    assert AUTOENCODER_PRESETS["fmnist-f4-quick"].latent_shape == (4, 8, 8)
    factors = {name: AUTOENCODER_PRESETS[name].downsample_factor for name in ("kl-f4", "kl-f8", "kl-f16")}
    assert factors == {"kl-f4": 4, "kl-f8": 8, "kl-f16": 16}
    assert AUTOENCODER_PRESETS["kl-f8"].latent_shape == (4, 32, 32)

    def forward_flops(config: AutoencoderConfig) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            AutoencoderKL(config)(torch.zeros(1, 1, 32, 32))
        return counter.get_total_flops()

    assert forward_flops(AUTOENCODER_PRESETS["fmnist-f4-quick"]) * 3 < forward_flops(fmnist)


def test_kl_f8_preset_has_the_stable_diffusion_vae_size_and_trains():
    torch.manual_seed(0)
    model = AutoencoderKL(AUTOENCODER_PRESETS["kl-f8"])
    # LDM's kl-f8 (the Stable Diffusion v1 VAE) has 83,653,863 parameters in encoder, decoder and
    # the two 1x1 quant convs; an equal count is a strong check that the structure is the same.
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    # The preset is for 256x256, but the network is convolutional: 32x32 keeps the test fast.
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    recon, posterior = model(x)
    assert recon.shape == x.shape and posterior.mean.shape == (1, 4, 4, 4)
    ((recon - x).abs().mean() + 1e-6 * posterior.kl().mean()).backward()
    assert model.last_layer.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attn_at_lowest, num_res_blocks", [(True, 1), (False, 2)])
def test_same_function_as_diffusers_autoencoder_with_the_same_weights(attn_at_lowest, num_res_blocks):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = tiny_config(
        in_channels=3,
        ch=32,
        ch_mult=(1, 1, 2),
        num_res_blocks=num_res_blocks,
        attn_at_lowest=attn_at_lowest,
        norm_groups=32,
    )
    theirs = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=num_res_blocks,  # its decoder also has one more per level
        latent_channels=4,
        norm_num_groups=32,
        mid_block_add_attention=attn_at_lowest,
    ).double()
    ours = AutoencoderKL(config).double()
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict()))  # strict: same module set
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        theirs_posterior = theirs.encode(x).latent_dist
        ours_posterior = ours.encode(x)
        torch.testing.assert_close(ours_posterior.mean, theirs_posterior.mean)
        torch.testing.assert_close(ours_posterior.logvar, theirs_posterior.logvar)
        z = theirs_posterior.mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample)


def test_config_is_kept_on_the_model():
    config = tiny_config()
    model = AutoencoderKL(config)
    assert model.config is config
    # Plain fields only, so the config round-trips through YAML into an artifact.
    assert dataclasses.asdict(config)["ch_mult"] == (1, 2, 2)
