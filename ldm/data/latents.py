"""The latent cache: posterior means and stds of a data set, sharded safetensors, read back as training batches.

Shard layout (`shard-00000.safetensors`, ...): `mean` and `std` (N, V, C, h, w) where V is 1, or 2
when the horizontal flip of each image is cached too, and `labels` (N,). Training re-samples
z = mean + std * eps every time an item is drawn, so the cache keeps the autoencoder's posterior
rather than one frozen sample of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import IterableDataset

from ldm.artifacts import Artifact, ArtifactError
from ldm.data.order import StepOrder, rank_and_world, step_generator


@dataclass
class LatentStats:
    """Mean and std (per channel, or one global value broadcast to all channels) used to normalise latents."""

    mean: list[float]
    std: list[float]
    mode: str = "channel"  # channel | global

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Return (z - mean) / std for latents (N, C, h, w)."""
        mean, std = self._tensors(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Return z * std + mean: the inverse of `normalize`, applied before decoding."""
        mean, std = self._tensors(z)
        return z * std + mean

    def _tensors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(self.std, dtype=z.dtype, device=z.device).view(shape)
        return mean, std

    def to_dict(self) -> dict:
        return {"mode": self.mode, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> "LatentStats":
        return cls(mean=[float(v) for v in data["mean"]], std=[float(v) for v in data["std"]], mode=data.get("mode", "channel"))


def measure_stats(mean: torch.Tensor, std: torch.Tensor, mode: str = "channel") -> LatentStats:
    """Return the statistics of z ~ N(mean, std^2) over a cache: E[z] and sqrt(E[std^2] + Var[mean]).

    `mean`, `std`: (N, V, C, h, w). Computed in float64 so 10^5 latents sum without drift.
    """
    if mode not in ("channel", "global"):
        raise ValueError(f"latent stats mode must be channel or global, got {mode!r}")
    channels = mean.shape[2]
    means = mean.double().transpose(0, 2).reshape(channels, -1)  # (C, N*V*h*w)
    variances = std.double().pow(2).transpose(0, 2).reshape(channels, -1)
    if mode == "global":
        means, variances = means.reshape(1, -1), variances.reshape(1, -1)
    center = means.mean(1)
    total_var = variances.mean(1) + means.var(1, unbiased=False)
    values_mean, values_std = center.tolist(), total_var.sqrt().tolist()
    if mode == "global":
        values_mean, values_std = values_mean * channels, values_std * channels
    return LatentStats(values_mean, values_std, mode)


class LatentCache:
    """All shards of a `latents` artifact (checksums were verified when the artifact loaded).

    The posterior means and stds stay memory-mapped, shard by shard: a training batch reads only
    its own items, the OS page cache holds one copy for every process of the machine (DDP ranks
    share it instead of each loading the whole cache), and a cache larger than RAM still trains,
    read from disk. Only the labels are read into memory.
    """

    def __init__(self, artifact: Artifact):
        if artifact.stage != "latents":
            raise ArtifactError(f"{artifact.ref} is not a latent cache")
        shards = sorted(name for name in artifact.manifest["files"] if name.startswith("shard-"))
        if not shards:
            raise ArtifactError(f"{artifact.ref} holds no shards")
        parts = [artifact.map_tensors(name) for name in shards]
        self.artifact = artifact
        self.shard_means = [p["mean"] for p in parts]  # each (n_s, V, C, h, w)
        self.shard_stds = [p["std"] for p in parts]
        self.labels = torch.cat([p["labels"] for p in parts]).long()  # (N,)
        sizes = torch.tensor([len(m) for m in self.shard_means])
        self.shard_starts = torch.cumsum(sizes, 0) - sizes  # first global index of each shard (S,)
        self.stats = LatentStats.from_dict(artifact.manifest["latent_stats"])
        self.autoencoder_ref = artifact.parents["autoencoder"]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_views(self) -> int:
        """1, or 2 when each item's horizontal flip is cached too."""
        return self.shard_means[0].shape[1]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.shard_means[0].shape[2:])

    @property
    def num_classes(self) -> int:
        return int(self.artifact.manifest.get("num_classes", int(self.labels.max()) + 1))

    @property
    def mean(self) -> torch.Tensor:
        """All posterior means (N, V, C, h, w), read into memory: for inspection, not for training."""
        return torch.cat(self.shard_means)

    @property
    def std(self) -> torch.Tensor:
        """All posterior stds (N, V, C, h, w), read into memory."""
        return torch.cat(self.shard_stds)

    def gather(self, indices: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float32 means and stds (B, C, h, w) of items `indices` (B,) in views `views` (B,)."""
        indices = indices.contiguous()  # a rank's strided slice of the global batch
        shard = torch.searchsorted(self.shard_starts, indices, right=True) - 1  # (B,)
        mean = torch.empty((len(indices), *self.latent_shape))
        std = torch.empty_like(mean)
        for s in shard.unique().tolist():  # one gather per shard the batch touches
            rows = (shard == s).nonzero().squeeze(1)
            local = indices[rows] - self.shard_starts[s]
            mean[rows] = self.shard_means[s][local, views[rows]].float()
            std[rows] = self.shard_stds[s][local, views[rows]].float()
        return mean, std


class LatentBatches(IterableDataset):
    """Endless normalised training batches (z, y) from a LatentCache, a pure function of (seed, step).

    Step s takes its indices from the permutation of epoch floor(s*B/N), draws the view (flip) and the
    posterior noise from a generator seeded by (seed, s), and each rank keeps its own slice of the
    global batch. So a resumed run that sets `start_step` sees exactly the batches it would have seen,
    and N ranks together see the same data as one process with the same global batch.
    """

    def __init__(self, cache: LatentCache, batch_size: int, seed: int = 0, normalize: bool = True):
        self.cache = cache
        self.batch_size = batch_size
        self.seed = seed
        self.normalize = normalize
        self.start_step = 0
        self.order = StepOrder(len(cache), seed)

    def batch_indices(self, step: int) -> torch.Tensor:
        """Return the global batch's item indices (B,) for a step."""
        return self.order.batch_indices(step, self.batch_size)

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Return this rank's (z, y) of a step: z (B/world, C, h, w) sampled from the posterior."""
        generator = step_generator(self.seed, step)
        indices = self.batch_indices(step)
        views = torch.randint(0, self.cache.num_views, (len(indices),), generator=generator)
        noise = torch.randn((len(indices), *self.cache.latent_shape), generator=generator)
        indices, views, noise = indices[rank::world], views[rank::world], noise[rank::world]
        mean, std = self.cache.gather(indices, views)  # (b, C, h, w) each
        z = mean + std * noise
        if self.normalize:
            z = self.cache.stats.normalize(z)
        return z, self.cache.labels[indices]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = rank_and_world()
        if self.batch_size % world:
            raise ValueError(f"batch size {self.batch_size} must be divisible by the {world} processes")
        step = self.start_step
        while True:
            yield self.batch(step, rank, world)
            step += 1
