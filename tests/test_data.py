"""Data layer: Fashion-MNIST IDX files, image folders, DataConfig, fingerprints."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import stat
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.data import DataConfig, build_dataset, data_fingerprint, fmnist
from ldm.data.fmnist import (
    FILE_STEMS,
    FMNIST_CLASSES,
    ChecksumMismatchError,
    FashionMNIST,
    FashionMNISTNotFoundError,
    IDXFormatError,
    ensure_fmnist,
    load_fmnist,
    parse_idx,
    to_model_range,
)
from ldm.data.folder import ImageFolderDataset, ImageReadError

REAL_DIR = fmnist.SYSTEM_DIR
needs_fmnist = pytest.mark.skipif(
    not all((REAL_DIR / f"{stem}.gz").is_file() for stem in FILE_STEMS),
    reason=f"Fashion-MNIST not installed in {REAL_DIR} (apt-get install -y dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def isolated_search_path(offline_data):
    """No test sees the user's LDM_DATA or cache, and none can reach the network (conftest's offline_data)."""


def fmnist_copy(folder: Path, replace: dict[str, bytes] | None = None) -> Path:
    """A folder with links to the real files, where ``replace`` maps a stem to new payload bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in FILE_STEMS:
        if replace and stem in replace:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(replace[stem]))
        else:
            (folder / f"{stem}.gz").symlink_to(REAL_DIR / f"{stem}.gz")
    return folder


def real_payload(stem: str) -> bytes:
    return gzip.decompress((REAL_DIR / f"{stem}.gz").read_bytes())


# ----------------------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_train_split_has_60000_images_6000_per_class_starting_9_0_0_3_0():
    images, labels = load_fmnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert labels[:5].tolist() == [9, 0, 0, 3, 0]


@needs_fmnist
def test_test_split_has_10000_images_1000_per_class_starting_9_2_1_1_6():
    images, labels = load_fmnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert images.min() == 0 and images.max() == 255
    assert len(FMNIST_CLASSES) == 10 and FMNIST_CLASSES[9] == "Ankle boot"


@needs_fmnist
def test_unknown_split_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"\['test', 'train'\], got 'validation'"):
        load_fmnist("validation")


@needs_fmnist
def test_repeated_loads_are_served_from_the_process_cache(monkeypatch):
    first_images, _ = load_fmnist("test")
    monkeypatch.setattr(fmnist, "_read_verified", lambda *a: pytest.fail("file parsed twice"))
    first_images.zero_()  # callers get copies: editing one must not corrupt the cache
    images, labels = load_fmnist("test")
    assert images.max() == 255 and labels[0] == 9


@needs_fmnist
def test_dataset_pads_28_to_32_with_background_and_maps_pixels_to_minus_one_one():
    raw, labels = load_fmnist("test")
    data = FashionMNIST("test")
    assert data.images.shape == (10000, 1, 32, 32) and data.images.dtype == torch.float32
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (data.images[:, 0, border] == -1.0).all()
    assert torch.equal(data.images[:, 0, 2:30, 2:30], raw.float() / 127.5 - 1.0)
    image, label = data[3]
    assert image.shape == (1, 32, 32) and label == int(labels[3]) and isinstance(label, int)
    assert torch.equal(data.labels, labels)


@needs_fmnist
def test_dataset_at_28_keeps_raw_pixels_and_other_sizes_resize_within_range():
    raw, _ = load_fmnist("test")
    assert torch.equal(FashionMNIST("test", resolution=28).images[:, 0], raw.float() / 127.5 - 1.0)
    padded = to_model_range(raw[:8], 32)
    big = to_model_range(raw[:8], 64)
    assert big.shape == (8, 1, 64, 64) and big.min() >= -1.0 and big.max() <= 1.0
    # Same framing as 32 (padded first, then resized): 2x2 averages of the 64 image match the 32 one.
    # (A one-pixel shift of the framing would give about 0.13 here.)
    assert (F.avg_pool2d(big, 2) - padded).abs().mean() < 0.05
    assert (big[:, :, 0, :] == -1.0).all() and (big[:, :, :, 0] == -1.0).all()


