"""`ldm import` and `ldm export`: pretrained weights into the artifact store, and our artifacts out to diffusers.

An imported autoencoder is an `autoencoder` artifact like a trained one (`ldm encode`, `ldm eval
recon` and the pipeline use it as is); its manifest records the source and, when the source gives
them, the latent statistics (diffusers' scaling_factor). An imported DiT is a `diffusion` artifact
that names the autoencoder its latents come from and the statistics it was trained with, which is
what `LatentDiffusionPipeline.from_artifacts` needs to sample with it. The tensor work is in
`ldm.interop`; this module moves its results in and out of the store and prints what it did.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ldm.artifacts import Artifact, ArtifactError, ArtifactStore, sha256_file
from ldm.config import ConfigError, brief, from_dict, set_key, to_dict
from ldm.data import DataConfig
from ldm.data.latents import LatentStats
from ldm.destinations import check_writable
from ldm.diffusion.schedules import DiffusionConfig
from ldm.interop import (
    COMPVIS_DEFAULT,
    ExportReport,
    Imported,
    diffusion_settings_from_diffusers_scheduler,
    export_autoencoder_to_diffusers,
    export_dit_to_diffusers,
    load_compvis_autoencoder,
    load_diffusers_autoencoder,
    load_diffusers_dit,
    load_original_dit,
)
from ldm.loading import dit_configs, load_autoencoder, load_dit, stored_precision
from ldm.models.autoencoder import AutoencoderConfig
from ldm.models.dit import DiTConfig
from ldm.quantize import int8_layer_names, quantize_int8, weight_bytes

# The data section of an imported RGB autoencoder when no --data is given: `ldm encode` and `ldm eval
# recon` then need --data, and this path, shown in their error, says so.
NO_DATA = "<imported autoencoder: no default data; pass --data PATH>"


def parse_overrides(overrides: Iterable[str], sections: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Return `--set section.key=value` overrides as {section: {key: value}}; other sections are an error."""
    data: dict[str, Any] = {}
    for override in overrides:
        set_key(data, override)
    for section, values in data.items():
        if section not in sections or not isinstance(values, dict):
            raise ConfigError(
                f"--set {section}...: only {', '.join(s + '.KEY=VALUE' for s in sections)} can be set here"
            )
    return data


def _source_record(imported: Imported, format_name: str) -> dict[str, Any]:
    return {
        "format": format_name,
        "path": str(Path(imported.files[-1]).resolve()),
        "files": {str(Path(f).resolve()): sha256_file(Path(f)) for f in imported.files},
        "notes": imported.notes,
    }


def _data_section(config: AutoencoderConfig, data: str | None, overrides: dict[str, Any]) -> dict | None:
    """The `data` config an imported autoencoder encodes by default: fmnist for 1 channel, else `data` or NO_DATA."""
    if config.in_channels not in (1, 3):
        return None  # our data loaders read grayscale or RGB only
    if data == "fmnist" or (data is None and config.in_channels == 1):
        fields = {"name": "fmnist", "path": None}
    else:
        fields = {"name": "folder", "path": data or NO_DATA}
    fields.update(resolution=config.resolution, channels=config.in_channels, **overrides)
    return to_dict(from_dict(DataConfig, fields, "data"))


