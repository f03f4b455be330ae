"""Convergence: sample quality against training time and images seen, for DiT recipes side by side.

Each recipe (a diffusion preset with overrides) trains on the same latent cache through
`stages.diffusion.run` for a fixed budget (steps, wall-clock minutes, or both: whichever ends
first). Every `--eval-every` steps, and where the budget ends, a Lightning callback pauses training
and measures the EMA model: `--n` class-balanced samples (image i: class i mod classes, noise seed
i), the default sampler of the objective (flow-euler for flow, dpm++2m for ddpm) at `--calls`
network calls, the same `--cfg`, decoded by the cache's autoencoder, then the Frechet distance (FD)
to the first n test images and class accuracy, both under the project's classifier (never a training
signal). Training minutes leave the evaluations out; both are measured.

`--peer` adds the line a user of diffusers' training scripts would draw at the same model size,
batch and budget: `DiTTransformer2DModel` with the first recipe's depth, width, heads and patch
(no learned sigma), `DDPMScheduler` (1000 linear steps) noise-prediction MSE, AdamW with the first
recipe's lr, weight decay, warm-up, schedule and gradient clipping, label dropout for CFG (null
label = number of classes), diffusers' `EMAModel` at the recipe's decay, in a plain torch loop on
the very same batches (`LatentBatches`, same seed). It is measured at the same points in the same
way, sampled by diffusers' DPMSolverMultistepScheduler at the same number of network calls and cfg.

Lines alternate seed by seed in one run, so a shared machine's load falls on all of them alike.
Each recipe's model is stored in `--store` as a diffusion artifact (named in the JSON), its run
folder under `--out`/runs. Writes into `--out`: convergence.csv (one row per line, seed and
evaluation), convergence.png (FD against training minutes and against images seen, one line per
recipe, the mean over seeds) and convergence.json (the setup, the configs and the real-data floor);
prints a summary whose ratios compare each line with the first recipe, the baseline, at the
furthest minutes and images seen that both reached.

    python bench/convergence.py --store /tmp/conv-store --latents latents@latest --classifier classifier@latest \\
        --budget-minutes 3 --eval-every 100 --peer --out out/convergence \\
        --recipe eps=configs/fmnist/diffusion-quick.yaml \\
        --recipe flow=configs/fmnist/diffusion-quick.yaml:diffusion.objective=flow
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from bench.dit import build_diffusers_dit
from bench.sample import diffusers_sample, diffusers_scheduler
from ldm.artifacts import ArtifactStore, write_atomic
from ldm.config import from_dict, load_config, to_dict
from ldm.data import DataConfig, build_dataset
from ldm.data.latents import LatentBatches, LatentCache
from ldm.diffusion.samplers import per_sample_generators, randn_like_per_sample
from ldm.evaluation import real_statistics
from ldm.generation import SamplingSettings, model_calls, sample_latents
from ldm.images import CurvePanel, save_curve_panels
from ldm.loading import feature_extractor, load_autoencoder, load_classifier
from ldm.metrics import FeatureStats, frechet_distance
from ldm.models.dit import DiT
from ldm.runtime import synchronize, tune_cpu_allocator
from ldm.training import seed_step
from pipeline import LatentDiffusionPipeline
from stages import diffusion

ROOT = Path(__file__).resolve().parents[1]

PEER = "diffusers"  # the name of the --peer line in the CSV, the plot and the table
NO_STEP_LIMIT = 10**7  # max_steps under a minutes-only budget: the lr schedule then never decays
CSV_COLUMNS = ("recipe", "seed", "step", "images_seen", "train_minutes", "eval_seconds", "fd", "class_accuracy")

SampleFn = Callable[
    [torch.Tensor, int], torch.Tensor
]  # (labels (B,), first noise seed) -> normalised latents (B, C, h, w)


@dataclass(frozen=True)
class Recipe:
    """A line of the benchmark: a diffusion preset and `key=value` overrides, under a name."""

    name: str
    preset: Path
    overrides: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """NAME=PRESET[:key=value,...].

        E.g. rms=configs/fmnist/diffusion-flow.yaml:model.hidden_size=256,betas=[0.9,0.95].
        """
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"--recipe must look like NAME=PRESET[:key=value,...], got {text!r}")
        if name == PEER:
            raise ValueError(f"--recipe: the name {PEER!r} is the --peer line's; choose another")
        preset, _, overrides = rest.partition(":")
        path = Path(preset)
        if not path.is_file() and (ROOT / path).is_file():
            path = ROOT / path
        return cls(name, path, tuple(o for o in split_overrides(overrides) if o))


def split_overrides(text: str) -> list[str]:
    """Split `a=1,b=[0.9,0.95]` at the commas outside brackets: ['a=1', 'b=[0.9,0.95]']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


