"""Lightning plumbing every stage shares: the Trainer from a TrainerConfig, run folders, checkpoints, curves."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import pickle
import secrets
import shutil
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Subset

from ldm.artifacts import write_atomic
from ldm.config import ConfigError, TrainerConfig, dump_yaml
from ldm.data import DataConfig, build_dataset
from ldm.data.order import FlippableItems, StepBatchSampler
from ldm.destinations import writing_to
from ldm.images import save_curves

LAST = "last.ckpt"
LOCK = "run.lock"  # held (flock) by the process training in the run folder; it names that process


def _hide_harmless_notices() -> None:
    """Hide the notices every fit prints that report no problem of the run; every other warning still shows.

    Each filter matches one notice by its text (and, where it can, its category and origin). Installed when
    a Trainer is built rather than on import, where a catch_warnings around the import (pytest's, for one)
    would undo it.
    """
    # Our checkpoints save the state after each step on purpose (that is what a resume continues from).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # The latent cache is an endless iterable with no length, and every stage sets max_steps.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Lightning's own pytree helper builds torch's deprecated LeafSpec: nothing of ours uses it.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # The modules a stage keeps in eval mode are frozen networks none of whose weights train (the LPIPS
    # network, EMA copies); the fit loop cannot tell them from a model left in eval mode by mistake.
    warnings.filterwarnings(
        "ignore",
        message=r"Found \d+ module\(s\) in eval mode at the start of training",
        category=PossibleUserWarning,
        module=r"lightning\.pytorch\.loops\.fit_loop",
    )
    # Lightning advertises its cloud services (litlogger, litmodels) at every fit, through rank_zero_info.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_cloud_tip)


def _not_a_cloud_tip(record: logging.LogRecord) -> bool:
    """Whether a log record is anything but Lightning's advert for its cloud ("💡 Tip: For seamless cloud ...")."""
    return not record.getMessage().startswith("💡 Tip: For seamless cloud")


# Settings a resumed run may change freely (how long, how often it logs, on what hardware) and those it
# may change only when asked (--allow-change KEY): the usual remedies for a diverging run. Any other
# change (model, objective, data, batch, seed, ...) would continue a different run from these weights.
RESUME_FREE = (
    "run_dir",
    "trainer.max_steps",
    "trainer.log_every",
    "trainer.image_every",
    "trainer.checkpoint_every",
    "trainer.progress",
    "trainer.logger",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.accelerator",
    "trainer.cpu_threads",
    "data.num_workers",
    "preview.",
    "preview_images",
)
RESUME_ON_REQUEST = ("trainer.lr", "trainer.grad_clip", "trainer.precision")


class CheckpointError(ValueError):
    """A resume checkpoint that cannot be trusted or read."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, fsyncs and renames it: a crash mid-save keeps the previous one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        # A name of its own (process and random suffix): no other writer can rename or remove it mid-save.
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            with writing_to(path.parent, "--run-dir"):  # a full disk: one line, the previous checkpoint intact
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as handle:
                    torch.save(checkpoint, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
        except BaseException:
            if tmp.is_file():  # half a checkpoint is none
                tmp.unlink()
            raise

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path)


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Return a run's checkpoint, loaded onto the CPU; CheckpointError if unsafe or unreadable.

    With `mmap`, its tensors are read only when used.
    """
    # Run folders may sit on shared storage that others can write: never run pickle code from one.
    # Our checkpoints hold tensors and plain data only. Loaded onto the CPU first, so a resume
    # never allocates a second copy of the model on the accelerator.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects besides tensors and plain data, and loading "
            f"it would run their code. It was not written by this training; delete it, or start a new run"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0]}); it is truncated or "
            f"corrupt: restore it, or start a new run"
        ) from err


def checkpoint_step(path: str | os.PathLike, steps_per_batch: int = 1) -> int:
    """Return the batches a run had trained when it saved the checkpoint at `path` (its tensors are not read)."""
    checkpoint = read_checkpoint(path, mmap=True)
    # `step` is written by StepCheckpoint; older checkpoints have Lightning's count of optimiser steps only.
    return int(checkpoint["step"]) if "step" in checkpoint else int(checkpoint.get("global_step", 0)) // steps_per_batch