def import_autoencoder(
    store: ArtifactStore,
    from_diffusers: str | None = None,
    from_compvis: str | None = None,
    overrides: Iterable[str] = (),
    data: str | None = None,
) -> Artifact:
    """Import a diffusers or CompVis KL autoencoder into an `autoencoder` artifact and return it."""
    if (from_diffusers is None) == (from_compvis is None):
        raise ValueError("give exactly one source: --from-diffusers DIR or --from-compvis FILE")
    store.check_writable()
    sections = parse_overrides(overrides, ("model", "data"))
    if from_diffusers is not None:
        imported = load_diffusers_autoencoder(from_diffusers, sections.get("model"))
        format_name = "diffusers AutoencoderKL"
    else:
        config = from_dict(AutoencoderConfig, {**to_dict(COMPVIS_DEFAULT), **sections.get("model", {})}, "model")
        imported = load_compvis_autoencoder(from_compvis, config)
        format_name = "CompVis AutoencoderKL"
    config = imported.config
    data_section = _data_section(config, data, sections.get("data", {}))
    metadata: dict[str, Any] = {
        "latent_shape": list(config.latent_shape),
        "image_shape": [config.in_channels, config.resolution, config.resolution],
        "source": _source_record(imported, format_name),
    }
    if imported.latent_stats is not None:
        metadata["latent_stats"] = imported.latent_stats.to_dict()
    artifact = store.save(
        "autoencoder",
        tensors={"weights.safetensors": imported.model.state_dict()},
        config={"model": to_dict(config), **({"data": data_section} if data_section else {})},
        metadata=metadata,
    )
    parameters = sum(p.numel() for p in imported.model.parameters())
    print(f"wrote {artifact.ref}  ({artifact.path})")
    print(
        f"  {format_name} from {metadata['source']['path']}: {parameters:,} parameters, "
        f"latents {tuple(config.latent_shape)} for {config.resolution}px images (f={config.downsample_factor})"
    )
    for note in imported.notes:
        print(f"  note: {note}")
    if imported.latent_stats is None:
        print("  no latent statistics in the source: `ldm encode` measures them (stats=channel or global)")
    else:
        stats = imported.latent_stats
        print(
            f"  source latent stats ({stats.mode}): mean {[round(v, 5) for v in stats.mean]}, "
            f"std {[round(v, 5) for v in stats.std]}; `ldm encode --set stats=source` uses them"
        )
    if data_section is None or data_section.get("path") == NO_DATA:
        print("  no default data set: pass --data to `ldm encode` and `ldm eval recon`")
    return artifact


def _latent_stats_for_diffusion(
    autoencoder: Artifact, scaling_factor: float | None, shift_factor: float | None, channels: int
) -> LatentStats:
    if scaling_factor is not None:
        if not scaling_factor > 0:
            raise ValueError(f"--scaling-factor must be positive, got {scaling_factor}")
        return LatentStats([shift_factor or 0.0] * channels, [1.0 / scaling_factor] * channels, "global")
    if shift_factor is not None:
        raise ValueError("--shift-factor needs --scaling-factor")
    if "latent_stats" not in autoencoder.manifest:
        raise ArtifactError(
            f"{autoencoder.ref} carries no source latent statistics, so the scale the DiT was trained at is unknown: "
            f"pass --scaling-factor S [--shift-factor M] (latents were used as (z - M) * S; 0.18215 for the SD v1 VAE)"
        )
    return LatentStats.from_dict(autoencoder.manifest["latent_stats"])


def import_diffusion(
    store: ArtifactStore,
    autoencoder_ref: str,
    from_dit: str | None = None,
    from_diffusers: str | None = None,
    overrides: Iterable[str] = (),
    num_heads: int | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
) -> Artifact:
    """Import a facebookresearch/DiT checkpoint or a diffusers DiT into a `diffusion` artifact and return it."""
    if (from_dit is None) == (from_diffusers is None):
        raise ValueError("give exactly one source: --from-dit FILE or --from-diffusers DIR")
    store.check_writable()
    sections = parse_overrides(overrides, ("model", "diffusion"))
    model_overrides = dict(sections.get("model", {}))
    if num_heads is not None:
        model_overrides["num_heads"] = num_heads
    autoencoder = store.load(autoencoder_ref, stage="autoencoder")
    if from_dit is not None:
        imported = load_original_dit(from_dit, model_overrides)
        format_name, diffusion_fields = "facebookresearch/DiT", {}
    else:
        imported = load_diffusers_dit(from_diffusers, model_overrides)
        format_name = "diffusers DiTTransformer2DModel"
        diffusion_fields = diffusion_settings_from_diffusers_scheduler(from_diffusers) or {}
    config: DiTConfig = imported.config
    diffusion = from_dict(
        DiffusionConfig,
        {"learn_sigma": config.learn_sigma, **diffusion_fields, **sections.get("diffusion", {})},
        "diffusion",
    )
    if diffusion.learn_sigma != config.learn_sigma:
        raise ValueError(
            f"diffusion.learn_sigma ({diffusion.learn_sigma}) must match the network's output channels "
            f"(learn_sigma {config.learn_sigma})"
        )
    ae_config = from_dict(AutoencoderConfig, autoencoder.config()["model"], "model")
    dit_latents = config.latent_shape
    if tuple(ae_config.latent_shape) != dit_latents:
        raise ValueError(
            f"the DiT works on {dit_latents} latents, but {autoencoder.ref} makes {tuple(ae_config.latent_shape)} "
            f"at its resolution {ae_config.resolution}: import the autoencoder with --set model.resolution="
            f"{config.input_size * ae_config.downsample_factor} (or give the matching one)"
        )
    stats = _latent_stats_for_diffusion(autoencoder, scaling_factor, shift_factor, config.in_channels)
    weights = imported.model.state_dict()
    raw = imported.raw_state_dict or weights
    artifact = store.save(
        "diffusion",
        tensors={"weights.safetensors": weights, "raw.safetensors": raw},
        config={"model": to_dict(config), "diffusion": to_dict(diffusion)},
        parents={"autoencoder": autoencoder.ref},
        metadata={
            "autoencoder": autoencoder.ref,
            "latent_stats": stats.to_dict(),
            "latent_shape": list(dit_latents),
            "num_classes": config.num_classes,
            "weights": "weights.safetensors holds the EMA (sampling) weights; raw.safetensors the raw ones "
            + (
                '(from the source\'s "model")'
                if imported.raw_state_dict is not None
                else "(the same tensors: the source had one set)"
            ),
            "source": _source_record(imported, format_name),
        },
    )
    parameters = sum(p.numel() for p in imported.model.parameters())
    print(f"wrote {artifact.ref}  ({artifact.path})")
    print(
        f"  {format_name} from {artifact.manifest['source']['path']}: {parameters:,} parameters, depth {config.depth}, "
        f"width {config.hidden_size}, {config.num_heads} heads, patch {config.patch_size}, latents {dit_latents}, "
        f"{config.num_classes} classes, learn_sigma {config.learn_sigma}"
    )
    print(
        f"  decodes with {autoencoder.ref}; latent stats ({stats.mode}): mean {[round(v, 5) for v in stats.mean]}, "
        f"std {[round(v, 5) for v in stats.std]}"
    )
    print(
        f"  diffusion: {diffusion.objective}, {diffusion.schedule} schedule, {diffusion.num_timesteps} steps, "
        f"predicts {diffusion.prediction}"
    )
    for note in imported.notes:
        print(f"  note: {note}")
    return artifact