@needs_fmnist
def test_hflip_returns_both_orientations_and_leaves_images_untouched():
    data = FashionMNIST("test", hflip=True)
    original = data.images[0].clone()
    torch.manual_seed(0)
    seen = {torch.equal(data[0][0], original) for _ in range(32)}
    assert seen == {True, False}
    assert any(torch.equal(data[0][0], original.flip(-1)) for _ in range(32))
    assert torch.equal(data.images[0], original)


def test_parse_idx_reads_header_dims_and_values():
    payload = bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    assert parse_idx(payload).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_parse_idx_rejects_bad_magic_and_truncation_naming_the_source():
    good = bytes([0, 0, 0x08, 1]) + (4).to_bytes(4, "big") + bytes(4)
    with pytest.raises(IDXFormatError, match="my-file.*bad IDX magic"):
        parse_idx(b"\x12\x34" + good[2:], "my-file")
    with pytest.raises(IDXFormatError, match="my-file.*truncated"):
        parse_idx(good[:-1], "my-file")


@needs_fmnist
def test_malformed_file_on_disk_is_reported_by_path(tmp_path, monkeypatch):
    labels = real_payload("t10k-labels-idx1-ubyte")
    folder = fmnist_copy(tmp_path / "bad-magic", {"t10k-labels-idx1-ubyte": b"\x00\x00\x08\x03" + labels[4:]})
    monkeypatch.setenv("LDM_DATA", str(folder))
    with pytest.raises(IDXFormatError, match=r"bad-magic/t10k-labels-idx1-ubyte\.gz"):
        load_fmnist("test")