class StepCheckpoint(ModelCheckpoint):
    """Saves `last.ckpt` every `every` batches and at the end of training, and where a stop signal arrives.

    With `stop_on_signals` active, a SIGTERM or SIGINT received in the training loop lets the batch in
    progress finish; the checkpoint is saved there and the run then ends with TrainingInterrupted. The
    state saved is the one a periodic checkpoint holds, so a resume from it is as exact.
    """

    def __init__(self, dirpath: Path, every: int, steps_per_batch: int = 1):
        super().__init__(
            dirpath=dirpath,
            filename="step-{step}",
            every_n_train_steps=every * steps_per_batch,
            save_last=True,
            save_top_k=0,
        )
        self.CHECKPOINT_NAME_LAST = "last"
        self.steps_per_batch = steps_per_batch
        self.saved_at = -1  # Lightning's global_step of the last save

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["step"] = trainer.global_step // self.steps_per_batch  # in batches, as the stages count
        self.saved_at = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if _STOP.active:
            # Lightning's own SIGTERM handler, installed for fit, ends the process with status 0 at its next
            # check (SIGTERMException is a SystemExit); ours takes its place. Lightning's teardown restores ours.
            signal.signal(signal.SIGTERM, _on_stop_signal)
            # With several processes, each would stop at its own batch and wait for the others in the save.
            _STOP.defer = trainer.world_size == 1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _STOP.pending is not None:
            if self.saved_at != trainer.global_step:
                trainer.save_checkpoint(Path(self.dirpath) / LAST)
            raise TrainingInterrupted(_STOP.pending)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _STOP.defer = False  # what follows (storing the artifact) stops at once
        super().on_train_end(trainer, pl_module)
        if _STOP.pending is not None:  # it came during the last batch, which ended training
            raise TrainingInterrupted(_STOP.pending)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        _STOP.defer = False
        super().on_exception(trainer, pl_module, exception)


class TrainingInterrupted(BaseException):
    """A SIGTERM or SIGINT that stopped a run (see `stop_on_signals`).

    A BaseException, as KeyboardInterrupt: no `except Exception` swallows it, and the `with` blocks it
    unwinds through clean up (an ArtifactWriter removes its temporary folder, the run folder is unlocked).
    """

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class _StopState:
    """What `stop_on_signals` shares with StepCheckpoint: whether it is on, and a signal waiting for the batch's end."""

    active = False
    defer = False  # in the training loop: a first signal waits for the end of the batch
    pending: int | None = None


_STOP = _StopState()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _on_stop_signal(signum: int, frame: Any) -> None:
    if _STOP.defer and _STOP.pending is None:
        _STOP.pending = signum
        return
    raise TrainingInterrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into TrainingInterrupted for the block: a run around it stops cleanly.

    In the training loop the batch in progress finishes and is checkpointed first (StepCheckpoint); a
    second signal, or one outside the loop (starting up, storing the artifact), raises at once. A no-op
    off the main thread, where Python cannot handle signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_stop_signal) for signum in STOP_SIGNALS}
    _STOP.active, _STOP.defer, _STOP.pending = True, False, None
    try:
        yield
    finally:
        _STOP.active, _STOP.defer, _STOP.pending = False, False, None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupted_message(stop: TrainingInterrupted, run_dir: str | os.PathLike, resume_command: str) -> str:
    """The one line a run stopped by a signal ends with: the step its checkpoint holds and the command resuming it."""
    name = signal.Signals(stop.signum).name
    checkpoint = last_checkpoint(run_dir)
    if checkpoint is None:
        return f"stopped by {name} before the first checkpoint; nothing to resume: run the same command again"
    try:
        step = checkpoint_step(checkpoint)
    except CheckpointError as err:
        return f"stopped by {name}; {err}"
    return f"stopped by {name} at step {step}, saved in {checkpoint}; continue with: {resume_command}"