@dataclass(frozen=True)
class Budget:
    """How long each line trains: steps, wall-clock minutes of training, or both (whichever ends first)."""

    steps: int | None = None
    minutes: float | None = None

    @property
    def max_steps(self) -> int:
        """The trainer's max_steps; also the length of the lr schedule, so give steps for a cosine decay."""
        return self.steps or NO_STEP_LIMIT

    def spent(self, step: int, train_seconds: float) -> bool:
        return step >= self.max_steps or (self.minutes is not None and train_seconds >= 60 * self.minutes)


@dataclass
class Point:
    """One evaluation of one line (a CSV row); eval_seconds is what this evaluation took."""

    recipe: str
    seed: int
    step: int
    images_seen: int
    train_minutes: float
    eval_seconds: float
    fd: float
    class_accuracy: float


class Results:
    """The points measured so far; the CSV is rewritten after each, so a stopped run keeps them."""

    def __init__(self, path: Path):
        self.path = path
        self.points: list[Point] = []

    def add(self, point: Point) -> None:
        self.points.append(point)
        text = io.StringIO()
        writer = csv.DictWriter(text, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(p) for p in self.points)
        write_atomic(self.path, text.getvalue().encode())
        print(
            f"  [{point.recipe} seed {point.seed}] step {point.step:>6}  {point.train_minutes:6.2f} train min  "
            f"FD {point.fd:8.3f}  accuracy {point.class_accuracy:.3f}  ({point.eval_seconds:.1f}s to evaluate)"
        )

    def curves(self, line: str) -> dict[int, list[Point]]:
        """{seed: points by step} of one line."""
        by_seed: dict[int, list[Point]] = {}
        for point in self.points:
            if point.recipe == line:
                by_seed.setdefault(point.seed, []).append(point)
        return by_seed


class Evaluator:
    """Measures a line's samples: n class-balanced latents, decoded by the cache's autoencoder, FD and class accuracy.

    The test split's features are computed once here, with the real-data floor (n train against the
    same n test images, as `ldm eval samples` reports it).
    """

    def __init__(
        self,
        store: ArtifactStore,
        cache: LatentCache,
        classifier_ref: str,
        features: str,
        n: int,
        settings: SamplingSettings,
        baseline: diffusion.DiffusionStageConfig,
        device: torch.device,
    ):
        autoencoder = store.load(cache.autoencoder_ref, stage="autoencoder")
        # The pipeline is here for its decode, the one place the latent statistics are applied; its
        # DiT (the baseline's architecture, untrained) is never sampled.
        self.pipeline = LatentDiffusionPipeline(
            DiT(baseline.model).to(device), load_autoencoder(autoencoder, device), baseline.diffusion, cache.stats
        )
        self.extractor = feature_extractor(store, features, classifier_ref, device)
        classifier = store.load(classifier_ref, stage="classifier")
        self.classifier_ref, self.classifier = classifier.ref, load_classifier(classifier, device)
        self.settings = settings
        self.labels = torch.arange(n) % cache.num_classes  # class-balanced; image i gets noise seed settings.seed + i
        self.device = device
        data = replace(from_dict(DataConfig, autoencoder.config()["data"], "data"), hflip=False)
        test, train = build_dataset(data, "test"), build_dataset(data, "train")
        self.n_real = min(n, len(test), len(train))
        self.test_stats = real_statistics(self.extractor, test, self.n_real, settings.batch_size, device)
        self.real_floor = self.distance(
            real_statistics(self.extractor, train, self.n_real, settings.batch_size, device)
        )

    def distance(self, stats: FeatureStats) -> float:
        return frechet_distance(self.test_stats.mean(), self.test_stats.cov(), stats.mean(), stats.cov())

    @torch.no_grad()
    def measure(self, sample: SampleFn) -> tuple[float, float]:
        """(FD to the test images, class accuracy) of the images decoded from `sample`'s latents."""
        stats, correct = FeatureStats(), 0
        for start in range(0, len(self.labels), self.settings.batch_size):
            labels = self.labels[start : start + self.settings.batch_size]
            images = self.pipeline.decode(sample(labels.to(self.device), self.settings.seed + start))  # (B, C, H, W)
            stats.update(self.extractor(images))
            correct += int((self.classifier(images).argmax(1).cpu() == labels).sum())
        return self.distance(stats), correct / len(self.labels)


