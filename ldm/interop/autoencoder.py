"""Autoencoders: diffusers `AutoencoderKL` folders and CompVis / taming `AutoencoderKL` checkpoints, in and out."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.config import brief
from ldm.data.latents import LatentStats
from ldm.interop.checkpoints import (
    ExportReport,
    Imported,
    InteropError,
    PathLike,
    _diffusers_weights,
    _load_back_and_compare,
    _model_folder,
    _relative_difference,
    _tensors_only,
    _with_overrides,
    _write_diffusers_folder,
    check_count,
    check_layout,
    config_int,
    read_checkpoint,
    read_json,
)
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL

# diffusers' AutoencoderKL defaults, for the keys a config.json may leave out.
DIFFUSERS_AUTOENCODER_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


# --------------------------------------------------------------------------------------------
# Autoencoder: diffusers
# --------------------------------------------------------------------------------------------


def autoencoder_config_from_diffusers(config_json: dict) -> AutoencoderConfig:
    """Return the AutoencoderConfig of a diffusers `AutoencoderKL` config.json.

    A field ours cannot hold raises a ValueError naming it.
    """

    def get(key: str) -> Any:
        value = config_json.get(key)
        return DIFFUSERS_AUTOENCODER_DEFAULTS[key] if value is None else value

    class_name = config_json.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(
            f"_class_name is {brief(class_name)}: only diffusers' AutoencoderKL maps onto our KL autoencoder"
        )
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if not isinstance(get(key), list) or not get(key):
            raise ValueError(f"{key} must be a non-empty list, got {brief(get(key))}")
    widths = [config_int(w, f"block_out_channels[{i}]") for i, w in enumerate(get("block_out_channels"))]
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    if len(down) != len(widths) or len(up) != len(widths):
        raise ValueError(
            f"down_block_types ({len(down)}), up_block_types ({len(up)}) and block_out_channels ({len(widths)}) "
            f"must have one entry per level"
        )
    if any(t != "DownEncoderBlock2D" for t in down):
        raise ValueError(
            f"down_block_types {brief(down)}: our encoder levels are DownEncoderBlock2D only "
            "(no attention inside levels)"
        )
    if any(t != "UpDecoderBlock2D" for t in up):
        raise ValueError(
            f"up_block_types {brief(up)}: our decoder levels are UpDecoderBlock2D only (no attention inside levels)"
        )
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(
            f"block_out_channels {brief(widths)} are not multiples of the first entry; ours are ch * ch_mult"
        )
    if get("act_fn") != "silu":
        raise ValueError(f"act_fn is {brief(get('act_fn'))}; our autoencoder uses silu")
    for key in ("use_quant_conv", "use_post_quant_conv"):
        if not get(key):
            raise ValueError(f"{key} is false; our autoencoder always has the 1x1 quant_conv and post_quant_conv")
    groups = config_int(get("norm_num_groups"), "norm_num_groups")
    if any(w % groups for w in widths):
        raise ValueError(f"norm_num_groups {groups} does not divide every width of block_out_channels {brief(widths)}")
    size = get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"sample_size {brief(size)} is not square; our configs have one resolution")
        size = size[0]
    size = config_int(size, "sample_size")
    in_channels, out_channels = (config_int(get(key), key) for key in ("in_channels", "out_channels"))
    try:
        return AutoencoderConfig(
            in_channels=in_channels,
            out_channels=None if out_channels == in_channels else out_channels,
            resolution=size,
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=config_int(get("layers_per_block"), "layers_per_block"),
            attn_at_lowest=bool(get("mid_block_add_attention")),
            latent_channels=config_int(get("latent_channels"), "latent_channels"),
            norm_groups=groups,
        )
    except ValueError as err:
        raise ValueError(
            f"the diffusers config does not fit AutoencoderConfig (sample_size / block_out_channels): {err}"
        ) from err


def latent_stats_from_diffusers(config_json: dict, latent_channels: int) -> tuple[LatentStats, list[str]]:
    """Return the latent statistics a diffusers AutoencoderKL config prescribes, and notes on where they came from.

    Global: mean = shift_factor (or 0), std = 1 / scaling_factor. Per channel, when latents_mean and
    latents_std are given (SDXL-style pipelines): mean = latents_mean, std = latents_std / scaling_factor.
    """
    notes = []
    scaling = config_json.get("scaling_factor")
    if scaling is None:
        scaling = DIFFUSERS_AUTOENCODER_DEFAULTS["scaling_factor"]
        notes.append(f"config.json has no scaling_factor: used diffusers' default {scaling}")
    scaling = float(scaling)
    if not scaling > 0:
        raise InteropError(f"scaling_factor must be positive, got {scaling}")
    latents_mean, latents_std = config_json.get("latents_mean"), config_json.get("latents_std")
    if latents_mean is not None and latents_std is not None:
        if len(latents_mean) != latent_channels or len(latents_std) != latent_channels:
            raise InteropError(
                f"latents_mean / latents_std have {len(latents_mean)} / {len(latents_std)} entries "
                f"for {latent_channels} latent channels"
            )
        notes.append("latent statistics per channel from latents_mean, latents_std and scaling_factor")
        return LatentStats(
            [float(m) for m in latents_mean], [float(s) / scaling for s in latents_std], "channel"
        ), notes
    shift = float(config_json.get("shift_factor") or 0.0)
    notes.append(
        f"latent statistics from scaling_factor {scaling:g}" + (f" and shift_factor {shift:g}" if shift else "")
    )
    return LatentStats([shift] * latent_channels, [1.0 / scaling] * latent_channels, "global"), notes


def diffusers_scaling_from_stats(stats: LatentStats | None) -> tuple[dict[str, Any], list[str]]:
    """diffusers' scaling_factor / shift_factor (and latents_mean / latents_std for per-channel stats), with notes."""
    if stats is None:
        note = (
            "no latent statistics known for this autoencoder: wrote scaling_factor 1.0 (latents are used "
            "unscaled); pass --latents REF to take them from a latent cache"
        )
        return {"scaling_factor": 1.0, "shift_factor": None}, [note]
    means, stds = torch.tensor(stats.mean, dtype=torch.float64), torch.tensor(stats.std, dtype=torch.float64)
    if stats.mode == "global" or (torch.all(means == means[0]) and torch.all(stds == stds[0])):
        shift = float(means[0])
        return {"scaling_factor": 1.0 / float(stds[0]), "shift_factor": shift or None}, []
    # One value for all channels: the mean and std of z pooled over channels, i.e. what stats=global
    # measures on the same cache (channels hold equally many values).
    pooled_mean = means.mean()
    pooled_std = float((stds.square() + (means - pooled_mean).square()).mean().sqrt())
    scaling = 1.0 / pooled_std
    settings = {
        "scaling_factor": scaling,
        "shift_factor": float(pooled_mean) or None,
        # SDXL-style pipelines normalise per channel as (z - latents_mean) * scaling_factor / latents_std.
        "latents_mean": [float(m) for m in means],
        "latents_std": [float(s) * scaling for s in stds],
    }
    note = (
        f"per-channel latent statistics: scaling_factor {scaling:.6g} and shift_factor {float(pooled_mean):.6g} are "
        f"their pooled (global) equivalent, which pipelines that read only scaling_factor use; the exact per-channel "
        f"values are in latents_mean / latents_std"
    )
    return settings, [note]


