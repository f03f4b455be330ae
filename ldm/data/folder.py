"""Image folders: one subfolder per class (ImageNet layout) or one flat folder of unlabelled images.

Preprocessing follows ADM/DiT: resize the shorter side to the target resolution, then center crop.
Pillow's ``reducing_gap`` does what ADM's ``center_crop_arr`` does by hand: shrink by an integer
factor with a box filter while the image stays at least twice the target, then resample the rest
with an antialiased bicubic filter.

Unreadable files are found lazily, when an item is loaded, not at scan time: decoding every
image up front costs as much as an epoch on ImageNet, and ``PIL.Image.verify`` is no substitute
(it does not decode JPEG data, so a truncated JPEG passes). With ``on_error="skip"`` a bad file is
remembered, counted in ``skipped`` and replaced by the next readable sample. DataLoader workers are
separate processes, so there each worker counts its own skips; every skip is also a warning that
names the file, which reaches the logs from any process. ``find_unreadable()`` decodes everything
when an exact up-front list is wanted.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")
# 4096 x 4096 = 16.8 Mpx: more than a 12 Mpx phone photo, and 16x the side this project trains at most (256
# px), so no training image needs more. Decoded as RGB it is 50 MB per image (and per DataLoader worker);
# a 12000 x 12000 PNG of a few kB would be 430 MB. Pillow itself only warns below 89 Mpx.
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageReadError(OSError):
    """An image file that cannot be opened or decoded; the message names the file."""


def _is_image(path: Path) -> bool:
    # Dot-files are skipped: macOS "._name.jpg" AppleDouble files carry image extensions but no image.
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_under(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursively, hidden entries skipped), sorted."""
    found = []
    # os.walk lists each folder with one scandir, without a stat per file: this matters at ImageNet's 1.28M files.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def scan_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Return (files, labels, classes) of a class-per-subfolder or a flat image folder.

    Class mode when ``root`` has subfolders holding images: class ``i`` is the i-th such subfolder
    in sorted order. Flat mode otherwise: every image directly in ``root``, label 0, classes [].
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [(d.name, _images_under(d)) for d in subfolders]
    empty = [name for name, files in per_class if not files]
    per_class = [(name, files) for name, files in per_class if files]
    if per_class and empty:
        warnings.warn(f"{root}: subfolders without images are not classes: {', '.join(empty)}", stacklevel=2)
    top_level = sorted(p for p in root.iterdir() if _is_image(p))
    exts = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    if per_class:
        if top_level:
            raise ValueError(
                f"{root} mixes {len(top_level)} images at its top level (e.g. {top_level[0].name}) with "
                f"class subfolders ({', '.join(n for n, _ in per_class[:5])}...); move the loose images into "
                "a class folder, or point the path at a folder with only one kind"
            )
        classes = [name for name, _ in per_class]
        files = [f for _, class_files in per_class for f in class_files]
        labels = [i for i, (_, class_files) in enumerate(per_class) for _ in class_files]
        return files, labels, classes
    if not top_level:
        raise ValueError(f"no images ({exts}, any case) in {root} or in its subfolders")
    return top_level, [0] * len(top_level), []


def _to_8bit_mode(image: Image.Image) -> Image.Image:
    """Bring 16-bit/int images to 'L' by scaling (Pillow's convert would clip them at 255)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    return image


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite transparent pixels onto white, rather than the arbitrary colour RGB conversion keeps."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (box reduce, then bicubic) and center crop a square."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _open_within(path: str | Path, max_pixels: int) -> Image.Image:
    """Open (not decode) the image at ``path``; ImageReadError if its header gives more than ``max_pixels`` pixels."""
    with warnings.catch_warnings():  # the cap below is the limit that counts, not Pillow's warning at 89 Mpx
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError:  # over twice Pillow's MAX_IMAGE_PIXELS: refused before we see the size
            raise ImageReadError(
                f"image {path} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, Pillow's own limit "
                f"(data.max_pixels = {max_pixels} cannot lift it): shrink the file"
            ) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageReadError(
            f"image {path} is {width}x{height} ({width * height / 1e6:.1f} Mpx), more than "
            f"data.max_pixels = {max_pixels}: shrink the file, or raise the cap (--set data.max_pixels=N)"
        )
    return image


def load_image(
    path: str | Path, resolution: int, channels: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Return the image at ``path`` as float32 (channels, resolution, resolution) in [-1, 1]."""
    try:
        with _open_within(path, max_pixels) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
            image = _flatten_alpha(_to_8bit_mode(image))
            image = image.convert("RGB" if channels == 3 else "L")
            image = center_crop_resize(image, resolution)
            array = np.asarray(image, dtype=np.uint8)  # (R, R, 3) or (R, R)
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.unsqueeze(0)  # (C, R, R)
    return tensor.to(torch.float32) / 127.5 - 1.0


class ImageFolderDataset(Dataset):
    """Images under ``root`` as (float32 (channels, R, R) in [-1, 1], label int) pairs."""

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        channels: int = 3,
        on_error: str = "raise",
        hflip: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        self.root = Path(root).expanduser()
        self.files, self.labels, self.classes = scan_image_folder(self.root)
        self.resolution, self.channels, self.on_error, self.hflip = resolution, channels, on_error, hflip
        self.max_pixels = max_pixels
        self.skipped = 0  # skips seen by this process (each DataLoader worker has its own count)
        self.skipped_files: list[Path] = []
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            if i in self._bad:
                continue
            try:
                image = load_image(self.files[i], self.resolution, self.channels, self.max_pixels)
            except ImageReadError as err:
                if self.on_error == "raise":
                    raise
                self._bad.add(i)
                self.skipped += 1
                self.skipped_files.append(self.files[i])
                warnings.warn(f"skipping unreadable image ({err})", stacklevel=2)
                continue
            if self.hflip and torch.rand(()) < 0.5:
                image = image.flip(-1)
            return image, self.labels[i]
        raise ImageReadError(f"no readable image left in {self.root}: all {len(self.files)} files failed")

    def find_unreadable(self) -> list[tuple[Path, str]]:
        """Decode every file now; return (path, reason) for each one that fails."""
        bad = []
        for path in self.files:
            try:
                load_image(path, self.resolution, self.channels, self.max_pixels)
            except ImageReadError as err:
                bad.append((path, str(err)))
        return bad
