"""Training data order as a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.

Step s of a global batch of B items out of N takes its items from the permutation of epoch
floor(s*B/N) (seeded by the seed and the epoch), continuing into the next epoch's permutation when
an epoch ends mid-batch. Per-item randomness of a step (flips, posterior noise) comes from a
generator seeded by (seed, step). Each rank of a distributed run keeps its own slice of the
global batch, so N ranks together see what one process with the same global batch would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a distributed run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_divisible(batch_size: int, world: int) -> None:
    """Raise ValueError unless a global batch splits evenly over the processes."""
    if batch_size % world:
        raise ValueError(
            f"trainer.batch_size {batch_size} (the global batch) must be divisible by the {world} processes"
        )


def endless_steps(source: Any) -> Iterator[Any]:
    """Yield this process's `source.batch(step, rank, world)` for step = source.start_step, +1, ... forever."""
    rank, world = rank_and_world()
    check_divisible(source.batch_size, world)
    step = source.start_step
    while True:
        yield source.batch(step, rank, world)
        step += 1


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a step's per-item randomness (views, flips, noise)."""
    return torch.Generator().manual_seed(seed * 7_919 + step + 1)


class StepOrder:
    """Item indices of each step's global batch: epoch permutations seeded by (seed, epoch)."""

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError("cannot draw batches from an empty data set")
        self.size = size
        self.seed = seed
        self._order: tuple[int, torch.Tensor] | None = None

    def batch_indices(self, step: int, batch_size: int) -> torch.Tensor:
        """Return the global batch's item indices (B,) for a step."""
        first = step * batch_size
        epoch, offset = divmod(first, self.size)
        indices: list[int] = []
        while len(indices) < batch_size:
            indices.extend(self.epoch_order(epoch)[offset : offset + batch_size - len(indices)].tolist())
            epoch, offset = epoch + 1, 0
        return torch.tensor(indices)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation (N,) of an epoch; kept while the epoch lasts (a 1.3M-item randperm per step adds up)."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.size, generator=generator))
        return self._order[1]


class StepBatchSampler(Sampler):
    """Endless batches of (index, flip) pairs for a map-style data set, a pure function of (seed, step).

    `batch_size` is the global batch: each of P processes takes its batch_size / P slice. A resumed
    run sets `start_step` to the step it continues from. Pair it with `FlippableItems`.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, hflip: bool = False):
        self.order = StepOrder(size, seed)
        self.batch_size = batch_size
        self.seed = seed
        self.hflip = hflip
        self.start_step = 0

    def batch(self, step: int, rank: int = 0, world: int = 1) -> list[tuple[int, bool]]:
        """Return this rank's (index, flip) pairs of a step."""
        indices = self.order.batch_indices(step, self.batch_size)
        flips = torch.rand(len(indices), generator=step_generator(self.seed, step)) < 0.5
        flips &= self.hflip
        return list(zip(indices[rank::world].tolist(), flips[rank::world].tolist()))

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        return endless_steps(self)


class FlippableItems(Dataset):
    """Items of an (image, label) data set addressed as (index, flip): the flip is decided by the sampler, not here."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = key
        image, label = self.dataset[index]
        return (image.flip(-1) if flip else image), label