_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _modern_attention_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the attention keys of old diffusers checkpoints (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0."""
    renamed = {}
    for key, tensor in state_dict.items():
        if ".attentions." in key:
            for old, new in _LEGACY_ATTENTION.items():
                key = key.replace(old, new)
        renamed[key] = tensor
    return renamed


def state_dict_from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers `AutoencoderKL` state dict with our `AutoencoderKL`'s key names (same tensors)."""
    resnet_ids = {k.split(".")[4] for k in state_dict if k.startswith("encoder.down_blocks.0.resnets.")}
    num_res_blocks = len(resnet_ids)
    second_mid_resnet = 2 if any(".mid_block.attentions." in k for k in state_dict) else 1
    rules = [
        (r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.\2.\3.\4."),
        # A level's down/upsampler comes right after its resnets in our nn.Sequential.
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", rf"encoder.down.\1.{num_res_blocks}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", rf"decoder.up.\1.{num_res_blocks + 1}."),
        (r"\.mid_block\.resnets\.0\.", ".mid.0."),
        (r"\.mid_block\.attentions\.0\.", ".mid.1."),
        (r"\.mid_block\.resnets\.1\.", f".mid.{second_mid_resnet}."),
        (r"\.conv_norm_out\.", ".norm_out."),
        (r"\.conv_shortcut\.", ".shortcut."),
        (r"\.group_norm\.", ".norm."),
        (r"\.to_out\.0\.", ".proj."),
    ]
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    # diffusers keeps q, k and v apart; ours is one projection with output rows [q; k; v].
    for prefix in [k.removesuffix(".to_q.weight") for k in renamed if k.endswith(".to_q.weight")]:
        for param in ("weight", "bias"):
            parts = [renamed.pop(f"{prefix}.to_{name}.{param}") for name in ("q", "k", "v")]
            renamed[f"{prefix}.qkv.{param}"] = torch.cat(parts)
    return renamed


def autoencoder_state_dict_to_diffusers(state_dict: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """Our `AutoencoderKL` state dict under diffusers' key names (the inverse of `state_dict_from_diffusers`)."""
    r = config.num_res_blocks
    mid = {"0": "resnets.0", "1": "attentions.0" if config.attn_at_lowest else "resnets.1", "2": "resnets.1"}
    out = {}
    for key, tensor in state_dict.items():
        if m := re.match(r"^encoder\.down\.(\d+)\.(\d+)\.(.*)$", key):
            level, index, rest = m.groups()
            slot = f"resnets.{index}" if int(index) < r else "downsamplers.0"
            key = f"encoder.down_blocks.{level}.{slot}.{rest}"
        elif m := re.match(r"^decoder\.up\.(\d+)\.(\d+)\.(.*)$", key):
            level, index, rest = m.groups()
            slot = f"resnets.{index}" if int(index) <= r else "upsamplers.0"
            key = f"decoder.up_blocks.{level}.{slot}.{rest}"
        elif m := re.match(r"^(encoder|decoder)\.mid\.(\d)\.(.*)$", key):
            part, index, rest = m.groups()
            key = f"{part}.mid_block.{mid[index]}.{rest}"
        key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
        key = key.replace(".shortcut.", ".conv_shortcut.")
        if ".attentions." in key:
            key = key.replace(".norm.", ".group_norm.").replace(".proj.", ".to_out.0.")
            if ".qkv." in key:
                for name, part in zip(("q", "k", "v"), tensor.chunk(3)):  # rows [q; k; v]
                    out[key.replace(".qkv.", f".to_{name}.")] = part
                continue
        out[key] = tensor
    return out


def load_diffusers_autoencoder(path: PathLike, overrides: dict[str, Any] | None = None) -> Imported:
    """Return our autoencoder with the weights of a diffusers AutoencoderKL folder (or a pipeline folder's vae/).

    `overrides`: AutoencoderConfig fields replacing those derived from config.json (e.g. resolution).
    """
    folder = _model_folder(path, "vae")
    config_path = folder / "config.json"
    config_json = read_json(config_path)
    try:
        config = autoencoder_config_from_diffusers(config_json)
    except (TypeError, ValueError) as err:
        raise InteropError(f"{config_path}: {err}") from err
    config = _with_overrides(config, overrides, "model")
    where = f"{config_path} (with the model settings given)" if overrides else str(config_path)
    weights = _diffusers_weights(folder)
    source = _modern_attention_names(_tensors_only(read_checkpoint(weights), weights, "diffusers AutoencoderKL"))
    check_count(source, "encoder.down_blocks.", len(config.ch_mult), "block_out_channels (levels)", where)
    check_count(source, "encoder.down_blocks.0.resnets.", config.num_res_blocks, "layers_per_block", where)
    with torch.device("meta"):  # shapes first: the real model is built once they fit
        expected = autoencoder_state_dict_to_diffusers(AutoencoderKL(config).state_dict(), config)
    check_layout(source, expected, f"the weights in {weights} (for the model of {where})")
    model = AutoencoderKL(config)
    model.load_state_dict(state_dict_from_diffusers(source), strict=True)
    stats, notes = latent_stats_from_diffusers(config_json, config.latent_channels)
    return Imported(model.eval(), config, stats, notes=notes, files=[folder / "config.json", weights])


def export_autoencoder_to_diffusers(
    model: AutoencoderKL, out_dir: PathLike, latent_stats: LatentStats | None = None, verify: bool = True
) -> ExportReport:
    """Write our autoencoder as a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).

    With `verify` and diffusers installed, the folder is loaded back with `from_pretrained` and the
    report gives the relative difference of encoder moments and decoded images on a random batch.
    """
    config = model.config
    widths = [config.ch * m for m in config.ch_mult]
    if any(w % config.norm_groups for w in widths):
        raise InteropError(
            f"norm_groups {config.norm_groups} does not divide every width {widths}: ours then uses fewer groups in "
            f"those layers, diffusers' AutoencoderKL cannot"
        )
    scaling, notes = diffusers_scaling_from_stats(latent_stats)
    levels = len(widths)
    config_json = {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.image_channels_out,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": config.resolution,
        **scaling,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": config.attn_at_lowest,
    }
    path = _write_diffusers_folder(
        out_dir, config_json, autoencoder_state_dict_to_diffusers(model.state_dict(), config)
    )
    return ExportReport(path, _load_back_and_compare(verify, notes, lambda: _compare_autoencoder(model, path)), notes)


@torch.no_grad()
def _compare_autoencoder(model: AutoencoderKL, path: Path) -> float:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    theirs = DiffusersAutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False).float().eval()
    ours = model.float().eval()
    side = 2 * ours.config.downsample_factor
    x = torch.rand(1, ours.config.in_channels, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    posterior, their_posterior = ours.encode(x), theirs.encode(x).latent_dist
    decoded, their_decoded = ours.decode(posterior.mean), theirs.decode(posterior.mean).sample
    return max(
        _relative_difference([posterior.mean], [their_posterior.mean]),
        _relative_difference([posterior.logvar], [their_posterior.logvar]),
        _relative_difference([decoded], [their_decoded]),
    )


# --------------------------------------------------------------------------------------------
# Autoencoder: CompVis latent-diffusion / taming-transformers
# --------------------------------------------------------------------------------------------


def _conv1x1(weight: Tensor) -> Tensor:
    return weight[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)


def autoencoder_state_dict_to_compvis(state_dict: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """Our `AutoencoderKL` state dict under the CompVis / taming key names and shapes."""
    r, levels = config.num_res_blocks, len(config.ch_mult)
    mid = {"0": "block_1", "1": "attn_1" if config.attn_at_lowest else "block_2", "2": "block_2"}
    out = {}
    for key, tensor in state_dict.items():
        if m := re.match(r"^encoder\.down\.(\d+)\.(\d+)\.(.*)$", key):
            level, index, rest = m.groups()
            slot = f"block.{index}" if int(index) < r else "downsample"
            key = f"encoder.down.{level}.{slot}.{rest}"
        elif m := re.match(r"^decoder\.up\.(\d+)\.(\d+)\.(.*)$", key):
            position, index, rest = m.groups()
            level = levels - 1 - int(position)  # ours run lowest resolution first; CompVis indexes by level
            slot = f"block.{index}" if int(index) <= r else "upsample"
            key = f"decoder.up.{level}.{slot}.{rest}"
        elif m := re.match(r"^(encoder|decoder)\.mid\.(\d)\.(.*)$", key):
            part, index, rest = m.groups()
            key = f"{part}.mid.{mid[index]}.{rest}"
        key = key.replace(".shortcut.", ".nin_shortcut.")
        if ".attn_1." in key:
            if ".qkv." in key:
                for name, part in zip(("q", "k", "v"), tensor.chunk(3)):
                    out[key.replace(".qkv.", f".{name}.")] = _conv1x1(part) if part.ndim == 2 else part
                continue
            if ".proj." in key:
                key = key.replace(".proj.", ".proj_out.")
                tensor = _conv1x1(tensor) if tensor.ndim == 2 else tensor
        out[key] = tensor
    return out


def state_dict_from_compvis(state_dict: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """A CompVis-layout autoencoder state dict (keys checked beforehand) under our key names and shapes."""
    r, levels = config.num_res_blocks, len(config.ch_mult)
    mid = {"block_1": "0", "attn_1": "1", "block_2": "2" if config.attn_at_lowest else "1"}
    renamed = {}
    for key, tensor in state_dict.items():
        if m := re.match(r"^encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.*)$", key):
            level, _, index, rest = m.groups()
            key = f"encoder.down.{level}.{index if index is not None else r}.{rest}"
        elif m := re.match(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)$", key):
            level, _, index, rest = m.groups()
            key = f"decoder.up.{levels - 1 - int(level)}.{index if index is not None else r + 1}.{rest}"
        elif m := re.match(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.*)$", key):
            part, name, rest = m.groups()
            key = f"{part}.mid.{mid[name]}.{rest}"
        key = key.replace(".nin_shortcut.", ".shortcut.")
        if ".mid.1." in key and config.attn_at_lowest:
            key = key.replace(".proj_out.", ".proj.")
            if key.endswith(".weight") and tensor.ndim == 4:
                tensor = tensor.flatten(1)  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
        renamed[key] = tensor
    # CompVis keeps q, k and v as three 1x1 convs; ours is one projection with output rows [q; k; v].
    for prefix in [k.removesuffix(".q.weight") for k in renamed if k.endswith(".q.weight")]:
        for param in ("weight", "bias"):
            renamed[f"{prefix}.qkv.{param}"] = torch.cat([renamed.pop(f"{prefix}.{name}.{param}") for name in "qkv"])
    return renamed


def guess_compvis_config(state_dict: dict[str, Tensor]) -> dict[str, Any] | None:
    """The AutoencoderConfig fields a CompVis state dict's shapes suggest (for error hints), or None."""
    try:
        ch = state_dict["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down."))
        blocks = {int(k.split(".")[4]) for k in state_dict if k.startswith("encoder.down.0.block.")}
        ch_in = state_dict["encoder.conv_in.weight"].shape[1]
        return {
            "in_channels": ch_in,
            "ch": ch,
            "ch_mult": [state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)],
            "num_res_blocks": len(blocks),
            "latent_channels": state_dict["post_quant_conv.weight"].shape[0],
            "attn_at_lowest": "encoder.mid.attn_1.q.weight" in state_dict,
            **({"out_channels": out} if (out := state_dict["decoder.conv_out.weight"].shape[0]) != ch_in else {}),
        }
    except (KeyError, ValueError, IndexError):
        return None


COMPVIS_DEFAULT = AutoencoderConfig(
    in_channels=3, resolution=256, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4, norm_groups=32
)  # LDM's kl-f8, the Stable Diffusion v1 VAE


def load_compvis_autoencoder(path: PathLike, config: AutoencoderConfig = COMPVIS_DEFAULT) -> Imported:
    """Return our autoencoder with the weights of a CompVis / taming `AutoencoderKL` checkpoint.

    .ckpt / .pt (a Lightning checkpoint's `state_dict`, or a plain one) or .safetensors; `loss.*`
    (LPIPS, discriminator) is dropped, and a full LDM checkpoint's `first_stage_model.*` is used.
    The checkpoint holds no config: `config` gives the shape (default LDM's kl-f8). Latent statistics
    are not in the file either (LDM configs set scale_factor elsewhere, 0.18215 for SD v1).
    """
    path = Path(path)
    obj = read_checkpoint(path, nested=("state_dict",))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    source = _tensors_only(obj, path, "CompVis AutoencoderKL")
    notes = []
    if any(k.startswith("first_stage_model.") for k in source):
        source = {
            k.removeprefix("first_stage_model."): v for k, v in source.items() if k.startswith("first_stage_model.")
        }
        notes.append("used the first_stage_model.* weights of a full latent-diffusion checkpoint")
    dropped = [k for k in source if k.startswith("loss.")]
    source = {k: v for k, v in source.items() if not k.startswith("loss.")}
    if dropped:
        notes.append(f"dropped {len(dropped)} loss.* tensors (LPIPS / discriminator)")
    check_count(source, "encoder.down.", len(config.ch_mult), "model.ch_mult (levels)", str(path))
    check_count(source, "encoder.down.0.block.", config.num_res_blocks, "model.num_res_blocks", str(path))
    with torch.device("meta"):  # shapes first: the real model is built once they fit
        expected = autoencoder_state_dict_to_compvis(AutoencoderKL(config).state_dict(), config)
    hint = ""
    if any(re.match(r"^(encoder\.down|decoder\.up)\.\d+\.attn\.", k) for k in source):
        hint = (
            "This autoencoder has attention inside its levels (attn_resolutions, as LDM's kl-f16 / kl-f32), "
            "which our AutoencoderKL does not have."
        )
    elif (guess := guess_compvis_config(source)) is not None:
        settings = " ".join(f"--set model.{k}={json.dumps(v, separators=(',', ':'))}" for k, v in guess.items())
        hint = f"The checkpoint's shapes suggest: {settings}"
    shape = ", ".join(
        f"{k}={getattr(config, k)}" for k in ("in_channels", "ch", "ch_mult", "num_res_blocks", "latent_channels")
    )
    check_layout(source, expected, f"the weights in {path} (read as {shape})", hint)
    model = AutoencoderKL(config)
    model.load_state_dict(state_dict_from_compvis(source, config), strict=True)
    return Imported(model.eval(), config, None, notes=notes, files=[path])
