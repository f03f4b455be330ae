"""Sound data: FSDD (locate, download, verify, load) and folders of the user's own WAV files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import FSDD_DIR, needs_fsdd
from ldm.audio import read_wav, write_wav
from ldm.data.sound import (
    FSDD,
    FSDD_COMMIT,
    FSDD_LISTING_SHA256,
    FSDD_URL,
    SoundFolderDataset,
    download_fsdd,
    ensure_fsdd,
    find_fsdd,
    fsdd_fingerprint,
    listing_sha256,
    read_sha256sums,
    scan_sound_folder,
)


@pytest.fixture(autouse=True)
def isolated_search_path(offline_data):
    """No test sees the user's LDM_DATA or cache, and none can reach the network (conftest's offline_data)."""


@pytest.fixture(scope="module")
def fsdd_train() -> FSDD:
    return FSDD("train", root=FSDD_DIR, download=False)


@pytest.fixture(scope="module")
def fsdd_test() -> FSDD:
    return FSDD("test", root=FSDD_DIR, download=False)


def _small_copy(tmp_path: Path, count: int = 20) -> Path:
    """A folder with the first ``count`` test-split recordings and a SHA256SUMS listing exactly those."""
    folder = tmp_path / "fsdd-small"
    (folder / "recordings").mkdir(parents=True)
    names = sorted(p.name for p in (FSDD_DIR / "recordings").glob("*_0.wav"))[:count]
    lines = []
    for name in names:
        shutil.copy(FSDD_DIR / "recordings" / name, folder / "recordings" / name)
        lines.append(f"{hashlib.sha256((folder / 'recordings' / name).read_bytes()).hexdigest()}  {name}\n")
    (folder / "SHA256SUMS").write_text("".join(lines))
    return folder


# ----------------------------------------------------------------------------- FSDD on the real copy


@needs_fsdd
def test_fsdd_official_split_sizes_and_per_digit_counts(fsdd_train, fsdd_test):
    assert (len(fsdd_train), len(fsdd_test)) == (2700, 300)
    assert torch.bincount(fsdd_train.labels).tolist() == [270] * 10
    assert torch.bincount(fsdd_test.labels).tolist() == [30] * 10
    assert fsdd_train.classes == tuple("0123456789") and fsdd_train.sample_rate == 8000


@needs_fsdd
def test_fsdd_items_are_fixed_length_float_clips_with_int_labels(fsdd_test):
    signal, label = fsdd_test[123]
    assert signal.shape == (1, 8192) and signal.dtype == torch.float32 and isinstance(label, int)
    assert fsdd_test.signals.shape == (300, 1, 8192) and fsdd_test.labels.dtype == torch.int64


@needs_fsdd
def test_fsdd_labels_match_file_names(fsdd_train):
    assert [int(path.name[0]) for path in fsdd_train.files] == fsdd_train.labels.tolist()
    assert all(int(path.stem.split("_")[2]) >= 5 for path in fsdd_train.files)


@needs_fsdd
def test_fsdd_clips_are_peak_normalised(fsdd_train):
    torch.testing.assert_close(fsdd_train.signals.abs().amax(dim=(1, 2)), torch.full((2700,), 0.9))


@needs_fsdd
def test_fsdd_order_is_index_speaker_digit_so_any_prefix_is_balanced(fsdd_test):
    def key(path: Path) -> tuple[int, str, int]:
        digit, speaker, index = path.stem.split("_")
        return int(index), speaker, int(digit)

    assert fsdd_test.files == sorted(fsdd_test.files, key=key)
    assert torch.bincount(fsdd_test.labels[:60], minlength=10).tolist() == [6] * 10
    assert FSDD("test", root=FSDD_DIR, download=False).files == fsdd_test.files


@needs_fsdd
def test_fsdd_pads_short_and_crops_long_recordings(fsdd_test):
    clips = FSDD("test", length=2000, root=FSDD_DIR, download=False, normalize=False)
    for i in range(0, 300, 37):
        raw, _ = read_wav(clips.files[i])
        kept = min(len(raw), 2000)
        assert torch.equal(clips.signals[i, 0, :kept], raw[:kept])
        assert (clips.signals[i, 0, kept:] == 0).all()


@needs_fsdd
def test_fsdd_rejects_unknown_split():
    with pytest.raises(ValueError, match="'test', 'train'"):
        FSDD("validation", root=FSDD_DIR, download=False)


@needs_fsdd
def test_fsdd_root_may_be_the_recordings_folder_itself():
    assert find_fsdd(FSDD_DIR / "recordings") == FSDD_DIR


@needs_fsdd
def test_fsdd_fingerprint_is_stable_and_differs_between_splits():
    train = fsdd_fingerprint(FSDD_DIR, "train")
    assert len(train) == 16 and int(train, 16) >= 0
    assert train == fsdd_fingerprint(FSDD_DIR, "train") != fsdd_fingerprint(FSDD_DIR, "test")


@needs_fsdd
def test_listing_digest_matches_the_real_copy():
    assert listing_sha256(read_sha256sums(FSDD_DIR / "SHA256SUMS")) == FSDD_LISTING_SHA256


# ----------------------------------------------------------------------------- FSDD verification and fetching


@needs_fsdd
def test_small_copy_listed_by_its_own_sha256sums_loads(tmp_path):
    assert len(FSDD("test", root=_small_copy(tmp_path), download=False)) == 20


@needs_fsdd
def test_checksum_mismatch_names_the_altered_file(tmp_path):
    folder = _small_copy(tmp_path)
    victim = sorted((folder / "recordings").iterdir())[7]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{victim.name}: checksum mismatch.*corrupt"):
        FSDD("test", root=folder, download=False)


@needs_fsdd
def test_listed_but_missing_recording_is_named(tmp_path):
    folder = _small_copy(tmp_path)
    victim = sorted((folder / "recordings").iterdir())[3]
    victim.unlink()
    with pytest.raises(ValueError, match=f"{victim.name}: listed in .* but missing"):
        FSDD("test", root=folder, download=False)


def test_ensure_fsdd_without_data_or_download_says_where_to_put_it(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("LDM_DATA", str(data))
    with pytest.raises(FileNotFoundError) as raised:
        ensure_fsdd(download=False)
    message = str(raised.value)
    assert "$LDM_DATA" in message and FSDD_URL in message and "--data DIR" in message
    assert str(data / "fsdd" / "recordings") in message and str(tmp_path / "xdg-cache" / "ldm" / "fsdd") in message


def test_ensure_fsdd_offline_reports_the_failed_download():
    with pytest.raises(FileNotFoundError, match="Download from .* failed"):
        ensure_fsdd()


def _serve_zip(archive: bytes, tmp_path: Path):
    """Serve ``archive`` as archive.zip from a localhost HTTP server; return (url, server)."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "archive.zip").write_bytes(archive)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/archive.zip", server


