"""The latent cache: posterior means and stds of a data set, sharded safetensors, read back as training batches.

Shard layout (`shard-00000.safetensors`, ...): `mean` and `std` (N, V, C, h, w) where V is 1, or 2
when the horizontal flip of each image is cached too, and `labels` (N,). Training re-samples
z = mean + std * eps every time an item is drawn, so the cache keeps the autoencoder's posterior
rather than one frozen sample of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset

from ldm.artifacts import Artifact, ArtifactError
from ldm.data.order import StepOrder, endless_steps, step_generator


@dataclass
class LatentStats:
    """Mean and std (per channel, or one global value broadcast to all channels) used to normalise latents."""

    mean: list[float]
    std: list[float]
    mode: str = "channel"  # channel | global

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Return (z - mean) / std for latents (N, C, h, w) or (N, C, l)."""
        mean, std = self._tensors(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Return z * std + mean: the inverse of `normalize`, applied before decoding."""
        mean, std = self._tensors(z)
        return z * std + mean

    def _tensors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (z.ndim - 2)  # channels on dim 1, whatever the latent's spatial dims
        mean = torch.tensor(self.mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(self.std, dtype=z.dtype, device=z.device).view(shape)
        return mean, std

    def to_dict(self) -> dict:
        return {"mode": self.mode, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> LatentStats:
        return cls(
            mean=[float(v) for v in data["mean"]], std=[float(v) for v in data["std"]], mode=data.get("mode", "channel")
        )


STATS_BLOCK = 64  # items reduced together by LatentStatsAccumulator, counted from the first item


def measure_stats(mean: torch.Tensor, std: torch.Tensor, mode: str = "channel") -> LatentStats:
    """Return the statistics of z ~ N(mean, std^2) over a cache: E[z] and sqrt(E[std^2] + Var[mean]).

    `mean`, `std`: (N, V, C, h, w). The same numbers, to the last bit, as a LatentStatsAccumulator fed
    the cache in batches of any size.
    """
    accumulator = LatentStatsAccumulator()
    accumulator.update(mean, std)
    return accumulator.stats(mode)


@dataclass
class Moments:
    """Per-channel float64 totals of a set of latents: enough to merge sets and give their statistics."""

    count: int  # values per channel (items * V * h * w)
    center: torch.Tensor  # (C,) mean of the posterior means
    m2: torch.Tensor  # (C,) sum of squared deviations of the means from `center`
    variance_sum: torch.Tensor  # (C,) sum of std^2

    @classmethod
    def of(cls, mean: torch.Tensor, std: torch.Tensor) -> Moments:
        """Return the moments of posterior means and stds (n, V, C, h, w) or (n, V, C, l)."""
        others = tuple(dim for dim in range(mean.ndim) if dim != 2)  # every dimension but the channel
        # Contiguous float64 copies: the reductions then see one memory layout whatever the input's.
        means = mean.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
        center = means.mean(others)
        m2 = means.sub_(center.view((1, 1, -1) + (1,) * (mean.ndim - 3))).square_().sum(others)
        variance_sum = std.to(torch.float64, memory_format=torch.contiguous_format, copy=True).square_().sum(others)
        return cls(mean[:, :, 0].numel(), center, m2, variance_sum)

    def merge(self, other: Moments) -> Moments:
        """Return the moments of both sets (Chan, Golub & LeVeque 1979: no sum of squares cancels)."""
        total = self.count + other.count
        delta = other.center - self.center
        return Moments(
            total,
            self.center + delta * (other.count / total),
            self.m2 + other.m2 + delta.square() * (self.count * other.count / total),
            self.variance_sum + other.variance_sum,
        )

    def pooled(self) -> Moments:
        """Return the moments of all channels taken as one (each holds `count` values)."""
        center = self.center.mean()
        m2 = self.m2.sum() + self.count * (self.center - center).square().sum()
        return Moments(self.count * len(self.center), center.view(1), m2.view(1), self.variance_sum.sum().view(1))


class LatentStatsAccumulator:
    """The statistics of `measure_stats` over a cache fed batch by batch, per channel and global at once.

    Computed in float64 so 10^6 latents sum without drift. Each block of STATS_BLOCK items gives its
    Moments, merged into the running ones in order; blocks are counted from the first item whatever the
    batches, so the arithmetic, and the result to the last bit, depends only on the items and their order.
    """

    def __init__(self) -> None:
        self.moments: Moments | None = None  # of the full blocks so far
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # items of the block not yet full
        self._pending_items = 0

    def update(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Add a batch of posterior means and stds (N, V, C, h, w)."""
        start = 0
        if self._pending_items:  # complete the open block first
            start = min(STATS_BLOCK - self._pending_items, len(mean))
            self._hold(mean[:start], std[:start])
            if self._pending_items < STATS_BLOCK:
                return
            self._add(self._open_block())
            self._pending, self._pending_items = [], 0
        while start + STATS_BLOCK <= len(mean):
            self._add(Moments.of(mean[start : start + STATS_BLOCK], std[start : start + STATS_BLOCK]))
            start += STATS_BLOCK
        self._hold(mean[start:], std[start:])

    def stats(self, mode: str = "channel") -> LatentStats:
        """Return the LatentStats (`channel` or `global`) of every item added so far."""
        if mode not in ("channel", "global"):
            raise ValueError(f"latent stats mode must be channel or global, got {mode!r}")
        moments = self.moments
        if self._pending_items:
            open_block = self._open_block()
            moments = open_block if moments is None else moments.merge(open_block)
        if moments is None:
            raise ValueError("no latents to measure: the accumulator was given no items")
        channels = len(moments.center)
        if mode == "global":
            moments = moments.pooled()
        total_var = (moments.variance_sum + moments.m2) / moments.count  # E[std^2] + Var[mean]
        values_mean, values_std = moments.center.tolist(), total_var.sqrt().tolist()
        if mode == "global":
            values_mean, values_std = values_mean * channels, values_std * channels
        return LatentStats(values_mean, values_std, mode)

    def _add(self, block: Moments) -> None:
        self.moments = block if self.moments is None else self.moments.merge(block)

    def _hold(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Keep a copy of items of the open block (a copy: the caller may reuse its buffers)."""
        if len(mean):
            self._pending.append((mean.clone(), std.clone()))
            self._pending_items += len(mean)

    def _open_block(self) -> Moments:
        return Moments.of(torch.cat([m for m, _ in self._pending]), torch.cat([s for _, s in self._pending]))


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
        self.captions: list[str] | None = None  # one per item, for a text DiT; None: the data has none
        if "captions" in artifact.manifest:
            self.captions = artifact.read_json(artifact.manifest["captions"])
            if not isinstance(self.captions, list) or len(self.captions) != len(self.labels):
                raise ArtifactError(
                    f"{artifact.ref}: {artifact.manifest['captions']} does not hold one caption per item"
                )

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

    def __init__(
        self, cache: LatentCache, batch_size: int, seed: int = 0, normalize: bool = True, with_indices: bool = False
    ):
        self.cache = cache
        self.batch_size = batch_size
        self.seed = seed
        self.normalize = normalize
        self.with_indices = with_indices  # batches are (z, y, item indices): a text DiT looks up their captions
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
        if self.with_indices:
            return z, self.cache.labels[indices], indices
        return z, self.cache.labels[indices]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return endless_steps(self)