def _export_stats(store: ArtifactStore, artifact: Artifact, latents_ref: str | None) -> tuple[LatentStats | None, str]:
    """The latent statistics to export with an autoencoder, and where they come from."""
    if latents_ref is not None:
        cache = store.load(latents_ref, stage="latents", verify=False)
        if cache.parents.get("autoencoder") != artifact.ref:
            raise ArtifactError(f"{cache.ref} was encoded with {cache.parents.get('autoencoder')}, not {artifact.ref}")
        return LatentStats.from_dict(cache.manifest["latent_stats"]), f"the latent cache {cache.ref}"
    if "latent_stats" in artifact.manifest:
        return LatentStats.from_dict(artifact.manifest["latent_stats"]), "the imported source"
    caches = [c for c in store.list("latents") if c.parents.get("autoencoder") == artifact.ref]
    if caches:
        return LatentStats.from_dict(caches[-1].manifest["latent_stats"]), f"the newest latent cache {caches[-1].ref}"
    return None, "nowhere (none known)"


def _print_report(report: ExportReport, kind: str, exact_limit: float = 1e-4) -> None:
    print(f"wrote {report.path}  (load with diffusers' {kind}.from_pretrained)")
    if report.relative_difference is not None:
        verdict = "the same function up to float rounding" if report.relative_difference < exact_limit else "NOT exact"
        print(f"  loaded back with diffusers: relative output difference {report.relative_difference:.2e} ({verdict})")
    for note in report.notes:
        print(f"  note: {note}")


def export_autoencoder(store: ArtifactStore, ref: str, out_dir: str, latents_ref: str | None = None) -> ExportReport:
    """Write an `autoencoder` artifact as a diffusers AutoencoderKL folder; latent stats become scaling_factor."""
    check_writable(out_dir, "--to-diffusers")
    artifact = store.load(ref, stage="autoencoder")
    stats, origin = _export_stats(store, artifact, latents_ref)
    report = export_autoencoder_to_diffusers(load_autoencoder(artifact), out_dir, stats)
    _print_report(report, "AutoencoderKL")
    print(f"  latent statistics from {origin}")
    return report


