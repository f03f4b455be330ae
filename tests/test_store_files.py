"""The store reads only its own regular files, refuses links and special files, and never hides a leftover.

Each planted file (a link to /dev/zero, a FIFO, a linked folder) must give one line naming the file and
the problem, from the Python API and from `ldm artifacts list/show/verify`, and never hang: every test
that could block has a timeout, so a hang fails instead of stalling CI.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ldm.artifacts
from ldm.artifacts import ArtifactError, ArtifactStore, ArtifactWarning
from stages.cli import main

ROOT = Path(__file__).resolve().parent.parent
needs_dev_zero = pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")


def save_small(store, value=1.0):
    return store.save(
        "diffusion",
        tensors={"weights.safetensors": {"w": torch.full((2, 3), value)}},
        config={"model": {"hidden_size": 8}, "value": value},
    )


def cli(store, *args):
    return CliRunner().invoke(main, ["--store", str(store.root), *args])


def assert_one_clean_line(result, *phrases):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if all(phrase in line for phrase in phrases)]
    assert len(lines) == 1, result.output


def link_config_to_dev_zero(folder):
    (folder / "config.yaml").unlink()
    (folder / "config.yaml").symlink_to("/dev/zero")


def fifo_for_manifest(folder):
    (folder / "manifest.json").unlink()
    os.mkfifo(folder / "manifest.json")


def link_manifest_to_dev_zero(folder):
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").symlink_to("/dev/zero")


def link_weights_to_dev_zero(folder):
    (folder / "weights.safetensors").unlink()
    (folder / "weights.safetensors").symlink_to("/dev/zero")


PLANTED = [
    (link_config_to_dev_zero, "config.yaml is a symbolic link"),
    (fifo_for_manifest, "manifest.json is a FIFO"),
    (link_manifest_to_dev_zero, "manifest.json is a symbolic link"),
    (link_weights_to_dev_zero, "weights.safetensors is a symbolic link"),
]
PLANTED_IDS = ["config-to-dev-zero", "fifo-manifest", "manifest-to-dev-zero", "weights-to-dev-zero"]


@pytest.fixture
def planted(request, tmp_path):
    """A store with a sound artifact and one whose file `request.param` replaced: (store, good, bad, phrase)."""
    plant, phrase = request.param
    store = ArtifactStore(tmp_path / "store")
    good, bad = save_small(store, 1.0), save_small(store, 2.0)
    plant(bad.path)
    return store, good, bad, phrase


# ---- special files and links inside an artifact -------------------------------------------


@needs_dev_zero
@pytest.mark.timeout(20)
@pytest.mark.parametrize("planted", PLANTED, ids=PLANTED_IDS, indirect=True)
def test_list_names_a_planted_special_file_as_broken_and_keeps_good_lines(planted):
    store, good, bad, phrase = planted
    result = cli(store, "artifacts", "list")
    assert result.exit_code == 0, result.output
    assert_one_clean_line(result, f"BROKEN diffusion/{bad.version}", phrase)
    assert result.output.splitlines()[0].startswith(f"{good.ref:<28} ")  # the good line as before


@needs_dev_zero
@pytest.mark.timeout(20)
@pytest.mark.parametrize("planted", PLANTED, ids=PLANTED_IDS, indirect=True)
def test_show_of_a_planted_special_file_is_one_clean_error(planted):
    store, _, bad, phrase = planted
    result = cli(store, "artifacts", "show", bad.ref, "--no-verify")
    assert result.exit_code == 1
    assert_one_clean_line(result, f"diffusion/{bad.version} is damaged", phrase)


@needs_dev_zero
@pytest.mark.timeout(20)
@pytest.mark.parametrize("planted", PLANTED, ids=PLANTED_IDS, indirect=True)
def test_verify_fails_a_planted_special_file_in_one_line(planted):
    store, good, bad, phrase = planted
    result = cli(store, "artifacts", "verify")
    assert result.exit_code == 1
    assert_one_clean_line(result, f"diffusion/{bad.version}", "FAILED", phrase)
    assert f"{good.ref} ok" in [" ".join(line.split()) for line in result.output.splitlines()]
    assert cli(store, "artifacts", "verify", f"diffusion@{bad.version[:6]}").exit_code == 1


@needs_dev_zero
@pytest.mark.timeout(20)
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("planted", PLANTED, ids=PLANTED_IDS, indirect=True)
def test_load_refuses_a_planted_special_file_naming_it(planted, verify):
    store, good, bad, phrase = planted
    with pytest.raises(ArtifactError, match=f"diffusion/{bad.version} is damaged: {phrase}"):
        store.load(bad.ref, verify=verify)
    assert store.list() == [store.load(good.ref)]


@pytest.mark.timeout(20)
def test_a_manifest_over_the_size_cap_is_refused_unread(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    saved = save_small(store)
    size = (saved.path / "manifest.json").stat().st_size
    monkeypatch.setattr(ldm.artifacts, "METADATA_MAX_BYTES", size - 1)
    with pytest.raises(ArtifactError, match=rf"manifest.json is {size} bytes, more than the {size - 1} bytes allowed"):
        store.load(saved.ref, verify=False)


@pytest.mark.timeout(20)
def test_a_config_over_the_size_cap_is_refused_unread(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    saved = save_small(store)
    cap = (saved.path / "manifest.json").stat().st_size
    monkeypatch.setattr(ldm.artifacts, "METADATA_MAX_BYTES", cap)
    (saved.path / "config.yaml").write_text("#" * (cap + 1))
    with pytest.raises(ArtifactError, match=rf"config.yaml is {cap + 1} bytes, more than the {cap} bytes allowed"):
        store.load(saved.ref, verify=False)


@pytest.mark.timeout(20)
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path):
    store = ArtifactStore(tmp_path)
    (tmp_path / "secret").write_text("not an artifact file")
    folder = tmp_path / "diffusion" / "pending"
    folder.mkdir(parents=True)
    files = {"../../secret": {"sha256": hashlib.sha256(b"not an artifact file").hexdigest()}}
    # A legacy manifest (its version hashes the files' lines alone) is easy to make consistent by hand.
    version = hashlib.sha256("".join(f"{n}:{f['sha256']}\n" for n, f in files.items()).encode()).hexdigest()[:12]
    (folder / "manifest.json").write_text(json.dumps({"stage": "diffusion", "version": version, "files": files}))
    folder.rename(folder.parent / version)
    with pytest.raises(
        ArtifactError, match=r"is damaged: manifest.json names '../../secret', which is not a plain file name"
    ):
        store.load(f"diffusion@{version}")


# ---- a linked artifact folder ---------------------------------------------------------------


@pytest.mark.timeout(20)
def test_a_folder_linked_to_another_version_is_refused_not_listed_as_that_version(tmp_path):
    store = ArtifactStore(tmp_path)
    real = save_small(store)
    (tmp_path / "diffusion" / "ffffffffffff").symlink_to(real.path)
    assert [a.ref for a in store.list()] == [real.ref]
    with pytest.raises(ArtifactError, match="diffusion/ffffffffffff is damaged: the folder is a symbolic link"):
        store.resolve("diffusion@ffff")
    listed = cli(store, "artifacts", "list")
    assert listed.exit_code == 0 and listed.output.count(real.ref) == 1
    assert_one_clean_line(listed, "BROKEN diffusion/ffffffffffff", "symbolic link")
    verified = cli(store, "artifacts", "verify")
    assert verified.exit_code == 1
    assert_one_clean_line(verified, "diffusion/ffffffffffff", "FAILED", "symbolic link")
    assert verified.output.splitlines()[-1].endswith("1 ok, 0 legacy, 1 failed")


@pytest.mark.timeout(20)
def test_a_path_reference_through_a_link_outside_the_store_names_the_real_folder(tmp_path):
    # The user chose this path; what the store holds under its own names is never a link.
    store = ArtifactStore(tmp_path / "store")
    real = save_small(store)
    (tmp_path / "best").symlink_to(real.path)
    loaded = store.load(str(tmp_path / "best"))
    assert loaded.ref == real.ref and loaded.path == real.path.resolve()


# ---- leftovers of writes that did not finish -------------------------------------------------

KILLED_WRITER = """
import os, signal, sys, torch
from ldm.artifacts import ArtifactStore
writer = ArtifactStore(sys.argv[1]).writer("diffusion")
writer.write_tensors("weights.safetensors", {"w": torch.zeros(1000)})
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_write(store) -> Path:
    """The temporary folder a writer killed mid-write left in the store."""
    subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(store.root)], cwd=ROOT, timeout=60, check=False
    )  # dies by SIGKILL
    (left,) = [p for p in (store.root / "diffusion").iterdir() if p.name.startswith(".tmp-")]
    return left


