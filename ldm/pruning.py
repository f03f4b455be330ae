"""Depth pruning of a trained DiT: which blocks to keep, the smaller network, and its recovery loss.

A DiT's blocks are residual updates of one token stream, so removing a block leaves a network that still
runs: the kept blocks see a stream without that update. TinyFusion (Fang et al. 2025) prunes half of
DiT-XL/2's blocks and recovers its FID by fine-tuning with knowledge distillation; BK-SDM (Kim et al.
2023) removes blocks of Stable Diffusion's U-Net and recovers with output and feature distillation. Here
the blocks to keep are chosen greedily by a measured importance: on a fixed calibration batch, remove one
block at a time, each time the one whose removal moves the network's output least from the unpruned
output. The pruned network starts as an exact copy of the kept blocks (`prune_blocks`), and
`recovery_losses` trains it to reproduce its parent's output at the noisy latents of the parent's own
objective (plus, optionally, the ordinary diffusion loss and a match of the final token stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ldm.diffusion.objectives import (
    FLOW_TIME_SCALE,
    diffusion_loss,
    flow_interpolate,
    flow_loss,
    flow_sample_t,
    mean_flat,
    q_sample,
)
from ldm.diffusion.schedules import DiffusionConfig, NoiseSchedule
from ldm.models.dit import DiT, DiTConfig


@dataclass
class PruneConfig:
    """What to remove from the parent DiT and how the pruned network learns to stand in for it."""

    depth: int = 0  # blocks to keep; 0: half the parent's (rounded up)
    keep: list[int] = field(default_factory=list)  # the kept blocks by index; empty: chosen by `importance`
    importance: str = "greedy"  # "greedy" (measured, see `choose_blocks`) or "uniform" (evenly spaced)
    calibration_size: int = 256  # cache latents the greedy choice is measured on
    output_weight: float = 1.0  # || pruned(x_t) - parent(x_t) ||^2, knowledge distillation of the output
    task_weight: float = 0.0  # the ordinary diffusion loss against the data
    feature_weight: float = 0.0  # || final tokens - parent's final tokens ||^2 (BK-SDM's feature distillation)

    def __post_init__(self) -> None:
        self.keep = [int(i) for i in self.keep]  # YAML gives lists of ints; --set may give strings
        if self.importance not in ("greedy", "uniform"):
            raise ValueError(f"prune.importance must be 'greedy' or 'uniform', got {self.importance!r}")
        if self.depth < 0 or self.calibration_size < 1:
            raise ValueError(
                f"prune.depth must be >= 0 and prune.calibration_size >= 1, got {self.depth}, {self.calibration_size}"
            )
        if self.keep and len(set(self.keep)) != len(self.keep):
            raise ValueError(f"prune.keep names a block twice: {self.keep}")
        if self.keep and self.depth and self.depth != len(self.keep):
            raise ValueError(f"prune.depth {self.depth} but prune.keep names {len(self.keep)} blocks: set one of them")
        weights = (self.output_weight, self.task_weight, self.feature_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError(f"the recovery weights must be >= 0 and not all 0, got {weights}")

    def target_depth(self, parent_depth: int) -> int:
        """The number of blocks the pruned network keeps."""
        depth = len(self.keep) or self.depth or (parent_depth + 1) // 2
        if not 1 <= depth < parent_depth:
            raise ValueError(f"a pruned network keeps 1 to {parent_depth - 1} of its parent's {parent_depth} blocks")
        return depth


def pruned_config(parent: DiTConfig, depth: int) -> DiTConfig:
    """The parent's DiTConfig at `depth` blocks. Token routing (TREAD) is a training option of the parent's blocks
    and is switched off: the pruned network learns from its parent's output, every token through every block."""
    return replace(parent, depth=depth, route_ratio=0.0)


def prune_blocks(parent: DiT, keep: Sequence[int]) -> DiT:
    """Return a DiT with the parent's blocks `keep` (in the parent's order) and all its other weights copied."""
    depth = parent.config.depth
    if not keep or any(not 0 <= i < depth for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"keep must name distinct blocks of 0..{depth - 1}, got {list(keep)}")
    keep = sorted(keep)
    pruned = DiT(pruned_config(parent.config, len(keep))).to(next(parent.parameters()).device)
    state = {}
    for key, value in parent.state_dict().items():
        if key.startswith("blocks."):
            index, rest = key.split(".", 2)[1:]
            if int(index) not in keep:
                continue
            key = f"blocks.{keep.index(int(index))}.{rest}"
        state[key] = value
    pruned.load_state_dict(state)
    return pruned


class _SkipBlock(torch.nn.Module):
    """A block that leaves the token stream as it is: what removing the block does to the network."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return x


@torch.no_grad()
def removal_distance(model: DiT, removed: Sequence[int], batch: CalibrationBatch) -> float:
    """Mean squared distance between the output of `model` with blocks `removed` skipped and its full output."""
    kept = list(model.blocks)
    try:
        for index in removed:
            model.blocks[index] = _SkipBlock()
        output = model(batch.x_t, batch.t, batch.y)
    finally:
        for index, block in enumerate(kept):
            model.blocks[index] = block
    return mean_flat((output - batch.target) ** 2).mean().item()


@dataclass
class CalibrationBatch:
    """Fixed noisy latents, timesteps and labels, and the full network's output on them."""

    x_t: Tensor
    t: Tensor  # network units
    y: Tensor
    target: Tensor


