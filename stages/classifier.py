"""The evaluation classifier: a CNN whose features give our Frechet distance, stored as an artifact.

Images (Fashion-MNIST) go in as they are; sound (spoken digits) through the model's log-mel front end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from ldm.artifacts import Artifact, ArtifactStore
from ldm.audio import take_windows
from ldm.config import TrainerConfig, to_dict
from ldm.data import DataConfig, build_dataset, data_fingerprint
from ldm.destinations import check_run_writable
from ldm.metrics import classifier_accuracy
from ldm.models.classifier import Classifier, ClassifierConfig
from ldm.training import adamw_cosine, fit_stage, format_seconds, make_loader, open_run, seed_step


def _trainer_defaults() -> TrainerConfig:
    return TrainerConfig(
        max_steps=2000, batch_size=128, lr=2e-3, weight_decay=5e-4, warmup_steps=100, checkpoint_every=500
    )


@dataclass
class ClassifierStageConfig:
    """Everything that defines a classifier run."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=_trainer_defaults)
    shift: int = 2  # random translation augmentation, in pixels (samples for sound; 0: none)
    run_dir: str = "runs/classifier"

    def __post_init__(self) -> None:
        if self.data.is_sound != (self.model.front_end == "logmel"):
            raise ValueError(
                f"data {self.data.name!r} needs model.front_end "
                f"{'logmel' if self.data.is_sound else 'none'}, got {self.model.front_end!r}"
            )


def random_shift(images: torch.Tensor, pixels: int, background: float = -1.0) -> torch.Tensor:
    """Return images translated by a random integer offset in [-pixels, pixels] each (one gather, no loops).

    Signals (N, C, L) are shifted in time the same way, with `background` (0: silence) filling in.
    """
    if pixels <= 0:
        return images
    if images.ndim == 3:
        padded = F.pad(images, (pixels, pixels), value=background)  # (N, C, L+2p)
        start = torch.randint(0, 2 * pixels + 1, (len(images),), device=images.device)
        return take_windows(padded, start, images.shape[-1])
    n, _, h, w = images.shape
    padded = F.pad(images, (pixels,) * 4, value=background)  # (N, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pixels + 1, (n,), device=images.device)
    dx = torch.randint(0, 2 * pixels + 1, (n,), device=images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of the classifier with AdamW, warm-up and cosine decay."""

    def __init__(self, config: ClassifierStageConfig):
        super().__init__()
        self.config = config
        self.classifier = Classifier(config.model)

    def configure_optimizers(self):
        return adamw_cosine(self.classifier.parameters(), self.config.trainer)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        seed_step(self.config.trainer.seed, self.global_step, self.global_rank, self.trainer.world_size)  # the shifts
        background = 0.0 if self.config.data.is_sound else -1.0  # silence, or a black border
        logits = self.classifier(random_shift(images, self.config.shift, background))
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log_dict({"train/loss": loss, "train/accuracy": accuracy}, prog_bar=True, on_step=True)
        return loss


def run(
    config: ClassifierStageConfig,
    store: ArtifactStore | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    allow_changes: Sequence[str] = (),
) -> Artifact | None:
    """Train the classifier, measure its test accuracy and return its stored artifact."""
    store = store or ArtifactStore()
    check_run_writable(store, config.run_dir)  # fails now rather than after training
    with open_run(config, resume, allow_changes) as (run_dir, checkpoint):
        loader, batches = make_loader(config.data, config.trainer)
        module = ClassifierModule(config)
        trained = fit_stage(config.trainer, run_dir, checkpoint, module, loader, batches, callbacks)
        if trained is None:
            return None
        trainer, seconds = trained
        test = build_dataset(config.data, "test")
        accuracy = classifier_accuracy(module.classifier, test)
        artifact = store.save(
            "classifier",
            tensors={"weights.safetensors": module.classifier.state_dict()},
            config=to_dict(config),
            data_fingerprint=data_fingerprint(config.data, "train"),
            metadata={
                "metrics": {"test": {"accuracy": accuracy}},
                "training": {"steps": trainer.global_step, "seconds_this_run": round(seconds, 1)},
            },
        )
        print(f"\nwrote {artifact.ref}  ({artifact.path})")
        print(
            f"  test accuracy {accuracy:.4f} on {len(test)} {'clips' if config.data.is_sound else 'images'}, "
            f"{trainer.global_step} steps in {format_seconds(seconds)}"
        )
        return artifact
