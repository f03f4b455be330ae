"""SIGTERM and SIGINT end a training run honestly: status 128 + signal, one line naming the step saved and the
command that continues it, a whole checkpoint there, nothing half-written in the store, and an exact resume."""

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import AUTOENCODER_QUICK, ROOT, TINY_AUTOENCODER, needs_fmnist, train_cli, train_process_command
from ldm import artifacts
from ldm.artifacts import ArtifactStore
from ldm.config import load_config
from ldm.training import TrainingInterrupted, checkpoint_step, last_checkpoint
from stages import autoencoder

# A constant learning rate (after the preset's warm-up): the rate at a step does not depend on
# trainer.max_steps, so a run started with no end in sight can be resumed to a step chosen later.
ENDLESS = ["lr_schedule=constant", "trainer.max_steps=100000", "trainer.checkpoint_every=2"]


def launch(store: Path, run_dir: Path, *overrides: str) -> tuple[subprocess.Popen, list[str]]:
    """Start `ldm train autoencoder` (the quick preset, TINY_AUTOENCODER, `overrides`) as a process of its own."""
    command = train_process_command(store, run_dir, *overrides)
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return process, command


def stop_when_training(process: subprocess.Popen, run_dir: Path, signum: int, group: bool = False) -> tuple[int, str]:
    """Send `signum` once the run has saved its first checkpoint (it is in the training loop then), to the process or,
    as a terminal's Ctrl+C does, to its whole process group (data-loader workers too); return status, stderr."""
    deadline = time.time() + 180
    while last_checkpoint(run_dir) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if process.poll() is None and group:
        os.killpg(process.pid, signum)
    elif process.poll() is None:
        process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, stderr


def tmp_leftovers(*folders: Path) -> list[Path]:
    """Hidden temporary files and folders (`.tmp-*`, `.last.ckpt.*.tmp`) under `folders`."""
    return [p for folder in folders if folder.exists() for p in folder.rglob(".*") if "tmp" in p.name]


@pytest.mark.slow
@pytest.mark.timeout(300)
@needs_fmnist
def test_sigterm_ends_with_143_one_line_a_whole_checkpoint_and_a_resume_equal_to_an_unbroken_run(tmp_path):
    store, run_dir = tmp_path / "store", tmp_path / "run"
    process, command = launch(store, run_dir, *ENDLESS)
    status, stderr = stop_when_training(process, run_dir, signal.SIGTERM)

    assert status == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"stopped by SIGTERM at step (\d+), saved in (.+); continue with: (.+)", last)
    assert match, stderr[-3000:]
    step = int(match[1])
    assert match[2] == str(run_dir / "checkpoints" / "last.ckpt")
    assert shlex.split(match[3]) == [*command, "--resume"]
    assert "Received SIGTERM" not in stderr and "Traceback" not in stderr
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["step"] == step >= 2 and checkpoint["global_step"] == step
    assert not tmp_leftovers(run_dir, store)
    assert not (store / "autoencoder").exists() or not any((store / "autoencoder").iterdir())

    # Resumed to two steps past the stop, it ends exactly where a run straight to that step does.
    def config(folder: Path, steps: int):
        return load_config(
            autoencoder.AutoencoderStageConfig,
            AUTOENCODER_QUICK,
            [*TINY_AUTOENCODER, *ENDLESS, f"trainer.max_steps={steps}", f"run_dir={folder}"],
        )

    resumed = autoencoder.run(config(run_dir, step + 2), ArtifactStore(store), resume=True)
    straight = autoencoder.run(config(tmp_path / "straight", step + 2), ArtifactStore(tmp_path / "store2"))
    a, b = straight.load_tensors(), resumed.load_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
@pytest.mark.timeout(300)
@needs_fmnist
def test_ctrl_c_ends_with_130_and_the_step_it_saved_on_a_line_of_its_own(tmp_path):
    store, run_dir = tmp_path / "store", tmp_path / "run"
    # With a progress bar, whose line ends before the message, and data-loader workers, which get the signal too.
    process, _ = launch(store, run_dir, *ENDLESS, "trainer.progress=true", "data.num_workers=2")
    status, stderr = stop_when_training(process, run_dir, signal.SIGINT, group=True)

    assert status == 130, stderr[-3000:]
    match = re.fullmatch(
        r"stopped by SIGINT at step (\d+), saved in .+; continue with: .+ --resume", stderr.strip().splitlines()[-1]
    )
    assert match, stderr[-3000:]
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == int(match[1])
    assert "KeyboardInterrupt" not in stderr and "Traceback" not in stderr
    assert not tmp_leftovers(run_dir, store)


@pytest.mark.slow
@pytest.mark.timeout(120)
@needs_fmnist
def test_sigterm_while_the_artifact_is_written_leaves_no_temporary_folder_and_a_resume_stores_it(tmp_path, monkeypatch):
    real_save_file = artifacts.save_file

    def save_file_then_sigterm(*args, **kwargs):
        real_save_file(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # handled as the write returns: inside the artifact's `with` block

    store, run_dir = tmp_path / "store", tmp_path / "run"
    # The store as text: conftest's cli() takes `.root` of anything that has one, and a Path's is "/".
    with monkeypatch.context() as patch:
        patch.setattr(artifacts, "save_file", save_file_then_sigterm)
        stopped = train_cli(str(store), run_dir, "trainer.max_steps=2")
    assert stopped.exit_code == 143, stopped.output
    line = next((line for line in stopped.output.splitlines() if line.startswith("stopped by")), stopped.output)
    assert line.startswith("stopped by SIGTERM at step 2, saved in ") and line.endswith(" --resume"), line
    assert not tmp_leftovers(store, run_dir)
    assert not list(ArtifactStore(store).list("autoencoder"))

    # The run had finished: the resume trains nothing and stores the artifact.
    resumed = train_cli(str(store), run_dir, "trainer.max_steps=2", resume=True)
    assert resumed.exit_code == 0, resumed.output
    assert "already finished at step 2: nothing to train" in resumed.output
    assert len(ArtifactStore(store).list("autoencoder")) == 1


class SigtermAt(Callback):
    """Sends this process SIGTERM at the start of batch `step`, as a scheduler would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.timeout(120)
@needs_fmnist
def test_the_python_api_stopped_by_sigterm_raises_instead_of_exiting_with_status_0(tmp_path):
    # No stop_on_signals here: Lightning's own handler stops the loop with a SystemExit of status 0.
    config = load_config(
        autoencoder.AutoencoderStageConfig,
        AUTOENCODER_QUICK,
        [*TINY_AUTOENCODER, "trainer.max_steps=6", f"run_dir={tmp_path / 'run'}"],
    )
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM"):
        autoencoder.run(config, ArtifactStore(tmp_path / "store"), callbacks=[SigtermAt(2)])
    assert not ArtifactStore(tmp_path / "store").list("autoencoder")