class Probe:
    """What both training loops call after every step: the clock, the evaluation points and the budget, in one place.

    Training seconds are wall-clock seconds since `start` minus the seconds spent evaluating.
    """

    def __init__(
        self,
        line: str,
        seed: int,
        batch_size: int,
        budget: Budget,
        every: int,
        evaluator: Evaluator,
        results: Results,
        device: torch.device,
    ):
        self.line, self.seed, self.batch_size = line, seed, batch_size
        self.budget, self.every, self.evaluator, self.results, self.device = budget, every, evaluator, results, device
        self.started = self.eval_seconds = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.started, self.eval_seconds = time.perf_counter(), 0.0

    def after_step(self, step: int, sample: SampleFn) -> bool:
        """Evaluate when `step` is an evaluation point or the budget is spent; return whether it is."""
        synchronize(self.device)
        train_seconds = time.perf_counter() - self.started - self.eval_seconds
        spent = self.budget.spent(step, train_seconds)
        if step % self.every == 0 or spent:
            began = time.perf_counter()
            fd, accuracy = self.evaluator.measure(sample)
            synchronize(self.device)
            seconds = time.perf_counter() - began
            self.eval_seconds += seconds
            self.results.add(
                Point(self.line, self.seed, step, step * self.batch_size, train_seconds / 60, seconds, fd, accuracy)
            )
        return spent


class EvaluateDuringTraining(Callback):
    """Measures the EMA model of a `stages.diffusion` run at the probe's points and stops training at the budget."""

    def __init__(self, probe: Probe, settings: SamplingSettings):
        self.probe = probe
        self.settings = settings

    def on_train_start(self, trainer, module) -> None:
        self.probe.start()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        def sample(labels: torch.Tensor, seed: int) -> torch.Tensor:
            return sample_latents(module.ema, module.config.diffusion, labels, replace(self.settings, seed=seed))

        if self.probe.after_step(trainer.global_step, sample):
            trainer.should_stop = True


def recipe_config(
    recipe: Recipe, latents_ref: str, seed: int, budget: Budget, run_dir: Path
) -> diffusion.DiffusionStageConfig:
    """The recipe's diffusion config, set to train on the benchmark's cache, seed and budget, without previews."""
    return load_config(
        diffusion.DiffusionStageConfig,
        recipe.preset,
        [
            *recipe.overrides,
            f"latents={latents_ref}",
            f"trainer.seed={seed}",
            f"trainer.max_steps={budget.max_steps}",
            # checkpoints only at the end and no preview grids: neither is training, and the peer makes neither
            f"trainer.checkpoint_every={budget.max_steps}",
            "trainer.image_every=0",
            "trainer.progress=false",
            f"run_dir={run_dir}",
        ],
    )


def train_recipe(
    config: diffusion.DiffusionStageConfig, store: ArtifactStore, probe: Probe, settings: SamplingSettings
) -> str:
    """Train one recipe through the diffusion stage, measured by `probe`; return its stored artifact's reference."""
    artifact = diffusion.run(config, store, callbacks=[EvaluateDuringTraining(probe, settings)])
    return artifact.ref


