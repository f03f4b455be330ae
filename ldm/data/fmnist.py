"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): locate, download, verify and parse the IDX files.

The four files are searched for, in order, in
  1. an explicit ``root`` argument (only there, when given),
  2. ``$LDM_DATA/fashion-mnist``, then ``$LDM_DATA`` itself,
  3. ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``),
  4. the user cache ``$XDG_CACHE_HOME/ldm/fashion-mnist`` (default ``~/.cache/ldm/fashion-mnist``).
Either the gzipped files or their decompressed form are accepted.

Integrity is checked on the *decompressed* IDX payload: Debian recompresses the ``.gz`` files, so
their bytes differ from Zalando's, but the payload inside is identical in both sources.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.artifacts import plain_mode
from ldm.data.fetch import search_dirs, stream_download, user_cache_dir

FMNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_PACKAGE = "dataset-fashion-mnist"

# split -> (images file, labels file), without the ".gz" suffix.
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# file -> (sha256 of the decompressed IDX payload, its length in bytes).
PAYLOAD_SHA256: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}
FILE_STEMS: tuple[str, ...] = tuple(PAYLOAD_SHA256)

# IDX element type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# (folder, split) -> (images uint8 (N, 28, 28), labels int64 (N,)); parsed and verified once per process.
_LOADED: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


class IDXFormatError(ValueError):
    """An IDX file whose header or length is inconsistent (bad magic, wrong dims, truncated)."""


class ChecksumMismatchError(ValueError):
    """A Fashion-MNIST file whose decompressed payload is not the published one."""


class FashionMNISTNotFoundError(FileNotFoundError):
    """Fashion-MNIST is not on this machine and could not be fetched."""


# ----------------------------------------------------------------------------- IDX parsing


def read_payload(path: Path) -> bytes:
    """Return the IDX bytes of ``path``, decompressing it when it is gzipped."""
    path = Path(path)
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"  # the gzip magic; the name may be a download's temp name
    if not is_gzip:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; truncation is EOFError
        raise IDXFormatError(f"{path}: not a readable gzip file ({err}). Delete it and fetch it again.") from err


