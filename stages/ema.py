"""`ldm ema`: choose a diffusion model's EMA length after training (post-hoc EMA, Karras et al. 2024, EDM2).

A run trained with `posthoc_ema` left snapshots of its power-function EMA profiles in
<run_dir>/ema-snapshots/. This reconstructs the EMA of each requested length sigma_rel at the
model's final step, measures each with the same samples, seeds and sampler as `ldm eval samples`
(and the model's own EMA beside them), prints the table, and stores the lowest-FD one as a new
`diffusion` artifact: the given model's config and lineage, the model as its `diffusion` parent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from ldm.artifacts import Artifact, ArtifactError, ArtifactStore, write_atomic
from ldm.destinations import check_writable, writing_to
from ldm.ema import SNAPSHOT_FOLDER, Snapshot, check_sigma_rel, list_snapshots, reconstruct, sigma_rel_to_gamma
from ldm.evaluation import (
    EVAL_FOLDER,
    SampleReference,
    evaluation_name,
    measure_samples,
    report_metrics,
    sample_reference,
)
from ldm.generation import SamplingSettings
from ldm.images import save_grid
from pipeline import LatentDiffusionPipeline

# Config keys a run folder must share with the model for its snapshots to be that model's.
RUN_IDENTITY = ("model", "diffusion", "trainer.seed", "trainer.batch_size", "posthoc_ema", "posthoc_snapshot_every")


def parse_sigma_rels(spec: str) -> list[float]:
    """`0.03,0.05,0.10` as sorted distinct floats, each in (0, 0.2887]."""
    try:
        values = sorted({float(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--sigma-rel must be comma-separated numbers such as 0.05,0.10, got {spec!r}") from None
    if not values:
        raise ValueError("--sigma-rel names no EMA length")
    for value in values:
        check_sigma_rel(value)
    return values


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def snapshots_of(model: Artifact, run_dir: str | Path | None = None) -> tuple[list[Snapshot], int]:
    """Return the post-hoc EMA snapshots of the run that trained `model` (up to its last step) and that step.

    `run_dir` overrides the run folder the manifest names (when it has moved); either way the run's
    config must match the model's (RUN_IDENTITY) and every snapshot must come from the model's latent cache.
    """
    record = model.manifest.get("training", {}).get("posthoc_ema")
    if record is None:
        raise ArtifactError(
            f"{model.ref} was trained without post-hoc EMA profiles: train with "
            f"--set posthoc_ema=[0.05,0.10] --set posthoc_snapshot_every=N to keep snapshots"
        )
    folder = Path(run_dir) / SNAPSHOT_FOLDER if run_dir is not None else Path(record["snapshots"])
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no post-hoc EMA snapshots at {folder}"
            + (
                ""
                if run_dir is not None
                else f" (where {model.ref} was trained); if the run folder moved, pass --run-dir"
            )
        )
    run_config_path = folder.parent / "config.yaml"
    if run_config_path.is_file():
        run_config, config = yaml.safe_load(run_config_path.read_text()) or {}, model.config()
        differ = [key for key in RUN_IDENTITY if _get(run_config, key) != _get(config, key)]
        if differ:
            raise ArtifactError(
                f"{folder.parent} is not the run of {model.ref}: its config differs in {', '.join(differ)}"
            )
    step = model.manifest["training"]["steps"]
    snapshots = [s for s in list_snapshots(folder) if s.step <= step]
    strangers = sorted({s.metadata.get("latents") for s in snapshots} - {model.parents.get("latents")}, key=str)
    if strangers:
        raise ArtifactError(
            f"snapshots in {folder} come from a run on {', '.join(map(str, strangers))}, "
            f"but {model.ref} was trained on {model.parents.get('latents')}"
        )
    missing = sorted(set(record["sigma_rel"]) - {s.sigma_rel for s in snapshots if s.step == step})
    if missing:
        raise FileNotFoundError(
            f"{folder} has no snapshot of sigma_rel {missing} at step {step}, the last step of "
            f"{model.ref}: the run folder lost it (or belongs to another run)"
        )
    return snapshots, step


@torch.no_grad()
def posthoc_ema(
    store: ArtifactStore,
    model_ref: str,
    sigma_rels: Sequence[float],
    settings: SamplingSettings,
    n: int = 1000,
    run_dir: str | Path | None = None,
    classifier_ref: str = "classifier@latest",
    features: str = "auto",
    out_dir: str | Path | None = None,
    device: str = "cpu",
    default_guidance: float = 1.5,
) -> Artifact:
    """Reconstruct, measure and compare EMA lengths of `model_ref`; store the lowest-FD one and return its artifact."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    sigma_rels = sorted(set(sigma_rels))
    for sigma_rel in sigma_rels:
        check_sigma_rel(sigma_rel)
    check_writable(Path(out_dir or EVAL_FOLDER), "--out")
    store.check_writable()  # the chosen length becomes a new artifact
    model = store.load(model_ref, stage="diffusion")
    snapshots, step = snapshots_of(model, run_dir)
    print(
        f"reconstructing sigma_rel {', '.join(f'{s:g}' for s in sigma_rels)} at step {step} of {model.ref} "
        f"from {len(snapshots)} snapshots in {snapshots[0].path.parent}"
    )
    candidates, coefficients = reconstruct(snapshots, sigma_rels, step)

    device_ = torch.device(device)
    pipe = LatentDiffusionPipeline.from_artifacts(model.ref, store=store, device=device_)
    settings = pipe.settings(settings, default_guidance)
    own_ema = model.load_tensors("weights.safetensors")
    for sigma_rel, weights in zip(sigma_rels, candidates):
        if weights.keys() != own_ema.keys() or any(weights[k].shape != own_ema[k].shape for k in own_ema):
            raise ArtifactError(f"the snapshots' tensors do not fit the DiT of {model.ref} (sigma_rel {sigma_rel:g})")
    reference = sample_reference(store, pipe, n, classifier_ref, features, settings.batch_size, device_)
    name = evaluation_name(pipe, settings, n)
    out_dir = Path(out_dir or EVAL_FOLDER / f"posthoc-ema-{name}-{model.version}")

    with writing_to(out_dir, "--out"):
        rows, reports = measure_lengths(
            pipe, settings, n, reference, model, own_ema, dict(zip(sigma_rels, candidates)), out_dir
        )
    best = min(range(len(sigma_rels)), key=lambda j: rows[1 + j]["frechet_distance"])
    chosen = sigma_rels[best]
    print_table(rows, chosen, reports[0])

    artifact = save_reconstruction(store, model, candidates[best], chosen, step, len(snapshots))
    table = {"evaluation": name, "chosen_sigma_rel": chosen, "table": rows}
    artifact = store.update_manifest(artifact, metrics={name: report_metrics(reports[1 + best]), "posthoc_ema": table})
    with writing_to(out_dir, "--out"):
        write_atomic(
            out_dir / "report.json",
            json.dumps(
                {
                    "model": model.ref,
                    "step": step,
                    "stored": artifact.ref,
                    **table,
                    "reports": reports,
                    "coefficients": {
                        "snapshots": [{"step": s.step, "sigma_rel": s.sigma_rel} for s in snapshots],
                        "columns": [f"{s:g}" for s in sigma_rels],
                        "values": coefficients.tolist(),
                    },
                },
                indent=2,
            ).encode(),
        )
    print(f"\nwrote {artifact.ref}  ({artifact.path}): sigma_rel {chosen:g}, parent {model.ref}")
    print(f"  report {out_dir / 'report.json'}   grids {out_dir}")
    return artifact