def train_diffusers_peer(
    baseline: diffusion.DiffusionStageConfig,
    cache: LatentCache,
    seed: int,
    calls: int,
    guidance_scale: float,
    probe: Probe,
    device: torch.device,
) -> dict:
    """Train diffusers' DiT as its training scripts do, at the baseline's size, batch and optimiser.

    Return its setup.
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    trainer, architecture = baseline.trainer, replace(baseline.model, learn_sigma=False)
    if trainer.precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"the peer trains in 32-true or bf16-mixed, not the baseline's {trainer.precision}")
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if trainer.precision == "bf16-mixed"
        else nullcontext
    )
    torch.manual_seed(seed)
    model = build_diffusers_dit(architecture).to(device).train()
    embedders = [block.norm1.emb.class_embedder for block in model.transformer_blocks]
    label_dropout = embedders[0].dropout_prob  # diffusers' LabelEmbedding default, 0.1, as DiT
    for embedder in embedders:
        # In train mode each block's embedder (and the final layer's, through block 0's) would drop
        # labels on its own draw; labels are dropped once per image below, as DiT's train.py does.
        embedder.dropout_prob = 0.0
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=trainer.lr, weight_decay=trainer.weight_decay)
    lr_scheduler = get_scheduler(
        "cosine" if baseline.lr_schedule == "cosine" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=trainer.warmup_steps,
        num_training_steps=probe.budget.max_steps,
    )
    ema = EMAModel(
        model.parameters(), decay=baseline.ema_decay, foreach=True
    )  # decay warms up as (1 + s) / (10 + s), as ours
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    sampler = diffusers_scheduler(noise_scheduler.config.num_train_timesteps)
    batches = LatentBatches(cache, trainer.batch_size, seed=seed)  # the recipes' batches, step for step
    null_class, channels, size = architecture.num_classes, architecture.in_channels, architecture.input_size

    def sample(labels: torch.Tensor, first_seed: int) -> torch.Tensor:
        ema.copy_to(ema_model.parameters())
        noise = randn_like_per_sample(
            (len(labels), channels, size, size), per_sample_generators(first_seed, len(labels)), device, torch.float32
        )
        return diffusers_sample(ema_model, sampler, noise, labels, null_class, calls, guidance_scale, channels)

    probe.start()
    step = 0
    while True:
        z, y = (v.to(device) for v in batches.batch(step))  # z (B, C, h, w) normalised latents, y (B,)
        seed_step(seed, step)
        noise = torch.randn_like(z)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(z),), device=device)
        y = torch.where(torch.rand(len(y), device=device) < label_dropout, null_class, y)
        with autocast():
            prediction = model(noise_scheduler.add_noise(z, noise, t), timestep=t, class_labels=y).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        if trainer.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        step += 1
        if probe.after_step(step, sample):
            break
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "label_dropout": label_dropout,
        "training": "DDPMScheduler(1000, linear) eps MSE",
        "final_loss": loss.item(),
        "sampler": "DPMSolverMultistepScheduler (dpmsolver++, order 2, trailing)",
    }


# ----------------------------------------------------------------------------- the summary


def value_at(points: list[tuple[float, float]], x: float) -> float:
    """The piecewise-linear curve through (x, y) points, sorted by x, at x (held flat beyond its ends)."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def x_of(point: Point, axis: str) -> float:
    return point.train_minutes if axis == "minutes" else float(point.images_seen)


def mean_curve(by_seed: dict[int, list[Point]], axis: str) -> list[tuple[float, float]]:
    """(x, FD) averaged over seeds at the steps every seed reached."""
    steps = set.intersection(*({p.step for p in points} for points in by_seed.values()))
    curve = []
    for step in sorted(steps):
        chosen = [p for points in by_seed.values() for p in points if p.step == step]
        curve.append((statistics.mean(x_of(p, axis) for p in chosen), statistics.mean(p.fd for p in chosen)))
    return curve


def fd_ratio_at_equal(line: dict[int, list[Point]], baseline: dict[int, list[Point]], axis: str) -> tuple[float, float]:
    """(line FD / baseline FD, x) at the furthest x both reached.

    Each FD is the mean over seeds of its interpolated curve.
    """
    x = min(x_of(points[-1], axis) for points in (*line.values(), *baseline.values()))

    def fd(by_seed: dict[int, list[Point]]) -> float:
        return statistics.mean(value_at([(x_of(p, axis), p.fd) for p in points], x) for points in by_seed.values())

    return fd(line) / fd(baseline), x


def spread(values: list[float]) -> str:
    """' +-h' with h half the range over seeds, or '' for one seed."""
    return f" +-{(max(values) - min(values)) / 2:.2f}" if len(values) > 1 else ""


