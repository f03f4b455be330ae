"""The machine's write errors: a full disk during the work, and a store or folder that cannot be written, checked first.

Each failure is one line naming the folder and what to do, with no traceback; partial outputs go (a
latent cache, a checkpoint) or stay as designed (the images of finished sampling batches). A
destination that cannot be written is refused before any long work (training, encoding, sampling,
calibrating) starts.
"""

import errno
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

import ldm.artifacts
from conftest import DIT, ROOT, assert_one_line_failure, cli, needs_fmnist, save_autoencoder, save_dit
from ldm.artifacts import ArtifactStore
from ldm.destinations import WriteError, check_writable
from ldm.diffusion.schedules import DiffusionConfig
from ldm.training import AtomicCheckpointIO
from pipeline import LatentDiffusionPipeline
from stages.cli import main

FULL = os.strerror(errno.ENOSPC)
TINY_CLASSIFIER = [
    "--config",
    str(ROOT / "configs/fmnist/classifier-quick.yaml"),
    "--set",
    "trainer.max_steps=2",
    "--set",
    "trainer.batch_size=8",
    "--set",
    "trainer.progress=false",
    "--set",
    "model.width=4",
]
TRAIN_COMMANDS = {
    stage: ["--config", str(ROOT / f"configs/fmnist/{preset}.yaml"), "--set", "trainer.max_steps=1"]
    for stage, preset in [
        ("autoencoder", "autoencoder-quick"),
        ("classifier", "classifier-quick"),
        ("diffusion", "diffusion-quick"),
        ("distill", "distill"),
    ]
}


@pytest.fixture
def store(tmp_path):
    """A store of its own for each test (they make it read-only): a random autoencoder and a random flow DiT."""
    store = ArtifactStore(tmp_path / "store")
    save_dit(store, DIT, DiffusionConfig(objective="flow", learn_sigma=False), 2, save_autoencoder(store, 0).ref)
    return store


@pytest.fixture
def make_read_only(monkeypatch):
    """Make a folder read-only: chmod for a normal user; as root, whom chmod does not stop, every temporary file or
    folder created inside it (how the store, the output writers and the write check create files) fails as it
    would on a read-only file system."""
    folders = []

    def refuse_inside(create):
        def wrapped(*args, dir=None, **kwargs):
            if dir is not None and any(Path(dir).resolve().is_relative_to(folder) for folder in folders):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
            return create(*args, dir=dir, **kwargs)

        return wrapped

    if os.geteuid() == 0:
        monkeypatch.setattr(tempfile, "mkstemp", refuse_inside(tempfile.mkstemp))
        monkeypatch.setattr(tempfile, "mkdtemp", refuse_inside(tempfile.mkdtemp))

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder.resolve())
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        return folder

    yield make
    for folder in folders:  # let pytest clean up
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def assert_one_line(result, *phrases):
    """A clean failure: exit status 1, one `Error:` line holding every phrase, no traceback."""
    assert_one_line_failure(result, *phrases, last=False, status=1)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- a full disk during the work


@needs_fmnist
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "error",
    [
        lambda path: SafetensorError(
            f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"'
        ),
        lambda path: OSError(errno.ENOSPC, FULL),
    ],
)
def test_a_full_disk_during_encode_is_one_line_naming_the_store_and_leaves_no_partial_cache(store, monkeypatch, error):
    written = []

    def fill_the_disk(tensors, path, *args, **kwargs):
        if written:  # the first shard fits, the second finds the disk full half-way
            Path(path).write_bytes(b"\0" * 100)
            raise error(path)
        written.append(path)
        return real_save(tensors, path, *args, **kwargs)

    real_save = ldm.artifacts.save_file
    monkeypatch.setattr(ldm.artifacts, "save_file", fill_the_disk)
    result = cli(store, "encode", "--set", "limit=16", "--set", "batch_size=8", "--set", "shard_size=8")
    assert_one_line(result, f"cannot write to {store.root}", FULL, "free space", "--store / LDM_HOME")
    assert written and files_under(store.root / "latents") == []


