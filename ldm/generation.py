"""Latents from a trained DiT: guidance, sampler and seeds composed in one place (stage previews and the pipeline)."""

from __future__ import annotations

from typing import Optional

import torch

from ldm.diffusion.samplers import Denoiser, cfg_denoiser, per_sample_generators, sample
from ldm.diffusion.schedules import DiffusionConfig, make_schedule
from ldm.models.dit import DiT


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
    **sampler_kwargs,
) -> torch.Tensor:
    """Return normalised latents (N, C, h, w) for class `labels` (N,); image i depends only on seed + i.

    The sampler defaults to DPM-Solver++ 2M for the discrete chain and Euler for rectified flow.
    """
    config = model.config
    device = next(model.parameters()).device
    sampler = sampler or ("flow-euler" if diffusion.objective == "flow" else "dpm++2m")
    if (sampler == "flow-euler") != (diffusion.objective == "flow"):
        raise ValueError(f"sampler {sampler!r} does not fit the {diffusion.objective!r} objective")
    labels = labels.to(device)
    model_fn = cfg_denoiser(model, labels, model.null_class, guidance_scale, guidance_interval, config.learn_sigma)
    denoiser = Denoiser.from_config(model_fn, diffusion)
    schedule = None if diffusion.objective == "flow" else make_schedule(diffusion.schedule, diffusion.num_timesteps)
    shape = (len(labels), config.in_channels, config.input_size, config.input_size)
    generators = per_sample_generators(seed, len(labels))
    return sample(sampler, denoiser, shape, schedule, num_steps, generators, device=device, **sampler_kwargs)