def age(folder: Path, seconds: float) -> None:
    """Make everything in `folder` look last changed `seconds` ago."""
    then = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then), follow_symlinks=False)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_verify_reports_a_killed_writers_folder_and_clean_removes_it(tmp_path):
    store = ArtifactStore(tmp_path)
    good = save_small(store)
    left = killed_write(store)
    age(left, 2 * 3600)
    verified = cli(store, "artifacts", "verify")
    assert verified.exit_code == 0, verified.output  # no stored artifact is damaged
    assert_one_clean_line(verified, f"diffusion/{left.name}", "stale temporary folder", "kB", "2.0 h ago")
    assert verified.output.splitlines()[-1] == "1 stale temporary folder: `ldm artifacts clean` removes it"
    dry = cli(store, "artifacts", "clean", "--dry-run")
    assert dry.exit_code == 0 and left.is_dir()
    assert_one_clean_line(dry, f"would remove diffusion/{left.name}")
    cleaned = cli(store, "artifacts", "clean")
    assert cleaned.exit_code == 0, cleaned.output
    assert_one_clean_line(cleaned, f"removed diffusion/{left.name}")
    assert not left.exists() and store.load(good.ref).ref == good.ref
    again = cli(store, "artifacts", "verify")
    assert "stale" not in again.output and again.exit_code == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_killed_writers_folder_is_stale_at_once(tmp_path):
    # Its lock file is there and nobody holds it: its writer is dead, however recent.
    store = ArtifactStore(tmp_path)
    left = killed_write(store)
    assert [t.path for t in store.clean() if t.stale] == [left] and not left.exists()


