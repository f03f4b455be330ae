"""Typed configs: dataclasses filled from YAML with strict keys and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


BRIEF_LIMIT = 80  # characters of a value an error message echoes


def brief(value: Any, limit: int = BRIEF_LIMIT) -> str:
    """Return repr(value), cut to `limit` characters with an ellipsis, so an echoed value cannot flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _few(names: typing.Iterable[Any], n: int = 10) -> str:
    """The first `n` names, each cut short, and how many there are in all."""
    names = sorted(str(name) for name in names)
    shown = ", ".join(name if len(name) <= BRIEF_LIMIT else name[: BRIEF_LIMIT - 3] + "..." for name in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, less aliases and tags: a config is plain data written out.

    An alias lets a few hundred bytes of nested anchors expand to gigabytes ("billion laughs"), and a
    tag names a type to construct; neither has a use in a config, so both are refused where they occur.
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in configs: write the value out", event.start_mark
            )
        tag = getattr(event, "tag", None)
        if tag is not None:
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.composer.ComposerError(
                None,
                None,
                f"YAML tags are not allowed in configs (found {brief(shown)}): give plain values",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str, column_offset: int = 0) -> Any:
    """Return the plain data of YAML `text`, or raise a one-line ConfigError naming `source`, the place and the problem.

    `column_offset` is added to columns of the first line (an override's value starts after `key=`).
    """

    def place(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1 + (column_offset if mark.line == 0 else 0)}"

    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.MarkedYAMLError as err:
        where = f" {place(err.problem_mark)}:" if err.problem_mark is not None else ""
        context = ""
        if err.context:  # e.g. "while parsing a flow sequence", where that began
            context = (
                f" ({err.context}" + (f" at {place(err.context_mark)}" if err.context_mark is not None else "") + ")"
            )
        raise ConfigError(f"{source}:{where} {err.problem or 'invalid YAML'}{context}") from None
    except yaml.YAMLError as err:  # ReaderError: a character YAML does not allow
        raise ConfigError(f"{source}: {str(err).splitlines()[0]}") from None


@dataclass
class TrainerConfig:
    """How a stage is trained: everything Lightning's Trainer and the data loader need."""

    max_steps: int = 1000
    batch_size: int = 64  # the global batch, in every stage: each of P processes trains on batch_size / P
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 disables clipping
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | ...
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    tf32: bool = True  # on CUDA, float32 matmuls and convolutions on TF32 tensor cores (as the DiT paper ran)
    compile: bool = False
    channels_last: bool = False  # NHWC activations for convolutional models (faster with oneDNN and cuDNN)
    seed: int = 0
    log_every: int = 50
    image_every: int = 500  # write a picture every N steps (0: only at the end)
    checkpoint_every: int = 500
    progress: bool = True
    # csv: logs/partNNN/metrics.csv (the loss curves are drawn from it); tensorboard: TensorBoard event
    # files in tensorboard/partNNN as well (needs the tensorboard or tensorboardX package)
    logger: str = "csv"
    # One config and seed, one result (on one machine): Lightning's deterministic flag (torch's deterministic
    # algorithms) and, on a CPU, cpu_threads threads. None: on for CPU runs, where it costs nothing
    # measurable (autoencoder-quick.yaml on 2 cores: 10.4 steps/s on and off), off on GPUs, where
    # deterministic kernels cost speed.
    deterministic: bool | None = None
    # Threads of a deterministic CPU run. Convolutions and matmuls split their sums over the threads, so
    # the weights depend on how many there are (runs with 1 and 2 threads part from the first update);
    # 0: one per CPU this process may run on, whatever OMP_NUM_THREADS or torch.set_num_threads say.
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        # Checked here, once, so that no stage starts (or stores an untrained artifact) on a nonsense value.
        at_least = {
            "max_steps": 1,
            "batch_size": 1,
            "num_nodes": 1,
            "log_every": 1,
            "checkpoint_every": 1,
            "warmup_steps": 0,
            "image_every": 0,
            "cpu_threads": 0,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if value < low:
                raise ValueError(f"trainer.{name} must be >= {low}, got {value}")
        if self.logger not in ("csv", "tensorboard"):
            raise ValueError(f"trainer.logger must be csv or tensorboard, got {self.logger!r}")
        if self.devices < 1 and self.devices != -1:
            raise ValueError(f"trainer.devices must be >= 1 (or -1 for every device), got {self.devices}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"trainer.lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"trainer.{name} must be >= 0 (0 disables it), got {value}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to the annotated type `tp`, or raise a ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {brief(value)} fits none of {tp}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        value = _expand_preset(value, tp, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {brief(value)}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {brief(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {brief(value)}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {brief(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {brief(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {brief(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {brief(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {brief(value)}")
    return value


def _expand_preset(value: Any, tp: type, where: str) -> Any:
    """A preset name (`model: fmnist-f4`, or `model: {preset: fmnist-f4, ch: 96}`) as the preset's fields.

    A config class offers presets by a `presets()` classmethod returning {name: instance}, so `ldm/`
    alone resolves them, whatever has been imported.
    """
    presets = tp.presets() if hasattr(tp, "presets") else None
    name = value if isinstance(value, str) else value.get("preset") if isinstance(value, dict) else None
    if name is None:
        return value
    if presets is None:
        raise ConfigError(f"{where}: {tp.__name__} has no presets; give its fields instead")
    if not isinstance(name, str) or name not in presets:
        raise ConfigError(f"{where}: unknown preset {brief(name)}; presets: {', '.join(presets)}")
    fields = to_dict(presets[name])
    if isinstance(value, dict):
        fields.update({k: v for k, v in value.items() if k != "preset"})
    return fields


def _over_default(field: dataclasses.Field, value: Any) -> Any:
    """A section given as some of its keys, laid over the field's own default: a stage whose trainer defaults to
    batch 256 keeps 256 when a preset or --set gives only trainer.max_steps. A section naming a preset is whole."""
    if not isinstance(value, dict) or "preset" in value or field.default_factory is dataclasses.MISSING:
        return value
    default = field.default_factory()
    return _merged(to_dict(default), value, presets_whole=True) if dataclasses.is_dataclass(default) else value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Return a `cls` instance filled from `data`; unknown keys are an error naming the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {brief(data)}")
    if hasattr(cls, "derive_keys"):  # a key set in one place that another section follows (see its docstring)
        data = cls.derive_keys(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]  # YAML keys may be numbers: compared, not sorted
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {_few(f'{prefix}{k}' for k in unknown)} in {cls.__name__}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    data = {name: _over_default(fields[name], value) for name, value in data.items()}
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in data.items()}
    try:
        config = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err
    return config


