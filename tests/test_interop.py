"""Pretrained weights in and out, compared output for output.

Each source is built here with random weights, then imported.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.artifacts import ArtifactStore
from ldm.config import to_dict
from ldm.data import DataConfig
from ldm.data.latents import LatentStats
from ldm.interop import (
    InteropError,
    autoencoder_config_from_diffusers,
    diffusers_scaling_from_stats,
    dit_config_from_original,
    dit_state_dict_to_original,
    export_dit_to_diffusers,
    latent_stats_from_diffusers,
    load_compvis_autoencoder,
    load_diffusers_autoencoder,
    load_diffusers_dit,
    load_original_dit,
)
from ldm.loading import load_autoencoder
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.dit import DIT_PRESETS, DiT, DiTConfig, timestep_embedding
from stages.cli import main

diffusers = pytest.importorskip("diffusers")

# 16x16 RGB images -> 4x4x4 latents; three levels of distinct widths, so a level mix-up changes shapes.
AE = AutoencoderConfig(
    in_channels=3, resolution=16, ch=8, ch_mult=(1, 2, 4), num_res_blocks=1, latent_channels=4, norm_groups=4
)
AE_SET = [
    "--set",
    "model.in_channels=3",
    "--set",
    "model.resolution=16",
    "--set",
    "model.ch=8",
    "--set",
    "model.ch_mult=[1,2,4]",
    "--set",
    "model.num_res_blocks=1",
    "--set",
    "model.norm_groups=4",
]
# A DiT on those 4x4x4 latents: 4 tokens of width 16, 10 classes.
DIT = DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=10)


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def cli_error(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return result.output


def randomized(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """The model with every parameter drawn from N(0, std^2): a fresh DiT's zero-init layers would hide mix-ups."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()


def diffusers_autoencoder(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        **config,
    ).eval()


def images(n: int = 2, side: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


def assert_same_autoencoder(ours: AutoencoderKL, encode, decode) -> None:
    """Our encoder moments and decoder against a reference's, on the same images and latents."""
    x = images()
    with torch.no_grad():
        posterior = ours.encode(x)
        mean, logvar = encode(x)
        torch.testing.assert_close(posterior.mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(posterior.logvar, logvar, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.decode(mean), decode(mean), rtol=1e-4, atol=1e-5)


def dit_inputs(config: DiTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(
        4, config.in_channels, config.input_size, config.input_size, generator=torch.Generator().manual_seed(2)
    )
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 3, config.num_classes - 1, config.num_classes])  # the last one is the null class
    return x, t, y


# --------------------------------------------------------------------------------------------
# Source layouts written out here, independently of ldm/interop.py
# --------------------------------------------------------------------------------------------


def compvis_state_dict(model: AutoencoderKL) -> dict[str, torch.Tensor]:
    """Our model's tensors under CompVis' AutoencoderKL names, level by level as taming's model.py builds them."""
    config, ours = model.config, model.state_dict()
    levels, blocks = len(config.ch_mult), config.num_res_blocks
    out = {}

    def copy(src: str, dst: str) -> None:
        for param in ("weight", "bias"):
            out[f"{dst}.{param}"] = ours[f"{src}.{param}"]

    def resnet(src: str, dst: str) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2"):
            copy(f"{src}.{name}", f"{dst}.{name}")
        if f"{src}.shortcut.weight" in ours:
            copy(f"{src}.shortcut", f"{dst}.nin_shortcut")

    def attention(src: str, dst: str) -> None:  # q, k, v, proj_out are 1x1 convs there
        copy(f"{src}.norm", f"{dst}.norm")
        for name, weight, bias in zip("qkv", ours[f"{src}.qkv.weight"].chunk(3), ours[f"{src}.qkv.bias"].chunk(3)):
            out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = weight[:, :, None, None], bias
        out[f"{dst}.proj_out.weight"] = ours[f"{src}.proj.weight"][:, :, None, None]
        out[f"{dst}.proj_out.bias"] = ours[f"{src}.proj.bias"]

    for part in ("encoder", "decoder"):
        for name in ("conv_in", "norm_out", "conv_out"):
            copy(f"{part}.{name}", f"{part}.{name}")
        resnet(f"{part}.mid.0", f"{part}.mid.block_1")
        attention(f"{part}.mid.1", f"{part}.mid.attn_1")
        resnet(f"{part}.mid.2", f"{part}.mid.block_2")
    for level in range(levels):
        for block in range(blocks):
            resnet(f"encoder.down.{level}.{block}", f"encoder.down.{level}.block.{block}")
        if level < levels - 1:
            copy(f"encoder.down.{level}.{blocks}.conv", f"encoder.down.{level}.downsample.conv")
        # CompVis' decoder.up[level] is resolution level `level` (0 = full size, run last); ours run lowest first.
        position = levels - 1 - level
        for block in range(blocks + 1):
            resnet(f"decoder.up.{position}.{block}", f"decoder.up.{level}.block.{block}")
        if level > 0:
            copy(f"decoder.up.{position}.{blocks + 1}.conv", f"decoder.up.{level}.upsample.conv")
    copy("quant_conv", "quant_conv")
    copy("post_quant_conv", "post_quant_conv")
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in ours.values())
    return out


