"""Throughput of our DiT against diffusers' DiTTransformer2DModel at an identical configuration.

Both models get the same depth, width, heads, patch size, latent size, in/out channels
(learn_sigma -> 2C outputs), LayerNorm eps and number of classes; before timing, the run loads
our weights into diffusers' model and checks that both compute the same function. It then
measures, interleaved call by call so that a shared machine's load hits both alike:

  forward   images/s of a no-grad forward in eval mode (what a sampler runs),
  train     images/s of forward + MSE loss + backward + AdamW step (train mode),

in float32 and under bf16 autocast (where the hardware has bf16 matmuls, or when asked), and
reports median images/s, the paired speedup (diffusers' time / ours, round by round), and the
model FLOP utilisation (MFU) against the best of two matmul peaks measured in the same run, before
and after the timings. Model FLOPs are the analytic matmul count of `dit_forward_flops`
(training = 3x forward), the same number for both models; diffusers' extra per-block
conditioning embedders are not credited to it.

    python bench/dit.py                                   # DiT-F/2 on 8x8x4 latents, CPU
    python bench/dit.py --preset DiT-S/2 --input-size 8 --batch 32
    python bench/dit.py --preset DiT-XL/2 --device cuda --batch 32
    python bench/dit.py --profile                         # also print the top operators
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F

from ldm.models.dit import (
    DIT_PRESETS,
    TIMESTEP_FREQUENCY_DIM,
    DiT,
    DiTConfig,
    dit_config,
    dit_forward_flops,
    timestep_embedding,
)
from ldm.runtime import synchronize, tune_cpu_allocator


def build_diffusers_dit(config: DiTConfig) -> torch.nn.Module:
    """Return diffusers' DiTTransformer2DModel with the architecture of `config`."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        sample_size=config.input_size,
        patch_size=config.patch_size,
        num_embeds_ada_norm=config.num_classes,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_zero",
        norm_eps=1e-6,  # DiT's LayerNorm eps (diffusers' default is 1e-5 for the MLP's norm)
    )


class OurTimestepFeatures(torch.nn.Module):
    """Stands in for diffusers' Timesteps, whose frequencies are max_period^(-i / (dim/2 - 1))."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, TIMESTEP_FREQUENCY_DIM)


@torch.no_grad()
def copy_weights_to_diffusers(ours: DiT, theirs: torch.nn.Module) -> None:
    """Load our weights into diffusers' DiT (its per-block embedders all get our one embedder)."""
    d = ours.config.hidden_size
    theirs.pos_embed.proj.load_state_dict(ours.x_embedder.proj.state_dict())
    for block, their_block in zip(ours.blocks, theirs.transformer_blocks):
        embed = their_block.norm1.emb
        embed.time_proj = OurTimestepFeatures()
        embed.timestep_embedder.linear_1.load_state_dict(ours.t_embedder.mlp[0].state_dict())
        embed.timestep_embedder.linear_2.load_state_dict(ours.t_embedder.mlp[2].state_dict())
        embed.class_embedder.embedding_table.load_state_dict(ours.y_embedder.embedding_table.state_dict())
        their_block.norm1.linear.load_state_dict(block.adaLN_modulation.state_dict())
        attn = their_block.attn1
        for i, projection in enumerate((attn.to_q, attn.to_k, attn.to_v)):
            projection.weight.copy_(block.attn.qkv.weight[i * d : (i + 1) * d])
            projection.bias.copy_(block.attn.qkv.bias[i * d : (i + 1) * d])
        attn.to_out[0].load_state_dict(block.attn.proj.state_dict())
        their_block.ff.net[0].proj.load_state_dict(block.mlp.fc1.state_dict())
        their_block.ff.net[2].load_state_dict(block.mlp.fc2.state_dict())
    theirs.proj_out_1.load_state_dict(ours.final_layer.adaLN_modulation.state_dict())
    theirs.proj_out_2.load_state_dict(ours.final_layer.linear.state_dict())