def parse_idx(payload: bytes, name: str = "<bytes>") -> np.ndarray:
    """Return the array stored in an IDX payload, after checking its magic number, dims and length."""
    if len(payload) < 4:
        raise IDXFormatError(f"{name}: {len(payload)} bytes is too short for an IDX header")
    zero, dtype_code, ndim = int.from_bytes(payload[:2], "big"), payload[2], payload[3]
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(
            f"{name}: bad IDX magic number 0x{payload[:4].hex()} "
            "(expected 0x0000 then a type code in 08/09/0B/0C/0D/0E then ndim >= 1)"
        )
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise IDXFormatError(f"{name}: truncated IDX header ({len(payload)} bytes, needs {header_len})")
    dims = tuple(int(d) for d in np.frombuffer(payload, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(payload) != expected:
        what = "truncated" if len(payload) < expected else "has trailing bytes"
        raise IDXFormatError(f"{name}: {what}: dims {dims} need {expected} bytes, file has {len(payload)}")
    # frombuffer views the bytes without a Python loop; astype copies into a writable, native-order array.
    return np.frombuffer(payload, dtype=dtype, offset=header_len).reshape(dims).astype(dtype.newbyteorder("="))


def verify_payload(payload: bytes, stem: str, path: Path) -> None:
    """Raise ChecksumMismatchError unless ``payload`` is the published content of file ``stem``."""
    want_sha, want_len = PAYLOAD_SHA256[stem]
    got_sha = hashlib.sha256(payload).hexdigest()
    if got_sha != want_sha:
        raise ChecksumMismatchError(
            f"{path}: checksum mismatch for the decompressed {stem} payload\n"
            f"  expected sha256 {want_sha} ({want_len} bytes)\n"
            f"  actual   sha256 {got_sha} ({len(payload)} bytes)\n"
            f"Fix: delete the file and download it again, or reinstall the system package "
            f"({_apt_command()} --reinstall)."
        )


def _read_verified(path: Path, stem: str) -> np.ndarray:
    """Decompress, parse and checksum one Fashion-MNIST file; return its array."""
    payload = read_payload(path)
    array = parse_idx(payload, str(path))
    verify_payload(payload, stem, path)
    return array


# ----------------------------------------------------------------------------- locating the files


def _cache_dir() -> Path:
    """The user cache folder that downloads go to (``XDG_CACHE_HOME`` respected)."""
    return user_cache_dir("fashion-mnist")


def candidate_dirs(root: str | Path | None = None) -> list[Path]:
    """Return the folders searched for the four files, in order."""
    return [Path(root).expanduser()] if root is not None else search_dirs("fashion-mnist", system=[SYSTEM_DIR])


def _file_in(folder: Path, stem: str) -> Path | None:
    """The gzipped or plain copy of ``stem`` inside ``folder``, if there is one."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fmnist(root: str | Path | None = None) -> Path | None:
    """Return the first searched folder that holds all four files, or None."""
    for folder in candidate_dirs(root):
        if all(_file_in(folder, stem) for stem in FILE_STEMS):
            return folder
    return None


def _apt_command() -> str:
    """The one command line that installs the system package (no sudo when already root)."""
    sudo = "" if _is_root() else "sudo "
    return f"{sudo}apt-get update && {sudo}apt-get install -y {APT_PACKAGE}"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _not_found_message(root: str | Path | None, attempts: list[str]) -> str:
    searched = "\n".join(f"  - {d}" for d in candidate_dirs(root))
    if root is None and not os.environ.get("LDM_DATA"):
        searched = "  - $LDM_DATA (not set)\n" + searched
    tried = "".join(f"\n{a}" for a in attempts)
    return (
        f"Fashion-MNIST not found: no folder holds all four files ({', '.join(s + '.gz' for s in FILE_STEMS)}).\n"
        f"Searched:\n{searched}{tried}\n"
        f"To install it, run:\n"
        f"    {_apt_command()}\n"
        f"Alternatively, put the four files in a folder and set LDM_DATA to it (or to its parent, "
        f"as LDM_DATA/fashion-mnist), or allow the download from {DOWNLOAD_URL} (download=True)."
    )


# ----------------------------------------------------------------------------- fetching


def _download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Stream ``url`` to ``dest`` through a temporary file, showing progress on stderr."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, plain_mode())
        with os.fdopen(fd, "wb") as out:
            stream_download(url, out, dest.name, timeout)
            out.flush()
            os.fsync(out.fileno())
        stem = dest.name.removesuffix(".gz")
        _read_verified(tmp, stem)  # verify before the rename, so a bad download never looks whole
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_fmnist(dest: Path | None = None, base_url: str | None = None) -> Path:
    """Download the missing files from the official source into ``dest`` (the user cache); return it."""
    dest = Path(dest) if dest is not None else _cache_dir()
    base_url = base_url or DOWNLOAD_URL
    for stem in FILE_STEMS:
        if _file_in(dest, stem) is None:
            print(f"Downloading {base_url}{stem}.gz -> {dest}", file=sys.stderr)
            _download(base_url + stem + ".gz", dest / (stem + ".gz"))
    return dest


def _install_system_package() -> None:
    """Run ``apt-get update`` then ``apt-get install -y dataset-fashion-mnist``, printing each."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", APT_PACKAGE]):
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=env)


