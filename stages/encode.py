"""Encode a data set once into a versioned latent cache (posterior mean and std, optional flips, statistics)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, replace

import torch

from ldm.artifacts import Artifact, ArtifactStore, ArtifactWriter
from ldm.config import from_dict, to_dict
from ldm.data import DataConfig, build_dataset, data_fingerprint, iterate_images
from ldm.data.latents import LatentStats, LatentStatsAccumulator
from ldm.destinations import STORE_OPTION, writing_to
from ldm.loading import load_autoencoder
from ldm.training import Timer, format_seconds

CAPTIONS_FILE = "captions.json"  # a captioned data set's captions, a JSON list in item order
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EncodeConfig:
    """How a latent cache is made."""

    split: str = "train"
    # Also cache each image's horizontal flip (V = 2 views). None: the data's own rule (`DataConfig.mirror_invariant`):
    # flips for image folders, none for Fashion-MNIST (every item faces one way) and never for sound.
    flips: bool | None = None
    stats: str = "channel"  # channel | global normalisation statistics | source (an imported autoencoder's own)
    batch_size: int = 500
    shard_size: int = 16384  # images per shard file
    dtype: str = "float32"  # storage dtype of mean and std: float32 | float16 | bfloat16
    autocast_bf16: bool = False  # run the encoder under bf16 autocast
    limit: int = 0  # encode only the first N images (0: all)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.stats not in ("channel", "global", "source"):
            raise ValueError(f"stats must be channel, global or source, got {self.stats!r}")


def cache_key(autoencoder: Artifact, fingerprint: str, config: EncodeConfig) -> str:
    """Return a hash of everything that determines a cache's content (the device does not)."""
    content = {
        "autoencoder": autoencoder.version,
        "data": fingerprint,
        **to_dict(replace(config, device="any", batch_size=0)),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def find_existing(store: ArtifactStore, key: str) -> Artifact | None:
    """Return a stored latent cache made from the same inputs, or None."""
    for artifact in reversed(store.list("latents")):
        if artifact.manifest.get("cache_key") == key:
            return store.load(artifact.ref, stage="latents")
    return None


class ShardWriter:
    """Collects encoded items into shards of `shard_size` and writes each through `writer` as soon as it is full.

    It holds one shard: a buffer that batches are copied into (its pages are touched only as it fills,
    so a cache smaller than one shard costs no more than itself).
    """

    def __init__(self, writer: ArtifactWriter, shard_size: int):
        self.writer, self.shard_size = writer, shard_size
        self.buffers: dict[str, torch.Tensor] = {}  # mean, std (shard_size, V, C, h, w); labels (shard_size,)
        self.filled = 0  # items in the buffers
        self.shards = 0  # shards written

    def add(self, **batch: torch.Tensor) -> None:
        """Append a batch (`mean`, `std`, `labels`, each of B items), writing every shard it completes."""
        size = len(next(iter(batch.values())))
        if not self.buffers:
            self.buffers = {
                key: torch.empty((self.shard_size, *part.shape[1:]), dtype=part.dtype) for key, part in batch.items()
            }
        start = 0
        while start < size:
            take = min(self.shard_size - self.filled, size - start)
            for key, part in batch.items():
                self.buffers[key][self.filled : self.filled + take] = part[start : start + take]
            self.filled += take
            start += take
            if self.filled == self.shard_size:
                self.flush()

    def flush(self) -> None:
        """Write the items buffered so far as the next shard (the last one may be partial)."""
        if self.filled:
            name = f"shard-{self.shards:05d}.safetensors"
            self.writer.write_tensors(name, {key: buffer[: self.filled] for key, buffer in self.buffers.items()})
            self.shards += 1
            self.filled = 0


@torch.no_grad()
def encode(
    store: ArtifactStore, autoencoder_ref: str, config: EncodeConfig, data: DataConfig | None = None
) -> Artifact:
    """Encode `config.split` of `data` (default: the autoencoder's training data) and return the `latents` artifact.

    Shards are written as they fill, so memory holds about one shard whatever the data set's size. An
    identical cache already in the store (same autoencoder, data and settings) is returned instead.
    """
    autoencoder = store.load(autoencoder_ref, stage="autoencoder")
    if config.stats == "source" and "latent_stats" not in autoencoder.manifest:
        raise ValueError(
            f"{autoencoder.ref} has no source latent statistics (only imported autoencoders whose source "
            f"gives a scaling_factor have them); use stats=channel or stats=global"
        )
    data_config = data or from_dict(DataConfig, autoencoder.config()["data"], "data")
    data_config = replace(data_config, hflip=False)
    if data_config.is_sound and config.flips:
        print("flips do not apply to sound (a clip played backwards is not the same word): one view per clip")
        config = replace(config, flips=False)
    elif config.flips is None:
        config = replace(config, flips=data_config.mirror_invariant)
    elif config.flips and not data_config.mirror_invariant:
        print(
            f"warning: flips=true on {data_config.name!r}, whose items all face one way: a DiT trained on this cache "
            f"learns mirrored items too (on Fashion-MNIST, train images half of them flipped score FD 4.3 and class "
            f"accuracy 0.83 against the test set, against 0.14 and 0.93 as they are; docs/results.md)"
        )
    fingerprint = data_fingerprint(data_config, config.split)
    key = cache_key(autoencoder, fingerprint, config)
    existing = find_existing(store, key)
    if existing is not None:
        print(f"found {existing.ref}: same autoencoder, data and settings; nothing to encode")
        return existing
    store.check_writable()  # before encoding: a cache that cannot be stored is work lost

    device = torch.device(config.device)
    model = load_autoencoder(autoencoder, device)
    dataset = build_dataset(data_config, config.split)
    total = min(config.limit, len(dataset)) if config.limit else len(dataset)
    dtype = DTYPES[config.dtype]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.autocast_bf16 else contextlib.nullcontext()
    measured = LatentStatsAccumulator()
    done, num_classes = 0, 0
    timer = Timer()
    print(
        f"encoding {total} {config.split} images with {autoencoder.ref}{' and their flips' if config.flips else ''} ..."
    )
    # A failed write (a full disk) leaves nothing: the writer removes its folder as the error passes.
    with writing_to(store.root, STORE_OPTION), store.writer("latents") as writer:
        shards = ShardWriter(writer, config.shard_size)
        for images, labels in iterate_images(dataset, config.batch_size, config.limit):
            views = [images, images.flip(-1)] if config.flips else [images]
            batch = torch.cat(views).to(device)  # (V*B, C, H, W) or (V*B, C, L): one encoder pass for all views
            with autocast:
                posterior = model.encode(batch)
            mean = posterior.mean.float().unflatten(0, (len(views), -1)).transpose(0, 1)  # (B, V, C, h, w)
            std = posterior.std.float().unflatten(0, (len(views), -1)).transpose(0, 1)
            mean, std = mean.to("cpu", dtype), std.to("cpu", dtype)
            measured.update(mean, std)
            shards.add(mean=mean, std=std, labels=labels)
            done, num_classes = done + len(labels), max(num_classes, int(labels.max()) + 1)
            print(f"  {done}/{total}  {done / timer():.0f} images/s", end="\r", flush=True)
        shards.flush()
        print()
        if not done:
            raise ValueError(f"no {config.split} images to encode in {data_config.name} data")
        captions = None
        if hasattr(dataset, "caption"):  # captioned data (scenes): the prompts a text DiT trains on, item by item
            captions = [dataset.caption(i) for i in range(done)]
            writer.write_bytes(CAPTIONS_FILE, json.dumps(captions, ensure_ascii=False).encode())
        if config.stats == "source":
            # The statistics an imported autoencoder prescribes (e.g. diffusers' scaling_factor), which
            # pretrained diffusion models of that autoencoder were trained with.
            stats = LatentStats.from_dict(autoencoder.manifest["latent_stats"])
        else:
            stats = measured.stats(config.stats)
        latent_shape = shards.buffers["mean"].shape[1:]  # (V, C, h, w)
        seconds = timer()
        artifact = writer.commit(
            config={"data": to_dict(data_config), **to_dict(config)},
            parents={"autoencoder": autoencoder.ref},
            data_fingerprint=fingerprint,
            metadata={
                "cache_key": key,
                "images": done,
                "views": latent_shape[0],
                "latent_shape": list(latent_shape[1:]),
                "num_classes": num_classes,
                **({"captions": CAPTIONS_FILE} if captions is not None else {}),
                "latent_stats": stats.to_dict(),
                "latent_stats_both": {mode: measured.stats(mode).to_dict() for mode in ("channel", "global")},
                "encode": {
                    "seconds": round(seconds, 1),
                    "images_per_s": round(done / seconds, 1),
                    "device": str(device),
                },
            },
        )
    print(
        f"wrote {artifact.ref} ({shards.shards} shards, {done} images x {latent_shape[0]} views, "
        f"latents {tuple(latent_shape[1:])}) in {format_seconds(seconds)}"
    )
    print(
        f"  latent stats ({stats.mode}): mean {[round(v, 4) for v in stats.mean]}, "
        f"std {[round(v, 4) for v in stats.std]}"
    )
    return artifact