@torch.no_grad()
def calibration_batch(
    model: DiT,
    x0: Tensor,
    y: Tensor,
    diffusion: DiffusionConfig,
    schedule: NoiseSchedule | None,
    generator: torch.Generator,
) -> CalibrationBatch:
    """Noisy latents of x0 at times drawn as the objective trains (from `generator`), and `model`'s output there."""
    x_t, t = noisy_latents(x0, diffusion, schedule, generator)
    was_training = model.training
    model.eval()
    target = model(x_t, t, y)
    model.train(was_training)
    return CalibrationBatch(x_t, t, y, target)


def choose_blocks(model: DiT, depth: int, batch: CalibrationBatch) -> tuple[list[int], list[dict]]:
    """Greedy depth pruning: remove, one at a time, the block whose removal (beside those already removed) moves the
    output on `batch` least. Return the kept blocks and the record of each round (the distance of every candidate)."""
    was_training = model.training
    model.eval()
    removed, rounds = [], []
    while model.config.depth - len(removed) > depth:
        candidates = [i for i in range(model.config.depth) if i not in removed]
        distances = {i: removal_distance(model, [*removed, i], batch) for i in candidates}
        chosen = min(distances, key=distances.get)
        removed.append(chosen)
        rounds.append({"removed": chosen, "distance": distances[chosen], "candidates": distances})
    model.train(was_training)
    return sorted(set(range(model.config.depth)) - set(removed)), rounds


def uniform_blocks(parent_depth: int, depth: int) -> list[int]:
    """`depth` blocks spread evenly over the parent's, the first and the last kept."""
    if depth == 1:
        return [parent_depth - 1]
    return sorted({round(i * (parent_depth - 1) / (depth - 1)) for i in range(depth)})


def noisy_latents(
    x0: Tensor, diffusion: DiffusionConfig, schedule: NoiseSchedule | None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Return (x_t, t in network units) drawn as the objective's training draws them (flow or ddpm)."""
    draw_on = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=draw_on, dtype=x0.dtype).to(x0.device)
    x_t, t, _ = _noisy(x0, noise, diffusion, schedule, generator)
    return x_t, t


def _noisy(x0, noise, diffusion, schedule, generator):
    n = x0.shape[0]
    if diffusion.objective == "flow":
        t = flow_sample_t(n, diffusion, generator, x0.device)
        return flow_interpolate(x0, noise, t), t * FLOW_TIME_SCALE, t
    if diffusion.objective == "ddpm":
        if schedule is None:
            raise ValueError("objective 'ddpm' needs a NoiseSchedule")
        draw_on = generator.device if generator is not None else x0.device
        t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator, device=draw_on).to(x0.device)
        return q_sample(x0, t, noise, schedule.alphas_cumprod), t.to(torch.float32), t
    raise ValueError(
        f"pruning recovers networks trained as 'flow' or 'ddpm', not {diffusion.objective!r}: prune the teacher, "
        f"then distil the pruned network into a few-call student"
    )


def recovery_losses(
    pruned,
    parent: DiT,
    x0: Tensor,
    y: Tensor,
    diffusion: DiffusionConfig,
    config: PruneConfig,
    schedule: NoiseSchedule | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Per-sample losses (N,) of one recovery batch: dict(loss, output, [task], [feature], t).

    `pruned(x_t, t, y, return_block=...)` is the network trained; `parent` the frozen unpruned network, called on
    the same x_t, t and labels (drop labels before, for both). The feature term matches the pruned network's final
    token stream to the parent's, each normalised by the parent's root-mean-square.
    """
    draw_on = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=draw_on, dtype=x0.dtype).to(x0.device)
    x_t, t_net, t = _noisy(x0, noise, diffusion, schedule, generator)
    features = config.feature_weight > 0
    with torch.no_grad():
        target = parent(x_t, t_net, y, return_block=parent.config.depth - 1 if features else None)
    output = pruned(x_t, t_net, y, return_block=pruned.config.depth - 1 if features else None)
    if features:
        (output, tokens), (target, parent_tokens) = output, target
    losses = {"output": mean_flat((output.float() - target.float()) ** 2)}
    loss = config.output_weight * losses["output"]
    if config.task_weight > 0:
        if diffusion.objective == "flow":
            losses["task"] = flow_loss(output, x0, noise)["mse"]
        else:
            losses["task"] = diffusion_loss(output, x0, t, noise, diffusion, schedule)["mse"]
        loss = loss + config.task_weight * losses["task"]
    if features:
        scale = parent_tokens.float().pow(2).mean(dim=(1, 2), keepdim=True).clamp_min(1e-8)  # (N, 1, 1)
        losses["feature"] = ((tokens.float() - parent_tokens.float()) ** 2 / scale).mean(dim=(1, 2))
        loss = loss + config.feature_weight * losses["feature"]
    return {"loss": loss, **losses, "t": t}