@pytest.mark.timeout(20)
def test_clean_keeps_a_folder_a_live_writer_holds_and_the_writer_still_commits(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writer("diffusion") as writer:
        writer.write_tensors("weights.safetensors", {"w": torch.ones(3)})
        age(writer.folder, 2 * 3600)
        result = cli(store, "artifacts", "clean")
        assert result.exit_code == 0 and writer.folder.is_dir(), result.output
        assert_one_clean_line(result, f"kept diffusion/{writer.folder.name}", "being written")
        assert "stale" not in cli(store, "artifacts", "verify").output
        saved = writer.commit(config={"a": 1})
    assert store.load(saved.ref).ref == saved.ref
    assert not any(p.name.startswith(".") for p in (tmp_path / "diffusion").iterdir())


@pytest.mark.timeout(20)
def test_an_unlocked_folder_without_a_lock_file_is_stale_only_after_the_grace(tmp_path):
    # No lock file: a writer in its first instant, or a folder from before writers locked theirs.
    store = ArtifactStore(tmp_path)
    left = tmp_path / "diffusion" / ".tmp-old"
    left.mkdir(parents=True)
    (left / "weights.safetensors").write_bytes(b"x" * 100)
    assert [t.stale for t in store.clean()] == [False] and left.is_dir()
    age(left, ldm.artifacts.STALE_AFTER_SECONDS + 5)
    assert [t.path for t in store.clean() if t.stale] == [left] and not left.exists()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_next_write_of_a_stage_removes_its_stale_temporary_folders(tmp_path):
    store = ArtifactStore(tmp_path)
    left = killed_write(store)
    save_small(store)
    assert not left.exists()
    assert not any(p.name.startswith(".") for p in (tmp_path / "diffusion").iterdir())


@pytest.mark.timeout(20)
def test_clean_never_follows_a_link_named_like_a_temporary_folder(tmp_path):
    store = ArtifactStore(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    (tmp_path / "diffusion").mkdir()
    (tmp_path / "diffusion" / ".tmp-link").symlink_to(outside)
    assert store.clean() == [] and store.temp_folders() == []
    assert (outside / "keep").read_text() == "mine"


# ---- stage@latest over a damaged newer artifact ----------------------------------------------


def damaged_newer(store):
    old = save_small(store, 1.0)
    store.update_manifest(old, created="2000-01-01T00:00:00Z")
    newer = save_small(store, 2.0)
    (newer.path / "config.yaml").write_text("value: 3\n")
    return old, newer


@pytest.mark.timeout(20)
def test_latest_over_a_damaged_newer_artifact_warns_naming_it(tmp_path):
    store = ArtifactStore(tmp_path)
    old, newer = damaged_newer(store)
    with pytest.warns(
        ArtifactWarning,
        match=rf"diffusion@latest is {old.ref}, not the newer diffusion/{newer.version}, "
        rf"which is damaged: config.yaml was changed after saving",
    ):
        assert store.load("diffusion@latest").ref == old.ref


@pytest.mark.timeout(20)
def test_latest_over_an_older_damaged_artifact_does_not_warn(tmp_path, recwarn):
    store = ArtifactStore(tmp_path)
    old = save_small(store, 1.0)
    store.update_manifest(old, created="2000-01-01T00:00:00Z")
    (old.path / "config.yaml").write_text("value: 3\n")
    newer = save_small(store, 2.0)
    assert store.load("diffusion@latest").ref == newer.ref
    assert not [w for w in recwarn if issubclass(w.category, ArtifactWarning)]


@pytest.mark.timeout(20)
def test_the_cli_shows_the_latest_warning_as_one_line(tmp_path):
    store = ArtifactStore(tmp_path)
    old, newer = damaged_newer(store)
    result = cli(store, "artifacts", "show", "diffusion@latest", "--no-verify")
    assert result.exit_code == 0, result.output
    assert_one_clean_line(result, f"warning: diffusion@latest is {old.ref}, not the newer diffusion/{newer.version}")
    assert f"{old.ref}  (" in result.output
