"""Sound data sets: the Free Spoken Digit Dataset (FSDD) and folders of the user's own WAV files.

Every data set yields ``(signal float32 (1, length) in [-1, 1], label int)`` and holds everything in
memory: ``signals`` (N, 1, length) float32, ``labels`` (N,) int64, ``classes`` and ``sample_rate``.
Clips have a fixed length: a shorter recording is zero-padded at the end, a longer one keeps its
first ``length`` samples (FSDD is trimmed of silence, so the word starts at sample 0). With
``normalize`` each clip is scaled to a peak |x| of 0.9, because recording levels differ a lot
between speakers and a model should not spend capacity on loudness.

FSDD (Jackson et al., github.com/Jakobovski/free-spoken-digit-dataset, CC BY-SA 4.0) is searched
for, in order, in
  1. an explicit ``root`` argument (only there, when given): the folder holding ``recordings/``,
     or ``recordings/`` itself,
  2. ``$LDM_DATA/fsdd``, then ``$LDM_DATA`` itself,
  3. the user cache ``$XDG_CACHE_HOME/ldm/fsdd`` (default ``~/.cache/ldm/fsdd``),
and otherwise downloaded into the cache from a pinned commit. A folder with a ``SHA256SUMS`` file
(next to ``recordings/``) is checked against it on every load; a download is checked against
``FSDD_LISTING_SHA256``, one digest over all 3,000 files' checksums.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ldm.artifacts import plain_mode, sha256_file
from ldm.audio import read_wav
from ldm.data.fetch import search_dirs, stream_download, user_cache_dir

FSDD_SOURCE = "github.com/Jakobovski/free-spoken-digit-dataset"
FSDD_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"  # 2024-05-02
FSDD_URL = f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/{FSDD_COMMIT}.zip"
# sha256 of the canonical listing: the 3,000 lines "<sha256>  recordings/<name>\n", sorted as strings and
# concatenated. Made once from the SHA256SUMS of a verified copy of FSDD_COMMIT's recordings/ folder.
FSDD_LISTING_SHA256 = "782ba3104cab450397c83dd3b51381d056bfbf7b5f479bdcdb60438902ef191f"
FSDD_NUM_FILES = 3000
FSDD_SAMPLE_RATE = 8000
FSDD_CLASSES: tuple[str, ...] = tuple(str(digit) for digit in range(10))
# Official split by recording index: 0-4 test (300 recordings), 5-49 train (2,700).
FSDD_SPLITS: dict[str, range] = {"train": range(5, 50), "test": range(0, 5)}
FINGERPRINT_VERSION = 1  # bump when what fsdd_fingerprint covers changes
PEAK = 0.9  # the peak |x| of a normalised clip; headroom below 1 keeps a model's overshoot representable

_FSDD_NAME = re.compile(r"(\d)_([A-Za-z]+)_(\d+)\.wav")
_ARCHIVE_RECORDING = re.compile(r"[^/]+/recordings/([^/]+\.wav)")  # "<repo>-<commit>/recordings/<name>"


# ----------------------------------------------------------------------------- clips


def peak_normalize(signals: torch.Tensor, peak: float = PEAK) -> torch.Tensor:
    """Return ``signals`` (N, 1, T) each scaled to a peak |x| of ``peak``; an all-zero clip stays zero."""
    peaks = signals.abs().amax(dim=-1, keepdim=True)  # (N, 1, 1)
    return torch.where(peaks > 0, signals * (peak / peaks.clamp(min=1e-12)), signals)


def _load_clips(files: list[Path], length: int, sample_rate: int, normalize: bool) -> torch.Tensor:
    """Read ``files`` into fixed-length clips (N, 1, length) float32, refusing any other sample rate."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"clip length must be an int >= 1 (samples), got {length!r}")
    clips = torch.zeros(len(files), 1, length)
    for i, path in enumerate(files):
        signal, rate = read_wav(path)  # (T,)
        if rate != sample_rate:
            raise ValueError(
                f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz; resample it, e.g. "
                f"`sox {path.name} -r {sample_rate} out.wav` or "
                f"`ffmpeg -i {path.name} -ar {sample_rate} out.wav`"
            )
        kept = signal[:length]  # zero padding at the end comes from torch.zeros
        clips[i, 0, : len(kept)] = kept
    return peak_normalize(clips) if normalize else clips


# ----------------------------------------------------------------------------- FSDD: checksums