def measure_lengths(
    pipe: LatentDiffusionPipeline,
    settings: SamplingSettings,
    n: int,
    reference: SampleReference,
    model: Artifact,
    own_ema: dict[str, torch.Tensor],
    candidates: dict[float, dict[str, torch.Tensor]],
    out_dir: Path,
) -> tuple[list[dict], list[dict]]:
    """Measure the model's own EMA, then each reconstructed length, with the same samples; return rows and reports.

    Writes one grid per row into out_dir.
    """
    rows, reports = [], []
    own_label = f"the model's EMA (ema_decay {model.config().get('ema_decay')})"
    for label, sigma_rel, weights in [
        (own_label, None, own_ema),
        *((f"sigma_rel {s:g}", s, w) for s, w in candidates.items()),
    ]:
        pipe.model.load_state_dict(weights)
        report, first = measure_samples(pipe, settings, n, reference)
        report["model"] = f"{model.ref} {label}"
        reports.append(report)
        grid = save_grid(
            first,
            out_dir / f"samples-{'own-ema' if sigma_rel is None else f'sigma{sigma_rel:g}'}.png",
            nrow=pipe.num_classes if len(first) >= pipe.num_classes else None,
            scale=2,
        )
        rows.append(
            {
                "weights": label,
                "sigma_rel": sigma_rel,
                "gamma": None if sigma_rel is None else round(sigma_rel_to_gamma(sigma_rel), 4),
                "frechet_distance": report["frechet_distance"],
                "class_accuracy": report["class_accuracy"],
                "grid": str(grid),
            }
        )
    return rows, reports