@needs_fmnist
def test_truncated_gzip_is_reported_by_path(tmp_path, monkeypatch):
    folder = fmnist_copy(tmp_path / "cut")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    cut = (REAL_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()[:2000]
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(cut)
    monkeypatch.setenv("LDM_DATA", str(folder))
    with pytest.raises(IDXFormatError, match=r"cut/t10k-labels-idx1-ubyte\.gz.*gzip"):
        load_fmnist("test")


@needs_fmnist
def test_checksum_mismatch_names_file_both_hashes_and_the_fix(tmp_path, monkeypatch):
    labels = bytearray(real_payload("t10k-labels-idx1-ubyte"))
    labels[8] = 3  # well-formed IDX, one label changed
    folder = fmnist_copy(tmp_path / "edited", {"t10k-labels-idx1-ubyte": bytes(labels)})
    monkeypatch.setenv("LDM_DATA", str(folder))
    expected_sha = fmnist.PAYLOAD_SHA256["t10k-labels-idx1-ubyte"][0]
    with pytest.raises(ChecksumMismatchError) as info:
        load_fmnist("test")
    message = str(info.value)
    assert "edited/t10k-labels-idx1-ubyte.gz" in message and expected_sha in message
    assert "actual" in message and "delete" in message and "reinstall" in message


@needs_fmnist
def test_ldm_data_is_searched_first_as_the_folder_or_its_fashion_mnist_child(tmp_path, monkeypatch):
    folder = fmnist_copy(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv("LDM_DATA", str(tmp_path / "data"))
    assert ensure_fmnist(download=False) == folder
    monkeypatch.setenv("LDM_DATA", str(folder))
    assert ensure_fmnist(download=False) == folder


def test_every_data_set_looks_in_its_ldm_data_child_then_ldm_data_then_the_system_then_the_cache(tmp_path, monkeypatch):
    from ldm.data import sound

    monkeypatch.setenv("LDM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data, cache = tmp_path / "data", tmp_path / "cache" / "ldm"
    assert fmnist.candidate_dirs() == [data / "fashion-mnist", data, fmnist.SYSTEM_DIR, cache / "fashion-mnist"]
    assert sound.candidate_dirs() == [data / "fsdd", data, cache / "fsdd"]


@needs_fmnist
def test_an_explicit_folder_is_the_only_place_searched(tmp_path):
    folder = fmnist_copy(tmp_path / "mine")
    assert ensure_fmnist(root=folder) == folder
    assert len(build_dataset(DataConfig(path=str(folder)), "test")) == 10000
    with pytest.raises(FashionMNISTNotFoundError, match="explicit folder"):
        ensure_fmnist(root=tmp_path / "elsewhere")  # the system copy exists, but was not asked for


def test_missing_data_error_gives_the_apt_command_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist, "SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.setenv("LDM_DATA", str(tmp_path / "empty"))
    with pytest.raises(FashionMNISTNotFoundError) as info:
        ensure_fmnist(download=True)
    message = str(info.value)
    assert "apt-get update && " in message and "apt-get install -y dataset-fashion-mnist" in message
    assert "LDM_DATA" in message and str(tmp_path / "empty") in message
    assert "network disabled in tests" in message  # the download's failure reason is kept
    assert not (tmp_path / "xdg-cache" / "ldm" / "fashion-mnist").exists() or not any(
        (tmp_path / "xdg-cache" / "ldm" / "fashion-mnist").iterdir()
    )


def test_install_system_package_runs_apt_update_then_install(tmp_path, monkeypatch):
    system_dir = tmp_path / "usr-share"
    monkeypatch.setattr(fmnist, "SYSTEM_DIR", system_dir)
    monkeypatch.setattr(fmnist, "_is_root", lambda: True)
    monkeypatch.setattr(fmnist.shutil, "which", lambda name: "/usr/bin/" + name)
    commands = []

    def fake_run(cmd, check, env):
        commands.append(cmd)
        if cmd[:2] == ["apt-get", "install"]:  # the package puts the four files in place
            system_dir.mkdir()
            for stem in FILE_STEMS:
                (system_dir / f"{stem}.gz").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fmnist.subprocess, "run", fake_run)
    assert ensure_fmnist(download=False, install_system_package=True) == system_dir
    assert commands == [["apt-get", "update"], ["apt-get", "install", "-y", "dataset-fashion-mnist"]]


@pytest.fixture
def local_mirror(tmp_path, monkeypatch):
    """Serve a folder over HTTP on localhost and point the downloader at it; yields the folder."""
    served = tmp_path / "mirror"
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setattr(fmnist, "SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.setattr(fmnist, "DOWNLOAD_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    yield served
    server.shutdown()


@needs_fmnist
def test_download_lands_verified_files_in_the_user_cache(local_mirror, tmp_path, capsys):
    fmnist_copy(local_mirror)
    folder = ensure_fmnist(download=True)
    assert folder == tmp_path / "xdg-cache" / "ldm" / "fashion-mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.gz" for s in FILE_STEMS)
    umask = os.umask(0o022)
    os.umask(umask)
    for file in folder.iterdir():  # readable as a plain file would be, not mkstemp's private 0600
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name
    assert "100.0%" in capsys.readouterr().err
    assert load_fmnist("test")[1][:5].tolist() == [9, 2, 1, 1, 6]


@needs_fmnist
def test_corrupt_download_is_refused_and_leaves_no_file_behind(local_mirror, tmp_path):
    labels = bytearray(real_payload("t10k-labels-idx1-ubyte"))
    labels[-1] ^= 1
    fmnist_copy(local_mirror, {"t10k-labels-idx1-ubyte": bytes(labels)})
    with pytest.raises(ChecksumMismatchError, match="t10k-labels-idx1-ubyte"):
        ensure_fmnist(download=True)
    cache = tmp_path / "xdg-cache" / "ldm" / "fashion-mnist"
    downloaded = sorted(p.name for p in cache.iterdir())  # no .part file, no corrupt file
    assert downloaded == sorted(f"{s}.gz" for s in FILE_STEMS if s != "t10k-labels-idx1-ubyte")


# ----------------------------------------------------------------------------- image folders


def save(path: Path, size=(20, 20), color=(255, 0, 0), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_class_subfolders_give_sorted_class_indices(tmp_path):
    save(tmp_path / "zebra" / "a.png")
    save(tmp_path / "cat" / "b.jpg", size=(30, 20))
    save(tmp_path / "cat" / "nested" / "c.PNG")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "._b.jpg").write_bytes(b"macOS metadata, not an image")
    (tmp_path / "dog").mkdir()
    with pytest.warns(UserWarning, match="without images are not classes: dog"):
        data = ImageFolderDataset(tmp_path, resolution=16)
    assert data.classes == ["cat", "zebra"]
    relative = [p.relative_to(tmp_path).as_posix() for p in data.files]
    assert relative == ["cat/b.jpg", "cat/nested/c.PNG", "zebra/a.png"]
    assert data.labels == [0, 0, 1]
    image, label = data[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1


def test_flat_folder_gives_label_zero_and_accepts_any_extension_case(tmp_path):
    for name in ("a.PNG", "b.JpEg", "c.bmp", "d.webp", "e.gif", "f.TIFF"):
        save(tmp_path / name)
    data = ImageFolderDataset(tmp_path, resolution=8)
    assert len(data) == 6 and data.classes == [] and set(data.labels) == {0}
    assert all(data[i][0].shape == (3, 8, 8) for i in range(len(data)))


def test_grayscale_and_rgb_outputs_in_minus_one_one(tmp_path):
    save(tmp_path / "red.png", color=(255, 0, 0))
    rgb, _ = ImageFolderDataset(tmp_path, resolution=8, channels=3)[0]
    assert torch.equal(rgb[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    gray, _ = ImageFolderDataset(tmp_path, resolution=8, channels=1)[0]
    assert gray.shape == (1, 8, 8)
    luma_of_red = 76  # ITU-R 601: round(0.299 * 255)
    assert torch.allclose(gray, torch.full((1, 8, 8), luma_of_red / 127.5 - 1.0), atol=1e-6)


def test_shorter_side_is_resized_then_center_cropped(tmp_path):
    array = np.zeros((20, 60, 3), dtype=np.uint8)  # (H, W, C): red | green | blue thirds
    array[:, :20, 0] = array[:, 20:40, 1] = array[:, 40:, 2] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    image, _ = ImageFolderDataset(tmp_path, resolution=10)[0]  # 60x20 -> 30x10 -> middle 10x10
    assert image.shape == (3, 10, 10)
    inner = image[:, :, 1:-1]  # the outer columns may blend with the neighbouring thirds
    assert (inner[1] > 0.9).all() and (inner[0] < -0.9).all() and (inner[2] < -0.9).all()


def test_transparent_pixels_become_white_not_black(tmp_path):
    save(tmp_path / "clear.png", color=(0, 0, 0, 0), mode="RGBA")
    image, _ = ImageFolderDataset(tmp_path, resolution=4)[0]
    assert (image == 1.0).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "deep.png")
    image, _ = ImageFolderDataset(tmp_path, resolution=8, channels=1)[0]
    assert torch.allclose(image, torch.full((1, 8, 8), 128 / 127.5 - 1.0), atol=1e-6)  # 32768 / 257 -> 128


def make_folder_with_bad_files(root: Path) -> list[Path]:
    for i in range(3):
        save(root / f"good{i}.png", color=(0, 80 * i, 0))
    (root / "garbage.png").write_bytes(b"this is not a png")
    good_jpeg = root / "whole.jpg"
    save(good_jpeg, size=(64, 64))
    truncated = root / "truncated.jpg"
    truncated.write_bytes(good_jpeg.read_bytes()[:300])
    good_jpeg.unlink()
    return [root / "garbage.png", truncated]


def test_unreadable_image_raises_naming_the_file(tmp_path):
    bad = make_folder_with_bad_files(tmp_path)
    data = ImageFolderDataset(tmp_path, resolution=8)
    for path in bad:
        with pytest.raises(ImageReadError, match=str(path)):
            data[data.files.index(path)]


def test_skip_mode_serves_readable_images_and_counts_the_skips(tmp_path):
    bad = make_folder_with_bad_files(tmp_path)
    data = ImageFolderDataset(tmp_path, resolution=8, on_error="skip")
    with pytest.warns(UserWarning) as warned:
        items = [data[i] for i in range(len(data))]
    assert all(any(path.name in str(w.message) for w in warned) for path in bad)
    assert len(items) == len(data) == 5 and all(image.shape == (3, 8, 8) for image, _ in items)
    assert data.skipped == 2 and sorted(data.skipped_files) == sorted(bad)
    assert sorted(p for p, _ in data.find_unreadable()) == sorted(bad)
    loader = torch.utils.data.DataLoader(data, batch_size=5)
    assert next(iter(loader))[0].shape == (5, 3, 8, 8)


def test_empty_or_mixed_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", resolution=8)
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing", resolution=8)
    save(tmp_path / "mixed" / "loose.png")
    save(tmp_path / "mixed" / "cls" / "a.png")
    with pytest.raises(ValueError, match="loose.png"):
        ImageFolderDataset(tmp_path / "mixed", resolution=8)


# ----------------------------------------------------------------------------- DataConfig


def test_config_rejects_unknown_name_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"\['fmnist', 'folder', 'fsdd', 'soundfolder', 'scenes'\].*'mnist'"):
        DataConfig(name="mnist")


@pytest.mark.parametrize(
    "fields, complaint",
    [
        ({"name": "folder"}, "data.path is required"),
        ({"channels": 3}, "grayscale"),
        ({"name": "folder", "path": "x", "channels": 2}, "channels must be 1 or 3"),
        ({"resolution": "32"}, "resolution"),
        ({"on_error": "ignore"}, r"\['raise', 'skip'\]"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_config_rejects_out_of_range_values(fields, complaint):
    with pytest.raises(ValueError, match=complaint):
        DataConfig(**fields)


@needs_fmnist
def test_build_dataset_for_fmnist_and_for_a_folder_with_split_subfolders(tmp_path):
    data = build_dataset(DataConfig(), "test")
    assert isinstance(data, FashionMNIST) and len(data) == 10000 and data[0][0].shape == (1, 32, 32)
    save(tmp_path / "train" / "a" / "1.png")
    save(tmp_path / "val" / "a" / "2.png")
    config = DataConfig(name="folder", path=str(tmp_path), channels=3, resolution=16)
    assert [p.name for p in build_dataset(config, "val").files] == ["2.png"]
    assert [p.name for p in build_dataset(config, "train").files] == ["1.png"]
    with pytest.raises(ValueError, match="'test'"):
        build_dataset(config, "test")


def test_fmnist_fingerprint_is_stable_and_depends_on_split_and_resolution():
    config = DataConfig()
    fingerprint = data_fingerprint(config, "train")
    assert fingerprint == data_fingerprint(DataConfig(), "train") and len(fingerprint) == 16
    assert fingerprint != data_fingerprint(config, "test")
    assert fingerprint != data_fingerprint(DataConfig(resolution=28), "train")
    assert fingerprint == data_fingerprint(DataConfig(hflip=True), "train")  # augmentation is not data


def test_folder_fingerprint_changes_when_a_file_changes_or_appears(tmp_path):
    save(tmp_path / "a" / "1.png")
    save(tmp_path / "b" / "2.png")
    config = DataConfig(name="folder", path=str(tmp_path), channels=3)
    before = data_fingerprint(config, "train")
    assert before == data_fingerprint(config, "train")
    assert before != data_fingerprint(DataConfig(name="folder", path=str(tmp_path), channels=1), "train")
    stat = (tmp_path / "a" / "1.png").stat()
    os.utime(tmp_path / "a" / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = data_fingerprint(config, "train")
    assert touched != before
    save(tmp_path / "b" / "3.png")
    assert data_fingerprint(config, "train") not in (before, touched)