def listing_sha256(hashes: dict[str, str]) -> str:
    """Return the sha256 of the canonical listing of ``{recording name: sha256}`` (see FSDD_LISTING_SHA256)."""
    lines = sorted(f"{digest}  recordings/{name}\n" for name, digest in hashes.items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def read_sha256sums(path: Path) -> dict[str, str]:
    """Return ``{recording name: sha256}`` from a sha256sum-format file; names may carry a ``recordings/`` prefix."""
    listed: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if not match:
            raise ValueError(f'{path}, line {number}: not a sha256sum line ("<64 hex digits>  <name>"): {line!r}')
        listed[match.group(2).removeprefix("./").removeprefix("recordings/")] = match.group(1).lower()
    return listed


def write_sha256sums(path: Path, hashes: dict[str, str]) -> None:
    """Write ``{name: sha256}`` to ``path`` in sha256sum format, sorted by name (the layout of the shared copy)."""
    path.write_text("".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes)))


def _recordings(folder: Path) -> list[Path]:
    """The FSDD recordings in ``folder/recordings``, refusing files with names FSDD does not use."""
    files = sorted(
        p for p in (folder / "recordings").iterdir() if p.suffix.lower() == ".wav" and not p.name.startswith(".")
    )
    strange = [p.name for p in files if not _FSDD_NAME.fullmatch(p.name)]
    if strange:
        raise ValueError(
            f"{folder / 'recordings'}: {strange[0]} (and {len(strange) - 1} more) is not named "
            "<digit>_<speaker>_<index>.wav; remove it, or load such files with SoundFolderDataset"
        )
    return files


def verify_fsdd(folder: str | Path) -> dict[str, str]:
    """Return ``{recording name: sha256}`` of ``folder/recordings``, checked against ``folder/SHA256SUMS`` if there."""
    folder = Path(folder)
    hashes = {path.name: sha256_file(path) for path in _recordings(folder)}
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        if len(hashes) != FSDD_NUM_FILES:
            warnings.warn(
                f"{folder}: {len(hashes)} FSDD recordings instead of {FSDD_NUM_FILES}, and no SHA256SUMS "
                "to check them against",
                stacklevel=2,
            )
        return hashes
    listed = read_sha256sums(sums)
    redo = f"the copy is corrupt: re-download it (delete {folder}) or copy it again"
    missing = sorted(set(listed) - set(hashes))
    if missing:
        raise ValueError(
            f"{folder / 'recordings' / missing[0]}: listed in {sums} but missing "
            f"({len(missing)} missing in all); {redo}"
        )
    unlisted = sorted(set(hashes) - set(listed))
    if unlisted:
        raise ValueError(
            f"{folder / 'recordings' / unlisted[0]}: not listed in {sums} ({len(unlisted)} unlisted "
            "in all); remove it, or regenerate SHA256SUMS if the files are meant to be there"
        )
    for name, digest in hashes.items():
        if digest != listed[name]:
            raise ValueError(
                f"{folder / 'recordings' / name}: checksum mismatch (sha256 {digest}, {sums} lists "
                f"{listed[name]}); {redo}"
            )
    return hashes


# ----------------------------------------------------------------------------- FSDD: locating and fetching


def _cache_dir() -> Path:
    """The user cache folder that downloads go to (``XDG_CACHE_HOME`` respected)."""
    return user_cache_dir("fsdd")


def candidate_dirs(root: str | Path | None = None) -> list[Path]:
    """Return the folders searched for FSDD's ``recordings/``, in order."""
    if root is not None:
        root = Path(root).expanduser()
        return [root.parent if root.name == "recordings" and not (root / "recordings").is_dir() else root]
    return search_dirs("fsdd")


def _holds_recordings(folder: Path) -> bool:
    recordings = folder / "recordings"
    return recordings.is_dir() and any(_FSDD_NAME.fullmatch(p.name) for p in recordings.iterdir())


def find_fsdd(root: str | Path | None = None) -> Path | None:
    """Return the first searched folder that holds FSDD recordings in ``recordings/``, or None."""
    return next((folder for folder in candidate_dirs(root) if _holds_recordings(folder)), None)