def print_summary(results: Results, lines: list[str], floor: float, n: int) -> None:
    baseline = results.curves(lines[0])
    print(
        f"\nsummary: the last evaluation of each line (mean over seeds; +- half the range), FD over {n} samples "
        f"(real-data floor {floor:.3f}); ratios: the line's FD / {lines[0]}'s at the furthest training minutes and "
        f"images seen both reached (linear between evaluations)"
    )
    header = (
        f"{'line':<14} {'seeds':>5} {'steps':>7} {'images':>9} {'train min':>9} {'eval min':>8} {'FD':>14} "
        f"{'accuracy':>14} {'FD vs base @ equal min':>23} {'@ equal images':>18}"
    )
    print(header)
    print("-" * len(header))
    for line in lines:
        by_seed = results.curves(line)
        if not by_seed:
            continue
        last = [points[-1] for points in by_seed.values()]
        eval_minutes = statistics.mean(sum(p.eval_seconds for p in points) / 60 for points in by_seed.values())
        fds, accuracies = [p.fd for p in last], [p.class_accuracy for p in last]
        by_minutes, minutes = fd_ratio_at_equal(by_seed, baseline, "minutes")
        by_images, images = fd_ratio_at_equal(by_seed, baseline, "images")
        print(
            f"{line:<14} {len(by_seed):>5} {statistics.mean(p.step for p in last):>7.0f} "
            f"{statistics.mean(p.images_seen for p in last):>9.0f} "
            f"{statistics.mean(p.train_minutes for p in last):>9.2f} "
            f"{eval_minutes:>8.2f} {statistics.mean(fds):>8.3f}{spread(fds):<6} "
            f"{statistics.mean(accuracies):>8.3f}{spread(accuracies):<6} "
            f"{by_minutes:>8.2f}x @ {minutes:5.2f} min {by_images:>7.2f}x @ {images:>7.0f}"
        )


