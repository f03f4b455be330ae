"""Few-step distillation of a rectified-flow teacher into an average-velocity student, as pure tensor functions.

The student u(x_t, r, t) is the MeanFlow network (`model.interval_embed`): the average velocity over
[r, t], so the `meanflow` sampler jumps x_r = x_t - (t - r) u in one call per step. It learns, for
each interval on the grids of 1, 2, 4, ... `finest_steps` sampler steps, a target that never needs
the teacher for more than one step:

- r = t (a share `anchor_share`, t uniform in (0, 1]): the teacher's guided velocity, so the student
  stays a flow model (the flow samplers work on it too);
- t - r = 1 / finest_steps: one Heun step of the guided teacher over [r, t] (two guided calls);
- longer intervals: the student's own two half steps, (u(x_t, s, t) + u(x_s, r, s)) / 2 with
  s = (t + r) / 2 and x_s = x_t - (t - s) u(x_t, s, t), held fixed. This is the shortcut models'
  self-consistency target (Frans et al. 2024, arXiv 2410.12557), here anchored on a teacher's
  trajectory instead of the data's conditional velocity.

The teacher's velocity carries classifier-free guidance at `guidance_scale` (only inside
`guidance_interval` when one is set, as the samplers' --cfg-interval), so the student learns the guided
flow and one sampler step is one network pass (guidance built in, as guided distillation does,
Meng et al. 2023); a student is sampled with guidance scale 1.
Times are flow times in [0, 1]; networks get FLOW_TIME_SCALE * t, as every flow model here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.objectives import FLOW_TIME_SCALE, flow_interpolate, mean_flat
from ldm.diffusion.samplers import cfg_denoiser, check_guidance_interval
from ldm.diffusion.schedules import expand_to

# velocity(x (N, C, ...), t (N,) flow times, y (N,) labels) -> (N, C, ...)
Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class DistillConfig:
    """What `ldm train distill` teaches its student."""

    guidance_scale: float = 2.0  # classifier-free guidance of the teacher's velocity, built into the student (1: none)
    finest_steps: int = 8  # the finest sampler grid taught; a power of 2. Intervals 1, 1/2, ... 1/finest_steps
    anchor_share: float = 0.25  # share of each batch with r = t (the teacher's velocity itself)
    # Guide the teacher only at network timesteps (1000 t) in [lo, hi], its conditional velocity elsewhere
    # (Kynkaanniemi et al. 2024; `--cfg-interval` of the samplers). None: guide at every time.
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.guidance_interval = check_guidance_interval(self.guidance_interval)
        if not self.guidance_scale >= 1.0:
            raise ValueError(f"distill.guidance_scale must be >= 1 (1: no guidance), got {self.guidance_scale}")
        steps = self.finest_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or steps & (steps - 1):
            raise ValueError(f"distill.finest_steps must be a power of 2 (1, 2, 4, 8, ...), got {steps!r}")
        if not 0.0 <= self.anchor_share < 1.0:
            raise ValueError(f"distill.anchor_share must lie in [0, 1), got {self.anchor_share}")

    @property
    def interval_levels(self) -> list[float]:
        """The interval lengths taught, longest first: 1, 1/2, ..., 1/finest_steps."""
        return [1.0 / 2**k for k in range(self.finest_steps.bit_length())]


def guided_velocity(
    model: Callable[..., Tensor], null_class: int, scale: float, interval: tuple[float, float] | None = None
) -> Velocity:
    """Return the velocity field v(x, t, y) of a flow network with classifier-free guidance at `scale` (inside
    `interval`, network timesteps, when given): the samplers' `cfg_denoiser` (both halves in one batched call;
    scale 1 one plain call), for any labels and flow times."""

    def velocity(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return cfg_denoiser(model, y, null_class, scale, interval)(x, t * FLOW_TIME_SCALE).to(x.dtype)

    return velocity


def sample_intervals(
    n: int, config: DistillConfig, generator: torch.Generator | None = None, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Return (t, r) (N,) flow times with r <= t: a share `anchor_share` has r = t, t uniform in (0, 1]; the
    rest take a level d uniformly from `interval_levels` and an interval [t - d, t] of that sampler grid."""
    draw_on = generator.device if generator is not None else device
    levels = torch.tensor(config.interval_levels, device=draw_on)
    d = levels[torch.randint(len(levels), (n,), generator=generator, device=draw_on)]
    # The grid of level d has 1 / d intervals; pick one: t = d * j, j in 1..1/d.
    j = torch.floor(torch.rand(n, generator=generator, device=draw_on) / d) + 1
    t = d * j
    anchor = torch.rand(n, generator=generator, device=draw_on) < config.anchor_share
    t_anchor = 1.0 - torch.rand(n, generator=generator, device=draw_on)  # (0, 1]
    t, r = torch.where(anchor, t_anchor, t), torch.where(anchor, t_anchor, t - d)
    return t.to(device), r.to(device)


