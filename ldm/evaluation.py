"""Measuring samples: Frechet distance to the test split, class accuracy, the two floors, what a report records.

Beside FD, which mixes fidelity and diversity into one number, a report separates them: precision and
recall, density and coverage against the test split (k-NN in the same features), the histogram of
predicted classes against the requested ones (collapse onto a few classes), and a memorisation rate
(samples nearer to a training image than training images are to each other), each beside the value
the training images themselves give against the test split.

`ldm eval samples` and `ldm ema` measure through these, and `bench/convergence.py` reuses the
real-data statistics. `pipe` is a `LatentDiffusionPipeline` (pipeline.py composes the library, so
the library takes it by what it offers: `sample`, `encode`, `decode`, `num_classes`,
`guide`, `provenance`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.artifacts import ArtifactStore
from ldm.config import from_dict
from ldm.data import DataConfig, build_dataset, data_fingerprint, iterate_images
from ldm.generation import SamplingSettings
from ldm.images import save_grid
from ldm.loading import feature_extractor, load_classifier
from ldm.metrics import FeatureStats, copy_threshold, frechet_distance, manifold_metrics, nearest_distances
from ldm.runtime import synchronize

EVAL_FOLDER = Path("runs") / "eval"  # where a measurement's report and pictures go without --out
MANIFOLD_K = 5  # neighbours of precision/recall/density/coverage: Naeem et al. 2020's choice
COPY_QUANTILE = 0.01  # memorisation: nearer to a training image than 99% of training images are to their nearest
NEAREST_PAIRS = 8  # samples nearest to a training image shown beside it in nearest-train.png


def report_settings(pipe, settings: SamplingSettings) -> dict:
    """What a report records of the models and the sampling settings."""
    return {
        "model": pipe.provenance.diffusion if pipe.provenance else None,
        "autoencoder": pipe.provenance.autoencoder if pipe.provenance else None,
        "sampler": settings.sampler,
        "steps": settings.num_steps,
        "spacing": settings.spacing,
        "shift": settings.shift,
        "guidance_scale": settings.guidance_scale,
        "guidance_interval": list(settings.guidance_interval) if settings.guidance_interval else None,
        "seed": settings.seed,
        "guide": pipe.provenance.guide if pipe.provenance else None,  # autoguidance: the weaker DiT that guides
        "guide_scale": settings.guide_scale if pipe.guide is not None else None,
        "precision": pipe.precision,
    }


def guidance_text(settings: dict) -> str:
    """ "cfg 2.0", "cfg 2.0 on t in [100, 600]", "cfg 1.0 + autoguidance 2.0 by diffusion@..." for a report."""
    interval = settings["guidance_interval"]
    text = f"cfg {settings['guidance_scale']}"
    if settings.get("guide"):
        text += f" + autoguidance {settings['guide_scale']} by {settings['guide']}"
    return text + (f" on t in [{interval[0]:g}, {interval[1]:g}]" if interval else "")


@torch.no_grad()
def real_features(extractor, dataset, limit: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Features (N, D) of the first `limit` images of a dataset (all of them at 0), on the CPU."""
    batches = iterate_images(dataset, batch_size, limit)
    return torch.cat([extractor(images.to(device)).float().cpu() for images, _ in batches])


def real_statistics(extractor, dataset, limit: int, batch_size: int, device: torch.device) -> FeatureStats:
    """Feature statistics of the first `limit` images of a dataset."""
    return FeatureStats.from_features(real_features(extractor, dataset, limit, batch_size, device))


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
    real_accuracy: float  # the classifier's accuracy on the same train images
    autoencoder_accuracy: float  # ... and on their reconstructions: the ceiling of samples decoded by this autoencoder
    test_fingerprint: str
    device: torch.device
    test_features: torch.Tensor  # (n_real, D): precision, recall, density and coverage are against these
    train_features: torch.Tensor  # (N_train, D), the whole train split: where a copy would be found
    train: Any  # the train split, for the picture of the nearest pairs
    copy_distance: float  # a sample nearer than this to a training image counts as a copy
    real_manifold: dict  # precision ... coverage of the n_real train images against the test images
    real_copy_rate: float  # the share of test images nearer than copy_distance to a training image