def check_same_function(config: DiTConfig, device: torch.device) -> float:
    """Relative max difference of the two models' outputs with shared weights (2 blocks, fp32, eval)."""
    config = replace(config, depth=min(config.depth, 2))
    torch.manual_seed(1)
    ours = DiT(config).to(device).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    theirs = build_diffusers_dit(config).to(device).eval()
    copy_weights_to_diffusers(ours, theirs)
    x = torch.randn(4, config.in_channels, config.input_size, config.input_size, device=device)
    t = torch.tensor([0, 10, 500, 999], device=device)
    y = torch.tensor([0, 1, config.num_classes - 1, config.null_class], device=device)
    with torch.no_grad():
        a = ours(x, t, y)
        b = theirs(x, timestep=t, class_labels=y, return_dict=False)[0]
    return ((a - b).abs().max() / a.abs().max()).item()


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """N(0, 0.02) weights: a fresh adaLN-Zero DiT outputs zeros, and both models should do nontrivial work."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def random_batch(config: DiTConfig, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Latents x, timesteps t, labels y and a regression target for n images (seeded: the same every run)."""
    torch.manual_seed(0)
    return {
        "x": torch.randn(n, config.in_channels, config.input_size, config.input_size, device=device),
        "t": torch.randint(0, 1000, (n,), device=device),
        "y": torch.randint(0, config.num_classes, (n,), device=device),
        "target": torch.randn(n, config.out_channels, config.input_size, config.input_size, device=device),
    }


