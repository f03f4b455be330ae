"""Build models from stored artifacts (the only way one stage uses another's result)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ldm.artifacts import Artifact
from ldm.config import from_dict
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.classifier import Classifier, ClassifierConfig


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
