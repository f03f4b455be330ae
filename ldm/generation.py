"""Latents from a trained DiT: guidance, sampler and seeds composed in one place (stage previews and the pipeline)."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch

from ldm.diffusion.samplers import (FLOW_SAMPLERS, Denoiser, InpaintDenoiser, cfg_denoiser, check_guidance_interval,
                                    per_sample_generators, randn_like_per_sample, run_sampler)
from ldm.diffusion.schedules import DiffusionConfig, make_schedule
from ldm.models.dit import DiT

X0_SAMPLERS = ("ddim", "dpm++2m", "dpm++2m-sde", "euler", "heun")  # samplers that step on the x0 estimate (inpainting needs one)


def default_sampler(diffusion: DiffusionConfig) -> str:
    """DPM-Solver++ 2M for the discrete chain, Euler for rectified flow."""
    return "flow-euler" if diffusion.objective == "flow" else "dpm++2m"


def check_sampling_options(
    num_steps: int,
    guidance_scale: float = 1.0,
    guide_scale: float = 1.0,
    strength: float = 1.0,
    guidance_interval: Optional[Sequence[float]] = None,
) -> Optional[tuple[float, float]]:
    """Return the guidance interval as (t_lo, t_hi) floats or None; raise ValueError naming the first option out of range.

    Every way into sampling (pipeline, `ldm sample`, `ldm eval samples`, training previews) passes
    here through `sample_latents`; the commands call it also before loading any model, to fail early.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps (--steps) must be an integer >= 1, got {num_steps!r}")
    _check_scale("guidance_scale (--cfg)", guidance_scale, "0: unconditional, 1: no guidance")
    _check_scale("guide_scale (--guide-scale)", guide_scale, "1: no autoguidance")
    if not _is_real(strength) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0: the input's reconstruction, 1: a fresh sample), got {strength!r}")
    return check_guidance_interval(guidance_interval)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_scale(name: str, value: float, meaning: str) -> None:
    # A negative scale extrapolates away from the condition: a silent mistake, never a setting.
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 ({meaning}), got {value!r}")


@torch.no_grad()
def sample_latents(
    model: DiT,
    diffusion: DiffusionConfig,
    labels: torch.Tensor,
    num_steps: int = 25,
    sampler: Optional[str] = None,
    guidance_scale: float = 1.0,
    guidance_interval: Optional[tuple[float, float]] = None,
    seed: int = 0,
    x0: Optional[torch.Tensor] = None,
    strength: float = 1.0,
    regenerate: Optional[torch.Tensor] = None,
    on_model_call: Optional[Callable[[], None]] = None,
    guide: Optional[DiT] = None,
    guide_scale: float = 1.0,
    **sampler_kwargs,
) -> torch.Tensor:
    """Return normalised latents (N, C, h, w) for class `labels` (N,); image i depends only on seed + i.

    x0 (N, C, h, w) with strength < 1: start from x0 noised part of the way (SDEdit). x0 with
    `regenerate` (N, 1, h, w): keep x0 where regenerate is 0 and sample the rest (inpainting).
    `on_model_call` is called after every sampler evaluation (progress bars). `guide`, `guide_scale`: a
    weaker DiT of the same latents and parametrisation, for autoguidance (see `cfg_denoiser`); the
    caller checks that it fits.
    """
    guidance_interval = check_sampling_options(num_steps, guidance_scale, guide_scale, strength, guidance_interval)
    config = model.config
    device = next(model.parameters()).device
    sampler = sampler or default_sampler(diffusion)
    if (sampler in FLOW_SAMPLERS) != (diffusion.objective == "flow"):
        raise ValueError(f"sampler {sampler!r} does not fit the {diffusion.objective!r} objective")
    labels = labels.to(device)
    model_fn = cfg_denoiser(model, labels, model.null_class, guidance_scale, guidance_interval, config.learn_sigma,
                            guide, guide_scale)
    if on_model_call is not None:
        guided = model_fn

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = guided(x, t)
            on_model_call()
            return out

    denoiser = Denoiser.from_config(model_fn, diffusion)
    if regenerate is not None:
        if sampler not in X0_SAMPLERS:
            raise ValueError(f"inpainting needs a sampler that steps on the x0 estimate, one of {X0_SAMPLERS}; got {sampler!r}")
        if x0 is None:
            raise ValueError("inpainting needs the known latents x0")
        denoiser = InpaintDenoiser(denoiser.model_fn, denoiser.prediction, denoiser.learn_sigma, denoiser.clip_x0,
                                   known=x0.to(device), regenerate=regenerate.to(device))
    schedule = None if diffusion.objective == "flow" else make_schedule(diffusion.schedule, diffusion.num_timesteps)
    shape = (len(labels), config.in_channels, config.input_size, config.input_size)
    generators = per_sample_generators(seed, len(labels))
    noise = randn_like_per_sample(shape, generators, device, torch.float32)
    x0 = None if x0 is None else x0.to(device, torch.float32)
    return run_sampler(sampler, denoiser, noise, schedule, num_steps, generators=generators, strength=strength, x0=x0, **sampler_kwargs)


def model_calls(sampler: str, num_steps: int, strength: float = 1.0) -> int:
    """Network forwards one sampling run makes (heun and flow-heun evaluate twice per step but the last)."""
    kept = num_steps if strength >= 1.0 else min(num_steps, int(num_steps * strength + 0.5))
    return 2 * kept - 1 if sampler in ("heun", "flow-heun") and kept else kept
