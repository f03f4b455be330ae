"""Lightning plumbing every stage shares: the Trainer from a TrainerConfig, run folders, checkpoints, curves."""

from __future__ import annotations

import csv
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset, Subset

from ldm.config import TrainerConfig, dump_yaml
from ldm.images import save_curves

LAST = "last.ckpt"

# Our checkpoints save the state after each step on purpose (that is what a resume continues from).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# The latent cache is an endless iterable with no length, and every stage sets max_steps.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, fsyncs and renames it: a crash mid-save keeps the previous one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning checkpoints stay inside our own run folders; they are loaded onto the CPU first
        # so a resume never allocates a second copy of the model on the accelerator.
        return torch.load(path, map_location="cpu", weights_only=False)


class StepCheckpoint(ModelCheckpoint):
    """Saves `last.ckpt` every `every` optimisation steps and at the end of training."""

    def __init__(self, dirpath: Path, every: int):
        super().__init__(dirpath=dirpath, filename="step-{step}", every_n_train_steps=every, save_last=True, save_top_k=0)
        self.CHECKPOINT_NAME_LAST = "last"


class ProgressBar(TQDMProgressBar):
    """The tqdm bar without the version number, which means nothing to a reader of the logs."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Return the run's last checkpoint, or None when it has none."""
    path = Path(run_dir) / "checkpoints" / LAST
    return path if path.is_file() else None


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool) -> Path | None:
    """Create the run folder and return the checkpoint to resume from (None for a fresh run).

    A fresh run refuses a folder that already holds a checkpoint, so that no earlier run is overwritten by accident.
    """
    run_dir = Path(run_dir)
    checkpoint = last_checkpoint(run_dir)
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint at {run_dir / 'checkpoints' / LAST}; start the run without --resume")
    if not resume and checkpoint is not None:
        raise FileExistsError(
            f"{run_dir} already holds a run (checkpoint {checkpoint}); pass --resume to continue it, "
            f"or choose another folder with --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return checkpoint if resume else None


def start_run(config: Any, resume: bool) -> tuple[Path, Path | None]:
    """Open a stage's run folder (`config.run_dir`), seed every RNG and save the config there.

    Returns the folder and the checkpoint to resume from (None for a fresh run).
    """
    run_dir = Path(config.run_dir)
    checkpoint = prepare_run_dir(run_dir, resume)
    seed_everything(config.trainer.seed)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    return run_dir, checkpoint


def build_trainer(
    config: TrainerConfig,
    run_dir: Path,
    *,
    steps_per_batch: int = 1,
    callbacks: Sequence[Callback] = (),
    **overrides: Any,
) -> L.Trainer:
    """Return a Lightning Trainer for a stage: precision, strategy, devices and nodes come from the config.

    `steps_per_batch` is the number of optimiser steps one batch takes (2 for an autoencoder with a
    discriminator): Lightning counts every optimiser step, we count batches.
    """
    every = max(1, config.checkpoint_every) * steps_per_batch
    if torch.cuda.is_available():  # no effect on CPUs; 32-true stays exact fp32 there
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    kwargs: dict[str, Any] = dict(
        default_root_dir=run_dir,
        max_steps=config.max_steps * steps_per_batch,
        max_epochs=-1,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=config.precision,
        # One log folder per start of the run, so a resume never overwrites what was logged before it.
        logger=CSVLogger(run_dir, name="logs", version=f"part{_next_log_part(run_dir):03d}"),
        callbacks=[StepCheckpoint(run_dir / "checkpoints", every), *callbacks],
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=max(1, config.log_every),
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=False,
        use_distributed_sampler=True,
    )
    if config.progress:
        kwargs["callbacks"].append(ProgressBar(refresh_rate=10))
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def _next_log_part(run_dir: Path) -> int:
    return len(list((Path(run_dir) / "logs").glob("part*")))


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """Return the logged series of a run as {name: [(step, value), ...]}, across resumes.

    Steps that a resumed part logged again (after the checkpoint it resumed from) replace the
    earlier part's values.
    """
    series: dict[str, dict[float, float]] = {}
    for path in sorted((Path(run_dir) / "logs").glob("part*/metrics.csv")):
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        first_step = min((float(r.get("step") or 0) for r in rows), default=0.0)
        for values in series.values():
            for step in [s for s in values if s >= first_step]:
                del values[step]
        for row in rows:
            step = float(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                series.setdefault(key, {})[step] = float(value)
    return {key: sorted(values.items()) for key, values in series.items()}


def save_loss_curves(run_dir: Path, names: Sequence[str], path: Path, title: str, step_divisor: int = 1) -> Path | None:
    """Write a PNG of the named logged series of a run; return its path, or None when nothing was logged."""
    series = read_metrics(run_dir)
    curves = {n: [(s / step_divisor, v) for s, v in series[n]] for n in names if n in series}
    if not curves:
        return None
    positive = all(v > 0 for c in curves.values() for _, v in c)
    return save_curves(curves, path, title=title, log_y=positive)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Return the learning-rate multiplier at `step`: linear warm-up, then constant or cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_loader(dataset: Dataset, config: TrainerConfig, num_workers: int = 0, subset: int = 0) -> DataLoader:
    """Return the shuffled training DataLoader of a stage (seeded order; `subset` > 0 keeps the first N items)."""
    if subset:
        dataset = Subset(dataset, range(min(subset, len(dataset))))
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= config.batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
    )


def compiled(model: torch.nn.Module, enabled: bool) -> Callable[..., Any]:
    """Return `torch.compile(model)` when enabled, else the model itself.

    Callers keep the result outside the module tree, so checkpoints and artifacts hold the plain
    model's parameter names either way.
    """
    return torch.compile(model) if enabled else model


def seed_everything(seed: int) -> None:
    """Seed every RNG Lightning knows, quietly."""
    L.seed_everything(seed, workers=True, verbose=False)


class Timer:
    """Wall-clock seconds since construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def format_seconds(seconds: float) -> str:
    """Return `1h02m03s`-style text."""
    seconds = int(math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
