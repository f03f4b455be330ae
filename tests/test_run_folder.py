"""A run folder belongs to one training run at a time (an OS lock the process holds), a resume of a finished run
says so and trains nothing, and checkpoint temporary files never collide."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import AUTOENCODER_QUICK, ROOT, TINY_AUTOENCODER, assert_clean_failure, needs_fmnist, train_cli
from ldm.artifacts import ArtifactStore
from ldm.config import dump_yaml, load_config
from ldm.training import LOCK, AtomicCheckpointIO, RunFolderInUse, run_folder_lock
from stages import autoencoder

# Stores are given to train_cli as text: conftest's cli() takes `.root` of anything that has one, and a Path's is "/".


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `folder` but those named in `skip`: size, modification time and content."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def planted_run(run_dir: Path) -> None:
    """A run folder with the tiny config and a checkpoint of step 0, as a run that is training leaves it."""
    config = load_config(
        autoencoder.AutoencoderStageConfig, AUTOENCODER_QUICK, [*TINY_AUTOENCODER, f"run_dir={run_dir}"]
    )
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    torch.save({"global_step": 0, "step": 0}, run_dir / "checkpoints" / "last.ckpt")


# ---- one run per folder ---------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_pid_and_touches_nothing(tmp_path, resume):
    run_dir = tmp_path / "run"
    if resume:
        planted_run(run_dir)
    else:
        run_dir.mkdir()
    with run_folder_lock(run_dir):  # the first run, still training
        before = snapshot(run_dir)
        result = train_cli(str(tmp_path / "store"), run_dir, resume=resume)
        after = snapshot(run_dir)
    assert_clean_failure(result, f"{run_dir} is in use by another training run (PID {os.getpid()} on ", "--run-dir")
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert after == before
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


HOLD_LOCK = """
import sys
from pathlib import Path
from ldm.training import run_folder_lock
with run_folder_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_lock_names_its_holder_and_is_released_when_the_holder_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderInUse, match=f"PID {holder.pid} on "), run_folder_lock(run_dir):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the OS alone drops the lock
        holder.wait()
    with run_folder_lock(run_dir):
        assert (run_dir / LOCK).read_text().startswith(f"PID {os.getpid()} on ")


def test_ranks_other_than_zero_of_a_launch_share_the_folder_of_rank_zero(tmp_path, monkeypatch):
    with run_folder_lock(tmp_path):
        monkeypatch.setenv("LOCAL_RANK", "1")
        with run_folder_lock(tmp_path):  # Lightning's launcher started this process as rank 1: no second lock
            pass


# ---- checkpoint temporary files -------------------------------------------------------------


def test_checkpoint_temporary_files_have_names_of_their_own_and_a_failed_save_leaves_none(tmp_path, monkeypatch):
    names = []
    real_save = torch.save

    def recording_save(obj, handle, *args, **kwargs):
        names.append(Path(handle.name).name)
        real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", recording_save)
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    assert len(set(names)) == 2 and all(f".last.ckpt.{os.getpid()}-" in name for name in names), names
    assert torch.load(path, weights_only=True)["global_step"] == 2

    def interrupted_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["global_step"] == 2


# ---- resuming a finished run ----------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny autoencoder run trained to its trainer.max_steps of 2, and its store (used in place: the run folder
    is part of the artifact's config)."""
    root = tmp_path_factory.mktemp("finished")
    result = train_cli(str(root / "store"), root / "run", "trainer.max_steps=2")
    assert result.exit_code == 0, result.output
    return root / "run", root / "store"


@pytest.mark.timeout(120)
@needs_fmnist
def test_resuming_a_finished_run_says_so_trains_nothing_and_keeps_its_artifact(finished_run):
    run_dir, store = finished_run
    stored = ArtifactStore(store).list("autoencoder")
    checkpoint = (run_dir / "checkpoints" / "last.ckpt").read_bytes()

    result = train_cli(str(store), run_dir, "trainer.max_steps=2", resume=True)
    assert result.exit_code == 0, result.output
    finished = [line for line in result.output.splitlines() if "already finished" in line]
    assert finished == [
        (
            "the run already finished at step 2: nothing to train; its weights are stored as they are. "
            "To train on, resume with a higher trainer.max_steps"
        )
    ], result.output
    assert "nan" not in result.output and "this run" not in result.output
    assert not re.search(r"\d \w*/s\b", result.output)  # no throughput of the nothing it trained
    assert f"wrote {stored[0].ref} " in result.output  # the artifact already stored, not a new one
    assert [a.ref for a in ArtifactStore(store).list("autoencoder")] == [stored[0].ref]
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == checkpoint


@pytest.mark.timeout(120)
@needs_fmnist
def test_a_resume_below_the_step_reached_is_refused_and_writes_nothing(finished_run):
    run_dir, store = finished_run
    before = snapshot(run_dir, skip=(LOCK,))  # the refused run held the lock while it checked
    result = train_cli(str(store), run_dir, "trainer.max_steps=1", resume=True)
    assert_clean_failure(result, "the run is at step 2, past trainer.max_steps 1", "trainer.max_steps=2")
    assert snapshot(run_dir, skip=(LOCK,)) == before