def mae_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """DiT's fixed position embedding (MAE's 2D sin-cos): first half the column coordinate, second half the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows = torch.arange(grid, dtype=torch.float64).repeat_interleave(grid)  # token k = row * grid + col
    cols = torch.arange(grid, dtype=torch.float64).repeat(grid)

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()[None]  # (1, T, D)


def original_dit_state_dict(model: DiT) -> dict[str, torch.Tensor]:
    """Our DiT's tensors under facebookresearch/DiT's names: adaLN_modulation is Sequential(SiLU, Linear) there."""
    out = {}
    for key, tensor in model.state_dict().items():
        if ".adaLN_modulation." in key:
            head, param = key.rsplit(".adaLN_modulation.", 1)
            key = f"{head}.adaLN_modulation.1.{param}"
        out[key] = tensor.clone()
    out["pos_embed"] = mae_pos_embed(model.config.hidden_size, model.config.grid_size)
    return out


def save_autoencoder_artifact(store: ArtifactStore, latent_stats: LatentStats | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoencoderKL(AE)
    metadata = {"latent_stats": latent_stats.to_dict()} if latent_stats else {}
    data = DataConfig(name="folder", path="unused", channels=3, resolution=16)
    artifact = store.save(
        "autoencoder",
        tensors={"weights.safetensors": model.state_dict()},
        config={"model": to_dict(AE), "data": to_dict(data)},
        metadata=metadata,
    )
    return artifact, model.eval()


# --------------------------------------------------------------------------------------------
# Autoencoder: diffusers
# --------------------------------------------------------------------------------------------


def test_diffusers_autoencoder_config_maps_onto_ours():
    config = autoencoder_config_from_diffusers(
        {
            "_class_name": "AutoencoderKL",
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 256,
        }
    )
    assert (config.ch, config.ch_mult, config.num_res_blocks, config.latent_channels) == (128, (1, 2, 4, 4), 2, 4)
    assert (config.in_channels, config.out_channels, config.resolution, config.norm_groups) == (3, None, 256, 32)
    assert config.attn_at_lowest  # diffusers' default mid_block_add_attention


@pytest.mark.parametrize(
    "change, field",
    [
        ({"use_quant_conv": False}, "use_quant_conv"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
        ({"block_out_channels": [8, 12]}, "block_out_channels"),
        ({"act_fn": "relu"}, "act_fn"),
    ],
)
def test_diffusers_autoencoder_config_ours_cannot_hold_is_refused_naming_the_field(change, field):
    base = {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 4,
        "sample_size": 16,
    }
    with pytest.raises(ValueError, match=field):
        autoencoder_config_from_diffusers({**base, **change})


def test_diffusers_autoencoder_imported_through_the_cli_computes_the_same_function(tmp_path):
    theirs = diffusers_autoencoder(scaling_factor=0.5, shift_factor=0.1)
    theirs.save_pretrained(tmp_path / "vae")
    output = cli("--store", tmp_path / "store", "import", "autoencoder", "--from-diffusers", tmp_path / "vae")
    assert "wrote autoencoder@" in output

    artifact = ArtifactStore(tmp_path / "store").load("autoencoder@latest")
    ours = load_autoencoder(artifact)
    assert ours.config == AE
    assert_same_autoencoder(
        ours,
        lambda x: (theirs.encode(x).latent_dist.mean, theirs.encode(x).latent_dist.logvar),
        lambda z: theirs.decode(z).sample,
    )
    # (z - shift_factor) * scaling_factor is (z - mean) / std with one global mean and std.
    assert artifact.manifest["latent_stats"] == {"mode": "global", "mean": [0.1] * 4, "std": [2.0] * 4}
    assert artifact.manifest["source"]["format"] == "diffusers AutoencoderKL"
    assert artifact.config()["data"]["channels"] == 3 and artifact.config()["data"]["resolution"] == 16


def test_per_channel_latents_mean_and_std_become_channel_stats_and_export_back_exactly():
    config_json = {"scaling_factor": 0.5, "latents_mean": [0.1, 0.2, 0.3, 0.4], "latents_std": [1.0, 2.0, 3.0, 4.0]}
    stats, _ = latent_stats_from_diffusers(config_json, 4)
    # SDXL-style pipelines use (z - latents_mean) * scaling_factor / latents_std.
    assert stats.mode == "channel" and stats.mean == [0.1, 0.2, 0.3, 0.4] and stats.std == [2.0, 4.0, 6.0, 8.0]
    settings, notes = diffusers_scaling_from_stats(stats)
    back, _ = latent_stats_from_diffusers(settings, 4)
    assert back.mean == pytest.approx(stats.mean) and back.std == pytest.approx(stats.std)
    assert notes and "pooled" in notes[0]
    # The pooled std is the std of z over all channels: sqrt(mean(std_c^2 + (mean_c - mean)^2)).
    pooled = (torch.tensor([4.0, 16, 36, 64]).mean() + torch.tensor([0.1, 0.2, 0.3, 0.4]).var(unbiased=False)).sqrt()
    assert settings["scaling_factor"] == pytest.approx(1 / pooled.item())


def test_encode_with_stats_source_uses_the_imported_scaling_factor(tmp_path):
    diffusers_autoencoder(scaling_factor=0.25).save_pretrained(tmp_path / "vae")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 40, 200)).save(folder / f"{i}.png")
    store = tmp_path / "store"
    cli("--store", store, "import", "autoencoder", "--from-diffusers", tmp_path / "vae", "--data", folder)
    cli("--store", store, "encode", "--set", "stats=source", "--set", "flips=false")
    cache = ArtifactStore(store).load("latents@latest")
    assert cache.manifest["latent_stats"] == {"mode": "global", "mean": [0.0] * 4, "std": [4.0] * 4}
    assert cache.manifest["images"] == 3


def test_old_diffusers_attention_names_are_accepted(tmp_path):
    theirs = diffusers_autoencoder()
    theirs.save_pretrained(tmp_path / "vae")
    file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, tensor in load_file(file).items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        tensors[key] = tensor
    save_file(tensors, file)
    ours = load_diffusers_autoencoder(tmp_path / "vae").model
    with torch.no_grad():
        torch.testing.assert_close(
            ours.decode(torch.ones(1, 4, 2, 2)), theirs.decode(torch.ones(1, 4, 2, 2)).sample, rtol=1e-4, atol=1e-5
        )


# --------------------------------------------------------------------------------------------
# Autoencoder: CompVis
# --------------------------------------------------------------------------------------------


def test_compvis_checkpoint_imported_through_the_cli_computes_the_source_function(tmp_path):
    source = randomized(AutoencoderKL(AE), std=0.05)
    state = compvis_state_dict(source)
    state["loss.logvar"] = torch.zeros(())  # LPIPS / discriminator tensors of a Lightning training run
    state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save({"state_dict": state, "global_step": 1000}, tmp_path / "kl.ckpt")

    cli("--store", tmp_path / "store", "import", "autoencoder", "--from-compvis", tmp_path / "kl.ckpt", *AE_SET)
    ours = load_autoencoder(ArtifactStore(tmp_path / "store").load("autoencoder@latest"))
    assert_same_autoencoder(ours, lambda x: (source.encode(x).mean, source.encode(x).logvar), source.decode)


def test_compvis_layout_written_here_is_the_one_diffusers_converts(tmp_path):
    # diffusers' own CompVis -> diffusers converter is an independent reading of the CompVis layout.
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    source = randomized(AutoencoderKL(AE), std=0.05)
    state = compvis_state_dict(source)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "kl.safetensors")
    ours = load_compvis_autoencoder(tmp_path / "kl.safetensors", AE).model
    theirs = diffusers_autoencoder()
    converted = convert_ldm_vae_checkpoint(state, {"down_block_types": ["x"] * 3, "up_block_types": ["x"] * 3})
    theirs.load_state_dict(converted, strict=True)
    assert_same_autoencoder(
        ours,
        lambda x: (theirs.encode(x).latent_dist.mean, theirs.encode(x).latent_dist.logvar),
        lambda z: theirs.decode(z).sample,
    )


def test_compvis_checkpoint_with_another_shape_is_refused_with_the_settings_it_suggests(tmp_path):
    state = compvis_state_dict(AutoencoderKL(AE))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "kl.safetensors")
    wrong = AutoencoderConfig(in_channels=3, resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)
    with pytest.raises(InteropError) as err:
        load_compvis_autoencoder(tmp_path / "kl.safetensors", wrong)
    message = str(err.value)
    # ch_mult (1, 2, 2) has no width change into the last level, so no 1x1 shortcut there.
    assert "unexpected keys: decoder.up.1.block.0.nin_shortcut.bias" in message
    assert "--set model.ch_mult=[1,2,4]" in message


def test_missing_key_is_refused_naming_it(tmp_path):
    state = compvis_state_dict(AutoencoderKL(AE))
    del state["decoder.up.0.block.1.conv2.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "kl.safetensors")
    output = cli_error(
        "--store", tmp_path / "store", "import", "autoencoder", "--from-compvis", tmp_path / "kl.safetensors", *AE_SET
    )
    assert "missing keys: decoder.up.0.block.1.conv2.bias" in output


def test_checkpoint_that_needs_pickle_is_refused_with_the_conversion_command(tmp_path):
    state = compvis_state_dict(AutoencoderKL(AE))
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "kl.ckpt")
    with pytest.raises(InteropError, match="pickle") as err:
        load_compvis_autoencoder(tmp_path / "kl.ckpt", AE)
    assert "save_file" in str(err.value) and "kl.safetensors" in str(err.value)


# --------------------------------------------------------------------------------------------
# Malformed sources
# --------------------------------------------------------------------------------------------


def test_truncated_safetensors_is_refused_with_a_clear_message(tmp_path):
    diffusers_autoencoder().save_pretrained(tmp_path / "vae")
    file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    output = cli_error("--store", tmp_path / "store", "import", "autoencoder", "--from-diffusers", tmp_path / "vae")
    assert "truncated or corrupt" in output and "diffusion_pytorch_model.safetensors" in output


def test_wrong_shaped_tensor_is_refused_naming_the_key_expected_and_got(tmp_path):
    diffusers_autoencoder().save_pretrained(tmp_path / "vae")
    file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(file)
    tensors["decoder.conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    save_file(tensors, file)
    with pytest.raises(InteropError, match=r"decoder\.conv_in\.weight: expected \(32, 4, 3, 3\), got \(32, 4, 1, 1\)"):
        load_diffusers_autoencoder(tmp_path / "vae")


def test_missing_source_files_are_refused(tmp_path):
    with pytest.raises(InteropError, match="does not exist"):
        load_original_dit(tmp_path / "DiT-XL-2-256x256.pt")
    (tmp_path / "vae").mkdir()
    with pytest.raises(InteropError, match="has no config.json"):
        load_diffusers_autoencoder(tmp_path / "vae")


# --------------------------------------------------------------------------------------------
# DiT: facebookresearch/DiT and diffusers
# --------------------------------------------------------------------------------------------


def test_diffusers_timestep_features_are_ours_with_freq_shift_one():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 10.0, 999.0])
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    torch.testing.assert_close(timestep_embedding(t, 256, freq_shift=1), theirs)
    assert not torch.allclose(timestep_embedding(t, 256), theirs)  # DiT's own spacing differs


def test_original_dit_config_is_read_from_the_shapes_with_paper_heads():
    config = DIT_PRESETS["DiT-XL/2"]
    with torch.device("meta"):  # shapes only: no 675M-parameter allocation
        state = dit_state_dict_to_original(DiT(config).state_dict(), config)
    inferred = dit_config_from_original(state)
    assert inferred == config


def test_original_dit_checkpoint_imported_through_the_cli_samples_with_the_pipeline(tmp_path):
    from pipeline import LatentDiffusionPipeline

    store = ArtifactStore(tmp_path / "store")
    autoencoder, _ = save_autoencoder_artifact(store, LatentStats([0.0] * 4, [5.0] * 4, "global"))
    ema, raw = randomized(DiT(DIT), seed=1), randomized(DiT(DIT), seed=2)
    torch.save({"ema": original_dit_state_dict(ema), "model": original_dit_state_dict(raw)}, tmp_path / "dit.pt")

    output = cli(
        "--store",
        store.root,
        "import",
        "diffusion",
        "--from-dit",
        tmp_path / "dit.pt",
        "--autoencoder",
        autoencoder.ref,
        "--num-heads",
        2,
    )
    assert "wrote diffusion@" in output
    pipe = LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=store)
    raw_pipe = LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=store, weights="raw")
    x, t, y = dit_inputs(DIT)
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x, t, y), ema(x, t, y), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(raw_pipe.model(x, t, y), raw(x, t, y), rtol=1e-5, atol=1e-6)
    assert pipe.model.config == DIT and pipe.stats.std == [5.0] * 4
    assert pipe.provenance.autoencoder == autoencoder.ref
    assert pipe.sample([1, 10 - 1], num_steps=2, sampler="ddim").shape == (2, 3, 16, 16)


def test_original_dit_of_unknown_size_needs_num_heads_and_extra_keys_are_refused(tmp_path):
    state = original_dit_state_dict(DiT(DIT))
    torch.save(state, tmp_path / "dit.pt")
    with pytest.raises(InteropError, match="--num-heads"):
        load_original_dit(tmp_path / "dit.pt")
    state["blocks.0.attn.q_norm.weight"] = torch.ones(8)
    torch.save(state, tmp_path / "dit.pt")
    with pytest.raises(InteropError, match=r"unexpected keys: blocks\.0\.attn\.q_norm\.weight"):
        load_original_dit(tmp_path / "dit.pt", {"num_heads": 2})


def test_original_dit_with_a_learned_position_embedding_is_refused(tmp_path):
    state = original_dit_state_dict(DiT(DIT))
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    save_file(state, tmp_path / "dit.safetensors")
    with pytest.raises(InteropError, match="pos_embed differs"):
        load_original_dit(tmp_path / "dit.safetensors", {"num_heads": 2})


def diffusers_dit(tie_embedders: bool = True) -> torch.nn.Module:
    """diffusers' DiT with random weights; as converted from a DiT checkpoint, every block has block 0's embedders."""
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    randomized(model, seed=3)
    if tie_embedders:
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


def test_diffusers_dit_imported_computes_exactly_diffusers_function(tmp_path):
    theirs = diffusers_dit()
    theirs.save_pretrained(tmp_path / "transformer")
    imported = load_diffusers_dit(tmp_path / "transformer")
    ours = imported.model
    assert ours.config.timestep_freq_shift == 1 and ours.config.mlp_norm_eps == 1e-5  # diffusers' norm_eps default
    x, t, y = dit_inputs(ours.config)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, t, y), theirs(x, timestep=t, class_labels=y, return_dict=False)[0], rtol=1e-5, atol=1e-5
        )


def test_diffusers_dit_with_distinct_per_block_embedders_is_refused(tmp_path):
    diffusers_dit(tie_embedders=False).save_pretrained(tmp_path / "transformer")
    with pytest.raises(InteropError, match=r"transformer_blocks\.1\.norm1\.emb\..* differs from block 0"):
        load_diffusers_dit(tmp_path / "transformer")


def test_diffusers_dit_import_through_the_cli_checks_the_latent_shape(tmp_path):
    diffusers_dit().save_pretrained(tmp_path / "transformer")
    store = ArtifactStore(tmp_path / "store")
    autoencoder, _ = save_autoencoder_artifact(store)
    output = cli_error(
        "--store",
        store.root,
        "import",
        "diffusion",
        "--from-diffusers",
        tmp_path / "transformer",
        "--autoencoder",
        autoencoder.ref,
        "--set",
        "model.input_size=8",
    )
    assert "wrong shape" not in output and "(4, 8, 8) latents" in output and "model.resolution=32" in output
    output = cli_error(
        "--store",
        store.root,
        "import",
        "diffusion",
        "--from-diffusers",
        tmp_path / "transformer",
        "--autoencoder",
        autoencoder.ref,
    )
    assert "--scaling-factor" in output  # the autoencoder was not imported, so no source statistics
    cli(
        "--store",
        store.root,
        "import",
        "diffusion",
        "--from-diffusers",
        tmp_path / "transformer",
        "--autoencoder",
        autoencoder.ref,
        "--scaling-factor",
        0.5,
    )
    assert store.load("diffusion@latest").manifest["latent_stats"]["std"] == [2.0] * 4


# --------------------------------------------------------------------------------------------
# Export to diffusers
# --------------------------------------------------------------------------------------------


def test_autoencoder_exported_to_diffusers_loads_there_and_computes_the_same_function(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    artifact, ours = save_autoencoder_artifact(store, LatentStats([0.1] * 4, [2.0] * 4, "global"))
    output = cli("--store", store.root, "export", "autoencoder", artifact.ref, "--to-diffusers", tmp_path / "vae")
    assert "the same function up to float rounding" in output

    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert theirs.config.scaling_factor == pytest.approx(0.5) and theirs.config.shift_factor == pytest.approx(0.1)
    assert_same_autoencoder(
        ours,
        lambda x: (theirs.encode(x).latent_dist.mean, theirs.encode(x).latent_dist.logvar),
        lambda z: theirs.decode(z).sample,
    )
    # An export never overwrites.
    assert "not empty" in cli_error(
        "--store", store.root, "export", "autoencoder", artifact.ref, "--to-diffusers", tmp_path / "vae"
    )


def test_dit_with_diffusers_timesteps_exports_exactly(tmp_path):
    ours = randomized(DiT(DiTConfig(**{**to_dict(DIT), "timestep_freq_shift": 1, "mlp_norm_eps": 1e-5})), seed=4)
    report = export_dit_to_diffusers(ours, tmp_path / "transformer")
    assert report.relative_difference < 1e-5 and report.notes == []
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    x, t, y = dit_inputs(DIT)
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(x, timestep=t, class_labels=y, return_dict=False)[0], ours(x, t, y), rtol=1e-5, atol=1e-5
        )
    # And back: the import of our export is our model.
    back = load_diffusers_dit(tmp_path / "transformer").model
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, y), ours(x, t, y))


def test_dit_with_original_timesteps_exports_with_its_measured_difference(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    autoencoder, _ = save_autoencoder_artifact(store)
    model = randomized(DiT(DIT), seed=5)
    weights = model.state_dict()
    store.save(
        "diffusion",
        tensors={"weights.safetensors": weights, "raw.safetensors": weights},
        config={"model": to_dict(DIT), "diffusion": {"learn_sigma": True}},
        metadata={"autoencoder": autoencoder.ref, "latent_stats": LatentStats([0.0] * 4, [1.0] * 4).to_dict()},
    )
    output = cli(
        "--store", store.root, "export", "diffusion", "diffusion@latest", "--to-diffusers", tmp_path / "transformer"
    )
    assert "NOT exact" in output and "10000^(-i/127)" in output
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and config["norm_eps"] == 1e-6
    report = export_dit_to_diffusers(model, tmp_path / "again")
    assert 1e-4 < report.relative_difference < 1.0
