"""What every format shares: reading checkpoints without pickle, checking layouts, writing diffusers folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldm.config import brief, from_dict, to_dict
from ldm.data.latents import LatentStats
from ldm.models.autoencoder import AutoencoderConfig
from ldm.models.dit import DiTConfig

PathLike = str | os.PathLike

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


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
        "Converting it to safetensors unpickles it (weights_only=False), which runs any code the file holds: "
        "do it only for a file from a source you trust, once, then import the .safetensors file it writes:\n"
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


def config_int(value: Any, key: str) -> int:
    """`value` of config.json's `key` as an int >= 1 (every size and count of a model is one); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {brief(value)}")
    return value


def check_count(source: dict[str, Tensor], prefix: str, count: int, key: str, where: str) -> None:
    """Refuse a config whose `key` asks for `count` repeated parts when the weights hold another number of `prefix`N.

    Checked before the model is built: building costs time per block even on the meta device, and a
    config.json may ask for millions.
    """
    found = len({k[len(prefix) :].split(".", 1)[0] for k in source if k.startswith(prefix)})
    if found != count:
        raise InteropError(f"{where}: {key} gives {count:,}, but the weights hold {found:,} ({prefix}N)")


def check_computed_size(skeleton: nn.Module, where: str, cause: str) -> None:
    """Refuse a model (built on the meta device) whose computed tables outweigh its weights and 1 GiB.

    Position embeddings are computed from the input size, not read from the weight file, so a config's
    size is the only bound on them: a sample_size of millions would ask for terabytes.
    """
    stored = set(skeleton.state_dict())
    computed = sum(b.numel() * b.element_size() for name, b in skeleton.named_buffers() if name not in stored)
    weights = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    if computed > max(weights, 1 << 30):
        raise InteropError(
            f"{where}: {cause} asks for {computed / 1e9:,.1f} GB of position tables, more than the "
            f"{weights / 1e6:,.1f} MB of weights; it is not the size this model was trained at"
        )


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
        f"{path} has no config.json (nor {subfolder}/config.json); "
        f"it holds: {_few(p.name for p in path.iterdir()) or 'nothing'}"
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
# Writing diffusers folders, measuring exports
# --------------------------------------------------------------------------------------------


def _diffusers_version() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def _write_diffusers_folder(out_dir: PathLike, config_json: dict, tensors: dict[str, Tensor]) -> Path:
    """Write config.json and diffusion_pytorch_model.safetensors into a new folder, atomically.

    The files go into a temporary folder, which is renamed once they are complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder (nothing was overwritten)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        version = _diffusers_version()
        header = {"_class_name": config_json.pop("_class_name"), **({"_diffusers_version": version} if version else {})}
        (tmp / "config.json").write_text(json.dumps({**header, **config_json}, indent=2) + "\n")
        save_file(
            {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
            str(tmp / DIFFUSERS_WEIGHTS[0]),
            metadata={"format": "pt"},
        )
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _relative_difference(ours: list[Tensor], theirs: list[Tensor]) -> float:
    scale = max(t.abs().max().item() for t in ours)
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs)) / max(scale, 1e-12)


def _load_back_and_compare(verify: bool, notes: list[str], compare) -> float | None:
    """The relative output difference `compare()` measures, or None (with a note) when diffusers is missing."""
    if not verify:
        return None
    if _diffusers_version() is None:
        notes.append("diffusers is not installed: the export was not loaded back and compared")
        return None
    return compare()
