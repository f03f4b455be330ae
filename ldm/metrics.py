"""Evaluation metrics: PSNR, SSIM, and the Frechet distance between Gaussians fitted to features.

Images are float tensors (N, C, H, W) in [-1, 1], as everywhere in the library. Clamp decoder
or sampler outputs to [-1, 1] before measuring, as saving them as pictures would.

The Frechet distance is only as meaningful as its feature space, so every feature extractor
carries a `name` that says what it measures and an `is_standard` flag: only Inception-v3 pool3
features (`InceptionFeatures`) give a number comparable to published FID. Inception weights are
never downloaded at run time; `inception_available` says what is missing and where to put it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics.functional.image import structural_similarity_index_measure

from ldm.data import iterate_images
from ldm.losses.lpips import MissingWeightsError, PerceptualConfig, build_lpips, resolve_backbone_file
from ldm.runtime import synchronize

# The converted TF Inception-v3 (2015-12-05 graph) that torch-fidelity, and through it
# torchmetrics, use for FID. torch.hub would save the URL's file under its own basename.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# pytorch-fid distributes a conversion of the same graph under this name, with the same
# parameter names (torch-fidelity's network is adapted from pytorch-fid's); loading is strict,
# so a file that does not fit fails loudly instead of giving wrong features.
INCEPTION_WEIGHTS_ALT_FILENAME = "pt_inception-2015-12-05-6726825d.pth"


def _to_unit_range(images: Tensor) -> Tensor:
    """Map [-1, 1] to [0, 1]."""
    return (images + 1.0) / 2.0


# --------------------------------------------------------------------------- pixel metrics


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB (N,), float64, of images x and y (N, C, H, W) in [-1, 1].

    With data_range=2 on [-1, 1] this is exactly PSNR on [0, 1]-scaled pixels, the usual
    convention for reported numbers. Identical images give +inf (zero error); report the
    mean over a set only when none is inf, or the median.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.double() - y.double()).square().flatten(1).mean(dim=1)  # (N,)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-image SSIM (N,) of images x and y (N, C, H, W) in [-1, 1], measured on [0, 1].

    The standard setting of Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5,
    K1=0.01, K2=0.03, via torchmetrics (the same computation as its
    `StructuralSimilarityIndexMeasure`, whose batch mean is the mean of these values).
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    return structural_similarity_index_measure(
        _to_unit_range(x),
        _to_unit_range(y),
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=1.0,
        reduction="none",
    )


# --------------------------------------------------------------------------- Frechet distance


def frechet_distance(
    mu1: Tensor | np.ndarray,
    sigma1: Tensor | np.ndarray,
    mu2: Tensor | np.ndarray,
    sigma2: Tensor | np.ndarray,
) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), computed in float64.
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    sigma2 = sigma2.to(sigma1.device)
    mu1, mu2 = mu1.to(sigma1.device), mu2.to(sigma1.device)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be equal-length vectors, got {tuple(mu1.shape)} and {tuple(mu2.shape)}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        shapes = f"{tuple(sigma1.shape)} and {tuple(sigma2.shape)}"
        raise ValueError(f"covariances must be ({d}, {d}), got {shapes}")

    # S1 S2 is not symmetric, so its square root needs a general eig or sqrtm (the TTUR
    # reference uses scipy's sqrtm), which turns complex or fails on the near-singular
    # covariances that come from fewer samples than dimensions. S1^(1/2) S2 S1^(1/2) has the
    # same eigenvalues and is symmetric PSD, so a symmetric eigh suffices; eigenvalues that
    # rounding makes slightly negative are really zero and are clamped.
    evals1, evecs1 = torch.linalg.eigh(sigma1)
    sqrt_sigma1 = (evecs1 * evals1.clamp_min(0).sqrt()) @ evecs1.T  # (D, D)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    middle = (middle + middle.T) / 2  # remove the asymmetry rounding left, eigh reads one triangle
    trace_sqrt_product = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()

    diff = mu1 - mu2
    distance = diff @ diff + sigma1.trace() + sigma2.trace() - 2.0 * trace_sqrt_product
    return float(distance)


class FeatureStats:
    """Streaming mean and covariance of feature vectors, accumulated in float64.

    Keeps the count, the sum and the sum of outer products of (features - shift), where the
    shift is the first batch's mean: with the raw sums, cov = E[xx^T] - mu mu^T cancels
    catastrophically when the mean is large next to the spread; centring near the mean keeps
    the subtraction small. Lives on the device of the first batch.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: Tensor | None = None  # (D,)
        self._sum: Tensor | None = None  # (D,)
        self._sum_outer: Tensor | None = None  # (D, D)

    @classmethod
    def from_features(cls, features: Tensor) -> FeatureStats:
        """Statistics of one (N, D) block of features."""
        stats = cls()
        stats.update(features)
        return stats

    @property
    def dim(self) -> int | None:
        """Feature dimension D, or None before the first update."""
        return None if self._shift is None else self._shift.shape[0]

    def update(self, features: Tensor) -> None:
        """Add a batch of features (N, D)."""
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
        if features.shape[0] == 0:
            return
        x = features.detach().to(torch.float64)
        if self._shift is None:
            self._shift = x.mean(dim=0)
            self._sum = torch.zeros_like(self._shift)
            self._sum_outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed from {self.dim} to {x.shape[1]}")
        centred = x.to(self._shift.device) - self._shift  # (N, D)
        self._sum += centred.sum(dim=0)
        self._sum_outer += centred.T @ centred
        self.count += x.shape[0]

    def mean(self) -> Tensor:
        """Mean feature vector (D,), float64."""
        if self.count == 0:
            raise ValueError("no features accumulated")
        return self._shift + self._sum / self.count

    def cov(self) -> Tensor:
        """Unbiased covariance (D, D), float64, normalised by N-1 as numpy.cov and FID references do."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        centred_mean = self._sum / self.count  # (D,), mean of the shifted features
        cov = (self._sum_outer - self.count * torch.outer(centred_mean, centred_mean)) / (self.count - 1)
        return (cov + cov.T) / 2


# --------------------------------------------------------------------------- feature extractors


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images (N, C, H, W) in [-1, 1] to features (N, D) for a Frechet distance."""

    name: str  # says what the features are, so a number is never reported as something else
    is_standard: bool  # True only for features that give published-comparable FID

    def __call__(self, images: Tensor) -> Tensor: ...


