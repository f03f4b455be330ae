"""Datasets by configuration: ``DataConfig`` -> ``build_dataset`` and ``data_fingerprint`` for lineage.

Every image dataset yields ``(image float32 (C, R, R) in [-1, 1], label int)``, every sound dataset
``(signal float32 (1, length) in [-1, 1], label int)``: the stages treat both as items of C channels
over one or two axes. Scenes (``ldm.data.scenes``: captioned 64x64 colour compositions of Fashion-MNIST
items) serve their category index as the label here; ``ScenesDataset`` gives their captions.

Splits: Fashion-MNIST, scenes and FSDD have 'train' and 'test'. For an image or sound folder, split ``s``
reads ``path/s`` when that folder exists (ImageNet's ``train/`` and ``val/``); otherwise 'train'
reads ``path`` itself and any other split is an error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ldm.data.fmnist import (
    FMNIST_CLASSES,
    PAYLOAD_SHA256,
    SPLIT_FILES,
    FashionMNIST,
    check_split,
    ensure_fmnist,
    load_fmnist,
)
from ldm.data.folder import DEFAULT_MAX_PIXELS, ON_ERROR_CHOICES, ImageFolderDataset, scan_image_folder
from ldm.data.scenes import SCENE_SIZE, SceneImages, ScenesDataset, scenes_identity
from ldm.data.sound import FSDD, SoundFolderDataset, check_fsdd_split, ensure_fsdd, fsdd_fingerprint, scan_sound_folder

DATASET_NAMES: tuple[str, ...] = ("fmnist", "folder", "fsdd", "soundfolder", "scenes")
SOUND_DATASETS: tuple[str, ...] = ("fsdd", "soundfolder")
FINGERPRINT_VERSION = 1  # bump when what the fingerprint covers changes


@dataclass
class DataConfig:
    """Which images (or sounds) a stage reads and how they are prepared."""

    name: str = "fmnist"  # "fmnist", "folder" or "scenes" (images), "fsdd" or "soundfolder" (sound)
    path: str | None = None  # folder: the image root; fmnist: a folder with the four IDX files (else searched)
    resolution: int = 32  # square side in pixels; Fashion-MNIST's 28 is padded to 32
    channels: int = 1  # 1 (grayscale) or 3 (RGB); Fashion-MNIST is 1
    hflip: bool = False  # random horizontal flip of training items
    on_error: str = "raise"  # unreadable folder image: "raise" or "skip" (counted, warned)
    max_pixels: int = (
        DEFAULT_MAX_PIXELS  # folder images larger (width x height) are refused from their header, undecoded
    )
    num_workers: int = 0  # DataLoader worker processes; 0 loads in the main process
    download: bool = True  # fmnist, fsdd: fetch from the official source when not found locally
    length: int = 8192  # sound: samples per clip; shorter recordings are zero-padded, longer ones keep their start
    sample_rate: int = 8000  # sound: the rate every recording must have (FSDD: 8 kHz)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and its valid values if any field is out of range."""
        if self.name not in DATASET_NAMES:
            raise ValueError(f"data.name must be one of {list(DATASET_NAMES)}, got {self.name!r}")
        if self.name in ("folder", "soundfolder") and not self.path:
            raise ValueError(f"data.path is required when data.name is '{self.name}' (the root folder of the files)")
        if self.path is not None and not isinstance(self.path, str):
            raise ValueError(f"data.path must be a string or null, got {self.path!r}")
        for field, low in (
            ("resolution", 8),
            ("num_workers", 0),
            ("length", 64),
            ("sample_rate", 1000),
            ("max_pixels", 1),
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{field} must be an int >= {low}, got {value!r}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"data.channels must be 1 or 3, got {self.channels!r}")
        if self.name == "fmnist" and self.channels != 1:
            raise ValueError(f"Fashion-MNIST is grayscale: data.channels must be 1, got {self.channels!r}")
        if self.name == "scenes" and (self.channels, self.resolution, self.hflip) != (3, SCENE_SIZE, False):
            raise ValueError(
                f"scenes are {SCENE_SIZE}x{SCENE_SIZE} RGB and a mirror swaps left and right: set data.channels 3, "
                f"data.resolution {SCENE_SIZE}, data.hflip false "
                f"(got {self.channels!r}, {self.resolution!r}, {self.hflip!r})"
            )
        if self.is_sound and (self.channels != 1 or self.hflip):
            raise ValueError(
                f"sound is mono and has no flips: data.channels must be 1 and data.hflip false "
                f"(got {self.channels!r}, {self.hflip!r})"
            )
        if self.name == "fsdd" and self.sample_rate != 8000:
            raise ValueError(f"FSDD is recorded at 8000 Hz: data.sample_rate must be 8000, got {self.sample_rate!r}")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"data.on_error must be one of {list(ON_ERROR_CHOICES)}, got {self.on_error!r}")
        for field in ("hflip", "download"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"data.{field} must be true or false, got {getattr(self, field)!r}")

    @property
    def mirror_invariant(self) -> bool:
        """Whether a horizontally flipped item is still an item of this data (so a latent cache may hold flips):
        photographs in an image folder are, as in DiT's ImageNet training; Fashion-MNIST's are not (every shoe and
        bag faces one way, and the measuring classifier never sees a mirrored one); sound never."""
        return self.name == "folder"

    @property
    def is_sound(self) -> bool:
        """Whether the items are 1-D signals (sound) rather than images."""
        return self.name in SOUND_DATASETS