class ProgressBar(TQDMProgressBar):
    """The tqdm bar in batches (Lightning counts optimiser steps), without the version number.

    The version number means nothing to a reader.
    """

    def __init__(self, steps_per_batch: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps_per_batch = steps_per_batch

    @property
    def total_train_batches(self) -> int | float:
        # Lightning's total is the optimiser steps left: twice the batches for an autoencoder with a
        # discriminator, so its bar ended at 50% with an ETA twice too long.
        total = super().total_train_batches
        return total if math.isinf(total) else math.ceil(total / self.steps_per_batch)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Closed, the bar ends its line: the message of a stopped run is a line of its own, not the bar's tail.
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()


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
        raise FileNotFoundError(
            f"--resume: no checkpoint at {run_dir / 'checkpoints' / LAST}; start the run without --resume"
        )
    if not resume and checkpoint is not None:
        raise FileExistsError(
            f"{run_dir} already holds a run (checkpoint {checkpoint}); pass --resume to continue it, "
            f"or choose another folder with --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return checkpoint if resume else None


class RunFolderInUse(FileExistsError):
    """Another process is training in this run folder."""


def _rank_zero_of_launch() -> bool:
    """Whether the launcher made this process global rank zero (a single process always is).

    Read from the environment, before Lightning sets up any process group: torchrun's RANK, SLURM's
    SLURM_PROCID, and the NODE_RANK / LOCAL_RANK of Lightning's own launcher.
    """
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` for the block; RunFolderInUse, naming the holder, if another process has it.

    An flock on `run.lock`, which holds the holder's PID and host: the OS drops it with the process, so a
    killed run never leaves a stale lock. The other ranks of a multi-process run train in rank zero's
    folder and take none.
    """
    if not _rank_zero_of_launch():
        yield
        return
    path = run_dir / LOCK
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (
                os.pread(handle, 256, 0).decode(errors="replace").strip()
                or "a process that has not written its PID yet"
            )
            raise RunFolderInUse(
                f"{run_dir} is in use by another training run ({holder}; lock {path}): wait for it "
                f"to end, or train into another --run-dir"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(handle, 0)
    finally:
        os.close(handle)  # releases the lock


@contextmanager
def open_run(
    config: Any, resume: bool, allow_changes: Sequence[str] = (), steps_per_batch: int = 1
) -> Iterator[tuple[Path, Path | None]]:
    """Hold a stage's run folder (`config.run_dir`) for the block: lock it, seed every RNG and save the config there.

    Yields the folder and the checkpoint to resume from (None for a fresh run). A resume first compares
    the config with the run's stored one (see `check_resume_config`); the changes it accepts are printed
    and appended to `resumes.json`. A resume past trainer.max_steps is refused. `steps_per_batch`:
    optimiser steps per batch, to read the step of checkpoints saved before they recorded it.
    """
    run_dir = Path(config.run_dir)
    prepare_run_dir(run_dir, resume)  # refused here, before anything is created
    with run_folder_lock(run_dir):
        checkpoint = prepare_run_dir(run_dir, resume)  # again under the lock: another run may have saved one since
        if checkpoint is not None:
            changes = check_resume_config(run_dir, config, allow_changes)
            reached = checkpoint_step(checkpoint, steps_per_batch)
            if reached > config.trainer.max_steps:
                raise ConfigError(
                    f"--resume: the run is at step {reached}, past trainer.max_steps "
                    f"{config.trainer.max_steps}: set trainer.max_steps={reached} to store it as it is, "
                    f"or higher to train on"
                )
            if changes:
                print(
                    "resuming with changed settings: "
                    + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
                )
                record_resume(run_dir, changes)
        elif allow_changes:
            raise ConfigError("--allow-change applies to --resume only")
        seed_everything(config.trainer.seed)
        write_atomic(run_dir / "config.yaml", dump_yaml(config).encode())
        yield run_dir, checkpoint


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resume_free(key: str) -> bool:
    return any(key == free or (free.endswith(".") and key.startswith(free)) for free in RESUME_FREE)


def check_resume_config(run_dir: Path, config: Any, allow_changes: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Return {key: (stored, new)} of the settings a resume changes; raise ConfigError for any it may not change.

    Free keys (RESUME_FREE) pass; RESUME_ON_REQUEST keys pass when named in `allow_changes`; any other
    difference is refused with every differing key listed.
    """
    unknown = [key for key in allow_changes if key not in RESUME_ON_REQUEST]
    if unknown:
        raise ConfigError(
            f"--allow-change {', '.join(unknown)}: only {', '.join(RESUME_ON_REQUEST)} can be allowed; "
            f"{', '.join(k.rstrip('.') for k in RESUME_FREE)} may change without it"
        )
    stored_path = run_dir / "config.yaml"
    if not stored_path.is_file():
        raise ConfigError(
            f"--resume: {stored_path} is missing, so the new settings cannot be compared with the run's; "
            f"restore it (it is the config the run was started with)"
        )
    stored = _flatten(yaml.safe_load(stored_path.read_text()) or {})
    new = _flatten(yaml.safe_load(dump_yaml(config)))  # through YAML, as stored: tuples become lists
    # A key the config no longer has (removed since the run began) cannot change anything; one it has
    # gained since counts as its default, which is what the run trained with.
    defaults = _flatten(yaml.safe_load(dump_yaml(type(config)())))
    before = {k: stored.get(k, defaults.get(k)) for k in new}
    changes = {k: (before[k], new[k]) for k in sorted(new) if before[k] != new[k]}
    refused = {k: v for k, v in changes.items() if not _resume_free(k) and k not in allow_changes}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        on_request = [k for k in refused if k in RESUME_ON_REQUEST]
        hint = (
            f" To change {', '.join(on_request)} on purpose, add " + " ".join(f"--allow-change {k}" for k in on_request)
            if on_request
            else ""
        )
        raise ConfigError(
            f"--resume: the settings differ from the run's ({stored_path}): {listed}. A resumed run must keep them; "
            f"resume with the run's settings, or start a new run in another --run-dir.{hint}"
        )
    return changes


def record_resume(run_dir: Path, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the settings a resume changed, with the time, to the run's `resumes.json`."""
    path = run_dir / "resumes.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()},
        }
    )
    write_atomic(path, json.dumps(history, indent=2).encode())


def build_trainer(
    config: TrainerConfig,
    run_dir: Path,
    *,
    steps_per_batch: int = 1,
    callbacks: Sequence[Callback] = (),
    lr_scales: Sequence[float] = (),
    **overrides: Any,
) -> L.Trainer:
    """Return a Lightning Trainer for a stage: precision, strategy, devices and nodes come from the config.

    `steps_per_batch` is the number of optimiser steps one batch takes (2 for an autoencoder with a
    discriminator): Lightning counts every optimiser step, we count batches. `lr_scales`: each
    optimiser's learning rate over config.lr (see LearningRateFromConfig).
    """
    if torch.cuda.is_available():  # no effect on CPUs; 32-true stays exact fp32 there
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    _hide_harmless_notices()
    kwargs: dict[str, Any] = dict(
        default_root_dir=run_dir,
        max_steps=config.max_steps * steps_per_batch,
        max_epochs=-1,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=config.precision,
        logger=loggers(config, run_dir),
        callbacks=[
            StepCheckpoint(run_dir / "checkpoints", max(1, config.checkpoint_every), steps_per_batch),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=max(1, config.log_every),
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=False,
        deterministic=deterministic_run(config),
        # Every loader here splits its global batch by rank itself (StepBatchSampler, LatentBatches).
        use_distributed_sampler=False,
    )
    if config.progress:
        kwargs["callbacks"].append(ProgressBar(steps_per_batch, refresh_rate=10))
    kwargs["callbacks"].append(LearningRateFromConfig(config.lr, lr_scales))
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def runs_on_cpu(config: TrainerConfig) -> bool:
    """Whether a run's accelerator is the CPU (`auto` is, on a machine without CUDA or MPS)."""
    if config.accelerator == "auto":
        return not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return config.accelerator == "cpu"


def deterministic_run(config: TrainerConfig) -> bool:
    """Whether a run is deterministic: trainer.deterministic, or when that is None, whether it runs on the CPU."""
    return config.deterministic if config.deterministic is not None else runs_on_cpu(config)


@contextmanager
def reproducible(config: TrainerConfig) -> Iterator[None]:
    """Run the block with the thread count a deterministic CPU run pins (trainer.cpu_threads), and give the
    process its own settings back afterwards: threads, and the deterministic algorithms Lightning switches on."""
    threads, algorithms = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if deterministic_run(config) and runs_on_cpu(config):
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        torch.set_num_threads(config.cpu_threads or len(affinity))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)


def _next_log_part(run_dir: Path) -> int:
    return len(list((Path(run_dir) / "logs").glob("part*")))


def loggers(config: TrainerConfig, run_dir: Path) -> list[Logger]:
    """The run's Lightning loggers: CSV always (the loss curves are drawn from it), TensorBoard when configured.

    One log folder per start of the run, so a resume never overwrites what was logged before it.
    """
    part = f"part{_next_log_part(run_dir):03d}"
    chosen: list[Logger] = [CSVLogger(run_dir, name="logs", version=part)]
    if config.logger == "tensorboard":
        try:
            chosen.append(TensorBoardLogger(run_dir, name="tensorboard", version=part, default_hp_metric=False))
        except ModuleNotFoundError as err:
            raise ConfigError(
                f"trainer.logger=tensorboard needs TensorBoard's writer ({err}): "
                f"pip install tensorboard (or tensorboardX)"
            ) from None
    return chosen


class LearningRateFromConfig(Callback):
    """Sets every scheduler's base learning rate to the config's once training starts.

    A fresh run already has it; a resume restores the checkpoint's, so without this a learning rate
    changed on resume (--allow-change trainer.lr) would be ignored. The lr of the current step is
    recomputed from the base and the schedule, exactly as the scheduler's own step would. `scales`, one
    per optimiser in configure_optimizers' order (empty: all 1), give optimisers their own multiple of
    the config's lr (an autoencoder's discriminator with disc_lr_scale).
    """

    def __init__(self, lr: float, scales: Sequence[float] = ()):
        self.lr = lr
        self.scales = tuple(scales)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        configs = trainer.lr_scheduler_configs
        if self.scales and len(self.scales) != len(configs):
            raise ValueError(
                f"{len(self.scales)} learning-rate scales for {len(configs)} optimisers: give one per optimiser"
            )
        for config, scale in zip(configs, self.scales or (1.0,) * len(configs)):
            scheduler = config.scheduler
            base = self.lr * scale
            scheduler.base_lrs = [base] * len(scheduler.base_lrs)
            for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
                group["initial_lr"] = base
                group["lr"] = base * factor(scheduler.last_epoch)


class ResumeDataOrder(Callback):
    """On resume, points a step-ordered data source at the batch the checkpoint's step continues from."""

    def __init__(self, batches: Any, steps_per_batch: int = 1):
        self.batches = batches
        self.steps_per_batch = steps_per_batch

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.batches.start_step = checkpoint["global_step"] // self.steps_per_batch


def fit_stage(
    config: TrainerConfig,
    run_dir: Path,
    checkpoint: Path | None,
    module: L.LightningModule,
    loader: Any,
    batches: Any,
    callbacks: Sequence[Callback] = (),
    steps_per_batch: int = 1,
    lr_scales: Sequence[float] = (),
    **overrides: Any,
) -> tuple[L.Trainer, float] | None:
    """The part every stage shares: build the Trainer, train (resuming from `checkpoint`), and return
    (trainer, seconds) on rank zero once training ended; None on the other ranks or when interrupted.

    `batches` is the loader's step-ordered source (StepBatchSampler, LatentBatches), which a resume
    points at the checkpoint's step. An interrupt prints how to continue; a start that fails before
    logging anything leaves no empty log folder behind. A non-finite loss stops a stage through
    `non_finite_message`. A resume of a run that has reached trainer.max_steps says so and trains nothing:
    the stage stores the checkpoint's weights (an identical artifact already stored is kept).
    """
    if checkpoint is not None and (reached := checkpoint_step(checkpoint, steps_per_batch)) >= config.max_steps:
        print(
            f"the run already finished at step {reached}: nothing to train; its weights are stored as they are. "
            f"To train on, resume with a higher trainer.max_steps"
        )
    with reproducible(config):
        trainer = build_trainer(
            config,
            run_dir,
            steps_per_batch=steps_per_batch,
            lr_scales=lr_scales,
            callbacks=[*callbacks, ResumeDataOrder(batches, steps_per_batch)],
            **overrides,
        )
        timer = Timer()
        try:
            trainer.fit(module, loader, ckpt_path=checkpoint)
        except (
            SIGTERMException
        ):  # Lightning's SIGTERM handler, when stop_on_signals is not on: a SystemExit of status 0
            _remove_empty_log_part(trainer)
            raise TrainingInterrupted(signal.SIGTERM) from None
        except BaseException as err:
            _remove_empty_log_part(trainer)
            if _STOP.pending is not None:  # whatever failed on the way to the batch's end, the signal stopped the run
                raise TrainingInterrupted(_STOP.pending) from err
            raise
    if trainer.interrupted:
        print(
            f"interrupted at step {trainer.global_step // steps_per_batch}; "
            f"continue with --resume (run folder {run_dir})"
        )
        return None
    return (trainer, timer()) if trainer.is_global_zero else None


def _remove_empty_log_part(trainer: L.Trainer) -> None:
    log_dir = Path(trainer.logger.log_dir) if trainer.logger is not None else None
    if log_dir is not None and log_dir.is_dir() and not (log_dir / "metrics.csv").is_file():
        shutil.rmtree(log_dir, ignore_errors=True)


def non_finite_message(what: str, step: int, run_dir: Path | None) -> str:
    """The message of a run stopped by a non-finite loss or gradient: where its last good checkpoint is, if any."""
    checkpoint = last_checkpoint(run_dir) if run_dir is not None else None
    where = (
        f"The last good checkpoint is {checkpoint}: resume with --resume after lowering trainer.lr "
        "(--allow-change trainer.lr), setting trainer.grad_clip or using trainer.precision=32-true "
        "(allowed the same way)"
        if checkpoint is not None
        else "No checkpoint was written yet (trainer.checkpoint_every); start again after lowering trainer.lr, "
        "setting trainer.grad_clip or using trainer.precision=32-true"
    )
    return f"{what} at step {step}; training stopped before the update, so the weights are intact. {where}"


def seed_step(seed: int, step: int, rank: int = 0, world: int = 1) -> None:
    """Seed the global RNG from (seed, step, rank): what a step draws then does not depend on earlier steps,
    so a resumed run draws exactly what the uninterrupted run would have drawn."""
    torch.manual_seed((seed * 1_000_003 + step) * world + rank)


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


LR_SCHEDULES = ("constant", "cosine")


def check_optimizer_settings(lr_schedule: str, betas: Sequence[float], ema_decay: float) -> None:
    """Raise ValueError unless the settings every trained stage shares make sense: a known learning-rate schedule,
    two Adam(W) decay rates in [0, 1) and an EMA decay in [0, 1) (0: the EMA is the weights themselves)."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be {' or '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"betas must be two AdamW decay rates in [0, 1), such as [0.9, 0.95], got {list(betas)}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) (0: the EMA is the weights themselves), got {ema_decay}")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Return the learning-rate multiplier at `step`: linear warm-up, then constant or cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def adamw_cosine(parameters: Iterator[torch.nn.Parameter], config: TrainerConfig) -> dict[str, Any]:
    """Lightning's configure_optimizers answer for a plain classifier: AdamW at config.lr and config.weight_decay,
    linear warm-up, then cosine decay to 0 at config.max_steps, stepped every step."""
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.max_steps, "cosine")
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def make_loader(data: DataConfig, config: TrainerConfig, subset: int = 0) -> tuple[DataLoader, StepBatchSampler]:
    """Return the training DataLoader of an image stage and its batch sampler (set `start_step` on resume).

    Batches and flips are a pure function of (seed, step), as the latent cache's: a resumed run
    trains on exactly the items an uninterrupted one would. `subset` > 0 keeps the first N items;
    `config.batch_size` is the global batch, as in every stage.
    """
    dataset = build_dataset(replace(data, hflip=False), "train")  # the sampler decides the flips
    if subset:
        dataset = Subset(dataset, range(min(subset, len(dataset))))
    sampler = StepBatchSampler(len(dataset), config.batch_size, seed=config.seed, hflip=data.hflip)
    loader = DataLoader(
        FlippableItems(dataset),
        batch_sampler=sampler,
        num_workers=data.num_workers,
        persistent_workers=data.num_workers > 0,
        worker_init_fn=leave_stop_signals_to_the_main_process,
    )
    return loader, sampler


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker's start: it ignores SIGTERM and SIGINT, which reach the whole process group (Ctrl+C, a
    scheduler), so that the main process stops the run cleanly (stop_on_signals) instead of failing on a dead worker.

    It also seeds the worker as Lightning does for loaders without a worker_init_fn of their own.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    pl_worker_init_function(worker_id)


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