def time_call(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds taken by one call of fn, including outstanding device work."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Best FLOP/s of a large square matmul over `repeats` calls: the practical peak for the MFU.

    The size doubles from 256 until one product takes 0.2 s (or reaches 4096 on CPU, 16384 on
    GPU), so a fast device is measured at a size that saturates it and a slow path (bf16 on a
    CPU without bf16 instructions) does not take minutes.
    """
    n_max = 16384 if device.type == "cuda" else 4096
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.matmul(a, b)  # warm-up
        seconds = time_call(lambda a=a, b=b: torch.matmul(a, b), device)
        if seconds >= 0.2 or n >= n_max:
            break
        n *= 2
    times = [seconds] + [time_call(lambda: torch.matmul(a, b), device) for _ in range(repeats - 1)]
    return 2 * n**3 / min(times)


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 matmuls run on hardware support (else they are emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_steps(
    model: torch.nn.Module, is_ours: bool, batch: dict, autocast, train: bool, optimizer_impl: str = "default"
) -> Callable[[], None]:
    """Return a closure running one forward (no grad) or one full training step of `model`."""
    x, t, y, target = batch["x"], batch["t"], batch["y"], batch["target"]

    def predict() -> torch.Tensor:
        return model(x, t, y) if is_ours else model(x, timestep=t, class_labels=y, return_dict=False)[0]

    if not train:

        def forward() -> None:
            with torch.no_grad(), autocast():
                predict()

        return forward

    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[optimizer_impl]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **impl)

    def train_step() -> None:
        with autocast():
            loss = F.mse_loss(predict().float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def interleaved_timings(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each step, calling them one after another, in alternating order, round by round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(time_call(steps[name], device))
    return times


def profile_train_step(label: str, step: Callable[[], None], device: torch.device, rows: int) -> None:
    """Print the operators that take the most time in three training steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- {label}: three training steps, top operators by self time ---")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-F/2", choices=sorted(DIT_PRESETS))
    parser.add_argument("--input-size", type=int, default=None, help="latent side (default: the preset's)")
    parser.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per model and measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--precisions",
        default="auto",
        help="comma list of fp32, bf16 (autocast); auto: fp32, plus bf16 where the hardware has it",
    )
    parser.add_argument(
        "--optimizer",
        default="default",
        choices=("default", "foreach", "fused"),
        help="AdamW implementation for both models (default: torch's choice for the device)",
    )
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of a training step")
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
    overrides = {k: v for k, v in (("input_size", args.input_size), ("depth", args.depth)) if v is not None}
    config = dit_config(args.preset, **overrides)
    flops_forward = dit_forward_flops(config)

    n = args.batch
    batch = random_batch(config, n, device)
    models = {
        "ours": randomize_(DiT(config).to(device)),
        "diffusers": randomize_(build_diffusers_dit(config).to(device)),
    }

    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"CPU allocator {allocator}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{args.preset}: depth {config.depth}, hidden {config.hidden_size}, heads {config.num_heads}, "
        f"patch {config.patch_size}, latent {config.in_channels}x{config.input_size}x{config.input_size}, "
        f"tokens {config.num_patches}, out channels {config.out_channels}, classes {config.num_classes}, batch {n}"
    )
    print(f"training step: forward, MSE loss, backward, AdamW ({args.optimizer} implementation)")
    print(
        f"parameters: ours {count(models['ours']):,}, diffusers {count(models['diffusers']):,} "
        "(diffusers gives every block its own timestep/class embedder)"
    )
    print(f"model FLOPs per image: forward {flops_forward / 1e9:.3f} G, training step {3 * flops_forward / 1e9:.3f} G")
    difference = check_same_function(config, device)
    print(
        f"same function: with our weights loaded into diffusers' DiT (2 blocks), outputs differ by "
        f"{difference:.1e} of their max"
    )
    if difference > 1e-4:
        raise SystemExit("the two models do not compute the same function; the comparison would be meaningless")

    if args.precisions == "auto":
        precisions = ["fp32", "bf16"] if bf16_is_native(device) else ["fp32"]
        if "bf16" not in precisions:
            print(
                "bf16 skipped: this CPU has no bf16 matmul instructions, so autocast would only emulate it "
                "(ask for it with --precisions fp32,bf16)"
            )
    else:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]

    rows = []
    for precision in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]

        def autocast(dtype=dtype):
            return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

        # The peak is measured before and after the timings and the higher one kept: on a shared
        # machine a single measurement taken in a slow moment would inflate every MFU.
        peak_before = matmul_peak_flops(dtype, device)
        first_row = len(rows)
        for train in (False, True):
            for model in models.values():
                model.train(train)
            steps = {
                name: make_steps(m, name == "ours", batch, autocast, train, args.optimizer)
                for name, m in models.items()
            }
            times = interleaved_timings(steps, args.warmup, args.repeats, device)
            rows.append((precision, "train" if train else "forward", times))
            if args.profile and train:
                for name, step in steps.items():
                    profile_train_step(f"{name} {precision}", step, device, rows=25)
        peak_after = matmul_peak_flops(dtype, device)
        print(
            f"{precision} matmul peak: {peak_before / 1e9:.1f} GFLOP/s before the timings, {peak_after / 1e9:.1f} after"
        )
        rows[first_row:] = [(*row, max(peak_before, peak_after)) for row in rows[first_row:]]

    print(
        f"\nmedians of {args.repeats} interleaved calls per model after {args.warmup} warm-up calls; "
        f"load average now {os.getloadavg()[0]:.1f}"
    )
    print(
        "speedup: median over rounds of diffusers' time / ours in the same round (paired, so load "
        "changes between rounds cancel); range: its 25-75th percentiles"
    )
    header = (
        f"{'precision':<9} {'pass':<8} {'ours img/s':>11} {'diffusers img/s':>16} {'speedup':>8} "
        f"{'range':>12} {'ours MFU':>9} {'diffusers MFU':>14} {'matmul peak':>13}"
    )
    print(header)
    print("-" * len(header))
    for precision, pass_name, times, peak in rows:
        flops = (3 if pass_name == "train" else 1) * flops_forward * n
        ours, theirs = statistics.median(times["ours"]), statistics.median(times["diffusers"])
        ratios = sorted(d / o for o, d in zip(times["ours"], times["diffusers"]))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(
            f"{precision:<9} {pass_name:<8} {n / ours:>11.1f} {n / theirs:>16.1f} {quartiles[1]:>7.2f}x "
            f"{quartiles[0]:>5.2f}-{quartiles[2]:.2f}x {flops / ours / peak:>9.1%} {flops / theirs / peak:>14.1%} "
            f"{peak / 1e9:>8.1f} GF/s"
        )


if __name__ == "__main__":
    main()