@torch.no_grad()
def sample_reference(
    store: ArtifactStore, pipe, n: int, classifier_ref: str, features: str, batch_size: int, device: torch.device
) -> SampleReference:
    """Measure the test split and the two floors of `evaluate_samples` with n images (fewer if a split is smaller)."""
    extractor = feature_extractor(store, features, classifier_ref, device, sound=pipe.sample_rate is not None)
    classifier_artifact = store.load(classifier_ref, stage="classifier")
    classifier = load_classifier(classifier_artifact, device)

    autoencoder = store.load(pipe.provenance.autoencoder, stage="autoencoder", verify=False)
    data_config = replace(from_dict(DataConfig, autoencoder.config()["data"], "data"), hflip=False)
    test, train = build_dataset(data_config, "test"), build_dataset(data_config, "train")
    n_real = min(n, len(test), len(train))
    test_features = real_features(extractor, test, n_real, batch_size, device)
    train_features = real_features(extractor, train, 0, batch_size, device)
    test_stats, train_stats = FeatureStats.from_features(test_features), FeatureStats()
    reconstruction_stats = FeatureStats()
    real_correct = reconstruction_correct = 0
    for images, labels in iterate_images(train, batch_size, n_real):  # one pass: each image as is and reconstructed
        images, labels = images.to(device), labels.to(device)
        reconstructions = pipe.decode(pipe.encode(images))
        reconstruction_stats.update(extractor(reconstructions))
        real_correct += int((classifier(images).argmax(1) == labels).sum())
        reconstruction_correct += int((classifier(reconstructions).argmax(1) == labels).sum())
    train_stats.update(train_features[:n_real])
    reference = frechet_distance(train_stats.mean(), train_stats.cov(), test_stats.mean(), test_stats.cov())
    copy_distance = copy_threshold(train_features, COPY_QUANTILE)
    test_nearest = nearest_distances(test_features, train_features)[0][:, 0]  # (n_real,)
    autoencoder_floor = frechet_distance(
        reconstruction_stats.mean(), reconstruction_stats.cov(), test_stats.mean(), test_stats.cov()
    )
    return SampleReference(
        extractor,
        classifier,
        classifier_artifact.ref,
        test_stats,
        n_real,
        reference,
        autoencoder_floor,
        real_correct / n_real,
        reconstruction_correct / n_real,
        data_fingerprint(data_config, "test"),
        device,
        test_features,
        train_features,
        train,
        copy_distance,
        manifold_or_none(test_features, train_features[:n_real]),
        (test_nearest < copy_distance).double().mean().item(),
    )


@torch.no_grad()
def measure_samples(
    pipe, settings: SamplingSettings, n: int, reference: SampleReference, out_dir: Path | None = None
) -> tuple[dict, torch.Tensor]:
    """Return the report of n class-balanced samples (image i from settings.seed + i), and the first 100 on the CPU.

    With out_dir, the NEAREST_PAIRS samples nearest to a training image go to out_dir/nearest-train.png, each above
    its nearest training image.
    """
    labels = torch.arange(n) % pipe.num_classes
    features, predicted, nearest = [], [], []
    seconds, grid_images = 0.0, []
    closest = None  # (distances, sample images, train indices) of the NEAREST_PAIRS nearest so far
    recorded = report_settings(pipe, settings)
    bar = tqdm(
        total=n,
        desc=f"sampling ({settings.sampler}, {settings.num_steps} steps, {guidance_text(recorded)})",
        unit="img",
    )
    with bar:
        for start in range(0, n, settings.batch_size):
            batch_labels = labels[start : start + settings.batch_size]
            began = time.perf_counter()
            images = pipe.sample(batch_labels, settings, seed=settings.seed + start)
            synchronize(reference.device)
            seconds += time.perf_counter() - began
            batch_features = reference.extractor(images).float().cpu()  # (B, D)
            features.append(batch_features)
            predicted.append(reference.classifier(images).argmax(1).cpu())
            distances, indices = nearest_distances(batch_features, reference.train_features)  # (B, 1) each
            nearest.append(distances[:, 0])
            closest = _keep_closest(closest, distances[:, 0], images.cpu(), indices[:, 0])
            if sum(len(g) for g in grid_images) < 100:
                grid_images.append(images[: 100 - sum(len(g) for g in grid_images)].cpu())
            bar.update(len(batch_labels))
    features, predicted, nearest = torch.cat(features), torch.cat(predicted), torch.cat(nearest)
    sample_stats = FeatureStats.from_features(features)
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
        "ratio_to_reference": distance / reference.reference_distance
        if reference.reference_distance > 0
        else float("inf"),
        "autoencoder_reference_distance": reference.autoencoder_distance,
        "autoencoder_reference": (
            f"{n_real} train images encoded and decoded by {pipe.provenance.autoencoder} vs {n_real} test images"
        ),
        "class_accuracy": (predicted == labels).double().mean().item(),
        "real_class_accuracy": reference.real_accuracy,
        "autoencoder_class_accuracy": reference.autoencoder_accuracy,
        "class_accuracy_reference": (
            f"the same {n_real} train images as they are and encoded and decoded by {pipe.provenance.autoencoder}"
        ),
        "class_accuracy_classifier": reference.classifier_ref,
        "class_histogram": {
            "requested": torch.bincount(labels, minlength=pipe.num_classes).tolist(),
            "predicted": torch.bincount(predicted, minlength=pipe.num_classes).tolist(),
        },
        # Precision/recall here are Kynkaanniemi et al.'s, of the sample set; "precision" is the DiT's arithmetic.
        "manifold": {**manifold_or_none(reference.test_features, features), "k": MANIFOLD_K},
        "real_manifold": reference.real_manifold,
        "manifold_reference": f"{n_real} test images; real_manifold: {n_real} train images in place of the samples",
        "memorisation_rate": (nearest < reference.copy_distance).double().mean().item(),
        "real_memorisation_rate": reference.real_copy_rate,
        "memorisation_reference": (
            f"nearer to one of the {len(reference.train_features)} train images than {1 - COPY_QUANTILE:.0%} of train "
            f"images are to their nearest other (distance {reference.copy_distance:.4g}); real: the test images"
        ),
        "seconds_per_image": seconds / n,
        "test_data": {"images": n_real, "fingerprint": reference.test_fingerprint},
        "device": str(reference.device),
        "threads": torch.get_num_threads(),
    }
    if out_dir is not None and closest is not None:
        _, samples, indices = closest
        train_images = torch.stack([reference.train[int(i)][0] for i in indices])
        save_grid(torch.cat([samples, train_images]), Path(out_dir) / "nearest-train.png", nrow=len(samples), scale=2)
    return report, torch.cat(grid_images)


