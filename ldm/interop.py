"""Pretrained weights in and out: diffusers and CompVis autoencoders, original and diffusers DiTs.

Imports build our module and load the source's tensors with `strict=True`, after checking the
source's keys and shapes under the source's own names (so an error names the key a user can find
in their file). Exports write a folder that diffusers' `from_pretrained` loads, and measure that
the loaded model computes our function. Nothing here unpickles: .ckpt/.pt/.bin files are read
with `torch.load(weights_only=True)`, and a file that needs more is refused with the command that
converts it to safetensors.

Key layouts, theirs -> ours:

    diffusers AutoencoderKL  encoder.down_blocks.i.resnets.j / .downsamplers.0, decoder.up_blocks.i (lowest
                             resolution first, as ours), mid_block.resnets / .attentions, to_q/to_k/to_v
                             -> `state_dict_from_diffusers` (ldm/models/autoencoder.py) and its inverse here
    CompVis AutoencoderKL    encoder.down.i.block.j / .downsample, mid.block_1 / attn_1 / block_2, attention
                             q, k, v, proj_out as 1x1 convs, nin_shortcut; decoder.up.i is level i counted
                             from the HIGHEST resolution (up.0 runs last), i.e. our decoder.up[L-1-i]
    DiT (facebookresearch)   our names, plus a fixed `pos_embed` and `adaLN_modulation.1` (a Sequential(SiLU, Linear))
    diffusers DiT            pos_embed.proj, transformer_blocks.i.{norm1.linear, attn1.to_q/k/v/out, ff.net},
                             proj_out_1/2, and one timestep/class embedder per block (all equal)

Latent statistics: diffusers normalises latents as (z - shift_factor) * scaling_factor, or per channel
as (z - latents_mean) * scaling_factor / latents_std; our `LatentStats` is (z - mean) / std.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldm.config import from_dict, to_dict
from ldm.data.latents import LatentStats
from ldm.models.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    state_dict_from_diffusers,
)
from ldm.models.dit import (
    DIT_PRESETS,
    TIMESTEP_FREQUENCY_DIM,
    DiT,
    DiTConfig,
    sincos_pos_embed_2d,
)

PathLike = str | os.PathLike

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

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

# diffusers' DiTTransformer2DModel defaults, likewise.
DIFFUSERS_DIT_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}


class InteropError(ValueError):
    """A source that cannot be imported as it is: missing, corrupt, or a layout our modules cannot hold."""


@dataclass
class Imported:
    """A model built from pretrained weights, with what the source says about its use."""

    model: nn.Module  # in eval mode, float32
    config: AutoencoderConfig | DiTConfig
    latent_stats: LatentStats | None = None  # autoencoders: the normalisation the source prescribes
    raw_state_dict: dict[str, Tensor] | None = None  # DiT: the non-EMA weights, when the source has both
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # the source files read


@dataclass
class ExportReport:
    """Where an export went and how closely diffusers' model reproduces ours."""

    path: Path
    # max |ours - diffusers| / max |ours| on a fixed random batch; None when diffusers is not installed.
    relative_difference: float | None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading files, checking layouts
# --------------------------------------------------------------------------------------------


