"""Stage 3: sample a trained DiT, decode through its autoencoder, and measure the samples.

`write_samples` is `ldm sample` (a grid PNG and the single images; for a sound model a spectrogram grid,
one row per class, and the single clips as WAV files); `evaluate_samples` is
`ldm eval samples` (Frechet distance to real images over named features, class accuracy under the
project's classifier, time per image; a JSON report and a grid).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.artifacts import ArtifactStore, write_atomic
from ldm.audio import write_wav
from ldm.caching import sealed_schedule, stored_schedule
from ldm.destinations import check_writable, writing_to
from ldm.evaluation import (
    EVAL_FOLDER,
    evaluation_name,
    guidance_text,
    measure_samples,
    precision_name,
    report_metrics,
    report_settings,
    sample_reference,
    trajectory_name,
)
from ldm.generation import SamplingSettings, model_calls
from ldm.images import save_captioned_grid, save_grid, save_png, to_pil
from ldm.runtime import synchronize
from pipeline import LatentDiffusionPipeline

GRID_MAX = 256  # grid.png shows every image up to this many; beyond, the first whole rows of classes that fit
# images/NNNNNN-classC.png, audio/NNNNNN-classC.wav, or a text model's images/NNNNNN-promptK.png
SAMPLE_FILE = re.compile(r"\d{6}-(class|prompt)\d+\.(png|wav)")
CAPTIONED_GRID_MAX = 64  # a text model's grid: its first images, each captioned with its prompt


def prompt_order(prompts: list[str], n: int) -> list[int]:
    """Which prompt each of n images takes: each prompt in turn for ceil(n / prompts) images, so a prompt's
    samples sit together (a grid row each when n is a multiple)."""
    if not prompts:
        raise ValueError("a text model needs prompts: --prompt TEXT (repeatable) or --prompts FILE")
    if any(not p.strip() for p in prompts):
        raise ValueError("a prompt is empty: the empty prompt is the unconditional model; give a description")
    each = math.ceil(n / len(prompts))
    return [i // each for i in range(n)]


def read_prompts(path: str) -> list[str]:
    """The prompts of a text file, one per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {path}: cannot read it as UTF-8 text, one prompt per line ({err})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts: write one per line")
    return prompts