class ClassifierFeatures:
    """Penultimate features of a Fashion-MNIST classifier (a project-specific "FID").

    `artifact_ref` names the exact weights (e.g. "classifier@1a2b3c4d"): distances are
    comparable only between numbers measured with the same weights.
    """

    is_standard = False

    def __init__(self, model: nn.Module, artifact_ref: str) -> None:
        if not callable(getattr(model, "features", None)):
            raise TypeError("ClassifierFeatures needs a model with a features(x) method")
        self.model = model
        self.name = f"{artifact_ref} penultimate features (not Inception; not comparable to published FID)"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Features (N, feature_dim) of images (N, C, H, W) in [-1, 1], computed in eval mode."""
        # Eval mode makes features a function of the image alone (BN running statistics, no
        # dropout); the caller's mode is restored, since the model may be mid-training.
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        features = self.model.features(images.to(device))
        self.model.train(was_training)
        return features


def inception_weights_dir() -> Path:
    """The torch hub checkpoints folder, where torch.hub would have cached the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _find_inception_weights(path: str | Path | None) -> Path | None:
    """The weights file: `path` if given and present, else the first known name in the hub folder."""
    if path is not None:
        path = Path(path).expanduser()
        return path if path.is_file() else None
    for filename in (INCEPTION_WEIGHTS_FILENAME, INCEPTION_WEIGHTS_ALT_FILENAME):
        candidate = inception_weights_dir() / filename
        if candidate.is_file():
            return candidate
    return None


def inception_available(path: str | Path | None = None) -> tuple[bool, str]:
    """(True, what will be used) if Inception FID can run offline, else (False, all that is missing)."""
    problems = []
    if importlib.util.find_spec("torch_fidelity") is None:
        problems.append(
            "the package torch-fidelity is not installed (it provides the FID Inception-v3 network that "
            "torchmetrics also uses): pip install torch-fidelity"
        )
    weights = _find_inception_weights(path)
    if weights is None:
        where = (
            f"{Path(path).expanduser()}"
            if path is not None
            else f"{INCEPTION_WEIGHTS_FILENAME} in {inception_weights_dir()}"
        )
        problems.append(
            f"the Inception-v3 weights file is missing: expected {where}. Download "
            f"{INCEPTION_WEIGHTS_URL} on a machine with internet and copy it there (or pass its path); "
            "nothing is downloaded at run time"
        )
    if problems:
        return False, "Inception FID is unavailable: " + "; ".join(problems) + "."
    version = importlib.metadata.version("torch-fidelity")
    return True, f"torch-fidelity {version}, weights {weights}"