def manifold_or_none(real: torch.Tensor, fake: torch.Tensor) -> dict:
    """`manifold_metrics` at k = MANIFOLD_K, or None for each where a side has no k neighbours (a handful of images)."""
    if min(len(real), len(fake)) <= MANIFOLD_K:
        return dict.fromkeys(("precision", "recall", "density", "coverage"))
    return manifold_metrics(real, fake, MANIFOLD_K)


def _keep_closest(closest, distances: torch.Tensor, images: torch.Tensor, indices: torch.Tensor):
    """The NEAREST_PAIRS (distances, images, train indices) nearest to the training set among `closest` and a batch."""
    if closest is not None:
        distances, images, indices = (torch.cat([a, b]) for a, b in zip(closest, (distances, images, indices)))
    order = distances.argsort()[:NEAREST_PAIRS]
    return distances[order], images[order], indices[order]


def trajectory_name(pipe, settings: SamplingSettings) -> str:
    """`dpm++2m-20[-leading]-cfg1.5[-t220-840][-guide2-<id>]` (a flow sampler: `flow-heun-10[-shift2]-cfg...`): what
    decides a sampling run's path through the DiT, in the names of its measurements and of its
    step-caching schedules."""
    interval = (
        f"-t{settings.guidance_interval[0]:g}-{settings.guidance_interval[1]:g}" if settings.guidance_interval else ""
    )
    spaced = "" if settings.spacing == "trailing" else f"-{settings.spacing}"
    shifted = "" if settings.shift == 1.0 else f"-shift{settings.shift:g}"
    guided = f"-guide{settings.guide_scale:g}-{pipe.provenance.guide.split('@')[1]}" if pipe.provenance.guide else ""
    return f"{settings.sampler}-{settings.num_steps}{spaced}{shifted}-cfg{settings.guidance_scale:g}{interval}{guided}"


def precision_name(pipe) -> str:
    """`-int8` or `-bf16` for a pipeline that does not run the DiT in float32, else empty: a part of names."""
    return "" if pipe.precision == "float32" else f"-{pipe.precision}"


def evaluation_name(pipe, settings: SamplingSettings, n: int) -> str:
    """`samples-dpm++2m-20-cfg1.5-n10000`: the name of a measurement in a manifest's metrics and of its folder."""
    decoder = (
        ""
        if pipe.provenance.autoencoder == pipe.provenance.lineage_autoencoder
        else f"-{pipe.provenance.autoencoder.replace('@', '-')}"
    )
    cached = f"-cache{settings.cache.fraction:.2g}" if settings.cache is not None else ""
    return f"samples-{trajectory_name(pipe, settings)}{decoder}{precision_name(pipe)}{cached}-n{n}"


METRIC_KEYS = (
    "frechet_distance",
    "real_reference_distance",
    "autoencoder_reference_distance",
    "class_accuracy",
    "real_class_accuracy",
    "autoencoder_class_accuracy",
    "seconds_per_image",
    "manifold",
    "memorisation_rate",
)  # what a manifest's metrics keep of a sample report


def report_metrics(report: dict) -> dict:
    """The numbers of a sample report that a manifest's metrics keep."""
    return {**{k: report[k] for k in METRIC_KEYS}, "features": report["features"], "n": report["n"]}