def save_plot(results: Results, lines: list[str], path: Path, n: int) -> Path:
    """Two panels, FD against training minutes and against images seen, one line per recipe (mean over seeds)."""
    panels = []
    for axis, label in (("minutes", "training minutes"), ("images", "images seen")):
        curves = {line: mean_curve(results.curves(line), axis) for line in lines if results.curves(line)}
        positive = all(y > 0 for curve in curves.values() for _, y in curve)
        panels.append(CurvePanel(curves, f"FD ({n} samples) against {label}", log_y=positive, x_label=label))
    return save_curve_panels(panels, path)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="artifacts", help="the artifact store (default: ./artifacts)")
    parser.add_argument(
        "--latents", default="latents@latest", help="the latent cache every line trains on (ldm encode)"
    )
    parser.add_argument("--classifier", default="classifier@latest", help="features for the FD and class accuracy")
    parser.add_argument(
        "--features",
        default="classifier",
        choices=("classifier", "auto", "inception"),
        help="FD feature space (default: the classifier's; auto takes Inception when its weights are here)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        required=True,
        metavar="NAME=PRESET[:key=value,...]",
        help="a line to train (repeatable); the first is the baseline, and the peer's model and optimiser",
    )
    parser.add_argument("--budget-steps", type=int, default=None, help="steps per line (also the lr schedule's length)")
    parser.add_argument(
        "--budget-minutes", type=float, default=None, help="training minutes per line (evaluation excluded)"
    )
    parser.add_argument(
        "--eval-every", type=int, required=True, help="steps between evaluations (and at the budget's end)"
    )
    parser.add_argument("--n", type=int, default=500, help="samples per evaluation, class-balanced, fixed seeds")
    parser.add_argument("--calls", type=int, default=20, help="network calls per sample for every line")
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale for every line")
    parser.add_argument("--batch", type=int, default=250, help="samples per sampling batch")
    parser.add_argument(
        "--seeds", default="0", help="training seeds, comma-separated (two where differences are small)"
    )
    parser.add_argument(
        "--peer", action="store_true", help=f"add the {PEER!r} line: diffusers' DiT trained as its scripts do"
    )
    parser.add_argument("--out", required=True, help="folder for convergence.csv, .png, .json and the run folders")
    args = parser.parse_args(argv)
    if args.budget_steps is None and args.budget_minutes is None:
        parser.error("give --budget-steps, --budget-minutes, or both (whichever ends first)")
    if (args.budget_steps is not None and args.budget_steps < 1) or (
        args.budget_minutes is not None and args.budget_minutes <= 0
    ):
        parser.error("budgets must be positive")
    for name in ("eval_every", "n", "calls", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> Results:
    args = parse_args(argv)
    allocator = "tuned (ldm.runtime)" if tune_cpu_allocator() else "defaults"
    out = Path(args.out)
    if (out / "convergence.csv").exists():
        raise SystemExit(f"{out} already holds a convergence run (convergence.csv): choose another --out")
    recipes = [Recipe.parse(text) for text in args.recipe]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise SystemExit(f"--recipe names must differ, got {names}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    budget = Budget(args.budget_steps, args.budget_minutes)
    store = ArtifactStore(args.store)
    cache = LatentCache(store.load(args.latents, stage="latents"))
    latents_ref = cache.artifact.ref

    def run_dir(line: str, seed: int) -> Path:
        return out / "runs" / f"{line}-seed{seed}"

    # Every recipe's config is built (and checked) before anything trains.
    configs = {r.name: recipe_config(r, latents_ref, seeds[0], budget, run_dir(r.name, seeds[0])) for r in recipes}
    baseline = configs[names[0]]
    accelerator = baseline.trainer.accelerator
    device = torch.device("cuda" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "cpu")
    settings = SamplingSettings(
        num_steps=args.calls, guidance_scale=args.cfg, seed=0, batch_size=min(args.batch, args.n)
    )
    samplers = {name: settings.resolved(config.diffusion).sampler for name, config in configs.items()}
    for name, sampler in samplers.items():
        if model_calls(sampler, args.calls) != args.calls:
            raise SystemExit(
                f"{name}: {sampler} would make {model_calls(sampler, args.calls)} network calls, not {args.calls}"
            )
    lines = names + ([PEER] if args.peer else [])

    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, CPU allocator {allocator}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"cache {latents_ref} ({len(cache)} images, latents {'x'.join(map(str, cache.latent_shape))}); budget "
        f"{budget.steps or 'no'} steps, {budget.minutes or 'no'} training minutes; "
        f"evaluation every {args.eval_every} steps: "
        f"{args.n} samples, {args.calls} network calls, cfg {args.cfg}"
    )
    if budget.steps is None:
        print(
            f"note: minutes only, so max_steps is {NO_STEP_LIMIT}: warm-up applies but a cosine schedule never decays "
            f"(add --budget-steps to set its length)"
        )
    evaluator = Evaluator(store, cache, args.classifier, args.features, args.n, settings, baseline, device)
    print(
        f"features: {evaluator.extractor.name}; class accuracy: {evaluator.classifier_ref}; real-data floor "
        f"(first {evaluator.n_real} train vs test images) FD {evaluator.real_floor:.3f}"
    )

    setup = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "latents": latents_ref,
        "autoencoder": cache.autoencoder_ref,
        "classifier": evaluator.classifier_ref,
        "features": evaluator.extractor.name,
        "budget": asdict(budget),
        "eval_every": args.eval_every,
        "seeds": seeds,
        "evaluation": {
            "n": args.n,
            "network_calls": args.calls,
            "guidance_scale": args.cfg,
            "noise_seeds": f"0..{args.n - 1}",
            "labels": "image i: class i mod classes",
            "test_images": evaluator.n_real,
        },
        "real_floor": {
            "fd": evaluator.real_floor,
            "what": f"first {evaluator.n_real} train vs first {evaluator.n_real} test images",
        },
        "recipes": {
            r.name: {
                "preset": str(r.preset),
                "overrides": list(r.overrides),
                "sampler": samplers[r.name],
                "config": to_dict(configs[r.name]),
            }
            for r in recipes
        },
        "machine": {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_start": os.getloadavg()[0],
        },
        "artifacts": {},
    }
    if args.peer:
        import diffusers

        setup["peer"] = {"diffusers": diffusers.__version__, "model_and_optimizer_of": names[0]}
    results = Results(out / "convergence.csv")
    write_atomic(out / "convergence.json", json.dumps(setup, indent=2).encode())

    for seed in seeds:
        for line in lines:
            print(f"\n== {line}, seed {seed} ==")
            if line == PEER:
                probe = Probe(
                    line, seed, baseline.trainer.batch_size, budget, args.eval_every, evaluator, results, device
                )
                setup["peer"][f"seed{seed}"] = train_diffusers_peer(
                    baseline, cache, seed, args.calls, args.cfg, probe, device
                )
            else:
                recipe = recipes[names.index(line)]
                config = recipe_config(recipe, latents_ref, seed, budget, run_dir(line, seed))
                probe = Probe(
                    line, seed, config.trainer.batch_size, budget, args.eval_every, evaluator, results, device
                )
                setup["artifacts"][f"{line}-seed{seed}"] = train_recipe(config, store, probe, settings)
            write_atomic(out / "convergence.json", json.dumps(setup, indent=2).encode())

    setup["machine"]["load_average_end"] = os.getloadavg()[0]
    write_atomic(out / "convergence.json", json.dumps(setup, indent=2).encode())
    plot = save_plot(results, lines, out / "convergence.png", args.n)
    print_summary(results, lines, evaluator.real_floor, args.n)
    print(f"\nload average now {os.getloadavg()[0]:.1f}; wrote {results.path}, {plot}, {out / 'convergence.json'}")
    return results


if __name__ == "__main__":
    main()