def with_data(config: DataConfig, data: str | None) -> DataConfig:
    """`config` pointed at `data`, the `--data` option of the commands (None keeps it).

    For an image config: "fmnist", "scenes" or an image folder. For a sound config: "fsdd", a folder holding
    FSDD's `recordings/`, or a folder of the user's WAV files.
    """
    if data is None:
        return config
    if config.is_sound:
        if data == "fsdd":
            return replace(config, name="fsdd", path=None)
        is_fsdd = (Path(data).expanduser() / "recordings").is_dir() or Path(data).name == "recordings"
        return replace(config, name="fsdd" if is_fsdd else "soundfolder", path=data)
    if data in ("fmnist", "scenes"):
        return replace(config, name=data, path=None)
    return replace(config, name="folder", path=data)


def _folder_split_root(path: str, split: str) -> Path:
    """The folder that holds ``split`` of an image-folder dataset."""
    root = Path(path).expanduser()
    if (root / split).is_dir():
        return root / split
    if split == "train":
        return root
    raise ValueError(f"image folder {root} has no '{split}' subfolder; only 'train' may read the root itself")


def build_dataset(config: DataConfig, split: str) -> Dataset:
    """Return the dataset that ``config`` describes, for ``split``."""
    config.validate()
    if config.name == "fmnist":
        check_split(split)
        return FashionMNIST(
            split, resolution=config.resolution, hflip=config.hflip, root=config.path, download=config.download
        )
    if config.name == "scenes":
        return SceneImages(ScenesDataset(split, root=config.path, download=config.download))
    if config.name == "fsdd":
        return FSDD(split, length=config.length, root=config.path, download=config.download)
    if config.name == "soundfolder":
        return SoundFolderDataset(_folder_split_root(config.path, split), config.length, config.sample_rate)
    return ImageFolderDataset(
        _folder_split_root(config.path, split),
        config.resolution,
        channels=config.channels,
        on_error=config.on_error,
        hflip=config.hflip,
        max_pixels=config.max_pixels,
    )


def iterate_images(dataset: Dataset, batch_size: int, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches in dataset order; in-memory datasets are sliced without a DataLoader."""
    total = min(limit, len(dataset)) if limit else len(dataset)
    images = getattr(dataset, "images", getattr(dataset, "signals", None))
    labels = getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            yield images[start:stop], labels[start:stop]
        return
    seen = 0
    for batch_images, batch_labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        keep = min(len(batch_images), total - seen)
        yield batch_images[:keep], batch_labels[:keep]
        seen += keep
        if seen >= total:
            return


def data_fingerprint(config: DataConfig, split: str) -> str:
    """Return a 16-hex-digit hash identifying the prepared data of ``split`` (not its augmentation)."""
    config.validate()
    if config.name == "fmnist":
        check_split(split)
        # Loading verifies every file against these payload hashes, so they identify the data exactly.
        content = {"files": {stem: PAYLOAD_SHA256[stem][0] for stem in SPLIT_FILES[split]}}
    elif config.name == "scenes":
        check_split(split)
        # A scene is a pure function of the Fashion-MNIST files and the generator's version, seed and size.
        content = {"files": {stem: PAYLOAD_SHA256[stem][0] for stem in SPLIT_FILES[split]}}
        content["scenes"] = scenes_identity(split)
    elif config.name == "fsdd":
        check_fsdd_split(split)
        # The recordings' own checksums, verified on load, identify them exactly.
        content = {"fsdd": fsdd_fingerprint(ensure_fsdd(config.path, config.download), split)}
    else:
        root = _folder_split_root(config.path, split)
        files, labels, classes = (scan_sound_folder if config.is_sound else scan_image_folder)(root)
        entries = []
        for path, label in zip(files, labels):
            stat = path.stat()
            entries.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns, label])
        content = {"files": entries, "classes": classes, "channels": config.channels}
    content.update(version=FINGERPRINT_VERSION, name=config.name, split=split, resolution=config.resolution)
    if config.is_sound:  # (kept out of image fingerprints, so that those stay what they were)
        content.update(length=config.length, sample_rate=config.sample_rate)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


__all__ = [
    "DATASET_NAMES",
    "FMNIST_CLASSES",
    "FSDD",
    "SOUND_DATASETS",
    "DataConfig",
    "FashionMNIST",
    "ImageFolderDataset",
    "SceneImages",
    "ScenesDataset",
    "SoundFolderDataset",
    "build_dataset",
    "data_fingerprint",
    "ensure_fmnist",
    "iterate_images",
    "load_fmnist",
    "with_data",
]
