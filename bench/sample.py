"""Latent sampling speed: our DiT + DPM-Solver++(2M) against diffusers' DiT + DPMSolverMultistepScheduler.

Both sides sample the same number of class-conditional latents with classifier-free guidance
(conditional and unconditional halves in one batched forward, as DiT and diffusers' DiTPipeline
do), the same number of steps on the same "trailing" timestep grid, with the same weights: the
run first loads our weights into diffusers' `DiTTransformer2DModel`, samples a few latents from
the same noise with both loops and reports how far apart they land (the two solvers are the same
algorithm, so they should agree to float32 rounding). The reference loop steps the scheduler on
the N guided latents only (leaner than DiTPipeline, which steps all 2N), so the ratio is not
inflated by that. Decoding is not included: both systems would run the same autoencoder.

Calls alternate batch by batch so that a shared machine's load hits both alike.

    python bench/sample.py                                # DiT-F/2, 8x8x4 latents, 1000 images, 20 steps
    python bench/sample.py --preset DiT-XL/2 --input-size 32 --classes 1000 --n 256 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch

from bench.dit import (
    build_diffusers_dit,
    copy_weights_to_diffusers,
    randomize_,
)
from ldm.diffusion.schedules import DiffusionConfig
from ldm.generation import SamplingSettings, sample_latents
from ldm.models.dit import DIT_PRESETS, DiT, dit_config
from ldm.runtime import synchronize, tune_cpu_allocator


def diffusers_scheduler(num_timesteps: int):
    """DPM-Solver++(2M) in diffusers with DiT's linear betas and the settings our sampler uses."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=num_timesteps,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        lower_order_final=True,
    )


@torch.no_grad()
def diffusers_sample(
    model,
    scheduler,
    noise: torch.Tensor,
    labels: torch.Tensor,
    null_class: int,
    steps: int,
    guidance: float,
    channels: int,
) -> torch.Tensor:
    """The DiTPipeline denoising loop (batched CFG on the eps channels), stepping only the N guided latents."""
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    class_input = torch.cat([labels, torch.full_like(labels, null_class)])
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        timesteps = t.expand(model_input.shape[0]).to(model_input.device)
        out = model(model_input, timestep=timesteps, class_labels=class_input, return_dict=False)[0]
        cond, uncond = out[:, :channels].chunk(2)
        eps = uncond + guidance * (cond - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-F/2", choices=sorted(DIT_PRESETS))
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--classes", type=int, default=None, help="number of classes (default: the preset's)")
    parser.add_argument("--n", type=int, default=1000, help="latents per side")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc at its defaults instead of tune_cpu_allocator() (as the ldm CLI runs)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "defaults" if args.default_allocator or not tune_cpu_allocator() else "tuned (ldm.runtime)"
    device = torch.device(args.device)
    overrides = {k: v for k, v in (("input_size", args.input_size), ("num_classes", args.classes)) if v is not None}
    config = replace(dit_config(args.preset, **overrides), learn_sigma=False)
    diffusion = DiffusionConfig(
        objective="ddpm", schedule="linear", num_timesteps=1000, prediction="eps", learn_sigma=False
    )

    torch.manual_seed(0)
    ours = randomize_(DiT(config).to(device)).eval()  # a fresh DiT predicts zero noise (adaLN-Zero)
    theirs = build_diffusers_dit(config).to(device).eval()
    copy_weights_to_diffusers(ours, theirs)
    scheduler = diffusers_scheduler(diffusion.num_timesteps)
    shape = (config.in_channels, config.input_size, config.input_size)

    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, CPU allocator {allocator}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{args.preset}: depth {config.depth}, hidden {config.hidden_size}, heads {config.num_heads}, latents "
        f"{'x'.join(map(str, shape))}, {config.num_classes} classes; {args.n} latents per side in batches of "
        f"{args.batch}, DPM-Solver++(2M) {args.steps} steps (trailing), cfg {args.cfg}"
    )

    # Same weights, same noise: how far apart do the two loops land?
    labels = torch.arange(8, device=device) % config.num_classes
    settings = SamplingSettings(sampler="dpm++2m", num_steps=args.steps, guidance_scale=args.cfg)
    mine = sample_latents(ours, diffusion, labels, settings)
    from ldm.diffusion.samplers import per_sample_generators, randn_like_per_sample

    noise = randn_like_per_sample((8, *shape), per_sample_generators(0, 8), device, torch.float32)
    reference = diffusers_sample(
        theirs, scheduler, noise, labels, ours.null_class, args.steps, args.cfg, config.in_channels
    )
    gap = ((mine - reference).abs().max() / reference.abs().max()).item()
    print(f"agreement: same weights and noise, final latents differ by {gap:.1e} of their max")
    if gap > 1e-3:
        raise SystemExit("the two samplers disagree; the timing comparison would be meaningless")

    batches = [(start, min(args.batch, args.n - start)) for start in range(0, args.n, args.batch)]
    times = {"ours": [], "diffusers": []}

    def run_ours(start: int, size: int) -> None:
        sample_latents(
            ours,
            diffusion,
            torch.arange(start, start + size, device=device) % config.num_classes,
            replace(settings, seed=start),
        )

    def run_theirs(start: int, size: int) -> None:
        batch_labels = torch.arange(start, start + size, device=device) % config.num_classes
        batch_noise = randn_like_per_sample((size, *shape), per_sample_generators(start, size), device, torch.float32)
        diffusers_sample(
            theirs, scheduler, batch_noise, batch_labels, ours.null_class, args.steps, args.cfg, config.in_channels
        )

    run_ours(0, min(args.batch, args.n))  # warm-up
    run_theirs(0, min(args.batch, args.n))
    for index, (start, size) in enumerate(batches):
        order = [("ours", run_ours), ("diffusers", run_theirs)]
        for name, fn in order if index % 2 == 0 else order[::-1]:
            synchronize(device)
            began = time.perf_counter()
            fn(start, size)
            synchronize(device)
            times[name].append(time.perf_counter() - began)
    ours_s, theirs_s = sum(times["ours"]), sum(times["diffusers"])
    ratios = [d / o for o, d in zip(times["ours"], times["diffusers"])]
    print(f"\n{'':<10} {'seconds':>9} {'ms/latent':>10} {'latents/s':>10}")
    for name, total in (("ours", ours_s), ("diffusers", theirs_s)):
        print(f"{name:<10} {total:>9.2f} {1000 * total / args.n:>10.2f} {args.n / total:>10.1f}")
    print(
        f"speedup (diffusers' time / ours): {theirs_s / ours_s:.2f}x overall; per batch median "
        f"{statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x; "
        f"load average now {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