@pytest.mark.timeout(60)
def test_a_full_disk_while_sampling_keeps_the_finished_batch_with_its_incomplete_report(store, tmp_path, monkeypatch):
    syncs = []
    real_fsync = os.fsync

    def fill_the_disk_at_the_fourth_file(fd):  # image 0, image 1, samples.json, then image 2 of the second batch
        syncs.append(fd)
        if len(syncs) >= 4:
            raise OSError(errno.ENOSPC, FULL)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fill_the_disk_at_the_fourth_file)
    out = tmp_path / "out"
    result = cli(store, "sample", "--n", "4", "--steps", "2", "--batch-size", "2", "--out", str(out))
    assert_one_line(result, f"cannot write to {out}", FULL, "free space", "--out", "samples.json")
    assert files_under(out) == ["images/000000-class0.png", "images/000001-class1.png", "samples.json"]
    report = json.loads((out / "samples.json").read_text())
    assert report["complete"] is False and report["sampled"] == 2


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def fill_the_disk(checkpoint, handle):
        handle.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(WriteError, match=rf"cannot write to {path.parent} \({FULL}\).*free space.*--run-dir"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert os.listdir(path.parent) == ["last.ckpt"]
    assert int(io.load_checkpoint(path)["step"]) == 1


@needs_fmnist
@pytest.mark.timeout(120)
def test_a_full_disk_at_a_checkpoint_during_training_is_one_line_and_stores_nothing(store, tmp_path, monkeypatch):
    def fill_the_disk(checkpoint, handle):
        raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(torch, "save", fill_the_disk)
    run_dir = tmp_path / "run"
    result = cli(
        store, "train", "classifier", *TINY_CLASSIFIER, "--set", "trainer.checkpoint_every=1", "--run-dir", str(run_dir)
    )
    assert_one_line(result, f"cannot write to {run_dir / 'checkpoints'}", FULL, "--run-dir")
    assert not list((run_dir / "checkpoints").glob("*")) and store.list("classifier") == []


# ----------------------------------------------------------------------------- destinations checked before the work


def test_check_writable_names_a_file_in_the_way_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(
        WriteError, match=rf"cannot write to {tmp_path}/notes.txt/out: {tmp_path}/notes.txt is a file, not a folder"
    ):
        check_writable(tmp_path / "notes.txt" / "out", "--out")
    check_writable(tmp_path / "new" / "folder", "--out")
    assert os.listdir(tmp_path) == ["notes.txt"]  # the check creates nothing


def test_check_writable_refuses_a_folder_even_root_cannot_write():
    # sysfs refuses new files to every user, root included
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs")
    with pytest.raises(
        WriteError,
        match=r"cannot write to /sys/kernel/out \(.*\): make it writable or choose another folder with --out",
    ):
        check_writable(Path("/sys/kernel/out"), "--out")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", list(TRAIN_COMMANDS))
def test_training_with_ldm_home_a_file_stops_before_the_run_starts(tmp_path, stage):
    home = tmp_path / "ldm-home"
    home.write_text("not a folder")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", stage, *TRAIN_COMMANDS[stage], "--run-dir", str(run_dir)], env={"LDM_HOME": str(home)}
    )
    assert_one_line(result, f"cannot write to {home}", "is a file, not a folder", "--store / LDM_HOME")
    assert not run_dir.exists()  # no run folder, no log, no step


@pytest.mark.timeout(60)
def test_training_into_a_read_only_run_folder_stops_before_the_run_starts(tmp_path, make_read_only):
    parent = make_read_only(tmp_path / "runs")
    result = cli(tmp_path / "store", "train", "classifier", *TINY_CLASSIFIER, "--run-dir", str(parent / "classifier"))
    assert_one_line(result, f"cannot write to {parent / 'classifier'}", "--run-dir")
    assert os.listdir(parent) == []


@pytest.mark.timeout(60)
def test_training_into_a_read_only_store_stops_before_the_run_starts(tmp_path, make_read_only):
    store = make_read_only(tmp_path / "store")
    run_dir = tmp_path / "run"
    result = cli(store, "train", "classifier", *TINY_CLASSIFIER, "--run-dir", str(run_dir))
    assert_one_line(result, f"cannot write to {store}", "make it writable", "--store / LDM_HOME")
    assert not run_dir.exists()


@pytest.mark.timeout(60)
def test_eval_samples_on_a_read_only_store_stops_before_sampling(store, tmp_path, monkeypatch, make_read_only):
    calls = []
    monkeypatch.setattr(LatentDiffusionPipeline, "sample", lambda *args, **kwargs: calls.append(1))
    make_read_only(store.root)
    result = cli(store, "eval", "samples", "--n", "10", "--steps", "2", "--out", str(tmp_path / "eval"))
    assert_one_line(result, f"cannot write to {store.list('diffusion')[0].path}", "--store / LDM_HOME")
    assert calls == [] and not (tmp_path / "eval").exists()


@pytest.mark.timeout(60)
def test_eval_samples_into_a_read_only_out_stops_before_sampling(store, tmp_path, monkeypatch, make_read_only):
    calls = []
    monkeypatch.setattr(LatentDiffusionPipeline, "sample", lambda *args, **kwargs: calls.append(1))
    out = make_read_only(tmp_path / "eval")
    result = cli(store, "eval", "samples", "--n", "10", "--steps", "2", "--out", str(out))
    assert_one_line(result, f"cannot write to {out}", "--out")
    assert calls == []