def parse_classes(spec: str | None, n: int, num_classes: int) -> torch.Tensor:
    """Labels for n images: "3" (all class 3), "0,2,5" (cycled), or None/"all" (every class in turn)."""
    if spec is None or spec == "all":
        choices = list(range(num_classes))
    else:
        try:
            choices = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--classes must be comma-separated class indices or 'all', got {spec!r}") from None
    if not choices or min(choices) < 0 or max(choices) >= num_classes:
        raise ValueError(f"--classes must name classes in 0..{num_classes - 1}, got {spec!r}")
    return torch.tensor(choices).repeat((n + len(choices) - 1) // len(choices))[:n]


@dataclass(frozen=True)
class SamplingModel:
    """The DiT a sampling command loads and what comes with it: decoder, guide, arithmetic, step caching, device."""

    ref: str = "diffusion@latest"
    autoencoder: str | None = None  # decode with this decoder fine-tune instead of the lineage's
    guide: str | None = None  # autoguidance by this weaker DiT (at the settings' guide_scale)
    precision: str | None = None  # float32 | bf16 | int8; None: the artifact's own
    cache_fraction: float = 0.0  # step caching: the share of block evaluations to skip (0: none)
    cache_forecast: bool = False  # a skipped block adds the linear forecast of its residual
    device: str = "cpu"

    @classmethod
    def of(cls, model: SamplingModel | str) -> SamplingModel:
        """`model` itself, or the defaults around a model reference."""
        return model if isinstance(model, SamplingModel) else cls(model)

    def load(self, store: ArtifactStore) -> LatentDiffusionPipeline:
        """The pipeline of this DiT with its decoder, guide and precision."""
        return LatentDiffusionPipeline.from_artifacts(
            self.ref,
            store=store,
            autoencoder=self.autoencoder,
            device=self.device,
            guide=self.guide,
            precision=self.precision,
        )

    def with_cache(
        self, store: ArtifactStore, pipe: LatentDiffusionPipeline, settings: SamplingSettings
    ) -> SamplingSettings:
        """`settings` with this model's step-caching schedule (`stored_cache_schedule`), if it caches."""
        return stored_cache_schedule(store, self.ref, pipe, settings, self.cache_fraction, self.cache_forecast)


def write_samples(
    store: ArtifactStore,
    model: SamplingModel | str,
    settings: SamplingSettings,
    n: int = 64,
    classes: str | None = None,
    out_dir: str | Path = "out/samples",
    single_images: bool = True,
    overwrite: bool = False,
    default_guidance: float = 2.0,
    prompts: list[str] | None = None,
    negative_prompt: str | None = None,
) -> dict:
    """Sample n class-conditional images (a text model: n images of `prompts`, each in turn for n / len(prompts),
    guided away from `negative_prompt`); write images/NNNNNN-classC.png, grid.png and samples.json; return the report.

    A sound model writes audio/NNNNNN-classC.wav instead of the PNGs, and grid.png shows spectrograms.

    Streams: each batch's images are written as soon as they are decoded and samples.json is
    rewritten after every batch ("complete": false until the end), so a run stopped early keeps
    what it made. Only the images of the grid stay in memory. Image i uses seed + i whatever the batch size.
    """
    _check_count(n)
    out_dir, model = Path(out_dir), SamplingModel.of(model)
    pipe = model.load(store)
    singles = out_dir / ("images" if pipe.sample_rate is None else "audio")
    check_writable(singles if single_images else out_dir, "--out")
    settings = model.with_cache(store, pipe, pipe.settings(settings, default_guidance))
    which = None  # a text model: each image's prompt index
    if pipe.takes_prompts:
        if classes is not None:
            raise ValueError("this model takes text prompts, not --classes: use --prompt TEXT or --prompts FILE")
        which = torch.tensor(prompt_order(prompts or [], n))
        labels = which  # file names and samples.json name each image's prompt by its index
    elif prompts or negative_prompt is not None:
        raise ValueError(
            f"{model.ref} is class-conditional: use --classes, not --prompt, --prompts or --negative-prompt"
        )
    else:
        labels = parse_classes(classes, n, pipe.num_classes)
    earlier = earlier_samples(out_dir, overwrite)
    recorded = {**report_settings(pipe, settings), "n": n}
    if which is not None:
        recorded.update(prompts=prompts, negative_prompt=negative_prompt)
    in_grid = min(n, CAPTIONED_GRID_MAX) if which is not None else _grid_count(n, len(set(labels.tolist())))
    kind = "prompt" if which is not None else "class"
    grid_images, seconds = [], 0.0
    batch_size = settings.batch_size
    bar = tqdm(
        total=math.ceil(n / batch_size) * model_calls(settings.sampler, settings.num_steps),
        unit="step",
        desc=f"{n} samples ({settings.sampler}, {settings.num_steps} steps, {guidance_text(recorded)})",
    )
    with bar, writing_to(out_dir, "--out", kept="the samples made so far stay, counted in samples.json"):
        for path in earlier:  # --overwrite: our earlier outputs only, never the folder or other files
            path.unlink(missing_ok=True)
        for start in range(0, n, batch_size):
            batch = labels[start : start + batch_size]
            began = time.perf_counter()
            if which is None:
                images = pipe.sample(batch, settings, seed=settings.seed + start, on_model_call=bar.update)
            else:
                images = pipe.sample(
                    None,
                    settings,
                    prompts=[prompts[k] for k in batch.tolist()],
                    negative_prompts=None if negative_prompt is None else [negative_prompt],
                    seed=settings.seed + start,
                    on_model_call=bar.update,
                )
            synchronize(pipe.device)
            seconds += time.perf_counter() - began
            if single_images and pipe.sample_rate is not None:
                for i, (signal, label) in enumerate(zip(images.cpu(), batch.tolist()), start=start):
                    write_wav(singles / f"{i:06d}-{kind}{label}.wav", signal, pipe.sample_rate)
            elif single_images:
                for i, (image, label) in enumerate(zip(to_pil(images), batch.tolist()), start=start):
                    save_png(image, singles / f"{i:06d}-{kind}{label}.png")
            if start < in_grid:
                grid_images.append(images[: in_grid - start].cpu())
            done = start + len(batch)
            _write_json(
                out_dir / "samples.json",
                {**recorded, "sampled": done, "labels": labels[:done].tolist(), "complete": False},
            )
        if which is None:
            grid = save_class_grid(torch.cat(grid_images), labels[:in_grid], out_dir / "grid.png")
        else:
            captions = [prompts[k] for k in which[:in_grid].tolist()]
            per_prompt = math.ceil(n / len(prompts))
            grid = save_captioned_grid(
                torch.cat(grid_images), captions, out_dir / "grid.png", ncol=per_prompt if per_prompt <= 8 else 8
            )
        report = {
            **recorded,
            "sampled": n,
            "labels": labels.tolist(),
            "complete": True,
            "seconds": round(seconds, 2),
            "seconds_per_image": seconds / n,
        }
        _write_json(out_dir / "samples.json", report)
    print(
        f"{n} samples from {report['model']} ({settings.sampler}, {settings.num_steps} steps, {guidance_text(report)}, "
        f"seed {settings.seed}) "
        f"in {seconds:.1f}s ({1000 * seconds / n:.1f} ms/image)"
    )
    print(f"  grid {grid}" + (f"   {singles.name} {singles}" if single_images else ""))
    return report


def stored_cache_schedule(
    store: ArtifactStore,
    model_ref: str,
    pipe: LatentDiffusionPipeline,
    settings: SamplingSettings,
    fraction: float,
    forecast: bool = False,
) -> SamplingSettings:
    """`settings` with a step-caching schedule that skips `fraction` of the block evaluations (0: none); with
    `forecast`, skipped blocks add a linear forecast of their residual (`ldm.caching`) instead of the last one.

    The schedule is calibrated once per model and setting (`pipe.calibrate_cache`) and kept in the artifact's
    manifest under metrics["cache-<sampler>-<steps>-cfg<scale>[-t<interval>][-guide...][-<precision>]-f<fraction>"
    "[-forecast]"]
    (the setting's whole trajectory, so another guidance interval or guide never reuses it), sealed to the model,
    that name and the fraction; later runs reuse it, and refuse one that was edited, moved or copied (`ldm.caching`).
    """
    if not fraction:
        return settings
    name = f"cache-{trajectory_name(pipe, settings)}{precision_name(pipe)}-f{fraction:g}" + (
        "-forecast" if forecast else ""
    )
    artifact = store.load(model_ref, stage="diffusion", verify=False)
    calls = model_calls(settings.sampler, settings.num_steps)
    schedule = stored_schedule(artifact, name, calls, pipe.model.config.depth, fraction, forecast)
    if schedule is not None:
        print(f"step caching: the stored schedule {name} skips {schedule.fraction:.1%} of the block evaluations")
        return replace(settings, cache=schedule)
    if name in (artifact.manifest.get("metrics") or {}):
        print(
            f"step caching: the stored schedule {name} is not sealed (stored by an older ldm, or its seal removed): "
            f"calibrating it anew"
        )
    store.check_writable(artifact)  # before calibrating: a schedule that cannot be stored would be calibrated every run
    schedule = pipe.calibrate_cache(settings, fraction=fraction, extrapolate=forecast)
    store.update_manifest(artifact, metrics={name: sealed_schedule(schedule, artifact, name, fraction)})
    print(
        f"step caching: calibrated {name} ({schedule.fraction:.1%} of the block evaluations skipped), stored in "
        f"{artifact.ref}'s manifest"
    )
    return replace(settings, cache=schedule)


def earlier_samples(out_dir: Path, overwrite: bool) -> list[Path]:
    """Return the files an earlier `ldm sample` left in out_dir, to remove; FileExistsError if any, unless overwrite."""
    ours = [out_dir / name for name in ("grid.png", "samples.json") if (out_dir / name).is_file()]
    singles = [
        path
        for folder, pattern in (("images", "*.png"), ("audio", "*.wav"))
        if (out_dir / folder).is_dir()
        for path in sorted((out_dir / folder).glob(pattern))
    ]
    if (ours or singles) and not overwrite:
        found = ", ".join(str(path.relative_to(out_dir)) for path in (ours + singles)[:3])
        raise FileExistsError(
            f"--out {out_dir} already holds samples ({found}{', ...' if len(ours + singles) > 3 else ''}): "
            f"pass --overwrite to replace them (it removes grid.png, samples.json, "
            f"images/NNNNNN-classC.png and audio/NNNNNN-classC.wav, nothing else), or another --out"
        )
    return ours + [path for path in singles if SAMPLE_FILE.fullmatch(path.name)]


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, path: Path) -> Path:
    """Write a grid of images (N, C, H, W) with labels (N,), one row per class when every class has as many; return
    its path."""
    n, distinct = len(labels), len(set(labels.tolist()))
    balanced = n % distinct == 0
    order = torch.argsort(labels, stable=True) if balanced else torch.arange(n)
    return save_grid(images[order], path, nrow=n // distinct if balanced and distinct > 1 else None, scale=2)


def _grid_count(n: int, classes: int) -> int:
    """How many of the first images the grid shows: all up to GRID_MAX, else whole rounds of the (cycled) classes."""
    if n <= GRID_MAX:
        return n
    return (GRID_MAX // classes) * classes if classes <= GRID_MAX else GRID_MAX


def _check_count(n: int) -> None:
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")


def _write_json(path: Path, report: dict) -> None:
    write_atomic(path, json.dumps(report, indent=2).encode())


@torch.no_grad()
def evaluate_samples(
    store: ArtifactStore,
    model: SamplingModel | str,
    settings: SamplingSettings,
    n: int = 10_000,
    classifier_ref: str = "classifier@latest",
    features: str = "auto",
    out_dir: str | Path | None = None,
    default_guidance: float = 1.5,
) -> dict:
    """Frechet distance of n class-balanced samples to the test split, class accuracy and time per image.

    Also measures two floors with the same features and number of images: n training images
    against the test images (what a perfect model would reach), and the same training images
    encoded and decoded by the autoencoder against the test images (what a perfect diffusion
    model would reach through this autoencoder; when samples sit near it, stage 1 limits them).
    """
    _check_count(n)
    check_writable(Path(out_dir or EVAL_FOLDER), "--out")
    model = SamplingModel.of(model)
    pipe = model.load(store)
    store.check_writable(store.load(model.ref, stage="diffusion", verify=False))  # the numbers go into its manifest
    settings = model.with_cache(store, pipe, pipe.settings(settings, default_guidance))
    reference = sample_reference(store, pipe, n, classifier_ref, features, settings.batch_size, pipe.device)
    name = evaluation_name(pipe, settings, n)
    out_dir = Path(out_dir or EVAL_FOLDER / f"{name}-{pipe.provenance.diffusion.split('@')[1]}")
    with writing_to(out_dir, "--out"):
        report, first = measure_samples(pipe, settings, n, reference, out_dir)
        if settings.cache is not None:
            counts = pipe.block_evaluations
            report["block_evaluations"] = dict(counts)
            report["block_evaluations_saved"] = counts["skipped"] / max(counts["evaluated"] + counts["skipped"], 1)
        grid = save_grid(
            first, out_dir / "samples.png", nrow=pipe.num_classes if len(first) >= pipe.num_classes else None, scale=2
        )
        _write_json(out_dir / "report.json", report)
    store.update_manifest(
        store.load(model.ref, stage="diffusion", verify=False), metrics={name: report_metrics(report)}
    )
    print_sample_report(report, out_dir, grid)
    return report


def print_sample_report(report: dict, out_dir: Path, grid: Path) -> None:
    kind = "FID" if report["is_standard_fid"] else "FD (not Inception FID)"
    print(
        f"{report['n']} samples of {report['model']}: {report['sampler']}, {report['steps']} steps "
        f"({report['spacing']}), "
        f"{guidance_text(report)}"
    )
    print(f"  {kind:<22} {report['frechet_distance']:9.4f}   [{report['features']}]")
    print(
        f"  real train vs test     {report['real_reference_distance']:9.4f}   ({report['real_reference']}; "
        f"samples are {report['ratio_to_reference']:.2f}x that)"
    )
    print(
        f"  reconstructions        {report['autoencoder_reference_distance']:9.4f}   "
        f"({report['autoencoder_reference']}: "
        f"the floor for samples decoded by this autoencoder)"
    )
    print(f"  class accuracy         {report['class_accuracy']:9.4f}   [{report['class_accuracy_classifier']}]")
    print(
        f"  real, reconstructed    {report['real_class_accuracy']:.4f}, {report['autoencoder_class_accuracy']:.4f}   "
        f"({report['class_accuracy_reference']}: the second is the ceiling for samples)"
    )
    print(
        f"  time per image         {1000 * report['seconds_per_image']:9.2f} ms ({report['device']}, "
        f"{report['threads']} threads"
        f"{', ' + report['precision'] if report.get('precision', 'float32') != 'float32' else ''})"
    )
    manifold, real = report["manifold"], report["real_manifold"]
    if manifold["precision"] is not None:
        print(
            f"  precision, recall      {manifold['precision']:.4f}, {manifold['recall']:.4f}   (train images instead "
            f"of samples: {real['precision']:.4f}, {real['recall']:.4f}; k = {manifold['k']} neighbours)"
        )
        print(
            f"  density, coverage      {manifold['density']:.4f}, {manifold['coverage']:.4f}   "
            f"(train images: {real['density']:.4f}, {real['coverage']:.4f})"
        )
    histogram = report["class_histogram"]
    print(f"  predicted classes      {histogram['predicted']}   (requested {histogram['requested']})")
    print(
        f"  memorisation           {report['memorisation_rate']:9.4f}   (test images: "
        f"{report['real_memorisation_rate']:.4f}; {report['memorisation_reference']}; nearest pairs "
        f"{out_dir / 'nearest-train.png'})"
    )
    if "block_evaluations_saved" in report:
        print(
            f"  step caching           {report['block_evaluations_saved']:9.1%} of the DiT's block evaluations skipped"
        )
    print(f"  report {out_dir / 'report.json'}   grid {grid}")