def save_reconstruction(
    store: ArtifactStore,
    model: Artifact,
    weights: dict[str, torch.Tensor],
    sigma_rel: float,
    step: int,
    snapshots_used: int,
) -> Artifact:
    """Store reconstructed EMA weights as a `diffusion` artifact with the model's config, latents and raw weights, and
    the model as its parent."""
    return store.save(
        "diffusion",
        tensors={"weights.safetensors": weights, "raw.safetensors": model.load_tensors("raw.safetensors")},
        config=model.config(),
        parents={"latents": model.parents["latents"], "diffusion": model.ref},
        data_fingerprint=model.manifest.get("data_fingerprint"),
        metadata={
            **{
                key: model.manifest[key]
                for key in ("autoencoder", "latent_stats", "latent_shape", "num_classes")
                if key in model.manifest
            },
            "weights": f"weights.safetensors holds the post-hoc EMA of length sigma_rel {sigma_rel:g}, reconstructed "
            f"at step {step} (for sampling); raw.safetensors the trained weights of {model.ref}",
            "posthoc_ema": {
                "sigma_rel": sigma_rel,
                "gamma": sigma_rel_to_gamma(sigma_rel),
                "step": step,
                "from": model.ref,
                "snapshots_used": snapshots_used,
            },
            "training": model.manifest["training"],  # the run's record, as the model's
        },
    )


def print_table(rows: list[dict], chosen: float, report: dict) -> None:
    """Print the measured lengths, the stored one marked, with the floors of `report`."""
    kind = "FID" if report["is_standard_fid"] else "FD"
    print(
        f"\n{report['n']} samples each: {report['sampler']}, {report['steps']} steps, cfg {report['guidance_scale']}, "
        f"seed {report['seed']}  [{report['features']}]"
    )
    print(f"  {'weights':<40} {kind:>10} {'class acc':>10}")
    for row in rows:
        mark = "  <- stored" if row["sigma_rel"] == chosen else ""
        print(f"  {row['weights']:<40} {row['frechet_distance']:10.4f} {row['class_accuracy']:10.4f}{mark}")
    print(
        f"  {'real train vs test':<40} {report['real_reference_distance']:10.4f} {report['real_class_accuracy']:10.4f}"
    )
    print(
        f"  {'autoencoder reconstructions':<40} {report['autoencoder_reference_distance']:10.4f} "
        f"{report['autoencoder_class_accuracy']:10.4f}"
    )
