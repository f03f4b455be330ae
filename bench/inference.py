"""Inference settings of one DiT side by side: samplers and network calls, precision, step caching.

For each setting, on the same model, classifier and seeds:
  FD and class accuracy over n class-balanced samples (the project's classifier features, as
  `ldm eval samples`), with the FD ratio to the first setting (the reference, by default the
  many-step flow-heun sampler);
  ms per image, sampling and decoding, measured interleaved: every round times one batch of every
  setting in turn, so a machine whose speed drifts slows all alike; the median of the rounds;
  block evaluations saved by step caching (its schedule calibrated once on other seeds);
  the DiT's weight bytes, and the resident memory of a fresh process once it has loaded the pipeline
  and at its peak while sampling one batch (polled every 2 ms; most of it is the torch runtime).
Writes a table (printed, and CSV / JSON in --out) and a PNG of FD against ms per image, one line per
precision and caching family, one point per setting.

    python bench/inference.py --store artifacts --model diffusion@latest --classifier classifier@latest --n 1000
    python bench/inference.py ... --setting flow-heun:10 --setting flow-heun:10:int8 --setting flow-euler:20:cache0.3
    python bench/inference.py ... --student diffusion@<distilled> --setting flow-heun:10 --setting student:meanflow:1
    python bench/inference.py ... --pruned diffusion@<pruned> --pruned-student diffusion@<its student> \
        --setting pruned:flow-heun:10 --setting pruned-student:meanflow:2:int8

A setting is [MODEL:]SAMPLER:STEPS[:int8|bf16][:cacheF[:forecast]][:intervalLO-HI] (F: the share of block
evaluations to skip; forecast: skipped blocks add a linear forecast of their residual instead of the last one;
interval: --cfg only at network timesteps LO-HI, as `--cfg-interval LO HI`). MODEL picks another model than
--model: "student:" the --student model (`ldm train distill`), sampled with its built-in guidance;
"pruned:" the --pruned model (`ldm train prune`) at --cfg; "pruned-student:" the --pruned-student model, a
student of the pruned one, with its built-in guidance.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import multiprocessing
import os
import statistics
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ldm.artifacts import ArtifactStore, write_atomic
from ldm.evaluation import measure_samples, sample_reference
from ldm.generation import model_calls
from ldm.images import CurvePanel, save_curve_panels
from ldm.quantize import weight_bytes
from ldm.runtime import tune_cpu_allocator
from pipeline import LatentDiffusionPipeline

DEFAULT_SETTINGS = (
    "flow-heun:10",
    "flow-heun:5",
    "flow-euler:20",
    "flow-heun:10:int8",
    "flow-heun:5:int8",
    "flow-heun:10:bf16",
    "flow-heun:10:cache0.3",
    "flow-euler:20:cache0.3",
    "flow-heun:10:int8:cache0.3",
)


# A setting's MODEL prefix: the option naming the model it samples, and what that model is.
MODELS = {
    "student": "a distilled model",
    "pruned": "a pruned model",
    "pruned-student": "a student distilled from the pruned model",
}
STUDENTS = ("student", "pruned-student")  # guidance built in: sampled at cfg 1


@dataclass(frozen=True)
class Setting:
    spec: str
    sampler: str
    steps: int
    precision: str = "float32"
    cache: float = 0.0  # share of block evaluations to skip (0: no caching)
    forecast: bool = False  # skipped blocks forecast their residual linearly in t (ldm.caching)
    source: str = ""  # "" (--model), or MODELS' key naming the option that holds the model sampled
    interval: tuple[float, float] | None = None  # guide only at these network timesteps

    @classmethod
    def parse(cls, spec: str) -> Setting:
        parts = spec.split(":")
        source = parts[0] if parts[0] in MODELS else ""
        parts = parts[1:] if source else parts
        student = source in STUDENTS
        if len(parts) < 2:
            raise SystemExit(
                f"setting {spec!r}: expected [MODEL:]SAMPLER:STEPS[:int8|bf16][:cacheF[:forecast]][:intervalLO-HI], "
                f"MODEL one of {', '.join(MODELS)}"
            )
        precision, cache, forecast, interval = "float32", 0.0, False, None
        for part in parts[2:]:
            if part in ("int8", "bf16", "float32"):
                precision = part
            elif part.startswith("cache"):
                cache = float(part[len("cache") :])
            elif part == "forecast":
                forecast = True
            elif part.startswith("interval") and not student:
                interval = tuple(float(t) for t in part[len("interval") :].split("-"))
            else:
                raise SystemExit(f"setting {spec!r}: unknown part {part!r}")
        if forecast and not cache:
            raise SystemExit(f"setting {spec!r}: forecast needs cacheF")
        return cls(spec, parts[0], int(parts[1]), precision, cache, forecast, source, interval)

    @property
    def family(self) -> str:
        caching = (" + cache forecast" if self.forecast else " + cache") if self.cache else ""
        return (f"{self.source} " if self.source else "") + self.precision + caching

    def model(self, args) -> str:
        if not self.source:
            return args.model
        chosen = getattr(args, self.source.replace("-", "_"))
        if not chosen:
            raise SystemExit(f"setting {self.spec!r} needs --{self.source} diffusion@<{MODELS[self.source]}>")
        return chosen

    def cfg(self, args) -> float:
        return 1.0 if self.source in STUDENTS else args.cfg


def sampling_settings(pipe, setting: Setting, args):
    settings = pipe.settings(
        sampler=setting.sampler,
        num_steps=setting.steps,
        guidance_scale=setting.cfg(args),
        guidance_interval=setting.interval,
        batch_size=args.batch,
        seed=args.seed,
    )
    if setting.cache:
        settings = replace(
            settings, cache=pipe.calibrate_cache(settings, fraction=setting.cache, extrapolate=setting.forecast)
        )
    return settings


def resident_mb() -> float:
    """This process's resident memory now (Linux /proc), MB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_memory_child(queue, store: str, model: str, setting: Setting, cfg: float, batch: int, threads: int) -> None:
    """In a fresh process: load the pipeline, then sample one batch while a thread polls the resident memory;
    report (resident MB once loaded, peak resident MB while sampling)."""
    torch.set_num_threads(threads)
    tune_cpu_allocator()
    pipe = LatentDiffusionPipeline.from_artifacts(model, store=ArtifactStore(store), precision=setting.precision)
    settings = pipe.settings(
        sampler=setting.sampler,
        num_steps=setting.steps,
        guidance_scale=cfg,
        guidance_interval=setting.interval,
        batch_size=batch,
    )
    if setting.cache:
        settings = replace(
            settings,
            cache=pipe.calibrate_cache(settings, fraction=setting.cache, n=batch, extrapolate=setting.forecast),
        )
    gc.collect()
    loaded, peak, done = resident_mb(), [0.0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_mb())
            time.sleep(0.002)

    poller = threading.Thread(target=poll)
    poller.start()
    pipe.sample(torch.arange(batch) % pipe.num_classes, settings)
    done.set()
    poller.join()
    queue.put((loaded, max(peak[0], resident_mb())))


