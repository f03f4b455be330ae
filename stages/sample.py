"""Stage 3: sample a trained DiT, decode through its autoencoder, and measure the samples.

`write_samples` is `ldm sample` (a grid PNG and the single images); `evaluate_samples` is
`ldm eval samples` (Frechet distance to real images over named features, class accuracy under the
project's classifier, time per image; a JSON report and a grid).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ldm.artifacts import ArtifactStore, write_atomic
from ldm.config import from_dict
from ldm.data import DataConfig, build_dataset, data_fingerprint, iterate_images
from ldm.generation import SamplingSettings, model_calls
from ldm.images import save_grid, save_png, to_pil
from ldm.loading import feature_extractor, load_classifier
from ldm.metrics import FeatureStats, frechet_distance
from ldm.runtime import synchronize
from pipeline import LatentDiffusionPipeline

GRID_MAX = 256  # grid.png shows every image up to this many; beyond, the first whole rows of classes that fit
SAMPLE_PNG = re.compile(r"\d{6}-class\d+\.png")  # images/NNNNNN-classC.png: the single images write_samples names


def parse_classes(spec: Optional[str], n: int, num_classes: int) -> torch.Tensor:
    """Labels for n images: "3" (all class 3), "0,2,5" (cycled), or None/"all" (every class in turn)."""
    if spec is None or spec == "all":
        choices = list(range(num_classes))
    else:
        try:
            choices = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--classes must be comma-separated class indices or 'all', got {spec!r}") from None
    if not choices or min(choices) < 0 or max(choices) >= num_classes:
        raise ValueError(f"--classes must name classes in 0..{num_classes - 1}, got {spec!r}")
    return torch.tensor(choices).repeat((n + len(choices) - 1) // len(choices))[:n]


def _report_settings(pipe: LatentDiffusionPipeline, settings: SamplingSettings) -> dict:
    """What a report records of the models and the sampling settings."""
    return {
        "model": pipe.provenance.diffusion if pipe.provenance else None,
        "autoencoder": pipe.provenance.autoencoder if pipe.provenance else None,
        "sampler": settings.sampler, "steps": settings.num_steps, "spacing": settings.spacing,
        "guidance_scale": settings.guidance_scale,
        "guidance_interval": list(settings.guidance_interval) if settings.guidance_interval else None, "seed": settings.seed,
        "guide": pipe.provenance.guide if pipe.provenance else None,  # autoguidance: the weaker DiT that guides
        "guide_scale": settings.guide_scale if pipe.guide is not None else None,
    }


def _guidance_text(settings: dict) -> str:
    """"cfg 2.0", "cfg 2.0 on t in [100, 600]", "cfg 1.0 + autoguidance 2.0 by diffusion@..." for a report."""
    interval = settings["guidance_interval"]
    text = f"cfg {settings['guidance_scale']}"
    if settings.get("guide"):
        text += f" + autoguidance {settings['guide_scale']} by {settings['guide']}"
    return text + (f" on t in [{interval[0]:g}, {interval[1]:g}]" if interval else "")


def write_samples(
    store: ArtifactStore,
    model_ref: str,
    settings: SamplingSettings,
    n: int = 64,
    classes: Optional[str] = None,
    out_dir: str | Path = "out/samples",
    device: str = "cpu",
    single_images: bool = True,
    autoencoder_ref: Optional[str] = None,
    guide_ref: Optional[str] = None,
    overwrite: bool = False,
) -> dict:
    """Sample n class-conditional images; write images/NNNNNN-classC.png, grid.png and samples.json, and return the report.

    Streams: each batch's images are written as soon as they are decoded and samples.json is
    rewritten after every batch ("complete": false until the end), so a run stopped early keeps
    what it made. Only the images of the grid stay in memory. Image i uses seed + i whatever the batch size.
    """
    _check_count(n)
    out_dir = Path(out_dir)
    check_folder(out_dir / "images" if single_images else out_dir)
    pipe = LatentDiffusionPipeline.from_artifacts(model_ref, store=store, autoencoder=autoencoder_ref, device=device,
                                                  guide=guide_ref)
    settings = pipe.settings(settings)
    labels = parse_classes(classes, n, pipe.num_classes)
    for path in earlier_samples(out_dir, overwrite):  # --overwrite: our earlier outputs only, never the folder or other files
        path.unlink(missing_ok=True)
    recorded = {**_report_settings(pipe, settings), "n": n}
    in_grid = _grid_count(n, len(set(labels.tolist())))
    grid_images, seconds = [], 0.0
    batch_size = settings.batch_size
    bar = tqdm(total=math.ceil(n / batch_size) * model_calls(settings.sampler, settings.num_steps), unit="step",
               desc=f"{n} samples ({settings.sampler}, {settings.num_steps} steps, {_guidance_text(recorded)})")
    with bar:
        for start in range(0, n, batch_size):
            batch = labels[start : start + batch_size]
            began = time.perf_counter()
            images = pipe.sample(batch, settings, seed=settings.seed + start, on_model_call=bar.update)
            synchronize(pipe.device)
            seconds += time.perf_counter() - began
            if single_images:
                for i, (image, label) in enumerate(zip(to_pil(images), batch.tolist()), start=start):
                    save_png(image, out_dir / "images" / f"{i:06d}-class{label}.png")
            if start < in_grid:
                grid_images.append(images[: in_grid - start].cpu())
            done = start + len(batch)
            _write_json(out_dir / "samples.json", {**recorded, "sampled": done, "labels": labels[:done].tolist(), "complete": False})
    grid = save_class_grid(torch.cat(grid_images), labels[:in_grid], out_dir / "grid.png")
    report = {**recorded, "sampled": n, "labels": labels.tolist(), "complete": True,
              "seconds": round(seconds, 2), "seconds_per_image": seconds / n}
    _write_json(out_dir / "samples.json", report)
    print(f"{n} samples from {report['model']} ({settings.sampler}, {settings.num_steps} steps, {_guidance_text(report)}, "
          f"seed {settings.seed}) "
          f"in {seconds:.1f}s ({1000 * seconds / n:.1f} ms/image)")
    print(f"  grid {grid}" + (f"   images {out_dir / 'images'}" if single_images else ""))
    return report


def earlier_samples(out_dir: Path, overwrite: bool) -> list[Path]:
    """Return the files an earlier `ldm sample` left in out_dir, to remove; raise FileExistsError if any, unless overwrite."""
    ours = [out_dir / name for name in ("grid.png", "samples.json") if (out_dir / name).is_file()]
    pngs = sorted((out_dir / "images").glob("*.png")) if (out_dir / "images").is_dir() else []
    if (ours or pngs) and not overwrite:
        found = ", ".join(str(path.relative_to(out_dir)) for path in (ours + pngs)[:3])
        raise FileExistsError(f"--out {out_dir} already holds samples ({found}{', ...' if len(ours + pngs) > 3 else ''}): "
                              f"pass --overwrite to replace them (it removes grid.png, samples.json and "
                              f"images/NNNNNN-classC.png, nothing else), or another --out")
    return ours + [path for path in pngs if SAMPLE_PNG.fullmatch(path.name)]


def check_folder(path: Path) -> None:
    """Raise ValueError when path, or a folder above it, is a file: nothing could be written there."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"--out: {existing} is a file, not a folder; pass a folder path (it is created when missing)")


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, path: Path) -> Path:
    """Write a grid of images (N, C, H, W) with labels (N,), one row per class when every class has as many, and return its path."""
    n, distinct = len(labels), len(set(labels.tolist()))
    balanced = n % distinct == 0
    order = torch.argsort(labels, stable=True) if balanced else torch.arange(n)
    return save_grid(images[order], path, nrow=n // distinct if balanced and distinct > 1 else None, scale=2)


def _grid_count(n: int, classes: int) -> int:
    """How many of the first images the grid shows: all up to GRID_MAX, else whole rounds of the (cycled) classes."""
    if n <= GRID_MAX:
        return n
    return (GRID_MAX // classes) * classes if classes <= GRID_MAX else GRID_MAX


def _check_count(n: int) -> None:
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")


def _write_json(path: Path, report: dict) -> None:
    write_atomic(path, json.dumps(report, indent=2).encode())


@torch.no_grad()
def real_statistics(extractor, dataset, limit: int, batch_size: int, device: torch.device) -> FeatureStats:
    """Feature statistics of the first `limit` images of a dataset."""
    stats = FeatureStats()
    for images, _ in iterate_images(dataset, batch_size, limit):
        stats.update(extractor(images.to(device)))
    return stats


@dataclass
class SampleReference:
    """What samples are measured against: the features, the classifier, the test split's statistics and two floors.

    Built once by `sample_reference` and shared by every model measured with it (`ldm ema` measures several).
    """

    extractor: Any  # images (N, C, H, W) in [-1, 1] -> features (N, D)
    classifier: torch.nn.Module
    classifier_ref: str
    test_stats: FeatureStats
    n_real: int  # test (and train) images in the statistics
    reference_distance: float  # train vs test images: what a perfect model would reach
    autoencoder_distance: float  # reconstructed train vs test images: the floor through this autoencoder
    test_fingerprint: str
    device: torch.device


@torch.no_grad()
def sample_reference(store: ArtifactStore, pipe: LatentDiffusionPipeline, n: int, classifier_ref: str, features: str,
                     batch_size: int, device: torch.device) -> SampleReference:
    """Measure the test split and the two floors of `evaluate_samples` with n images (fewer if a split is smaller)."""
    extractor = feature_extractor(store, features, classifier_ref, device)
    classifier_artifact = store.load(classifier_ref, stage="classifier")
    classifier = load_classifier(classifier_artifact, device)

    autoencoder = store.load(pipe.provenance.autoencoder, stage="autoencoder", verify=False)
    data_config = replace(from_dict(DataConfig, autoencoder.config()["data"], "data"), hflip=False)
    test, train = build_dataset(data_config, "test"), build_dataset(data_config, "train")
    n_real = min(n, len(test), len(train))
    test_stats = real_statistics(extractor, test, n_real, batch_size, device)
    train_stats, reconstruction_stats = FeatureStats(), FeatureStats()
    for images, _ in iterate_images(train, batch_size, n_real):  # one pass: each image as is and reconstructed
        images = images.to(device)
        train_stats.update(extractor(images))
        reconstruction_stats.update(extractor(pipe.decode(pipe.encode(images))))
    reference = frechet_distance(train_stats.mean(), train_stats.cov(), test_stats.mean(), test_stats.cov())
    autoencoder_floor = frechet_distance(
        reconstruction_stats.mean(), reconstruction_stats.cov(), test_stats.mean(), test_stats.cov()
    )
    return SampleReference(extractor, classifier, classifier_artifact.ref, test_stats, n_real, reference, autoencoder_floor,
                           data_fingerprint(data_config, "test"), device)


@torch.no_grad()
def measure_samples(pipe: LatentDiffusionPipeline, settings: SamplingSettings, n: int,
                    reference: SampleReference) -> tuple[dict, torch.Tensor]:
    """Return the report of n class-balanced samples (image i from settings.seed + i) and the first 100 images (on the CPU)."""
    labels = torch.arange(n) % pipe.num_classes
    sample_stats = FeatureStats()
    correct, seconds, grid_images = 0, 0.0, []
    recorded = _report_settings(pipe, settings)
    bar = tqdm(total=n, desc=f"sampling ({settings.sampler}, {settings.num_steps} steps, {_guidance_text(recorded)})",
               unit="img")
    with bar:
        for start in range(0, n, settings.batch_size):
            batch_labels = labels[start : start + settings.batch_size]
            began = time.perf_counter()
            images = pipe.sample(batch_labels, settings, seed=settings.seed + start)
            synchronize(reference.device)
            seconds += time.perf_counter() - began
            sample_stats.update(reference.extractor(images))
            correct += int((reference.classifier(images).argmax(1).cpu() == batch_labels).sum())
            if sum(len(g) for g in grid_images) < 100:
                grid_images.append(images[: 100 - sum(len(g) for g in grid_images)].cpu())
            bar.update(len(batch_labels))
    test_stats, n_real = reference.test_stats, reference.n_real
    distance = frechet_distance(test_stats.mean(), test_stats.cov(), sample_stats.mean(), sample_stats.cov())
    report = {
        **recorded,
        "n": n,
        "frechet_distance": distance,
        "features": reference.extractor.name,
        "is_standard_fid": bool(reference.extractor.is_standard),
        "real_reference_distance": reference.reference_distance,
        "real_reference": f"{n_real} train vs {n_real} test images, same features",
        "ratio_to_reference": distance / reference.reference_distance if reference.reference_distance > 0 else float("inf"),
        "autoencoder_reference_distance": reference.autoencoder_distance,
        "autoencoder_reference": f"{n_real} train images encoded and decoded by {pipe.provenance.autoencoder} vs {n_real} test images",
        "class_accuracy": correct / n,
        "class_accuracy_classifier": reference.classifier_ref,
        "seconds_per_image": seconds / n,
        "test_data": {"images": n_real, "fingerprint": reference.test_fingerprint},
        "device": str(reference.device),
        "threads": torch.get_num_threads(),
    }
    return report, torch.cat(grid_images)


def evaluation_name(pipe: LatentDiffusionPipeline, settings: SamplingSettings, n: int) -> str:
    """`samples-dpm++2m-20-cfg1.5-n10000`: the name of a measurement in a manifest's metrics and of its folder."""
    interval = f"-t{settings.guidance_interval[0]:g}-{settings.guidance_interval[1]:g}" if settings.guidance_interval else ""
    spaced = "" if settings.spacing == "trailing" else f"-{settings.spacing}"
    decoder = "" if pipe.provenance.autoencoder == pipe.provenance.lineage_autoencoder else f"-{pipe.provenance.autoencoder.replace('@', '-')}"
    guided = f"-guide{settings.guide_scale:g}-{pipe.provenance.guide.split('@')[1]}" if pipe.provenance.guide else ""
    return f"samples-{settings.sampler}-{settings.num_steps}{spaced}-cfg{settings.guidance_scale:g}{interval}{guided}{decoder}-n{n}"


METRIC_KEYS = ("frechet_distance", "real_reference_distance", "autoencoder_reference_distance", "class_accuracy",
               "seconds_per_image")  # what a manifest's metrics keep of a sample report


def report_metrics(report: dict) -> dict:
    """The numbers of a sample report that a manifest's metrics keep."""
    return {**{k: report[k] for k in METRIC_KEYS}, "features": report["features"], "n": report["n"]}


@torch.no_grad()
def evaluate_samples(
    store: ArtifactStore,
    model_ref: str,
    settings: SamplingSettings,
    n: int = 10_000,
    classifier_ref: str = "classifier@latest",
    features: str = "auto",
    out_dir: str | Path | None = None,
    device: str = "cpu",
    autoencoder_ref: Optional[str] = None,
    guide_ref: Optional[str] = None,
) -> dict:
    """Frechet distance of n class-balanced samples to the test split, class accuracy and time per image.

    Also measures two floors with the same features and number of images: n training images
    against the test images (what a perfect model would reach), and the same training images
    encoded and decoded by the autoencoder against the test images (what a perfect diffusion
    model would reach through this autoencoder; when samples sit near it, stage 1 limits them).
    """
    _check_count(n)
    if out_dir is not None:
        check_folder(Path(out_dir))
    device_ = torch.device(device)
    pipe = LatentDiffusionPipeline.from_artifacts(model_ref, store=store, autoencoder=autoencoder_ref, device=device_,
                                                  guide=guide_ref)
    settings = pipe.settings(settings)
    reference = sample_reference(store, pipe, n, classifier_ref, features, settings.batch_size, device_)
    report, first = measure_samples(pipe, settings, n, reference)
    name = evaluation_name(pipe, settings, n)
    out_dir = Path(out_dir or Path("runs") / "eval" / f"{name}-{pipe.provenance.diffusion.split('@')[1]}")
    write_atomic(out_dir / "report.json", json.dumps(report, indent=2).encode())
    grid = save_grid(first, out_dir / "samples.png", nrow=pipe.num_classes if len(first) >= pipe.num_classes else None, scale=2)
    store.update_manifest(store.load(model_ref, stage="diffusion", verify=False), metrics={name: report_metrics(report)})
    print_sample_report(report, out_dir, grid)
    return report


def print_sample_report(report: dict, out_dir: Path, grid: Path) -> None:
    kind = "FID" if report["is_standard_fid"] else "FD (not Inception FID)"
    print(f"{report['n']} samples of {report['model']}: {report['sampler']}, {report['steps']} steps ({report['spacing']}), "
          f"{_guidance_text(report)}")
    print(f"  {kind:<22} {report['frechet_distance']:9.4f}   [{report['features']}]")
    print(f"  real train vs test     {report['real_reference_distance']:9.4f}   ({report['real_reference']}; "
          f"samples are {report['ratio_to_reference']:.2f}x that)")
    print(f"  reconstructions        {report['autoencoder_reference_distance']:9.4f}   ({report['autoencoder_reference']}: "
          f"the floor for samples decoded by this autoencoder)")
    print(f"  class accuracy         {report['class_accuracy']:9.4f}   [{report['class_accuracy_classifier']}]")
    print(f"  time per image         {1000 * report['seconds_per_image']:9.2f} ms ({report['device']}, {report['threads']} threads)")
    print(f"  report {out_dir / 'report.json'}   grid {grid}")