class InceptionUnavailableError(RuntimeError):
    """Raised when Inception features are requested but their package or weights are missing."""


def to_inception_input(images: Tensor) -> Tensor:
    """uint8 RGB images (N, 3, H, W) in [0, 255] from float images (N, 1 or 3, H, W) in [-1, 1]."""
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
    # Quantise as saving a PNG would (ADM and DiT evaluation: 127.5 x + 128, clamp, truncate),
    # since reference FID statistics come from 8-bit images.
    pixels = (images * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)
    # Inception sees RGB; a grayscale image is the same gray in all three channels.
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


class InceptionFeatures:
    """2048-d pool3 features of the FID Inception-v3 (torch-fidelity), the standard FID space.

    Inputs are quantised to uint8 and made RGB (`to_inception_input`); the network resizes
    them to 299x299 with TF1-compatible bilinear interpolation, as the original FID code did.
    """

    name = "Inception-v3 (2015-12-05) pool3, torch-fidelity: standard FID features"
    is_standard = True

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        available, reason = inception_available(weights_path)
        if not available:
            raise InceptionUnavailableError(reason)
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,
        )

        # A weights path is always given, so torch-fidelity never reaches for the network.
        weights = str(_find_inception_weights(weights_path))
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=weights
        )
        self.model.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Features (N, 2048), float32, of images (N, 1 or 3, H, W) in [-1, 1]."""
        (features,) = self.model(to_inception_input(images).to(self.device))
        return features


# --------------------------------------------------------------------------- conveniences

Batches = Iterable[Tensor | tuple | list]


def feature_stats(extractor: FeatureExtractor, batches: Batches) -> FeatureStats:
    """Feature statistics of a stream of image batches; a (images, labels, ...) batch uses images."""
    stats = FeatureStats()
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        stats.update(extractor(images))
    return stats


def frechet_distance_of(
    extractor: FeatureExtractor,
    images_a: Batches | FeatureStats,
    images_b: Batches | FeatureStats,
) -> float:
    """Frechet distance in `extractor`'s feature space between two image streams.

    Either side may be precomputed `FeatureStats` (e.g. reference statistics of the training
    set). The estimate is biased upward at small N, so compare numbers at equal sample counts.
    """
    a = images_a if isinstance(images_a, FeatureStats) else feature_stats(extractor, images_a)
    b = images_b if isinstance(images_b, FeatureStats) else feature_stats(extractor, images_b)
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


def throughput(fn: Callable[[], object], items_per_call: int, repeats: int = 5, warmup: int = 1) -> float:
    """Items per second of fn(), the median over `repeats` timed calls after `warmup` untimed ones."""
    # CUDA kernels run asynchronously; without a sync the clock stops before the work does.
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return items_per_call / statistics.median(seconds)


@torch.no_grad()
def classifier_accuracy(
    model: nn.Module, dataset: Dataset, batch_size: int = 500, device: str | torch.device = "cpu"
) -> float:
    """Return the fraction of `dataset` that `model` classifies correctly (eval mode, mode restored)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in iterate_images(dataset, batch_size):
        predicted = model(images.to(device)).argmax(1).cpu()
        correct += int((predicted == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(1, total)


def perceptual_metric(choice: str, net: str = "vgg"):
    """Return the LPIPS module for evaluation: pretrained when asked or available, random only when asked or offline."""
    if choice == "auto":
        try:
            resolve_backbone_file(PerceptualConfig(net=net))
            choice = "pretrained"
        except MissingWeightsError:
            choice = "random"
            print("LPIPS backbone weights not found; reporting LPIPS with a RANDOM backbone (not the standard LPIPS)")
    return build_lpips(PerceptualConfig(net=net, backbone=choice))


# --------------------------------------------------------------------------- what FD mixes: fidelity, diversity, copies

# Rows of the pairwise-distance matrix computed at once: 512 x 60,000 float64 distances are 0.25 GB.
DISTANCE_CHUNK = 512


def nearest_distances(queries: Tensor, points: Tensor, k: int = 1, exclude_self: bool = False) -> tuple[Tensor, Tensor]:
    """Return the distances (M, k) from each query (M, D) to its k nearest points (N, D), ascending, and their indices.

    exclude_self: the queries are the first M of the points, and each one's zero distance to itself is skipped, so
    column j holds its (j+1)-th neighbour other than itself. Euclidean, in float64 via chunks of DISTANCE_CHUNK rows.
    """
    if queries.ndim != 2 or points.ndim != 2 or queries.shape[1] != points.shape[1]:
        raise ValueError(f"expected features (M, D) and (N, D), got {tuple(queries.shape)} and {tuple(points.shape)}")
    available = points.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k = {k} nearest neighbours need at least {k + int(exclude_self)} points, got {len(points)}")
    points = points.to(torch.float64)
    distances, indices = [], []
    for start in range(0, len(queries), DISTANCE_CHUNK):
        chunk = queries[start : start + DISTANCE_CHUNK].to(torch.float64)
        pairwise = torch.cdist(chunk, points)  # (m, N)
        if exclude_self:
            rows = torch.arange(len(chunk))
            pairwise[rows, rows + start] = float("inf")
        found = pairwise.topk(k, dim=1, largest=False)  # ascending
        distances.append(found.values)
        indices.append(found.indices)
    return torch.cat(distances), torch.cat(indices)


def manifold_metrics(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, float]:
    """Precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020) of fake features.

    Each real point (N, D) owns a ball reaching its k-th nearest real neighbour (each fake point (M, D) one to its
    k-th nearest fake neighbour). Precision: the share of fake points inside some real ball (fidelity). Recall: the
    share of real points inside some fake ball (diversity). Density: real balls holding each fake point, averaged
    and divided by k (1 when fakes sit as densely as reals; above 1 where they crowd). Coverage: the share of real
    balls holding at least one fake point. Naeem et al. use k = 5.
    """
    real_radii = nearest_distances(real, real, k, exclude_self=True)[0][:, -1]  # (N,)
    fake_radii = nearest_distances(fake, fake, k, exclude_self=True)[0][:, -1]  # (M,)
    inside_real = torch.zeros(len(fake), dtype=torch.bool)  # fake j in some real ball
    balls_per_fake = torch.zeros(len(fake), dtype=torch.float64)
    covered = torch.zeros(len(real), dtype=torch.bool)  # real ball i holds some fake
    recalled = torch.zeros(len(real), dtype=torch.bool)  # real i in some fake ball
    fake64 = fake.to(torch.float64)
    for start in range(0, len(real), DISTANCE_CHUNK):
        pairwise = torch.cdist(real[start : start + DISTANCE_CHUNK].to(torch.float64), fake64)  # (n, M)
        in_real_ball = pairwise <= real_radii[start : start + DISTANCE_CHUNK, None].to(pairwise.device)  # (n, M)
        inside_real |= in_real_ball.any(0).cpu()
        balls_per_fake += in_real_ball.sum(0).cpu()
        covered[start : start + DISTANCE_CHUNK] = in_real_ball.any(1).cpu()
        recalled[start : start + DISTANCE_CHUNK] = (pairwise <= fake_radii[None, :].to(pairwise.device)).any(1).cpu()
    return {
        "precision": inside_real.double().mean().item(),
        "recall": recalled.double().mean().item(),
        "density": (balls_per_fake.mean() / k).item(),
        "coverage": covered.double().mean().item(),
    }


def copy_threshold(train: Tensor, quantile: float = 0.01, limit: int = 10_000) -> float:
    """The `quantile` of training images' distances to their nearest other training image, over the first `limit`.

    A generated image nearer than this to a training image is nearer to it than all but that share of training
    images are to one another: counted as a copy by `memorisation_rate`. A generator that copies nothing flags
    about `quantile` of its samples, as fresh images of the data do (the test split's rate is its floor).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"the copy quantile must lie in (0, 1), got {quantile}")
    queries = train[:limit]
    distances = nearest_distances(queries, train, 1, exclude_self=True)[0][:, 0]
    return torch.quantile(distances, quantile).item()
