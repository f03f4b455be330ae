"""Throughput of our AutoencoderKL against diffusers' AutoencoderKL at identical architecture.

Both models are built from one `AutoencoderConfig` preset (same channels, blocks per level,
latent channels, group count and middle attention); diffusers' weights are loaded into ours, and
the two must agree on the output before anything is timed, which proves the networks are the same
function, not only the same size. Then, interleaving the two models so that load from other
processes on the machine hits both alike, it times

  forward: encode + decode (posterior mean) under inference_mode,           images/s
  train:   encode, sample, decode, L1 loss, backward, AdamW step,           images/s

and prints the median throughput of each over --repeats runs and the median of the per-repeat
ratios ours / diffusers (by wall clock and by process CPU time). The networks compute the same
function; ours differs only in how: a fused q/k/v projection, in-place residual adds, no
divisions by an output scale of 1, and the upsampling conv folded into a transposed conv.

Run from the repository root:

    python -m bench.autoencoder --preset fmnist-f4 --batch 64 --repeats 9 --threads 2
    python -m bench.autoencoder --preset fmnist-f4 --batch 64 --repeats 9 --threads 2 --memory-format channels_last
    python -m bench.autoencoder --preset kl-f8 --resolution 64 --batch 2 --repeats 5 --warmup 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ldm.interop.autoencoder import state_dict_from_diffusers
from ldm.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderConfig, AutoencoderKL


def diffusers_autoencoder(config: AutoencoderConfig) -> nn.Module:
    """diffusers' AutoencoderKL with the same architecture as ours for `config`."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    widths = tuple(config.ch * m for m in config.ch_mult)
    if any(w % config.norm_groups for w in widths) or config.dropout > 0:
        # diffusers uses one group count everywhere and has no dropout in its VAE.
        raise ValueError("the comparison needs every width divisible by norm_groups and dropout 0")
    return DiffusersAutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.image_channels_out,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=config.num_res_blocks,  # its decoder adds one per level, as ours does
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        sample_size=config.resolution,
        mid_block_add_attention=config.attn_at_lowest,
    )


def ours_forward(model: AutoencoderKL, x: Tensor) -> Tensor:
    """Encode to the posterior mean and decode."""
    return model.decode(model.encode(x).mode())


def diffusers_forward(model: nn.Module, x: Tensor) -> Tensor:
    """Encode to the posterior mean and decode."""
    return model.decode(model.encode(x).latent_dist.mode()).sample


def ours_train_recon(model: AutoencoderKL, x: Tensor) -> Tensor:
    """Reconstruction through a posterior sample, as in training."""
    return model(x, sample_posterior=True)[0]


def diffusers_train_recon(model: nn.Module, x: Tensor) -> Tensor:
    """Reconstruction through a posterior sample, as in training."""
    return model(x, sample_posterior=True).sample


def make_train_step(model: nn.Module, recon_fn: Callable[[nn.Module, Tensor], Tensor]) -> Callable[[Tensor], None]:
    """One optimisation step: reconstruction, L1 loss, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: Tensor) -> None:
        loss = (recon_fn(model, x) - x).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def num_parameters(model: nn.Module) -> int:
    """Number of scalars in the model's parameters."""
    return sum(p.numel() for p in model.parameters())


def time_call(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds one call of fn takes."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fmnist-f4", choices=sorted(AUTOENCODER_PRESETS))
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the preset's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model and task (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per model and task first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--memory-format",
        default="contiguous",
        choices=["contiguous", "channels_last"],
        help="layout of weights and inputs, the same for both models",
    )
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AUTOENCODER_PRESETS[args.preset]
    resolution = args.resolution or config.resolution
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format

    theirs = diffusers_autoencoder(config)
    ours = AutoencoderKL(config)
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict()))  # strict: same modules
    ours.to(memory_format=memory_format)
    theirs.to(memory_format=memory_format)
    x = torch.rand(args.batch, config.in_channels, resolution, resolution).mul_(2).sub_(1)
    x = x.contiguous(memory_format=memory_format)

    with torch.inference_mode():
        difference = (ours_forward(ours, x[:2]) - diffusers_forward(theirs, x[:2])).abs().max().item()
    if difference > 1e-3:  # float32 rounding is ~1e-5; a wrong layer gives O(1)
        raise RuntimeError(f"ours and diffusers disagree on the same weights: max |diff| = {difference:.2e}")

    print(f"preset {args.preset}: {config}")
    print(f"input {tuple(x.shape)} {args.memory_format}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"parameters: ours {num_parameters(ours):,}  diffusers {num_parameters(theirs):,}")
    print(f"same weights, same output: max |ours - diffusers| = {difference:.1e}")

    def forward_task(model: nn.Module, forward: Callable[[nn.Module, Tensor], Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return forward(model, x)

        return run

    ours_step = make_train_step(ours, ours_train_recon)
    theirs_step = make_train_step(theirs, diffusers_train_recon)
    # Both tasks run in train mode: with dropout 0 and GroupNorm nothing depends on the mode.
    tasks = {
        ("forward", "ours"): forward_task(ours, ours_forward),
        ("forward", "diffusers"): forward_task(theirs, diffusers_forward),
        ("train", "ours"): lambda: ours_step(x),
        ("train", "diffusers"): lambda: theirs_step(x),
    }
    for _ in range(args.warmup):
        for task in tasks.values():
            task()
    seconds: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in tasks}
    for repeat in range(args.repeats):
        # Alternate which model goes first, so neither always runs right after the other.
        models = ("ours", "diffusers") if repeat % 2 == 0 else ("diffusers", "ours")
        for task in ("forward", "train"):
            for model in models:
                seconds[(task, model)].append(time_call(tasks[(task, model)]))

    # On a shared machine the load drifts: each ratio is taken within a repeat, where the two
    # runs were back to back, and the median of those is reported. CPU time is steadier than
    # wall time when other processes take the cores away, but counts spin-waiting threads.
    print(f"\nmedian of {args.repeats} runs after {args.warmup} warm-up, batch {args.batch}")
    print(f"{'task':<10}{'ours img/s':>12}{'diffusers img/s':>17}{'ours/diffusers':>16}{'(CPU time)':>12}")
    for task in ("forward", "train"):
        ours_times, theirs_times = seconds[(task, "ours")], seconds[(task, "diffusers")]
        ours_rate = args.batch / statistics.median(wall for wall, _ in ours_times)
        theirs_rate = args.batch / statistics.median(wall for wall, _ in theirs_times)
        wall_ratio = statistics.median(t[0] / o[0] for o, t in zip(ours_times, theirs_times))
        cpu_ratio = statistics.median(t[1] / o[1] for o, t in zip(ours_times, theirs_times))
        print(f"{task:<10}{ours_rate:>12.2f}{theirs_rate:>17.2f}{wall_ratio:>16.3f}{cpu_ratio:>12.3f}")


if __name__ == "__main__":
    main()
