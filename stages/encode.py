"""Encode a data set once into a versioned latent cache (posterior mean and std, optional flips, statistics)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, replace

import torch

from ldm.artifacts import Artifact, ArtifactStore
from ldm.config import from_dict, to_dict
from ldm.data import DataConfig, build_dataset, data_fingerprint
from ldm.data.latents import LatentStats, measure_stats
from ldm.loading import iterate_images, load_autoencoder
from ldm.training import Timer, format_seconds

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EncodeConfig:
    """How a latent cache is made."""

    split: str = "train"
    flips: bool = True  # also cache each image's horizontal flip (V = 2 views)
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
    content = {"autoencoder": autoencoder.version, "data": fingerprint, **to_dict(replace(config, device="any", batch_size=0))}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def find_existing(store: ArtifactStore, key: str) -> Artifact | None:
    """Return a stored latent cache made from the same inputs, or None."""
    for artifact in reversed(store.list("latents")):
        if artifact.manifest.get("cache_key") == key:
            return store.load(artifact.ref, stage="latents")
    return None


@torch.no_grad()
def encode(store: ArtifactStore, autoencoder_ref: str, config: EncodeConfig, data: DataConfig | None = None) -> Artifact:
    """Encode `config.split` of `data` (default: the autoencoder's training data) and return the `latents` artifact.

    An identical cache already in the store (same autoencoder, data and settings) is returned instead.
    """
    autoencoder = store.load(autoencoder_ref, stage="autoencoder")
    if config.stats == "source" and "latent_stats" not in autoencoder.manifest:
        raise ValueError(
            f"{autoencoder.ref} has no source latent statistics (only imported autoencoders whose source "
            f"gives a scaling_factor have them); use stats=channel or stats=global"
        )
    data_config = data or from_dict(DataConfig, autoencoder.config()["data"], "data")
    data_config = replace(data_config, hflip=False)
    fingerprint = data_fingerprint(data_config, config.split)
    key = cache_key(autoencoder, fingerprint, config)
    existing = find_existing(store, key)
    if existing is not None:
        print(f"found {existing.ref}: same autoencoder, data and settings; nothing to encode")
        return existing

    device = torch.device(config.device)
    model = load_autoencoder(autoencoder, device)
    dataset = build_dataset(data_config, config.split)
    total = min(config.limit, len(dataset)) if config.limit else len(dataset)
    dtype = DTYPES[config.dtype]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.autocast_bf16 else contextlib.nullcontext()
    means, stds, labels = [], [], []
    timer = Timer()
    print(f"encoding {total} {config.split} images with {autoencoder.ref}{' and their flips' if config.flips else ''} ...")
    for images, batch_labels in iterate_images(dataset, config.batch_size, config.limit):
        views = [images, images.flip(-1)] if config.flips else [images]
        batch = torch.cat(views).to(device)  # (V*B, C, H, W): one encoder pass for all views
        with autocast:
            posterior = model.encode(batch)
        mean = posterior.mean.float().unflatten(0, (len(views), -1)).transpose(0, 1)  # (B, V, C, h, w)
        std = posterior.std.float().unflatten(0, (len(views), -1)).transpose(0, 1)
        means.append(mean.to("cpu", dtype))
        stds.append(std.to("cpu", dtype))
        labels.append(batch_labels)
        done = sum(len(m) for m in means)
        print(f"  {done}/{total}  {done / timer():.0f} images/s", end="\r", flush=True)
    print()
    mean, std, label = torch.cat(means), torch.cat(stds), torch.cat(labels)
    if config.stats == "source":
        # The statistics an imported autoencoder prescribes (e.g. diffusers' scaling_factor), which
        # pretrained diffusion models of that autoencoder were trained with.
        stats = LatentStats.from_dict(autoencoder.manifest["latent_stats"])
    else:
        stats = measure_stats(mean, std, config.stats)
    shards = {
        f"shard-{i // config.shard_size:05d}.safetensors": {
            "mean": mean[i : i + config.shard_size],
            "std": std[i : i + config.shard_size],
            "labels": label[i : i + config.shard_size],
        }
        for i in range(0, len(label), config.shard_size)
    }
    seconds = timer()
    artifact = store.save(
        "latents",
        tensors=shards,
        config={"data": to_dict(data_config), **to_dict(config)},
        parents={"autoencoder": autoencoder.ref},
        data_fingerprint=fingerprint,
        metadata={
            "cache_key": key,
            "images": len(label),
            "views": mean.shape[1],
            "latent_shape": list(mean.shape[2:]),
            "num_classes": int(label.max()) + 1,
            "latent_stats": stats.to_dict(),
            "latent_stats_both": {
                "channel": measure_stats(mean, std, "channel").to_dict(),
                "global": measure_stats(mean, std, "global").to_dict(),
            },
            "encode": {"seconds": round(seconds, 1), "images_per_s": round(len(label) / seconds, 1), "device": str(device)},
        },
    )
    print(f"wrote {artifact.ref} ({len(shards)} shards, {len(label)} images x {mean.shape[1]} views, "
          f"latents {tuple(mean.shape[2:])}) in {format_seconds(seconds)}")
    print(f"  latent stats ({stats.mode}): mean {[round(v, 4) for v in stats.mean]}, std {[round(v, 4) for v in stats.std]}")
    return artifact
