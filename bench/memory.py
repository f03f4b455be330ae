"""Peak memory of training and sampling, our DiT against diffusers' DiTTransformer2DModel at the same configuration.

For each setting both models run the same work on the same batch:

  train    the first training step of a fresh model: forward, MSE loss, backward, AdamW; so its number holds
           the gradients and AdamW's state (12 bytes a parameter, the same for both models) beside the
           activations; per batch size, with and without gradient checkpointing, in fp32 and under bf16 autocast;
  sample   one no-grad forward in eval mode (a sampler's call; classifier-free guidance doubles the batch)
           per batch size, in fp32 and under bf16 autocast.

The number is the peak memory during that step above what was in use just before it (the weights and the
batch): on a GPU from `torch.cuda.max_memory_allocated`; on a CPU from the process's resident set, read every
0.2 ms by a thread while the step runs, each setting in a fresh process so that memory an earlier setting
freed (and the allocator kept) cannot hide this one's, the median of --repeats processes (one process's
number moves by up to 10 MiB with the allocator's timing). The table prints each model's MiB and
diffusers' / ours (above 1: ours needs less).

    python bench/memory.py                                  # DiT-F/2 on 8x8x4 latents, CPU
    python bench/memory.py --preset DiT-S/2 --input-size 16 --batches 8 32
    python bench/memory.py --device cuda --preset DiT-XL/2 --input-size 32 --batches 8 32
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

MIB = 2**20


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_during(step) -> int:
    """Bytes of the highest resident set seen while step() runs, polled by a thread, above the set before it."""
    before, peak, done = _current_rss_bytes(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss_bytes())
            time.sleep(0.0002)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        step()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], _current_rss_bytes()) - before


def measure(setting: dict) -> float:
    """MiB of the peak during one step of `setting` above the memory in use before it."""
    from bench.dit import build_diffusers_dit, random_batch, randomize_
    from ldm.models.dit import DiT, dit_config

    device = torch.device(setting["device"])
    torch.manual_seed(0)
    config = dit_config(
        setting["preset"],
        input_size=setting["input_size"],
        in_channels=setting["channels"],
        learn_sigma=False,
        grad_checkpointing=setting["checkpointing"],
    )
    ours = setting["model"] == "ours"
    model = randomize_(DiT(config) if ours else build_diffusers_dit(config)).to(device)
    if setting["checkpointing"] and not ours:
        model.enable_gradient_checkpointing()
    batch = random_batch(config, setting["batch"], device)
    x, t, y, target = batch["x"], batch["t"], batch["y"], batch["target"]
    dtype = torch.bfloat16 if setting["precision"] == "bf16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext

    def predict() -> torch.Tensor:
        return model(x, t, y) if ours else model(x, timestep=t, class_labels=y, return_dict=False)[0]

    if setting["mode"] == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            with autocast():
                loss = F.mse_loss(predict().float(), target)
            loss.backward()
            optimizer.step()  # creates AdamW's state: counted, as in any first step

    else:
        model.eval()

        def step() -> None:
            with torch.no_grad(), autocast():
                predict()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    return peak_rss_during(step) / MIB


def in_fresh_process(setting: dict) -> float:
    """`measure(setting)` in a new Python process, whose allocator holds nothing an earlier setting freed."""
    output = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--child", json.dumps(setting)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-F/2")
    parser.add_argument("--input-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="CPU: fresh processes per number, their median")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(json.loads(args.child)))
        return
    base = {"preset": args.preset, "input_size": args.input_size, "channels": args.channels, "device": args.device}
    settings = [
        {**base, "mode": "train", "batch": b, "checkpointing": ckpt, "precision": precision}
        for b in args.batches
        for ckpt in (False, True)
        for precision in ("fp32", "bf16")
    ] + [
        {**base, "mode": "sample", "batch": b, "checkpointing": False, "precision": precision}
        for b in args.batches
        for precision in ("fp32", "bf16")
    ]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    print(
        f"peak memory of one step above the memory in use before it, MiB: {args.preset} on {args.input_size}x"
        f"{args.input_size}x{args.channels} latents, {where}, torch {torch.__version__}"
        + ("" if args.device.startswith("cuda") else f", median of {args.repeats} processes")
    )
    print(
        f"{'mode':<7}{'batch':>6}  {'checkpointing':<14}{'precision':<10}{'ours':>9}{'diffusers':>11}"
        f"{'diffusers/ours':>16}"
    )
    for setting in settings:
        measured = {}
        for model in ("ours", "diffusers"):
            run = {**setting, "model": model}
            if args.device.startswith("cuda"):
                measured[model] = measure(run)
            else:
                measured[model] = statistics.median(in_fresh_process(run) for _ in range(args.repeats))
        ratio = measured["diffusers"] / measured["ours"] if measured["ours"] > 0 else float("inf")
        print(
            f"{setting['mode']:<7}{setting['batch']:>6}  {'on' if setting['checkpointing'] else 'off':<14}"
            f"{setting['precision']:<10}{measured['ours']:>9.1f}{measured['diffusers']:>11.1f}{ratio:>16.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