@torch.no_grad()
def distillation_target(
    student: Callable[..., Tensor], teacher: Velocity, x_t: Tensor, y: Tensor, t: Tensor, r: Tensor, finest: float
) -> Tensor:
    """Return the student's regression target (N, C, ...) at (x_t, r, t), flow times; see the module docstring.

    `student(x, t, y, r=r)` takes network units; `teacher(x, t, y)` is a (guided) velocity field in flow time.
    Intervals up to `finest` (1e-6 relative slack) are the teacher's Heun step; longer ones the student's
    two half steps. Each group is evaluated only on its own samples.
    """
    target = torch.empty_like(x_t)
    gap = t - r
    anchor = gap == 0
    heun = ~anchor & (gap <= finest * (1 + 1e-6))
    halves = ~anchor & ~heun
    if anchor.any():
        target[anchor] = teacher(x_t[anchor], t[anchor], y[anchor])
    if heun.any():
        x, t_, r_, y_ = x_t[heun], t[heun], r[heun], y[heun]
        v_start = teacher(x, t_, y_)
        v_end = teacher(x - expand_to(t_ - r_, x) * v_start, r_, y_)
        target[heun] = (v_start + v_end) / 2
    if halves.any():
        x, t_, r_, y_ = x_t[halves], t[halves], r[halves], y[halves]
        s = (t_ + r_) / 2

        def u(x_: Tensor, r__: Tensor, t__: Tensor) -> Tensor:
            return student(x_, t__ * FLOW_TIME_SCALE, y_, r=r__ * FLOW_TIME_SCALE).to(x_.dtype)

        u_first = u(x, s, t_)
        u_second = u(x - expand_to(t_ - s, x) * u_first, r_, s)
        target[halves] = (u_first + u_second) / 2
    return target


def distillation_losses(
    student: Callable[..., Tensor],
    bootstrap: Callable[..., Tensor],
    teacher: Velocity,
    x0: Tensor,
    y: Tensor,
    config: DistillConfig,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Return per-sample losses (N,) of one distillation batch: dict(loss, mse, t).

    x0 (N, C, ...) are data latents; x_t lies on the straight path to fresh noise, as the teacher was
    trained. `student` is the network trained (with autograd), `bootstrap` the same weights called for
    the half-step targets (without autograd: e.g. the module itself rather than a compiled wrapper).
    """
    draw_on = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=draw_on, dtype=x0.dtype).to(x0.device)
    t, r = sample_intervals(x0.shape[0], config, generator, x0.device)
    x_t = flow_interpolate(x0, noise, t)
    target = distillation_target(bootstrap, teacher, x_t, y, t, r, config.interval_levels[-1])
    u = student(x_t, t * FLOW_TIME_SCALE, y, r=r * FLOW_TIME_SCALE).to(x0.dtype)
    mse = mean_flat((u - target) ** 2)
    return {"loss": mse, "mse": mse, "t": t}