def peak_memory(args, setting: Setting) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(
        target=peak_memory_child,
        args=(queue, args.store, setting.model(args), setting, setting.cfg(args), args.batch, args.threads),
    )
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="artifacts")
    parser.add_argument("--model", default="diffusion@latest")
    parser.add_argument("--student", default=None, help="a distilled model (ldm train distill) for student: settings")
    parser.add_argument("--pruned", default=None, help="a pruned model (ldm train prune) for pruned: settings")
    parser.add_argument("--pruned-student", default=None, help="a student of the pruned model, pruned-student:")
    parser.add_argument("--classifier", default="classifier@latest")
    parser.add_argument(
        "--setting", action="append", default=None, help="SAMPLER:STEPS[:int8|bf16][:cacheF] (repeatable)"
    )
    parser.add_argument("--n", type=int, default=1000, help="samples per setting for FD and class accuracy")
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--timing-rounds", type=int, default=5, help="interleaved rounds of one batch per setting")
    parser.add_argument("--timing-batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--out", default="out/inference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    settings_list = [Setting.parse(spec) for spec in (args.setting or DEFAULT_SETTINGS)]
    store, out = ArtifactStore(args.store), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipes = {}
    for setting in settings_list:
        key = (setting.model(args), setting.precision)
        if key not in pipes:
            pipes[key] = LatentDiffusionPipeline.from_artifacts(key[0], store=store, precision=key[1])
    first = pipes[settings_list[0].model(args), settings_list[0].precision]
    print(
        f"model {first.provenance.diffusion}"
        + (f", student {args.student} (guidance built in)" if args.student else "")
        + (f", pruned {args.pruned}" if args.pruned else "")
        + (f", its student {args.pruned_student}" if args.pruned_student else "")
        + f", {args.n} samples per setting, cfg {args.cfg}, seed {args.seed}, "
        f"{args.threads} threads; measuring the reference images ..."
    )
    reference = sample_reference(store, first, args.n, args.classifier, "classifier", args.batch, torch.device("cpu"))

    rows, prepared = [], []
    for setting in settings_list:
        pipe = pipes[setting.model(args), setting.precision]
        settings = sampling_settings(pipe, setting, args)
        prepared.append((pipe, settings))
        pipe.block_evaluations = {"evaluated": 0, "skipped": 0}
        report, _ = measure_samples(pipe, settings, args.n, reference)
        counts = pipe.block_evaluations
        saved = counts["skipped"] / (counts["evaluated"] + counts["skipped"]) if counts["skipped"] else 0.0
        rows.append(
            {
                "setting": setting.spec,
                "family": setting.family,
                "sampler": setting.sampler,
                "steps": setting.steps,
                "calls": model_calls(setting.sampler, setting.steps),
                "precision": setting.precision,
                "blocks_saved": round(saved, 4),
                "frechet_distance": report["frechet_distance"],
                "class_accuracy": report["class_accuracy"],
                "weight_mb": weight_bytes(pipe.model) / 1e6,
            }
        )
        print(
            f"  {setting.spec:<28} FD {report['frechet_distance']:8.4f}  accuracy {report['class_accuracy']:.4f}"
            + (f"  blocks saved {saved:.1%}" if saved else "")
        )

    print(f"timing: {args.timing_rounds} interleaved rounds of {args.timing_batch} images per setting ...")
    labels = torch.arange(args.timing_batch) % first.num_classes
    times: list[list[float]] = [[] for _ in settings_list]
    for _ in range(args.timing_rounds):
        for i, (pipe, settings) in enumerate(prepared):
            began = time.perf_counter()
            pipe.sample(labels, settings, batch_size=args.timing_batch)
            times[i].append(1000 * (time.perf_counter() - began) / args.timing_batch)
    for row, measured in zip(rows, times):
        row["ms_per_image"] = statistics.median(measured)
    if not args.no_memory:
        for row, setting in zip(rows, settings_list):
            row["loaded_mb"], row["peak_mb"] = peak_memory(args, setting)

    base = rows[0]
    for row in rows:
        row["fd_ratio"] = row["frechet_distance"] / base["frechet_distance"]
        row["speedup"] = base["ms_per_image"] / row["ms_per_image"]
    print(
        f"\n{args.n} samples per setting; FD over {reference.extractor.name}; real floor "
        f"{reference.reference_distance:.4f}, reconstruction floor {reference.autoencoder_distance:.4f}"
    )
    header = (
        f"{'setting':<28} {'calls':>5} {'blocks saved':>12} {'FD':>8} {'x ref':>6} {'accuracy':>8} {'ms/img':>7} "
        f"{'speedup':>7} {'weights MB':>10} {'loaded MB':>9} {'peak MB':>8}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['setting']:<28} {row['calls']:>5} {row['blocks_saved']:>12.1%} {row['frechet_distance']:>8.4f} "
            f"{row['fd_ratio']:>6.3f} {row['class_accuracy']:>8.4f} {row['ms_per_image']:>7.2f} {row['speedup']:>7.2f} "
            f"{row['weight_mb']:>10.2f} {row.get('loaded_mb', float('nan')):>9.0f} "
            f"{row.get('peak_mb', float('nan')):>8.0f}"
        )
    with open(out / "inference.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_atomic(
        out / "inference.json",
        json.dumps(
            {
                "model": first.provenance.diffusion,
                "student": args.student,
                "pruned": args.pruned,
                "pruned_student": args.pruned_student,
                "n": args.n,
                "cfg": args.cfg,
                "seed": args.seed,
                "threads": args.threads,
                "features": reference.extractor.name,
                "real_floor": reference.reference_distance,
                "reconstruction_floor": reference.autoencoder_distance,
                "rows": rows,
            },
            indent=2,
        ).encode(),
    )
    families: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append((row["ms_per_image"], row["frechet_distance"]))
    panel = CurvePanel(
        {name: sorted(points) for name, points in families.items()},
        title=f"FD against ms per image ({args.n} samples each)",
        x_label="ms / image",
    )
    print(
        f"wrote {out / 'inference.csv'}, {out / 'inference.json'}, {save_curve_panels([panel], out / 'inference.png')}"
    )


if __name__ == "__main__":
    main()