def _few(keys, n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _conversion_hint(path: Path, nested: tuple[str, ...]) -> str:
    pick = "sd = torch.load(src, map_location='cpu', weights_only=False); "
    if nested:
        pick += f"sd = next((sd[k] for k in {nested!r} if k in sd), sd); "
    return (
        "If you trust the file, convert it once to safetensors and import that file instead:\n"
        f"  python -c \"import torch; from safetensors.torch import save_file; src = '{path}'; {pick}"
        "save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
        f"'{path.with_suffix('.safetensors')}')\""
    )


def read_checkpoint(path: PathLike, nested: tuple[str, ...] = ()) -> Any:
    """Return the object stored in a .safetensors file (a dict of tensors) or a torch file read without pickle code.

    `nested` names the keys a wrapped state dict may sit under (used in the conversion hint only).
    """
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError (an Exception) for bad files
            raise InteropError(
                f"{path} is not a readable safetensors file ({err}); it is probably truncated or corrupt: "
                f"download or copy it again"
            ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "Weights only load failed" in str(err) or type(err).__name__ == "UnpicklingError":
            raise InteropError(
                f"{path} holds Python objects besides tensors (a Lightning checkpoint's callbacks, training "
                f"arguments, ...). Loading those would run pickle code, which this importer never does.\n"
                + _conversion_hint(path, nested)
            ) from err
        raise InteropError(
            f"{path} cannot be read as a torch checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"it is probably truncated or corrupt: download or copy it again"
        ) from err


def _tensors_only(obj: Any, path: Path, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise InteropError(f"{path} holds no {what} state dict (found {type(obj).__name__})")
    others = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if others:
        raise InteropError(f"{path}: entries {_few(others)} are not tensors; expected a {what} state dict")
    return obj


def read_json(path: PathLike) -> dict:
    """Return the JSON object in `path`, or raise InteropError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InteropError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise InteropError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def check_layout(source: dict[str, Tensor], expected: dict[str, Tensor], what: str, hint: str = "") -> None:
    """Raise InteropError unless `source` has exactly the keys of `expected`, with the same shapes."""
    hint = f"\n{hint}" if hint else ""
    missing = set(expected) - set(source)
    unexpected = set(source) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise InteropError(f"{what} do not fit the model: " + "; ".join(parts) + hint)
    wrong = [
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(source[key].shape)}"
        for key in sorted(expected)
        if tuple(source[key].shape) != tuple(expected[key].shape)
    ]
    if wrong:
        shown = "; ".join(wrong[:5]) + (f"; ... ({len(wrong)} in all)" if len(wrong) > 5 else "")
        raise InteropError(f"{what} have tensors of the wrong shape: {shown}{hint}")
    bad = [key for key, tensor in source.items() if not tensor.is_floating_point()]
    if bad:
        raise InteropError(f"{what}: tensors {_few(bad)} are not floating point")


def _model_folder(path: PathLike, subfolder: str) -> Path:
    """A diffusers model folder (config.json + weights), also given as a pipeline folder holding `subfolder`."""
    path = Path(path)
    if not path.is_dir():
        raise InteropError(f"{path} is not a folder; give a diffusers model folder (config.json + weights)")
    if (path / "config.json").is_file():
        return path
    if (path / subfolder / "config.json").is_file():
        return path / subfolder
    raise InteropError(
        f"{path} has no config.json (nor {subfolder}/config.json); it holds: {_few(p.name for p in path.iterdir()) or 'nothing'}"
    )


def _diffusers_weights(folder: Path) -> Path:
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise InteropError(
        f"{folder} has no {' or '.join(DIFFUSERS_WEIGHTS)}; it holds: {_few(p.name for p in folder.iterdir())}"
    )


def _with_overrides(config, overrides: dict[str, Any] | None, section: str):
    """`config` with fields replaced by `overrides` (typed and validated as YAML values would be)."""
    if not overrides:
        return config
    return from_dict(type(config), {**to_dict(config), **overrides}, section)


# --------------------------------------------------------------------------------------------
# Autoencoder: diffusers
# --------------------------------------------------------------------------------------------


def autoencoder_config_from_diffusers(config_json: dict) -> AutoencoderConfig:
    """Return the AutoencoderConfig of a diffusers `AutoencoderKL` config.json; ValueError naming a field ours cannot hold."""

    def get(key: str) -> Any:
        value = config_json.get(key)
        return DIFFUSERS_AUTOENCODER_DEFAULTS[key] if value is None else value

    class_name = config_json.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"_class_name is {class_name!r}: only diffusers' AutoencoderKL maps onto our KL autoencoder")
    widths = [int(w) for w in get("block_out_channels")]
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    if len(down) != len(widths) or len(up) != len(widths):
        raise ValueError(
            f"down_block_types ({len(down)}), up_block_types ({len(up)}) and block_out_channels ({len(widths)}) "
            f"must have one entry per level"
        )
    if any(t != "DownEncoderBlock2D" for t in down):
        raise ValueError(f"down_block_types {down}: our encoder levels are DownEncoderBlock2D only (no attention inside levels)")
    if any(t != "UpDecoderBlock2D" for t in up):
        raise ValueError(f"up_block_types {up}: our decoder levels are UpDecoderBlock2D only (no attention inside levels)")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first entry; ours are ch * ch_mult")
    if get("act_fn") != "silu":
        raise ValueError(f"act_fn is {get('act_fn')!r}; our autoencoder uses silu")
    for key in ("use_quant_conv", "use_post_quant_conv"):
        if not get(key):
            raise ValueError(f"{key} is false; our autoencoder always has the 1x1 quant_conv and post_quant_conv")
    groups = int(get("norm_num_groups"))
    if any(w % groups for w in widths):
        raise ValueError(f"norm_num_groups {groups} does not divide every width of block_out_channels {widths}")
    size = get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"sample_size {size} is not square; our configs have one resolution")
        size = size[0]
    in_channels, out_channels = int(get("in_channels")), int(get("out_channels"))
    try:
        return AutoencoderConfig(
            in_channels=in_channels,
            out_channels=None if out_channels == in_channels else out_channels,
            resolution=int(size),
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=int(get("layers_per_block")),
            attn_at_lowest=bool(get("mid_block_add_attention")),
            latent_channels=int(get("latent_channels")),
            norm_groups=groups,
        )
    except ValueError as err:
        raise ValueError(f"the diffusers config does not fit AutoencoderConfig (sample_size / block_out_channels): {err}") from err


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
        return LatentStats([float(m) for m in latents_mean], [float(s) / scaling for s in latents_std], "channel"), notes
    shift = float(config_json.get("shift_factor") or 0.0)
    notes.append(f"latent statistics from scaling_factor {scaling:g}" + (f" and shift_factor {shift:g}" if shift else ""))
    return LatentStats([shift] * latent_channels, [1.0 / scaling] * latent_channels, "global"), notes


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
    config_json = read_json(folder / "config.json")
    try:
        config = autoencoder_config_from_diffusers(config_json)
    except ValueError as err:
        raise InteropError(f"{folder / 'config.json'}: {err}") from err
    config = _with_overrides(config, overrides, "model")
    weights = _diffusers_weights(folder)
    source = _modern_attention_names(_tensors_only(read_checkpoint(weights), weights, "diffusers AutoencoderKL"))
    model = AutoencoderKL(config)
    expected = autoencoder_state_dict_to_diffusers(model.state_dict(), config)
    check_layout(source, expected, f"the weights in {weights}", f"(model config: {config})")
    model.load_state_dict(state_dict_from_diffusers(source), strict=True)
    stats, notes = latent_stats_from_diffusers(config_json, config.latent_channels)
    return Imported(model.eval(), config, stats, notes=notes, files=[folder / "config.json", weights])


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
        source = {k.removeprefix("first_stage_model."): v for k, v in source.items() if k.startswith("first_stage_model.")}
        notes.append("used the first_stage_model.* weights of a full latent-diffusion checkpoint")
    dropped = [k for k in source if k.startswith("loss.")]
    source = {k: v for k, v in source.items() if not k.startswith("loss.")}
    if dropped:
        notes.append(f"dropped {len(dropped)} loss.* tensors (LPIPS / discriminator)")
    model = AutoencoderKL(config)
    expected = autoencoder_state_dict_to_compvis(model.state_dict(), config)
    hint = ""
    if any(re.match(r"^(encoder\.down|decoder\.up)\.\d+\.attn\.", k) for k in source):
        hint = ("This autoencoder has attention inside its levels (attn_resolutions, as LDM's kl-f16 / kl-f32), "
                "which our AutoencoderKL does not have.")
    elif (guess := guess_compvis_config(source)) is not None:
        settings = " ".join(f"--set model.{k}={json.dumps(v, separators=(',', ':'))}" for k, v in guess.items())
        hint = f"The checkpoint's shapes suggest: {settings}"
    shape = ", ".join(f"{k}={getattr(config, k)}" for k in ("in_channels", "ch", "ch_mult", "num_res_blocks", "latent_channels"))
    check_layout(source, expected, f"the weights in {path} (read as {shape})", hint)
    model.load_state_dict(state_dict_from_compvis(source, config), strict=True)
    return Imported(model.eval(), config, None, notes=notes, files=[path])


# --------------------------------------------------------------------------------------------
# DiT: facebookresearch/DiT checkpoints
# --------------------------------------------------------------------------------------------


def dit_state_dict_to_original(state_dict: dict[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """Our DiT state dict under the facebookresearch/DiT names, with its fixed `pos_embed` (1, T, D) added."""
    out = {re.sub(r"\.adaLN_modulation\.", ".adaLN_modulation.1.", k): v for k, v in state_dict.items()}
    out["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, config.grid_size).unsqueeze(0)
    return out


def dit_config_from_original(state_dict: dict[str, Tensor], num_heads: int | None = None) -> DiTConfig:
    """Return the DiTConfig that an original DiT state dict's shapes imply; num_heads given or from the paper presets."""
    try:
        embed = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        final = state_dict["final_layer.linear.weight"]  # (p*p*C_out, D)
        table = state_dict["y_embedder.embedding_table.weight"]  # (classes + 1, D)
        fc1 = state_dict["blocks.0.mlp.fc1.weight"]  # (D * mlp_ratio, D)
        t_in = state_dict["t_embedder.mlp.0.weight"]  # (D, 256)
    except KeyError as err:
        raise InteropError(f"not a DiT state dict: key {err.args[0]} is missing") from err
    hidden, in_channels, patch = embed.shape[0], embed.shape[1], embed.shape[2]
    depth = len({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
    out_channels = final.shape[0] // patch**2
    if out_channels not in (in_channels, 2 * in_channels):
        raise InteropError(f"final_layer.linear gives {out_channels} output channels for {in_channels} input channels; "
                           f"expected {in_channels} (mean only) or {2 * in_channels} (learn_sigma)")
    if t_in.shape[1] != TIMESTEP_FREQUENCY_DIM:
        raise InteropError(f"t_embedder.mlp.0.weight takes {t_in.shape[1]} frequency features; ours has {TIMESTEP_FREQUENCY_DIM}")
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is None:
        raise InteropError("pos_embed is missing: it gives the latent size the DiT was trained at")
    tokens = pos_embed.shape[-2]
    grid = math.isqrt(tokens)
    if pos_embed.ndim != 3 or grid * grid != tokens or pos_embed.shape[-1] != hidden:
        raise InteropError(f"pos_embed has shape {tuple(pos_embed.shape)}; expected (1, T, {hidden}) with T a square")
    if num_heads is None:
        known = {(c.depth, c.hidden_size): c.num_heads for c in DIT_PRESETS.values()}
        if (depth, hidden) not in known:
            raise InteropError(
                f"a DiT of depth {depth} and width {hidden} is none of the known presets, and the number of "
                f"attention heads cannot be read from the weights: give it (--num-heads N / num_heads=N)"
            )
        num_heads = known[(depth, hidden)]
    try:
        return DiTConfig(
            input_size=grid * patch,
            patch_size=patch,
            in_channels=in_channels,
            hidden_size=hidden,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=fc1.shape[0] / hidden,
            num_classes=table.shape[0] - 1,  # the last row is the null class of classifier-free guidance
            learn_sigma=out_channels == 2 * in_channels,
        )
    except ValueError as err:
        raise InteropError(f"the checkpoint's shapes give an invalid DiT: {err}") from err


def _check_pos_embed(pos_embed: Tensor, config: DiTConfig, where: str) -> None:
    """Refuse a position embedding other than the fixed 2D sin-cos one that our DiT computes."""
    expected = sincos_pos_embed_2d(config.hidden_size, config.grid_size).unsqueeze(0)
    difference = (pos_embed.float() - expected).abs().max().item()
    if difference > 2e-3:  # fp16 storage of values in [-1, 1] is within 5e-4
        raise InteropError(
            f"{where}: pos_embed differs from the fixed 2D sin-cos embedding by up to {difference:.3g}; a DiT with "
            f"another (e.g. learned or interpolated) position embedding cannot be imported"
        )


def _dit_state(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """The (sampling weights, raw weights or None) inside a DiT checkpoint: plain, or under "ema" / "model"."""
    if isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("ema", "model")):
        ema, raw = obj.get("ema"), obj.get("model")
        chosen = _tensors_only(ema if isinstance(ema, dict) else raw, path, "DiT")
        other = _tensors_only(raw, path, "DiT") if isinstance(ema, dict) and isinstance(raw, dict) else None
        return chosen, other
    return _tensors_only(obj, path, "DiT"), None


def load_original_dit(path: PathLike, overrides: dict[str, Any] | None = None) -> Imported:
    """Return our DiT with the weights of a facebookresearch/DiT checkpoint (e.g. DiT-XL-2-256x256.pt).

    The file holds a state dict, or one under "ema" (used) and/or "model" (kept as raw weights). The
    config comes from the tensors' shapes; `overrides` may set DiTConfig fields, and must set
    num_heads for sizes that are not the paper's (or our small presets).
    """
    path = Path(path)
    state, raw = _dit_state(read_checkpoint(path, nested=("ema", "model")), path)
    overrides = dict(overrides or {})
    num_heads = overrides.pop("num_heads", None)
    config = dit_config_from_original(state, None if num_heads is None else int(num_heads))
    config = _with_overrides(config, overrides, "model")
    model = DiT(config)
    expected = dit_state_dict_to_original(model.state_dict(), config)
    check_layout(state, expected, f"the DiT weights in {path}", f"(model config: {config})")
    _check_pos_embed(state["pos_embed"], config, str(path))
    ours = {re.sub(r"\.adaLN_modulation\.1\.", ".adaLN_modulation.", k): v for k, v in state.items() if k != "pos_embed"}
    model.load_state_dict(ours, strict=True)
    raw_ours = None
    if raw is not None:
        check_layout(raw, expected, f"the raw (\"model\") DiT weights in {path}")
        raw_ours = {re.sub(r"\.adaLN_modulation\.1\.", ".adaLN_modulation.", k): v.float() for k, v in raw.items() if k != "pos_embed"}
    notes = ["EMA weights from \"ema\"; raw weights from \"model\""] if raw is not None else []
    return Imported(model.eval(), config, raw_state_dict=raw_ours, notes=notes, files=[path])


# --------------------------------------------------------------------------------------------
# DiT: diffusers DiTTransformer2DModel
# --------------------------------------------------------------------------------------------


def dit_config_from_diffusers(config_json: dict) -> DiTConfig:
    """Return the DiTConfig of a diffusers DiTTransformer2DModel config.json (diffusers' timestep frequencies and eps)."""

    def get(key: str) -> Any:
        return config_json.get(key, DIFFUSERS_DIT_DEFAULTS[key])

    class_name = config_json.get("_class_name", "DiTTransformer2DModel")
    if class_name not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise ValueError(f"_class_name is {class_name!r}: expected diffusers' DiTTransformer2DModel")
    required = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                "norm_elementwise_affine": False}
    for key, value in required.items():
        if get(key) != value:
            raise ValueError(f"{key} is {get(key)!r}; a DiT has {value!r}")
    for key in ("cross_attention_dim", "num_vector_embeds"):
        if config_json.get(key) is not None:
            raise ValueError(f"{key} is {config_json[key]!r}: not a class-conditional DiT (expected null)")
    if get("patch_size") is None or get("num_embeds_ada_norm") is None:
        raise ValueError("patch_size and num_embeds_ada_norm must be set for a DiT")
    in_channels = int(get("in_channels"))
    out_channels = int(get("out_channels") or in_channels)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels {out_channels} is neither in_channels {in_channels} nor twice it (learn_sigma)")
    heads, head_dim = int(get("num_attention_heads")), int(get("attention_head_dim"))
    return DiTConfig(
        input_size=int(get("sample_size")),
        patch_size=int(get("patch_size")),
        in_channels=in_channels,
        hidden_size=heads * head_dim,
        depth=int(get("num_layers")),
        num_heads=heads,
        num_classes=int(get("num_embeds_ada_norm")),
        learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=1,  # diffusers' Timesteps(downscale_freq_shift=1)
        mlp_norm_eps=float(get("norm_eps")),
    )


# Our DiT's one-to-one tensors -> DiTTransformer2DModel's ({block} is the block index).
_DIFFUSERS_DIT_NAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "blocks.{block}.adaLN_modulation": "transformer_blocks.{block}.norm1.linear",
    "blocks.{block}.attn.proj": "transformer_blocks.{block}.attn1.to_out.0",
    "blocks.{block}.mlp.fc1": "transformer_blocks.{block}.ff.net.0.proj",
    "blocks.{block}.mlp.fc2": "transformer_blocks.{block}.ff.net.2",
    "final_layer.adaLN_modulation": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
# Our one timestep/class embedder -> the copy inside each of diffusers' blocks.
_DIFFUSERS_DIT_EMBEDDERS = {
    "t_embedder.mlp.0": "transformer_blocks.{block}.norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "transformer_blocks.{block}.norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "transformer_blocks.{block}.norm1.emb.class_embedder.embedding_table",
}


def _one_to_one_dit_keys(config: DiTConfig) -> dict[str, str]:
    """Our key -> diffusers' key for every DiT tensor that maps one to one."""
    names = {}
    for ours, theirs in _DIFFUSERS_DIT_NAMES.items():
        for block in range(config.depth) if "{block}" in ours else [0]:
            for param in ("weight", "bias"):
                names[f"{ours.format(block=block)}.{param}"] = f"{theirs.format(block=block)}.{param}"
    return names


def dit_state_dict_to_diffusers(state_dict: dict[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """Our DiT state dict under DiTTransformer2DModel's names; the embedders are copied into every block."""
    if config.qk_norm:
        raise InteropError("diffusers' DiTTransformer2DModel has no QK-norm; a DiT with qk_norm=true cannot be exported")
    if int(config.hidden_size * config.mlp_ratio) != 4 * config.hidden_size:
        raise InteropError(f"diffusers' DiT has mlp_ratio 4; this one has {config.mlp_ratio}")
    out = {theirs: state_dict[ours] for ours, theirs in _one_to_one_dit_keys(config).items()}
    for ours, theirs in _DIFFUSERS_DIT_EMBEDDERS.items():
        for param in ("weight",) if "embedding_table" in ours else ("weight", "bias"):
            for block in range(config.depth):
                # Copies: safetensors refuses to save tensors that share memory.
                out[f"{theirs.format(block=block)}.{param}"] = state_dict[f"{ours}.{param}"].clone()
    for block in range(config.depth):
        for param in ("weight", "bias"):
            # Our fused projection has output rows [q; k; v].
            q, k, v = state_dict[f"blocks.{block}.attn.qkv.{param}"].chunk(3)
            for name, part in zip("qkv", (q, k, v)):
                out[f"transformer_blocks.{block}.attn1.to_{name}.{param}"] = part
    return out


def dit_state_dict_from_diffusers(state_dict: dict[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """A DiTTransformer2DModel state dict (keys checked beforehand) under our names; block 0's embedders, all equal."""
    out = {ours: state_dict[theirs] for ours, theirs in _one_to_one_dit_keys(config).items()}
    for ours, theirs in _DIFFUSERS_DIT_EMBEDDERS.items():
        for param in ("weight",) if "embedding_table" in ours else ("weight", "bias"):
            first = state_dict[f"{theirs.format(block=0)}.{param}"]
            for block in range(1, config.depth):
                key = f"{theirs.format(block=block)}.{param}"
                if not torch.equal(state_dict[key], first):
                    raise InteropError(
                        f"{key} differs from block 0's: this DiTTransformer2DModel has per-block timestep/class "
                        f"embedders, which our DiT (one shared embedder, as the original DiT) cannot represent"
                    )
            out[f"{ours}.{param}"] = first
    for block in range(config.depth):
        for param in ("weight", "bias"):
            parts = [state_dict[f"transformer_blocks.{block}.attn1.to_{name}.{param}"] for name in "qkv"]
            out[f"blocks.{block}.attn.qkv.{param}"] = torch.cat(parts)
    return out


def load_diffusers_dit(path: PathLike, overrides: dict[str, Any] | None = None) -> Imported:
    """Return our DiT with the weights of a diffusers DiTTransformer2DModel folder (or a pipeline folder's transformer/).

    The config gets timestep_freq_shift=1 and diffusers' norm_eps, so the import computes exactly
    diffusers' function.
    """
    folder = _model_folder(path, "transformer")
    try:
        config = dit_config_from_diffusers(read_json(folder / "config.json"))
    except ValueError as err:
        if isinstance(err, InteropError):
            raise
        raise InteropError(f"{folder / 'config.json'}: {err}") from err
    config = _with_overrides(config, overrides, "model")
    weights = _diffusers_weights(folder)
    source = _tensors_only(read_checkpoint(weights), weights, "diffusers DiTTransformer2DModel")
    model = DiT(config)
    expected = dit_state_dict_to_diffusers(model.state_dict(), config)
    check_layout(source, expected, f"the weights in {weights}", f"(model config: {config})")
    model.load_state_dict(dit_state_dict_from_diffusers(source, config), strict=True)
    return Imported(model.eval(), config, files=[folder / "config.json", weights])


def diffusion_settings_from_diffusers_scheduler(path: PathLike) -> dict[str, Any] | None:
    """DiffusionConfig fields from a diffusers pipeline folder's scheduler/scheduler_config.json, or None if absent.

    Our DDPM objective has DiT's linear betas 1e-4 .. 0.02; another schedule is refused.
    """
    file = Path(path) / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return None
    scheduler = read_json(file)
    schedule = scheduler.get("beta_schedule", "linear")
    start, end = float(scheduler.get("beta_start", 1e-4)), float(scheduler.get("beta_end", 0.02))
    if schedule != "linear" or not (math.isclose(start, 1e-4) and math.isclose(end, 0.02)):
        raise InteropError(f"{file}: beta schedule {schedule} {start}..{end}; ours is DiT's linear 0.0001..0.02")
    predictions = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in predictions:
        raise InteropError(f"{file}: prediction_type {prediction!r} is none of {', '.join(predictions)}")
    return {"num_timesteps": int(scheduler.get("num_train_timesteps", 1000)), "prediction": predictions[prediction]}


# --------------------------------------------------------------------------------------------
# Export to diffusers
# --------------------------------------------------------------------------------------------


def _diffusers_version() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def _write_diffusers_folder(out_dir: PathLike, config_json: dict, tensors: dict[str, Tensor]) -> Path:
    """Write config.json and diffusion_pytorch_model.safetensors into a new folder, atomically (temporary folder, rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder (nothing was overwritten)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        version = _diffusers_version()
        header = {"_class_name": config_json.pop("_class_name"), **({"_diffusers_version": version} if version else {})}
        (tmp / "config.json").write_text(json.dumps({**header, **config_json}, indent=2) + "\n")
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / DIFFUSERS_WEIGHTS[0]), metadata={"format": "pt"})
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def diffusers_scaling_from_stats(stats: LatentStats | None) -> tuple[dict[str, Any], list[str]]:
    """diffusers' scaling_factor / shift_factor (and latents_mean / latents_std for per-channel stats), with notes."""
    if stats is None:
        note = ("no latent statistics known for this autoencoder: wrote scaling_factor 1.0 (latents are used "
                "unscaled); pass --latents REF to take them from a latent cache")
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


def _relative_difference(ours: list[Tensor], theirs: list[Tensor]) -> float:
    scale = max(t.abs().max().item() for t in ours)
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs)) / max(scale, 1e-12)


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
    path = _write_diffusers_folder(out_dir, config_json, autoencoder_state_dict_to_diffusers(model.state_dict(), config))
    return ExportReport(path, _load_back_and_compare(verify, notes, lambda: _compare_autoencoder(model, path)), notes)


def _load_back_and_compare(verify: bool, notes: list[str], compare) -> float | None:
    """The relative output difference `compare()` measures, or None (with a note) when diffusers is missing."""
    if not verify:
        return None
    if _diffusers_version() is None:
        notes.append("diffusers is not installed: the export was not loaded back and compared")
        return None
    return compare()


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


def export_dit_to_diffusers(model: DiT, out_dir: PathLike, verify: bool = True) -> ExportReport:
    """Write our DiT as a diffusers DiTTransformer2DModel folder; the embedders are replicated into every block.

    diffusers' timestep frequencies are fixed to max_period^(-i/(half-1)): a DiT with
    timestep_freq_shift=0 (DiT's own, ours by default) cannot be reproduced exactly, and the report's
    relative_difference (measured by loading the folder back, when diffusers is installed) says by how much.
    """
    config = model.config
    config_json = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": config.mlp_norm_eps,
    }
    path = _write_diffusers_folder(out_dir, config_json, dit_state_dict_to_diffusers(model.state_dict(), config))
    notes = []
    if config.timestep_freq_shift == 0:
        notes.append(
            "not exact: diffusers' DiT embeds timesteps with frequencies 10000^(-i/127), this model was trained with "
            "DiT's 10000^(-i/128); the relative output difference is the measured consequence"
        )
    return ExportReport(path, _load_back_and_compare(verify, notes, lambda: _compare_dit(model, path)), notes)


@torch.no_grad()
def _compare_dit(model: DiT, path: Path) -> float:
    from diffusers import DiTTransformer2DModel

    theirs = DiTTransformer2DModel.from_pretrained(path, low_cpu_mem_usage=False).float().eval()
    ours = model.float().eval()
    cfg = ours.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=generator)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, cfg.num_classes - 1, cfg.num_classes // 2, cfg.null_class])
    return _relative_difference([ours(x, t, y)], [theirs(x, timestep=t, class_labels=y, return_dict=False)[0]])