def _zip_of(names: list[str]) -> bytes:
    buffer = io.BytesIO()
    prefix = f"free-spoken-digit-dataset-{FSDD_COMMIT}/"
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zipped:
        zipped.writestr(prefix + "README.md", "not extracted")
        for name in names:
            zipped.write(FSDD_DIR / "recordings" / name, prefix + "recordings/" + name)
    return buffer.getvalue()


@needs_fsdd
def test_download_extracts_verifies_and_places_the_recordings(tmp_path):
    names = sorted(p.name for p in (FSDD_DIR / "recordings").iterdir())
    url, server = _serve_zip(_zip_of(names), tmp_path)
    try:
        dest = download_fsdd(tmp_path / "cache" / "fsdd", url=url)
    finally:
        server.shutdown()
    assert sorted(p.name for p in (dest / "recordings").iterdir()) == names
    assert read_sha256sums(dest / "SHA256SUMS") == read_sha256sums(FSDD_DIR / "SHA256SUMS")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["fsdd"]  # no staging folder left behind


@needs_fsdd
def test_download_with_wrong_content_is_refused_and_leaves_nothing(tmp_path):
    names = sorted(p.name for p in (FSDD_DIR / "recordings").iterdir())[:20]
    url, server = _serve_zip(_zip_of(names), tmp_path)
    try:
        with pytest.raises(ValueError, match="20 recordings, expected 3000"):
            download_fsdd(tmp_path / "cache" / "fsdd", url=url)
    finally:
        server.shutdown()
    assert list((tmp_path / "cache").iterdir()) == []


# ----------------------------------------------------------------------------- the user's own sound folder


def _tone(seconds_samples: int, amplitude: float = 0.2) -> torch.Tensor:
    return amplitude * torch.sin(torch.arange(seconds_samples) * 0.3)


def test_sound_folder_labels_come_from_sorted_subfolders(tmp_path):
    for cls, count in (("dog", 2), ("cat", 1)):
        for i in range(count):
            write_wav(tmp_path / cls / f"clip{i}.wav", _tone(100), 16000)
    data = SoundFolderDataset(tmp_path, length=128, sample_rate=16000)
    assert data.classes == ("cat", "dog")
    assert data.labels.tolist() == [0, 1, 1] and [p.parent.name for p in data.files] == ["cat", "dog", "dog"]
    assert data.signals.shape == (3, 1, 128) and (data.signals[:, :, 100:] == 0).all()
    torch.testing.assert_close(data.signals.abs().amax(dim=(1, 2)), torch.full((3,), 0.9))


def test_sound_folder_labels_come_from_file_name_prefixes_sorted_numerically_in_round_robin_order(tmp_path):
    for name in ("10_a.wav", "2_b.wav", "2_c_d.wav", "1_x.wav"):
        write_wav(tmp_path / name, _tone(50), 8000)
    files, labels, classes = scan_sound_folder(tmp_path)
    assert classes == ("1", "2", "10")
    # One file of each class in turn, so that the first n files are balanced over the classes.
    assert [p.name for p in files] == ["1_x.wav", "2_b.wav", "10_a.wav", "2_c_d.wav"] and labels == [0, 1, 2, 1]


def test_sound_folder_refuses_a_wrong_sample_rate_by_name(tmp_path):
    write_wav(tmp_path / "a" / "good.wav", _tone(50), 8000)
    write_wav(tmp_path / "a" / "fast.wav", _tone(50), 44100)
    with pytest.raises(ValueError, match="fast.wav: sample rate 44100 Hz, expected 8000 Hz; resample"):
        SoundFolderDataset(tmp_path, length=64, sample_rate=8000)


def test_sound_folder_keeps_silence_silent_and_crops(tmp_path):
    write_wav(tmp_path / "quiet_1.wav", torch.zeros(300), 8000)
    data = SoundFolderDataset(tmp_path, length=200, sample_rate=8000)
    assert data.signals.shape == (1, 1, 200) and (data.signals == 0).all()


def test_empty_sound_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no .wav files"):
        scan_sound_folder(tmp_path)


def test_sound_file_without_class_prefix_is_named(tmp_path):
    write_wav(tmp_path / "noprefix.wav", _tone(50), 8000)
    with pytest.raises(ValueError, match="noprefix.wav.*'<class>_' prefix"):
        scan_sound_folder(tmp_path)