def _download_archive(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` to ``dest``, showing progress on stderr."""
    with open(dest, "wb") as out:
        stream_download(url, out, "FSDD archive", timeout)


def _extract_recordings(archive: Path, folder: Path) -> dict[str, str]:
    """Extract only ``*/recordings/*.wav`` of ``archive`` into ``folder/recordings``; return {name: sha256}."""
    (folder / "recordings").mkdir()
    hashes = {}
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.namelist():
            match = _ARCHIVE_RECORDING.fullmatch(member)
            if match and _FSDD_NAME.fullmatch(match.group(1)):  # the name pattern also rules out path traversal
                data = zipped.read(member)
                (folder / "recordings" / match.group(1)).write_bytes(data)
                hashes[match.group(1)] = hashlib.sha256(data).hexdigest()
    return hashes


def download_fsdd(dest: Path | None = None, url: str = FSDD_URL, timeout: float = 60.0) -> Path:
    """Return ``dest`` (default: the user cache) after downloading, verifying and atomically placing FSDD there."""
    dest = Path(dest) if dest is not None else _cache_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Built next to dest, then renamed: other processes see either nothing or the whole, verified copy.
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        os.chmod(staging, plain_mode(directory=True))
        print(f"Downloading FSDD {url} -> {dest}", file=sys.stderr)
        archive = staging / "archive.zip"
        _download_archive(url, archive, timeout)
        hashes = _extract_recordings(archive, staging)
        archive.unlink()
        if len(hashes) != FSDD_NUM_FILES or listing_sha256(hashes) != FSDD_LISTING_SHA256:
            raise ValueError(
                f"the FSDD download from {url} is not commit {FSDD_COMMIT[:12]}'s recordings "
                f"({len(hashes)} recordings, expected {FSDD_NUM_FILES}, or different content); "
                "try again, or fetch it by hand (see ldm/data/sound.py)"
            )
        write_sha256sums(staging / "SHA256SUMS", hashes)
        try:
            os.replace(staging, dest)
        except OSError:
            if not _holds_recordings(dest):  # else another process placed it first, which is as good
                raise
        return dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _not_found_message(root: str | Path | None, attempts: list[str]) -> str:
    searched = "\n".join(f"  - {folder}/recordings/" for folder in candidate_dirs(root))
    if root is None and not os.environ.get("LDM_DATA"):
        searched = "  - $LDM_DATA/fsdd/recordings/ and $LDM_DATA/recordings/ ($LDM_DATA is not set)\n" + searched
    tried = "".join(f"\n{attempt}" for attempt in attempts)
    return (
        f"FSDD (Free Spoken Digit Dataset) not found: no folder holds recordings/<digit>_<speaker>_<index>.wav.\n"
        f"Searched:\n{searched}{tried}\n"
        f"To fix: download {FSDD_URL}, unpack it, and put its recordings/ folder (3,000 WAV files) at "
        f"$LDM_DATA/fsdd/recordings/ (set LDM_DATA to a data folder), or anywhere as DIR/recordings/ "
        f"and pass --data DIR; or allow the download (download=True)."
    )


def ensure_fsdd(root: str | Path | None = None, download: bool = True) -> Path:
    """Return the folder holding FSDD's ``recordings/``, downloading it into the user cache if allowed."""
    found = find_fsdd(root)
    if found is not None:
        return found
    attempts: list[str] = []
    if root is not None:
        attempts.append("An explicit folder was given, so no other folder was searched and nothing was fetched.")
    elif not download:
        attempts.append("Download not attempted (download=False).")
    else:
        try:
            return download_fsdd()
        except (OSError, http.client.HTTPException, zipfile.BadZipFile) as err:  # offline, HTTP error, not a zip
            attempts.append(f"Download from {FSDD_URL} failed: {err}")
    raise FileNotFoundError(_not_found_message(root, attempts))


# ----------------------------------------------------------------------------- FSDD: the data set


def _fsdd_key(name: str) -> tuple[int, str, int]:
    """(digit, speaker, index) of a recording name."""
    digit, speaker, index = _FSDD_NAME.fullmatch(name).groups()
    return int(digit), speaker, int(index)


def _fsdd_order(name: str) -> tuple[int, str, int]:
    """The data set's sort key (index, speaker, digit): every run of 60 items holds each digit by each speaker.

    So the first n items of a split (what the evaluation's real-data floors and the previews take) are
    balanced over digits and speakers, not all zeros by one speaker.
    """
    digit, speaker, index = _fsdd_key(name)
    return index, speaker, digit


def check_fsdd_split(split: str) -> None:
    """Raise ValueError unless ``split`` is one of FSDD_SPLITS."""
    if split not in FSDD_SPLITS:
        raise ValueError(f"FSDD split must be one of {sorted(FSDD_SPLITS)}, got {split!r}")


def _split_names(hashes: dict[str, str], split: str) -> list[str]:
    """The recording names of ``split``, sorted by (index, speaker, digit)."""
    check_fsdd_split(split)
    return sorted((name for name in hashes if _fsdd_key(name)[2] in FSDD_SPLITS[split]), key=_fsdd_order)


def fsdd_fingerprint(root: str | Path, split: str) -> str:
    """Return a 16-hex-digit hash of ``split``'s file names and contents in the FSDD folder ``root``."""
    folder = ensure_fsdd(root, download=False)
    hashes = verify_fsdd(folder)
    content = {
        "version": FINGERPRINT_VERSION,
        "name": "fsdd",
        "split": split,
        "files": [[name, hashes[name]] for name in _split_names(hashes, split)],
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class FSDD(Dataset):
    """Free Spoken Digit Dataset: 8 kHz spoken digits 0-9 as fixed-length clips, ordered by (digit, speaker, index)."""

    def __init__(
        self,
        split: str,
        length: int = 8192,
        root: str | Path | None = None,
        download: bool = True,
        normalize: bool = True,
    ):
        check_fsdd_split(split)
        self.root = ensure_fsdd(root, download=download)
        names = _split_names(verify_fsdd(self.root), split)
        if not names:
            raise ValueError(
                f"{self.root / 'recordings'} holds no recordings of the {split!r} split "
                f"(indices {FSDD_SPLITS[split].start}-{FSDD_SPLITS[split].stop - 1})"
            )
        self.split, self.length = split, length
        self.classes, self.sample_rate = FSDD_CLASSES, FSDD_SAMPLE_RATE
        self.files = [self.root / "recordings" / name for name in names]
        self.signals = _load_clips(self.files, length, self.sample_rate, normalize)  # (N, 1, length)
        self.labels = torch.tensor([_fsdd_key(name)[0] for name in names], dtype=torch.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.signals[index], int(self.labels[index])


# ----------------------------------------------------------------------------- the user's own sound


def _class_order(name: str) -> tuple[int, int, str]:
    """Sort key putting numeric class names first, in numeric order, then the rest alphabetically."""
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def _wav_files(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.suffix.lower() == ".wav"
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def scan_sound_folder(root: str | Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Return (files, labels, classes) of ``root/<class>/*.wav`` or, without class folders, ``root/<class>_*.wav``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"sound folder {root} does not exist or is not a folder")
    subfolders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    per_class = {d.name: files for d in subfolders if (files := _wav_files(d, recursive=True))}
    loose = _wav_files(root, recursive=False)
    if per_class and loose:
        raise ValueError(
            f"{root} mixes .wav files at its top level (e.g. {loose[0].name}) with class subfolders "
            f"({', '.join(sorted(per_class)[:5])}); move the loose files into a class folder"
        )
    if not per_class:
        if not loose:
            raise ValueError(
                f"no .wav files in {root} or its subfolders; lay them out as "
                f"{root}/<class>/<name>.wav or {root}/<class>_<name>.wav"
            )
        unlabelled = [p.name for p in loose if "_" not in p.stem or not p.stem.split("_", 1)[0]]
        if unlabelled:
            raise ValueError(
                f"{root / unlabelled[0]}: the file name has no '<class>_' prefix; rename it "
                "<class>_<anything>.wav, or put the files in class subfolders"
            )
        for path in loose:
            per_class.setdefault(path.stem.split("_", 1)[0], []).append(path)
    classes = tuple(sorted(per_class, key=_class_order))
    # Round robin over the classes (each class's files in name order): the first n files are balanced
    # over classes, which the evaluation's real-data floors and the previews rely on.
    ranked = [(rank, label, path) for label, name in enumerate(classes) for rank, path in enumerate(per_class[name])]
    ranked.sort(key=lambda item: item[:2])
    return [path for _, _, path in ranked], [label for _, label, _ in ranked], classes


class SoundFolderDataset(Dataset):
    """The user's own WAV files as fixed-length clips, labelled by class subfolder or file-name prefix."""

    def __init__(self, root: str | Path, length: int, sample_rate: int, normalize: bool = True):
        self.root = Path(root).expanduser()
        self.files, labels, self.classes = scan_sound_folder(self.root)
        self.length, self.sample_rate = length, sample_rate
        self.signals = _load_clips(self.files, length, sample_rate, normalize)  # (N, 1, length)
        self.labels = torch.tensor(labels, dtype=torch.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.signals[index], int(self.labels[index])
