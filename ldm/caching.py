"""Step caching for many-step samplers: reuse a block's residual from the previous network call.

Between neighbouring sampler steps the input of a DiT block changes little, and so does what the
block adds to the residual stream (Delta-DiT, Chen et al. 2024; Learning-to-Cache, Ma et al. 2024).
A `BlockCache` set on a DiT (`DiT.block_cache`) runs each block as usual or, where its schedule says
so, adds the residual (block output minus block input) that the block produced at the previous
call instead of evaluating it. The schedule is fixed per model and sampler setting: calibration
(`LatentDiffusionPipeline.calibrate_cache`) runs the sampler once without skipping with a recording
cache, which measures how much each block's residual changed from call to call, and
`schedule_from_changes` marks the calls x blocks that changed least, never the same block at two calls in a
row (a reused residual is always one call old) and never at the first call.

With `extrapolate`, a skipped block adds a forecast instead of the stale residual: the line through
its last two evaluated residuals, continued to the current timestep (a first-order Taylor forecast
in time, as TaylorSeer does, Liu et al. 2025, arXiv 2503.06923). Reuse is exact only for a residual
that does not change; the forecast is exact for one that changes linearly in t.

A calibrated schedule is stored in its model's manifest (metrics, under the setting's name) as a
sealed record (`ldm.artifacts.seal_record`): bound to the model's version, the entry's name and the
fraction it was calibrated for, so that `stored_schedule` refuses one edited by hand, moved to the
entry of another setting or fraction, or copied from another model, instead of running it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.artifacts import RECORD_SEAL, Artifact, ArtifactError, record_problem, seal_record


@dataclass(frozen=True)
class CacheSchedule:
    """Which blocks reuse their previous residual at which network call of one sampler setting."""

    calls: int  # network calls of one sampling run
    depth: int  # blocks of the DiT
    skips: tuple[tuple[int, int], ...]  # (call, block) pairs that reuse the residual of call - 1
    extrapolate: bool = False  # forecast the residual linearly in t from the last two evaluations instead of reusing it

    def __post_init__(self) -> None:
        for call, block in self.skips:
            if not (1 <= call < self.calls and 0 <= block < self.depth):
                raise ValueError(
                    f"skip ({call}, {block}) is outside calls 1..{self.calls - 1} and blocks 0..{self.depth - 1}"
                )
        if len(set(self.skips)) != len(self.skips):
            raise ValueError("a (call, block) pair is listed twice in the cache schedule")

    @property
    def fraction(self) -> float:
        """The share of block evaluations the schedule saves."""
        return len(self.skips) / (self.calls * self.depth)

    def mask(self) -> torch.Tensor:
        """(calls, depth) bool: True where the block is evaluated."""
        evaluate = torch.ones(self.calls, self.depth, dtype=torch.bool)
        for call, block in self.skips:
            evaluate[call, block] = False
        return evaluate

    def to_dict(self) -> dict:
        return {
            "calls": self.calls,
            "depth": self.depth,
            "skips": [list(pair) for pair in self.skips],
            "extrapolate": self.extrapolate,
            "fraction": round(self.fraction, 4),
        }

    @classmethod
    def from_dict(cls, data: Any) -> CacheSchedule:
        """The schedule `to_dict` wrote (other keys are ignored); ValueError saying what is wrong with anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"a schedule is a JSON object with calls, depth and skips, got {type(data).__name__}")
        for name in ("calls", "depth"):
            if not _is_int(data.get(name)) or data[name] < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {data.get(name)!r}")
        skips = data.get("skips")
        if not isinstance(skips, (list, tuple)) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(map(_is_int, pair)) for pair in skips
        ):
            raise ValueError(f"skips must be a list of [call, block] pairs of integers, got {str(skips)[:60]}")
        extrapolate = data.get("extrapolate", False)  # absent in schedules stored before forecasts
        if not isinstance(extrapolate, bool):
            raise ValueError(f"extrapolate must be true or false, got {extrapolate!r}")
        return cls(data["calls"], data["depth"], tuple((call, block) for call, block in skips), extrapolate)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class BlockCache:
    """Runs a DiT's blocks for one sampling run, reusing residuals where `schedule` says so.

    Set it as `model.block_cache` (see `cached`); the DiT calls `begin` at every forward and `run` for
    every block. A call whose batch differs from the one the residuals were made with (a guidance
    interval switches between N and 2N) and calls past the schedule evaluate every block. With
    `record`, `changes[i][k]` is the relative change ||R_k(i) - R_k(i-1)|| / ||R_k(i)|| of block k's residual,
    or with `extrapolate` the relative error of its forecast ||R_k(i) - F_k(i)|| / ||R_k(i)||.
    """

    def __init__(self, schedule: CacheSchedule | None = None, record: bool = False, extrapolate: bool | None = None):
        self.evaluate = None if schedule is None else schedule.mask()
        self.extrapolate = (schedule is not None and schedule.extrapolate) if extrapolate is None else extrapolate
        self.record = record
        self.call = -1
        self.batch = None
        self.t: float | None = None  # this call's network timestep
        self.residuals: dict[int, torch.Tensor] = {}  # block: its last evaluated residual
        self.times: dict[int, float] = {}  # block: the timestep of that residual (with extrapolate)
        self.older: dict[int, tuple[torch.Tensor, float]] = {}  # block: the last evaluation at another timestep
        self.changes: list[list[float]] = []
        self.evaluated = self.skipped = 0

    def begin(self, batch: int, t: torch.Tensor | None = None) -> None:
        """Start a network call of `batch` samples at network timesteps `t` (N,) (all equal in a sampler's call)."""
        self.call += 1
        if batch != self.batch:
            for memory in (self.residuals, self.times, self.older):
                memory.clear()
            self.batch = batch
        # One host read per call, and only for a forecast (a sampler's call has one timestep for the batch).
        self.t = float(t.reshape(-1)[0]) if self.extrapolate and t is not None else None
        if self.record:
            self.changes.append([])

    def _forecast(self, index: int) -> torch.Tensor:
        """The residual to add for a skipped block: the last one, or its linear forecast to this call's t."""
        newer = self.residuals[index]
        if not self.extrapolate or index not in self.older or self.t is None:
            return newer
        older, t_older = self.older[index]
        t_newer = self.times[index]
        # The slope comes from two timesteps that differ: Heun's corrector and the next predictor share one.
        return newer + (newer - older) * ((self.t - t_newer) / (t_newer - t_older))

    def _evaluates(self, index: int) -> bool:
        if index not in self.residuals or self.evaluate is None or self.call >= len(self.evaluate):
            return True
        return bool(self.evaluate[self.call, index])

    def run(self, index: int, block: torch.nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        """Return block(x, *args), or x plus the block's residual of the previous call."""
        if not self._evaluates(index):
            self.skipped += 1
            return x.add_(self._forecast(index))  # x is the forward's own tensor (no autograd in sampling)
        before = x.clone()
        x = block(x, *args)  # updates x in place without autograd
        residual = x - before
        if self.record:
            previous = self._forecast(index) if index in self.residuals else None
            change = (
                float("nan")
                if previous is None
                else float((residual - previous).norm() / residual.norm().clamp_min(1e-12))
            )
            self.changes[-1].append(change)
        if self.t is not None:
            if index in self.times and self.times[index] != self.t:
                self.older[index] = (self.residuals[index], self.times[index])
            self.times[index] = self.t
        self.residuals[index] = residual
        self.evaluated += 1
        return x


class cached:
    """Context manager that sets a BlockCache on a DiT for one sampling run and removes it after."""

    def __init__(self, model: torch.nn.Module, cache: BlockCache):
        self.model, self.cache = model, cache

    def __enter__(self) -> BlockCache:
        self.model.block_cache = self.cache
        return self.cache

    def __exit__(self, *exc_info) -> None:
        self.model.block_cache = None


def schedule_from_changes(changes: Sequence[Sequence[float]], fraction: float) -> CacheSchedule:
    """The schedule that skips `fraction` of all block evaluations where the residuals changed least.

    Cells are taken in order of increasing change; a cell is passed over when its block is already
    skipped at the call before or after it, and call 0 is never skipped. Raises ValueError when the
    rule cannot reach the fraction (at most half of the later calls of each block can be skipped).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    calls, depth = len(changes), len(changes[0])
    wanted = skips_for(fraction, calls, depth)
    # A NaN change (no previous residual of the same batch) is never skipped.
    order = sorted(
        (changes[i][k] if changes[i][k] == changes[i][k] else float("inf"), i, k)
        for i in range(1, calls)
        for k in range(depth)
    )
    skips: set[tuple[int, int]] = set()
    for change, call, block in order:
        if len(skips) >= wanted or change == float("inf"):
            break
        if (call - 1, block) in skips or (call + 1, block) in skips:
            continue
        skips.add((call, block))
    if len(skips) < wanted:
        raise ValueError(
            f"a skip fraction of {fraction:g} needs {wanted} skips; at most {len(skips)} fit the rule "
            f"(never two calls in a row, never the first call) at {calls} calls"
        )
    return CacheSchedule(calls, depth, tuple(sorted(skips)))


def skips_for(fraction: float, calls: int, depth: int) -> int:
    """The number of skips a schedule calibrated for `fraction` holds: at least that share of calls x depth."""
    return math.ceil(fraction * calls * depth - 1e-9)


def sealed_schedule(schedule: CacheSchedule, model: Artifact, name: str, fraction: float) -> dict:
    """The record that stores `schedule`, calibrated for `fraction`, as `model`'s metrics[name]: sealed to all three."""
    return seal_record(model, name, {**schedule.to_dict(), "cache_fraction": fraction})


def stored_schedule(
    model: Artifact, name: str, calls: int, depth: int, fraction: float, extrapolate: bool
) -> CacheSchedule | None:
    """The schedule metrics[name] of `model` holds for a setting of `calls` network calls skipping `fraction` of them.

    None when there is none to use: no entry, or an unsealed one (stored before schedules were sealed,
    or stripped of its seal), which is never trusted; calibrate anew. Raises ArtifactError naming the
    artifact and the entry for one that is malformed, does not match its seal, or does not fit the setting.
    """
    metrics = model.manifest.get("metrics")
    record = metrics.get(name) if isinstance(metrics, dict) else None
    if record is None:
        return None
    where = f"{model.ref}: the step-caching schedule metrics[{name!r}]"
    fix = f"delete that entry from {model.path / 'manifest.json'} to calibrate it again"
    try:
        schedule = CacheSchedule.from_dict(record)
    except ValueError as err:
        raise ArtifactError(f"{where} is malformed ({err}); {fix}") from None
    if RECORD_SEAL not in record:
        return None
    problem = record_problem(model, name)
    if problem is not None:
        raise ArtifactError(f"{model.ref}: {problem}")
    problem = _misfit(schedule, record, calls, depth, fraction, extrapolate)
    if problem is not None:
        raise ArtifactError(f"{where} {problem}; {fix}")
    return schedule


def _misfit(
    schedule: CacheSchedule, record: dict, calls: int, depth: int, fraction: float, extrapolate: bool
) -> str | None:
    """Why a sealed schedule does not fit the setting it is asked for (only a forged seal lets one through), or None."""
    if (schedule.calls, schedule.depth) != (calls, depth):
        return (
            f"is for {schedule.calls} calls of {schedule.depth} blocks, "
            f"but this setting makes {calls} calls of {depth} blocks"
        )
    if schedule.extrapolate != extrapolate:
        return f"was calibrated {'with' if schedule.extrapolate else 'without'} --cache-forecast"
    if record.get("cache_fraction") != fraction or len(schedule.skips) != skips_for(fraction, calls, depth):
        return (
            f"skips {len(schedule.skips)} of {calls * depth} block evaluations: it was not calibrated for "
            f"--cache-fraction {fraction:g} ({skips_for(fraction, calls, depth)} skips)"
        )
    if any((call + 1, block) in schedule.skips for call, block in schedule.skips):
        return "skips a block at two calls in a row, which calibration never does"
    return None
