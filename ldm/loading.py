"""Build models from stored artifacts (the only way one stage uses another's result)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ldm.artifacts import Artifact
from ldm.config import from_dict
from ldm.diffusion.schedules import DiffusionConfig
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.classifier import Classifier, ClassifierConfig
from ldm.models.dit import DiT, DiTConfig

DIT_WEIGHT_FILES = {"ema": "weights.safetensors", "raw": "raw.safetensors"}  # a diffusion artifact's two weight sets


def load_autoencoder(artifact: Artifact, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Return the autoencoder of an `autoencoder` artifact, in eval mode."""
    config = from_dict(AutoencoderConfig, artifact.config()["model"], "model")
    model = AutoencoderKL(config)
    model.load_state_dict(artifact.load_tensors(device="cpu"))
    return model.to(device).eval()


def load_classifier(artifact: Artifact, device: str | torch.device = "cpu") -> Classifier:
    """Return the classifier of a `classifier` artifact, in eval mode."""
    config = from_dict(ClassifierConfig, artifact.config()["model"], "model")
    model = Classifier(config)
    model.load_state_dict(artifact.load_tensors(device="cpu"))
    return model.to(device).eval()


def dit_configs(artifact: Artifact) -> tuple[DiTConfig, DiffusionConfig]:
    """The DiT architecture and the diffusion settings a `diffusion` artifact was trained with."""
    config = artifact.config()
    return from_dict(DiTConfig, config["model"], "model"), from_dict(DiffusionConfig, config["diffusion"], "diffusion")


def load_dit(artifact: Artifact, weights: str = "ema", device: str | torch.device = "cpu") -> DiT:
    """Return the DiT of a `diffusion` artifact in eval mode: its EMA weights ("ema", for sampling) or "raw"."""
    if weights not in DIT_WEIGHT_FILES:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    model = DiT(dit_configs(artifact)[0])
    model.load_state_dict(artifact.load_tensors(DIT_WEIGHT_FILES[weights], device="cpu"))
    return model.to(device).eval()


def iterate_images(dataset: Dataset, batch_size: int, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches in dataset order; in-memory datasets are sliced without a DataLoader."""
    total = min(limit, len(dataset)) if limit else len(dataset)
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            yield images[start:stop], labels[start:stop]
        return
    seen = 0
    for batch_images, batch_labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        keep = min(len(batch_images), total - seen)
        yield batch_images[:keep], batch_labels[:keep]
        seen += keep
        if seen >= total:
            return


@torch.no_grad()
def classifier_accuracy(model: Classifier, dataset: Dataset, batch_size: int = 500, device: str | torch.device = "cpu") -> float:
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