def ensure_fmnist(download: bool = True, install_system_package: bool = False, root: str | Path | None = None) -> Path:
    """Return the folder holding Fashion-MNIST, downloading or apt-installing it if allowed."""
    found = find_fmnist(root)
    if found is not None:
        return found
    attempts: list[str] = []
    if download and root is None:
        try:
            return download_fmnist()
        except (OSError, http.client.HTTPException) as err:  # offline, DNS, HTTP status, dropped link, disk full
            attempts.append(f"Download from {DOWNLOAD_URL} failed: {err}")
    elif root is None:
        attempts.append("Download not attempted (download=False).")
    else:
        attempts.append("An explicit folder was given, so no other folder was searched and nothing was fetched.")
    if install_system_package and root is None:
        if _is_root() and shutil.which("apt-get"):
            try:
                _install_system_package()
                found = find_fmnist()
                if found is not None:
                    return found
                attempts.append(f"apt-get installed {APT_PACKAGE}, but the files are not in {SYSTEM_DIR}.")
            except (subprocess.CalledProcessError, OSError) as err:
                attempts.append(f"Installing {APT_PACKAGE} with apt-get failed: {err}")
        else:
            attempts.append(f"Could not install {APT_PACKAGE}: needs root and apt-get.")
    raise FashionMNISTNotFoundError(_not_found_message(root, attempts))


# ----------------------------------------------------------------------------- loading


def check_split(split: str) -> None:
    """Raise ValueError unless ``split`` is 'train' or 'test'."""
    if split not in SPLIT_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(SPLIT_FILES)}, got {split!r}")


def load_fmnist(split: str, root: str | Path | None = None, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) of split 'train' (60000) or 'test' (10000)."""
    check_split(split)
    folder = ensure_fmnist(download=download, root=root)
    key = (str(folder.resolve()), split)
    if key not in _LOADED:
        image_stem, label_stem = SPLIT_FILES[split]
        image_path, label_path = _file_in(folder, image_stem), _file_in(folder, label_stem)
        images = _read_verified(image_path, image_stem)  # (N, 28, 28) uint8
        labels = _read_verified(label_path, label_stem)  # (N,) uint8
        # The checksums already pin the content; these checks give a readable error if the table is edited.
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(labels) != len(images):
            raise IDXFormatError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
        _LOADED[key] = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    images, labels = _LOADED[key]
    return images.clone(), labels.clone()  # clones keep the per-process cache safe from in-place edits


def to_model_range(images: torch.Tensor, resolution: int = 32) -> torch.Tensor:
    """Map uint8 (N, 28, 28) images to float32 (N, 1, resolution, resolution) in [-1, 1].

    28 keeps the raw pixels. 32 pads 2 px per side with the background value -1: exact, no
    resampling, and a power of two halves cleanly through autoencoder and patch downsampling.
    Any other size pads to 32 first, so every resolution frames the garment the same way, then
    resizes bicubically (antialiased when shrinking) and clamps the overshoot back into [-1, 1].
    """
    x = images.unsqueeze(1)  # (N, 1, 28, 28) uint8
    if resolution != 28:
        x = F.pad(x, (2, 2, 2, 2), value=0)  # (N, 1, 32, 32); padding in uint8 is cheaper, 0 maps to -1
    x = x.to(torch.float32).div_(127.5).sub_(1.0)
    if resolution not in (28, 32):
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bicubic", antialias=resolution < 32, align_corners=False
        ).clamp_(-1.0, 1.0)
    return x


class FashionMNIST(Dataset):
    """Fashion-MNIST as (image float32 (1, R, R) in [-1, 1], label int) pairs, converted once up front."""

    def __init__(
        self,
        split: str,
        resolution: int = 32,
        hflip: bool = False,
        root: str | Path | None = None,
        download: bool = True,
    ) -> None:
        if not isinstance(resolution, int) or resolution < 8:
            raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
        raw_images, labels = load_fmnist(split, root=root, download=download)
        self.split, self.resolution, self.hflip = split, resolution, hflip
        self.classes = FMNIST_CLASSES
        self.images = to_model_range(raw_images, resolution)  # (N, 1, R, R) float32, unflipped
        self.labels = labels  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, int(self.labels[index])