@pytest.mark.timeout(60)
def test_cache_fraction_on_a_read_only_store_stops_before_calibrating(store, tmp_path, monkeypatch, make_read_only):
    calls = []
    monkeypatch.setattr(LatentDiffusionPipeline, "calibrate_cache", lambda *args, **kwargs: calls.append(1))
    make_read_only(store.root)
    out = tmp_path / "out"
    result = cli(store, "sample", "--n", "2", "--steps", "3", "--cache-fraction", "0.3", "--out", str(out))
    assert_one_line(result, f"cannot write to {store.list('diffusion')[0].path}", "--store / LDM_HOME")
    assert calls == [] and not out.exists()


@pytest.mark.timeout(60)
def test_a_stored_schedule_samples_from_a_read_only_store(store, tmp_path, make_read_only):
    args = ["sample", "--n", "2", "--steps", "3", "--cache-fraction", "0.3", "--no-images"]
    assert cli(store, *args, "--out", str(tmp_path / "first")).exit_code == 0
    make_read_only(store.root)
    result = cli(store, *args, "--out", str(tmp_path / "second"))
    assert result.exit_code == 0 and "the stored schedule" in result.output, result.output


@pytest.mark.timeout(60)
def test_sample_into_a_read_only_out_stops_before_sampling(store, tmp_path, monkeypatch, make_read_only):
    calls = []
    monkeypatch.setattr(LatentDiffusionPipeline, "sample", lambda *args, **kwargs: calls.append(1))
    out = make_read_only(tmp_path / "out")
    assert_one_line(
        cli(store, "sample", "--n", "2", "--steps", "2", "--out", str(out)),
        f"cannot write to {out / 'images'}",
        "--out",
    )
    assert calls == []


@pytest.mark.timeout(60)
def test_encode_into_a_read_only_store_stops_before_encoding(store, monkeypatch, make_read_only):
    import stages.encode

    monkeypatch.setattr(stages.encode, "build_dataset", lambda *args: pytest.fail("the data was read"))
    make_read_only(store.root)
    assert_one_line(cli(store, "encode", "--set", "limit=16"), f"cannot write to {store.root}", "--store / LDM_HOME")


@pytest.mark.timeout(60)
def test_eval_recon_on_a_read_only_store_stops_before_evaluating(store, tmp_path, monkeypatch, make_read_only):
    import stages.evaluate

    monkeypatch.setattr(stages.evaluate, "build_dataset", lambda *args: pytest.fail("the data was read"))
    make_read_only(store.root)
    result = cli(store, "eval", "recon", "--out", str(tmp_path / "recon"))
    assert_one_line(result, f"cannot write to {store.list('autoencoder')[0].path}", "--store / LDM_HOME")


@pytest.mark.timeout(60)
def test_posthoc_ema_on_a_read_only_store_stops_before_reconstructing(store, tmp_path, make_read_only):
    make_read_only(store.root)
    result = cli(
        store, "ema", "--model", store.list("diffusion")[0].ref, "--sigma-rel", "0.05", "--out", str(tmp_path / "ema")
    )
    assert_one_line(result, f"cannot write to {store.root}", "--store / LDM_HOME")


@pytest.mark.timeout(60)
def test_quantize_into_a_read_only_store_and_export_into_a_read_only_folder_stop_before_the_work(
    store, tmp_path, make_read_only
):
    ref = store.list("diffusion")[0].ref
    out = make_read_only(tmp_path / "exports")
    assert_one_line(
        cli(store, "export", "diffusion", ref, "--to-diffusers", str(out / "dit")),
        f"cannot write to {out / 'dit'}",
        "--to-diffusers",
    )
    make_read_only(store.root)
    assert_one_line(
        cli(store, "export", "diffusion", ref, "--quantize", "int8"),
        f"cannot write to {store.root}",
        "--store / LDM_HOME",
    )
    assert len(store.list("diffusion")) == 1


@pytest.mark.timeout(60)
def test_import_into_a_read_only_store_stops_before_reading_the_source(tmp_path, make_read_only):
    store = make_read_only(tmp_path / "store")
    result = cli(store, "import", "autoencoder", "--from-compvis", str(tmp_path / "missing.ckpt"))
    assert_one_line(result, f"cannot write to {store}", "--store / LDM_HOME")


@pytest.mark.timeout(60)
def test_a_full_disk_where_no_command_named_the_folder_is_still_one_line_naming_it(store, tmp_path, monkeypatch):
    import ldm.interop.checkpoints

    def fill_the_disk(tensors, path, *args, **kwargs):
        raise SafetensorError(
            f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"'
        )

    monkeypatch.setattr(ldm.interop.checkpoints, "save_file", fill_the_disk)
    result = cli(store, "export", "diffusion", store.list("diffusion")[0].ref, "--to-diffusers", str(tmp_path / "dit"))
    assert_one_line(result, f"cannot write to {tmp_path}", FULL, "free space")
    assert os.listdir(tmp_path) == ["store"]  # the export's temporary folder is gone
