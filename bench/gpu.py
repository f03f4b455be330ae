"""DiT training throughput on one GPU, ours against diffusers' DiTTransformer2DModel, as a table for docs/results.md.

The default is the paper's setting: DiT-XL/2 on 32x32x4 latents (256 px ImageNet through an f8
autoencoder, 1000 classes, learned sigma), 32 images per GPU (DiT's global batch 256 on 8 GPUs).
A training step is forward + MSE loss + backward + AdamW, timed for both models call by call in
alternating order (the helpers of bench/dit.py), after checking that diffusers' model with our
weights computes the same function. Precisions:

  tf32   fp32 weights and activations, matmuls on TF32 tensor cores (set_float32_matmul_precision("high"))
  fp32   the same with IEEE fp32 matmuls ("highest", PyTorch's default; what trainer.precision=32-true runs)
  bf16   fp32 weights under bf16 autocast (what trainer.precision=bf16-mixed runs)

MFU is the model's matmul FLOPs (`dit_forward_flops`, training = 3x forward, the same count for both
models) per second over a matmul peak measured in the same run at the same precision, so it says how
close each model gets to what this GPU's GEMMs reach, not to the datasheet. "step memory" is the peak
allocated during one training step above what was allocated before it (activations, gradients and
temporaries; parameters and AdamW state, 16 bytes per parameter, are resident on top of it).

    python bench/gpu.py                                   # DiT-XL/2, batch 32, tf32 and bf16
    python bench/gpu.py --batch 64 --compile              # torch.compile both models
    python bench/gpu.py --device cpu --preset DiT-S/2 --batch 2 --repeats 1 --warmup 1   # dry run on a CPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from contextlib import nullcontext

import torch

from bench.dit import (
    build_diffusers_dit,
    check_same_function,
    interleaved_timings,
    make_steps,
    matmul_peak_flops,
    random_batch,
    randomize_,
)
from ldm.models.dit import DIT_PRESETS, DiT, dit_config, dit_forward_flops
from ldm.runtime import synchronize

PRECISIONS = {  # name: (matmul precision for float32, autocast dtype or None)
    "tf32": ("high", None),
    "fp32": ("highest", None),
    "bf16": ("highest", torch.bfloat16),
}
NO_CUDA = (
    "bench/gpu.py measures a CUDA GPU, but torch {version} sees none (torch.cuda.is_available() is False{why}).\n"
    "Run it on a machine with an NVIDIA GPU: python bench/gpu.py\n"
    "To check the script itself here: "
    "python bench/gpu.py --device cpu --preset DiT-S/2 --batch 2 --repeats 1 --warmup 1"
)


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'' if threads == 1 else 's'})"


def step_memory_gib(step, device: torch.device) -> float | None:
    """GiB allocated at the peak of one call of `step` above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-XL/2", choices=sorted(DIT_PRESETS))
    parser.add_argument("--batch", type=int, default=32, help="images per training step (per GPU)")
    parser.add_argument("--repeats", type=int, default=10, help="timed training steps per model and precision")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (compilation, allocator)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the script")
    parser.add_argument(
        "--precisions", default="auto", help="comma list of tf32, fp32, bf16; auto: tf32,bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--optimizer",
        default="default",
        choices=("default", "foreach", "fused"),
        help="AdamW implementation for both models (default: torch's choice, as the training stage)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both models before timing")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        why = ", and this torch build has no CUDA" if torch.version.cuda is None else ""
        raise SystemExit(NO_CUDA.format(version=torch.__version__, why=why))
    try:
        import diffusers
    except ImportError:
        raise SystemExit("bench/gpu.py compares against diffusers: pip install -e '.[bench]'") from None

    device = torch.device(args.device)
    if args.precisions == "auto":
        precisions = ["tf32", "bf16"] if device.type == "cuda" else ["fp32"]
    else:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise SystemExit(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")

    config = dit_config(args.preset)
    flops_per_step = 3 * dit_forward_flops(config) * args.batch
    name = device_name(device)
    print(f"{name}; torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}")
    print(
        f"{args.preset}: depth {config.depth}, hidden {config.hidden_size}, heads {config.num_heads}, "
        f"latents {config.in_channels}x{config.input_size}x{config.input_size} ({config.num_patches} tokens), "
        f"{config.num_classes} classes, {config.out_channels} output channels; batch {args.batch}; "
        f"{3 * dit_forward_flops(config) / 1e9:.1f} GFLOP per training image"
    )

    torch.set_float32_matmul_precision("highest")  # the equivalence check compares exact fp32 results
    difference = check_same_function(config, device)
    print(f"same function: diffusers' DiT with our weights (2 blocks) differs by {difference:.1e} of the output's max")
    if difference > 1e-4:
        raise SystemExit("the two models do not compute the same function; the comparison would be meaningless")

    n = args.batch
    batch = random_batch(config, n, device)
    models = {
        "ours": randomize_(DiT(config).to(device)).train(),
        "diffusers": randomize_(build_diffusers_dit(config).to(device)).train(),
    }
    runnable = {key: torch.compile(m) if args.compile else m for key, m in models.items()}

    rows = []
    for precision in precisions:
        matmul_precision, autocast_dtype = PRECISIONS[precision]
        torch.set_float32_matmul_precision(matmul_precision)

        def autocast(dtype=autocast_dtype):
            return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

        peak = matmul_peak_flops(autocast_dtype or torch.float32, device)
        steps = {
            key: make_steps(m, key == "ours", batch, autocast, True, args.optimizer) for key, m in runnable.items()
        }
        times = interleaved_timings(steps, args.warmup, args.repeats, device)
        memory = {key: step_memory_gib(step, device) for key, step in steps.items()}
        rows.append((precision, times, memory, peak))
        del steps  # this precision's AdamW state, before the next precision allocates its own
        if device.type == "cuda":
            torch.cuda.empty_cache()

    labels = {"tf32": "TF32", "fp32": "fp32", "bf16": "bf16 autocast"}

    def gib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} GiB"

    print(
        f"\nmedian of {args.repeats} interleaved training steps per model after {args.warmup} warm-up steps"
        f"{', both models torch.compile-d' if args.compile else ''}; speedup = diffusers' time / ours, "
        f"median over rounds; MFU against the measured matmul peak\n"
    )
    print(
        "| device | precision | batch | ours img/s | diffusers img/s | speedup | ours MFU | diffusers MFU "
        "| matmul peak | step memory ours / diffusers |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for precision, times, memory, peak in rows:
        ours, theirs = statistics.median(times["ours"]), statistics.median(times["diffusers"])
        speedup = statistics.median(d / o for o, d in zip(times["ours"], times["diffusers"]))
        print(
            f"| {name} | {labels[precision]} | {n} | {n / ours:,.1f} | {n / theirs:,.1f} | {speedup:.2f}x "
            f"| {flops_per_step / ours / peak:.1%} | {flops_per_step / theirs / peak:.1%} "
            f"| {peak / 1e12:.1f} TFLOP/s | {gib(memory['ours'])} / {gib(memory['diffusers'])} |"
        )
    print(f"\ncommand: python bench/gpu.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
