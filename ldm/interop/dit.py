"""DiTs: facebookresearch/DiT checkpoints and diffusers `DiTTransformer2DModel` folders, in and out."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.config import brief
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
    check_computed_size,
    check_count,
    check_layout,
    config_int,
    read_checkpoint,
    read_json,
)
from ldm.models.dit import (
    DIT_PRESETS,
    TIMESTEP_FREQUENCY_DIM,
    DiT,
    DiTConfig,
    sincos_pos_embed,
)

# diffusers' DiTTransformer2DModel defaults, for the keys a config.json may leave out.
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


# --------------------------------------------------------------------------------------------
# DiT: facebookresearch/DiT checkpoints
# --------------------------------------------------------------------------------------------


def dit_state_dict_to_original(state_dict: dict[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """Our DiT state dict under the facebookresearch/DiT names, with its fixed `pos_embed` (1, T, D) added."""
    out = {re.sub(r"\.adaLN_modulation\.", ".adaLN_modulation.1.", k): v for k, v in state_dict.items()}
    out["pos_embed"] = sincos_pos_embed(config.hidden_size, config.grid_shape).unsqueeze(0)
    return out


def dit_config_from_original(state_dict: dict[str, Tensor], num_heads: int | None = None) -> DiTConfig:
    """Return the DiTConfig an original DiT state dict's shapes imply; num_heads given or from the paper presets."""
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
        raise InteropError(
            f"final_layer.linear gives {out_channels} output channels for {in_channels} input channels; "
            f"expected {in_channels} (mean only) or {2 * in_channels} (learn_sigma)"
        )
    if t_in.shape[1] != TIMESTEP_FREQUENCY_DIM:
        raise InteropError(
            f"t_embedder.mlp.0.weight takes {t_in.shape[1]} frequency features; ours has {TIMESTEP_FREQUENCY_DIM}"
        )
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
    expected = sincos_pos_embed(config.hidden_size, config.grid_shape).unsqueeze(0)
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
    where = f"{path} with the model settings given" if overrides else str(path)
    check_count(state, "blocks.", config.depth, "depth", where)
    with torch.device("meta"):  # shapes and sizes first: the real model is built once they fit
        skeleton = DiT(config)
        expected = dit_state_dict_to_original(skeleton.state_dict(), config)
    check_layout(state, expected, f"the DiT weights in {path}", f"(model config: {config})")
    check_computed_size(skeleton, where, f"input_size {config.input_size}")
    _check_pos_embed(state["pos_embed"], config, str(path))
    model = DiT(config)
    ours = {
        re.sub(r"\.adaLN_modulation\.1\.", ".adaLN_modulation.", k): v for k, v in state.items() if k != "pos_embed"
    }
    model.load_state_dict(ours, strict=True)
    raw_ours = None
    if raw is not None:
        check_layout(raw, expected, f'the raw ("model") DiT weights in {path}')
        raw_ours = {
            re.sub(r"\.adaLN_modulation\.1\.", ".adaLN_modulation.", k): v.float()
            for k, v in raw.items()
            if k != "pos_embed"
        }
    notes = ['EMA weights from "ema"; raw weights from "model"'] if raw is not None else []
    return Imported(model.eval(), config, raw_state_dict=raw_ours, notes=notes, files=[path])


# --------------------------------------------------------------------------------------------
# DiT: diffusers DiTTransformer2DModel
# --------------------------------------------------------------------------------------------