def to_dict(config: Any) -> dict:
    """Return a plain (YAML-safe) dict of a dataclass config; tuples become lists."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def set_key(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {brief(override)} must look like key=value (for example trainer.max_steps=500)")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        if isinstance(node.get(part), str):  # a preset name: keep it and override some of its fields
            node[part] = {"preset": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {brief(override)}: {part} is not a section")
    node[parts[-1]] = parse_yaml(raw, f"override {brief(override)}", column_offset=len(key) + 1)


BASE_KEY = "base"  # a preset's `base: other.yaml` (relative to it): that preset's keys, with this one's on top
RUN_DIR = "run_dir"  # derived from a preset's path when it gives none, never inherited from its base


def read_preset(path: str | os.PathLike, _children: tuple[Path, ...] = ()) -> dict:
    """Return the keys of the YAML preset at `path` with its `base:` chain merged under them (nearest preset wins)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist" + (f" (the base of {_children[-1]})" if _children else "")
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); a config is a YAML file"
        ) from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must name another preset file, relative to this one, got {brief(base)}")
    base_path = path.parent / base
    if base_path.resolve() in {p.resolve() for p in (*_children, path)}:
        chain = " -> ".join(str(p) for p in (*_children, path, base_path))
        raise ConfigError(f"{path}: its base chain returns to itself ({chain}); a preset cannot inherit from itself")
    inherited = read_preset(base_path, (*_children, path))
    inherited.pop(RUN_DIR, None)  # a child's runs never go into its base's folder
    return _merged(inherited, data)


def _merged(base: dict, child: dict, presets_whole: bool = False) -> dict:
    """`base` with `child`'s keys on top: mappings merge key by key, any other value replaces the base's.

    `presets_whole`: a child mapping that names a preset replaces the base's whole (over a field's default, the
    preset's values are meant); between presets, a child's `preset:` keeps the base's other keys (a variant)."""
    merged = dict(base)
    for key, value in child.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        if nested and not (presets_whole and "preset" in value):
            merged[key] = _merged(merged[key], value, presets_whole)
        else:
            merged[key] = value
    return merged


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Return `cls` filled from the YAML preset at `path` (optional; its `base:` chain merged in) with `key=value`
    overrides applied. A preset that names no `run_dir` runs in `runs/<its folder>/<its name>`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = read_preset(path)
        if RUN_DIR not in data and RUN_DIR in {f.name for f in dataclasses.fields(cls)}:
            data[RUN_DIR] = f"runs/{path.parent.name}/{path.stem}"
    for override in overrides:
        set_key(data, override)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from None


def dump_yaml(config: Any) -> str:
    """Return the YAML text of a dataclass config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