def export_diffusion(store: ArtifactStore, ref: str, out_dir: str, weights: str = "ema") -> ExportReport:
    """Write the DiT of a `diffusion` artifact as a diffusers DiTTransformer2DModel folder."""
    check_writable(out_dir, "--to-diffusers")
    artifact = store.load(ref, stage="diffusion")
    if stored_precision(artifact) != "float32":
        raise ArtifactError(
            f"{artifact.ref} holds {stored_precision(artifact)} weights, which diffusers' DiT cannot hold: "
            f"export the model it was quantised from, {artifact.parents.get('diffusion')}"
        )
    model, diffusion = load_dit(artifact, weights), dit_configs(artifact)[1]
    report = export_dit_to_diffusers(model, out_dir)
    if diffusion.objective != "ddpm" or diffusion.prediction != "eps":
        report.notes.append(
            f"the model predicts {diffusion.prediction if diffusion.objective == 'ddpm' else 'a flow velocity'} "
            f"({diffusion.objective}); diffusers' DiTPipeline assumes a DDPM eps model, so pair it with a "
            f"matching scheduler"
        )
    stats = artifact.manifest.get("latent_stats")
    if stats:
        mean, std = [round(v, 5) for v in stats["mean"]], [round(v, 5) for v in stats["std"]]
        report.notes.append(
            f"trained on latents normalised with mean {mean} and std {std} "
            f"({stats['mode']}); export its autoencoder ({artifact.manifest.get('autoencoder')}) with "
            f"`ldm export autoencoder` to carry them as scaling_factor"
        )
    _print_report(report, "DiTTransformer2DModel")
    return report


def check_keep_patterns(int8_layers: list[str], keep: Iterable[str]) -> None:
    """Raise ValueError naming the first --keep pattern matching none of `int8_layers` (a typo would keep nothing)."""
    for pattern in keep:
        if not any(fnmatch.fnmatch(name, pattern) for name in int8_layers):
            blocks = sorted({int(name.split(".")[1]) for name in int8_layers})
            inside = ", ".join(dict.fromkeys(name.split(".", 2)[2] for name in int8_layers))
            raise ValueError(
                f"--keep {brief(pattern)} matches no int8 layer: each of blocks.{blocks[0]} .. blocks.{blocks[-1]} has "
                f"{inside} (e.g. {int8_layers[0]}); patterns are fnmatch over these names, "
                "e.g. 'blocks.*.adaLN_modulation'"
            )


def quantize_diffusion(store: ArtifactStore, ref: str, keep: Iterable[str] = ()) -> Artifact:
    """Store the EMA DiT of a `diffusion` artifact with int8 block linears (`ldm.quantize`) as a new `diffusion`
    artifact: the same config, latents and decoder, the float artifact as parent; `from_artifacts` loads it as int8."""
    store.check_writable()
    artifact = store.load(ref, stage="diffusion")
    if stored_precision(artifact) != "float32":
        raise ArtifactError(
            f"{artifact.ref} is stored as {stored_precision(artifact)} already; quantise its parent "
            f"{artifact.parents.get('diffusion')}"
        )
    float_model = load_dit(artifact)
    check_keep_patterns(int8_layer_names(float_model), keep)
    float_bytes = weight_bytes(float_model)
    layers = int8_layer_names(float_model, keep)
    model = quantize_int8(float_model, keep)
    quantized = store.save(
        "diffusion",
        tensors={"weights.safetensors": model.state_dict()},
        config=artifact.config(),
        parents={**{k: v for k, v in artifact.parents.items() if k == "latents"}, "diffusion": artifact.ref},
        data_fingerprint=artifact.manifest.get("data_fingerprint"),
        metadata={
            **{
                key: artifact.manifest[key]
                for key in ("autoencoder", "latent_stats", "latent_shape", "num_classes")
                if key in artifact.manifest
            },
            "precision": "int8",
            "int8_layers": layers,
            "weights": f"weights.safetensors holds the EMA weights of {artifact.ref} "
            f"with {len(layers)} block linears as int8 (per-channel scales) for CPU sampling; no raw weights",
            "training": artifact.manifest.get("training", {}),
        },
    )
    size = quantized.manifest["files"]["weights.safetensors"]["bytes"]
    source = artifact.manifest["files"]["weights.safetensors"]["bytes"]
    print(f"wrote {quantized.ref}  ({quantized.path})")
    print(
        f"  {len(layers)} linear layers int8 "
        f"({', '.join(sorted({name.split('.')[-1] for name in layers}))} of every block), "
        f"the embeddings and final layer float32" + (f"; kept float32: {', '.join(keep)}" if keep else "")
    )
    print(
        f"  weights {size / 1e6:.2f} MB on disk ({source / size:.2f}x smaller than {artifact.ref}), "
        f"{weight_bytes(model) / 1e6:.2f} MB in memory ({float_bytes / weight_bytes(model):.2f}x smaller)"
    )
    return quantized