def dit_config_from_diffusers(config_json: dict) -> DiTConfig:
    """Return the DiTConfig of a diffusers DiTTransformer2DModel config.json (diffusers' timestep frequencies, eps)."""

    def get(key: str) -> Any:
        return config_json.get(key, DIFFUSERS_DIT_DEFAULTS[key])

    class_name = config_json.get("_class_name", "DiTTransformer2DModel")
    if class_name not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise ValueError(f"_class_name is {brief(class_name)}: expected diffusers' DiTTransformer2DModel")
    required = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
    }
    for key, value in required.items():
        if get(key) != value:
            raise ValueError(f"{key} is {brief(get(key))}; a DiT has {value!r}")
    for key in ("cross_attention_dim", "num_vector_embeds"):
        if config_json.get(key) is not None:
            raise ValueError(f"{key} is {brief(config_json[key])}: not a class-conditional DiT (expected null)")
    if get("patch_size") is None or get("num_embeds_ada_norm") is None:
        raise ValueError("patch_size and num_embeds_ada_norm must be set for a DiT")
    size = {
        key: config_int(get(key), key)
        for key in (
            "in_channels",
            "num_attention_heads",
            "attention_head_dim",
            "sample_size",
            "patch_size",
            "num_layers",
            "num_embeds_ada_norm",
        )
    }
    in_channels = size["in_channels"]
    out_channels = in_channels if get("out_channels") is None else config_int(get("out_channels"), "out_channels")
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels {out_channels} is neither in_channels {in_channels} nor twice it (learn_sigma)")
    heads = size["num_attention_heads"]
    return DiTConfig(
        input_size=size["sample_size"],
        patch_size=size["patch_size"],
        in_channels=in_channels,
        hidden_size=heads * size["attention_head_dim"],
        depth=size["num_layers"],
        num_heads=heads,
        num_classes=size["num_embeds_ada_norm"],
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
        raise InteropError(
            "diffusers' DiTTransformer2DModel has no QK-norm; a DiT with qk_norm=true cannot be exported"
        )
    # The recipe options change the function, which diffusers' DiT cannot express. (TREAD's route_* only
    # change training: the inference function is a plain DiT's, so a routed DiT converts exactly.)
    for name, plain in (("norm", "layernorm"), ("mlp", "gelu"), ("pos_embed", "sincos")):
        if getattr(config, name) != plain:
            raise InteropError(
                f"diffusers' DiTTransformer2DModel has only {name}={plain!r}; a DiT with "
                f"{name}={getattr(config, name)!r} cannot be converted to or from it"
            )
    if config.text_dim:
        raise InteropError(
            "diffusers' DiTTransformer2DModel is class-conditional; a DiT with text_dim > 0 cannot be exported"
        )
    if config.spatial_dims != 2:
        raise InteropError(
            f"diffusers' DiTTransformer2DModel takes 2-D latents; a DiT with spatial_dims {config.spatial_dims} "
            "(sequences or clips) cannot be exported"
        )
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
    """Return our DiT with the weights of a diffusers DiTTransformer2DModel folder (or a pipeline's transformer/).

    The config gets timestep_freq_shift=1 and diffusers' norm_eps, so the import computes exactly
    diffusers' function.
    """
    folder = _model_folder(path, "transformer")
    config_path = folder / "config.json"
    try:
        config = dit_config_from_diffusers(read_json(config_path))
    except (TypeError, ValueError) as err:
        if isinstance(err, InteropError):
            raise
        raise InteropError(f"{config_path}: {err}") from err
    config = _with_overrides(config, overrides, "model")
    where = f"{config_path} (with the model settings given)" if overrides else str(config_path)
    weights = _diffusers_weights(folder)
    source = _tensors_only(read_checkpoint(weights), weights, "diffusers DiTTransformer2DModel")
    check_count(source, "transformer_blocks.", config.depth, "num_layers", where)
    with torch.device("meta"):  # shapes and sizes first: the real model is built once they fit
        skeleton = DiT(config)
        expected = dit_state_dict_to_diffusers(skeleton.state_dict(), config)
    check_layout(source, expected, f"the weights in {weights} (for the model of {where})")
    check_computed_size(skeleton, where, f"sample_size {config.input_size}")
    model = DiT(config)
    model.load_state_dict(dit_state_dict_from_diffusers(source, config), strict=True)
    return Imported(model.eval(), config, files=[folder / "config.json", weights])


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
