"""Prompt evaluation of text-to-image on scenes: GenEval's scores, judged by the scene parser, beside two references.

`evaluate_prompts` judges the images an injected `generate(captions, seeds)` makes for the suite's prompts
(`ldm.prompts`); it knows nothing of how they are made. `ldm eval prompts` (`evaluate_prompt_suite`) measures
a text DiT's samples that way, and two references measured the same way:

    real            the suite's own test scenes, one per prompt: the parser's errors alone, what a perfect
                    generator would score (a scene is the same at every seed, so more images of it would only
                    repeat its verdicts)
    reconstruction  those scenes encoded and decoded by an autoencoder: what a perfect DiT decoded by it would score

Each column also has a Frechet distance in the parser's features to REFERENCE_SCENES real test scenes drawn
with another scene seed than the suite's (the real column's is the floor of a finite sample), over the main
suite's images (the reference holds no held-out pair).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.artifacts import ArtifactStore, write_atomic
from ldm.config import from_dict
from ldm.data import DataConfig
from ldm.data.scenes import CATEGORIES, SCENE_SIZE, SceneMaker, ScenesDataset, collate_scenes
from ldm.destinations import check_writable, writing_to
from ldm.evaluation import EVAL_FOLDER, report_settings, trajectory_name
from ldm.generation import SamplingSettings
from ldm.images import save_grid
from ldm.loading import load_autoencoder, load_parser
from ldm.metrics import ClassifierFeatures, FeatureStats, frechet_distance
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.parser import SceneParser
from ldm.prompts import HELD_OUT_PER_CATEGORY, PER_CATEGORY, SuitePrompt, judge, prompt_suite, score
from stages.sample import SamplingModel

# generate(captions, seeds) -> images (N, 3, 64, 64) in [-1, 1]: image i of captions[i] at seeds[i]
Generate = Callable[[list[str], list[int]], torch.Tensor]
REFERENCE_SEED = 1  # scene seed of the Frechet reference: other scenes than the suite's (seed 0)
REFERENCE_SCENES = 2000
GRID_IMAGES = 64


@dataclass
class PromptEvaluation:
    """What `evaluate_prompts` measured: GenEval's scores, the parser features of the main suite's images, a few."""

    scores: dict  # ldm.prompts.score's
    verdicts: list[tuple[SuitePrompt, bool]]  # one per image, in the order made
    features: FeatureStats
    first: torch.Tensor  # the first images made, (<= GRID_IMAGES, 3, 64, 64)


@torch.no_grad()
def evaluate_prompts(
    parser: SceneParser,
    generate: Generate,
    suite: Sequence[SuitePrompt],
    images_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> PromptEvaluation:
    """Judge `images_per_prompt` images of every prompt of `suite`, made by `generate`, with `parser`.

    Image j of prompt i has seed `seed + i * images_per_prompt + j`, so the seeds of one call are consecutive
    and an image does not depend on the batch it was made in.
    """
    if images_per_prompt < 1:
        raise ValueError(f"images per prompt must be >= 1, got {images_per_prompt}")
    jobs = [
        (prompt, seed + i * images_per_prompt + j) for i, prompt in enumerate(suite) for j in range(images_per_prompt)
    ]
    extractor = ClassifierFeatures(parser, "parser")
    verdicts, features, first = [], FeatureStats(), []
    with tqdm(total=len(jobs), unit="image", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            images = generate([prompt.caption for prompt, _ in batch], [s for _, s in batch])
            if tuple(images.shape) != (len(batch), 3, SCENE_SIZE, SCENE_SIZE):
                raise ValueError(
                    f"generate made images of shape {tuple(images.shape)} for {len(batch)} prompts; "
                    f"the parser reads ({len(batch)}, 3, {SCENE_SIZE}, {SCENE_SIZE})"
                )
            for (prompt, _), cells in zip(batch, parser.parse(images)):
                verdicts.append((prompt, judge(prompt.spec, cells)))
            main = torch.tensor([not prompt.held_out for prompt, _ in batch])
            features.update(extractor(images[main.to(images.device)]))
            if sum(len(f) for f in first) < GRID_IMAGES:
                first.append(images[:GRID_IMAGES].cpu())
            bar.update(len(batch))
    return PromptEvaluation(score(verdicts), verdicts, features, torch.cat(first)[:GRID_IMAGES])


def real_scenes(suite: Sequence[SuitePrompt], root: str | None = None, download: bool = True) -> Generate:
    """A `generate` that gives each caption of `suite` its own test scene, whatever the seed."""
    maker = SceneMaker("test", root=root, download=download)
    where = {prompt.caption: (prompt.scene, prompt.held_out) for prompt in suite}

    def generate(captions: list[str], seeds: list[int]) -> torch.Tensor:
        unknown = [caption for caption in captions if caption not in where]
        if unknown:
            raise ValueError(f"caption {unknown[0]!r} is not a prompt of the suite: it has no real scene")
        return torch.stack([maker.scene(*where[caption])[0] for caption in captions])

    return generate


def through_autoencoder(autoencoder: AutoencoderKL, generate: Generate) -> Generate:
    """A `generate` that encodes (posterior mode) and decodes what `generate` makes: its reconstructions."""
    if autoencoder.config.in_channels != 3 or autoencoder.config.spatial_dims != 2:
        raise ValueError(
            f"the autoencoder takes {autoencoder.config.in_channels}-channel "
            f"{'images' if autoencoder.config.spatial_dims == 2 else 'signals'}; scenes are RGB images: "
            f"pass an autoencoder trained on scenes (configs/scenes/autoencoder.yaml)"
        )
    device = next(autoencoder.parameters()).device

    def reconstruct(captions: list[str], seeds: list[int]) -> torch.Tensor:
        images = generate(captions, seeds).to(device)
        return autoencoder.decode(autoencoder.encode(images).mode()).clamp(-1, 1)

    return reconstruct


def pipeline_generate(pipe, settings: SamplingSettings) -> Generate:
    """A `generate` that samples a text DiT's pipeline (`LatentDiffusionPipeline`) with `settings`."""

    def generate(captions: list[str], seeds: list[int]) -> torch.Tensor:
        # The pipeline makes image i at seed + i, so one call covers a run of consecutive seeds.
        if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ValueError(f"the pipeline samples consecutive seeds in one call, got {seeds[:4]}...")
        return pipe.sample(prompts=captions, settings=settings, seed=seeds[0])

    return generate


@torch.no_grad()
def reference_features(
    parser: SceneParser, n: int = REFERENCE_SCENES, root: str | None = None, download: bool = True
) -> FeatureStats:
    """Parser features of n real test scenes of REFERENCE_SEED, the Frechet reference."""
    extractor, stats = ClassifierFeatures(parser, "parser"), FeatureStats()
    scenes = ScenesDataset("test", n, seed=REFERENCE_SEED, root=root, download=download)
    for images, _, _ in torch.utils.data.DataLoader(scenes, batch_size=250, collate_fn=collate_scenes):
        stats.update(extractor(images))
    return stats


def evaluate_prompt_suite(
    store: ArtifactStore,
    parser_ref: str,
    model: SamplingModel,
    settings: SamplingSettings,
    images_per_prompt: int = 4,
    limit: int = 0,
    real_only: bool = False,
    out_dir: str | Path | None = None,
    default_guidance: float = 2.0,
) -> dict:
    """`ldm eval prompts`: score a text DiT's samples of the prompt suite beside the real scenes and their
    reconstructions by its autoencoder; print a table, write report.json and a grid, keep the scores in its manifest.

    `real_only`: no DiT; the real scenes, and their reconstructions by `model.autoencoder` when it names one.
    `limit` > 0: the first `limit` prompts of each category (0: the whole suite).
    """
    if limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: the whole suite), got {limit}")
    if images_per_prompt < 1:
        raise ValueError(f"--per-prompt must be >= 1, got {images_per_prompt}")
    check_writable(Path(out_dir or EVAL_FOLDER), "--out")
    device = torch.device(model.device)
    parser_artifact = store.load(parser_ref, stage="parser")
    parser = load_parser(parser_artifact, device)
    data = from_dict(DataConfig, parser_artifact.config()["data"], "data")
    suite = prompt_suite(
        per_category=min(limit, PER_CATEGORY) if limit else PER_CATEGORY,
        held_out_per_category=min(limit, HELD_OUT_PER_CATEGORY) if limit else HELD_OUT_PER_CATEGORY,
        root=data.path,
        download=data.download,
    )
    real = real_scenes(suite, data.path, data.download)
    held_out = sum(prompt.held_out for prompt in suite)
    report: dict = {
        "parser": parser_artifact.ref,
        "prompts": len(suite) - held_out,
        "held_out_prompts": held_out,
        "images_per_prompt": images_per_prompt,
    }
    reconstructed = None
    if not real_only:
        pipe = model.load(store)
        diffusion = store.load(model.ref, stage="diffusion", verify=False)
        if not pipe.model.config.text_dim:
            raise ValueError(
                f"{diffusion.ref} is class-conditional: the prompt suite needs a text DiT "
                f"(configs/scenes/diffusion.yaml), or --real-only to score the real scenes alone"
            )
        store.check_writable(diffusion)  # the scores go into its manifest
        settings = model.with_cache(store, pipe, pipe.settings(settings, default_guidance))
        report.update(report_settings(pipe, settings))
        reconstructed = through_autoencoder(pipe.autoencoder, real)  # checked before sampling
    elif model.autoencoder is not None:
        artifact = store.load(model.autoencoder, stage="autoencoder")
        reconstructed = through_autoencoder(load_autoencoder(artifact, device), real)
        report["autoencoder"] = artifact.ref
    columns: dict[str, PromptEvaluation] = {}
    if not real_only:
        print(f"sampling {images_per_prompt} images of each of {len(suite)} prompts with {diffusion.ref}")
        generate = pipeline_generate(pipe, settings)
        columns["generated"] = evaluate_prompts(
            parser, generate, suite, images_per_prompt, settings.seed, settings.batch_size, progress=True
        )
    columns["real"] = evaluate_prompts(parser, real, suite, 1, batch_size=250)
    if reconstructed is not None:
        columns["reconstruction"] = evaluate_prompts(parser, reconstructed, suite, 1)
    reference = reference_features(parser, REFERENCE_SCENES, data.path, data.download)
    report["frechet_reference"] = f"{REFERENCE_SCENES} real test scenes of scene seed {REFERENCE_SEED}"
    report["columns"] = {
        name: {**column.scores, "frechet_distance": _distance(reference, column.features)}
        for name, column in columns.items()
    }
    report["per_prompt"] = _per_prompt(columns[next(iter(columns))].verdicts)  # the first column's
    name = f"prompts-{trajectory_name(pipe, settings)}-x{images_per_prompt}" if not real_only else "prompts-real"
    out_dir = Path(out_dir or EVAL_FOLDER / f"{name}-n{len(suite)}")
    with writing_to(out_dir, "--out"):
        grid = save_grid(columns[next(iter(columns))].first, out_dir / "images.png", nrow=8, scale=2)
        write_atomic(out_dir / "report.json", json.dumps(report, indent=2).encode())
    if not real_only:
        kept = {key: report["columns"]["generated"][key] for key in ("overall", "held_out", "seen_pairs")}
        store.update_manifest(diffusion, metrics={f"{name}-n{len(suite)}": {**kept, "parser": parser_artifact.ref}})
    print_prompt_report(report, out_dir, grid)
    return report


def _distance(reference: FeatureStats, features: FeatureStats) -> float | None:
    """The Frechet distance of `features` to `reference`; None with fewer than 2 images (no covariance)."""
    if features.count < 2:
        return None
    return frechet_distance(reference.mean(), reference.cov(), features.mean(), features.cov())


def _per_prompt(verdicts: Sequence[tuple[SuitePrompt, bool]]) -> list[dict]:
    """Each prompt's caption, category, held-out flag and how many of its images were judged right."""
    rows: dict[str, dict] = {}
    for prompt, verdict in verdicts:
        row = rows.setdefault(
            prompt.caption,
            {
                "caption": prompt.caption,
                "category": prompt.category,
                "held_out": prompt.held_out,
                "right": 0,
                "images": 0,
            },
        )
        row["right"] += int(verdict)
        row["images"] += 1
    return list(rows.values())


def print_prompt_report(report: dict, out_dir: Path, grid: Path) -> None:
    """Print the scores side by side: a row per category, overall, held-out and seen pairs, the Frechet distance."""
    columns = report["columns"]
    print(
        f"prompt suite of {report['prompts']} prompts and {report['held_out_prompts']} naming held-out pairs, "
        f"judged by {report['parser']}"
        + (f"; {report['images_per_prompt']} images per prompt sampled" if "generated" in columns else "")
    )
    print(f"  {'':<22}" + "".join(f"{name:>16}" for name in columns))
    rows = [(category, lambda c, k=category: c["categories"].get(k)) for category in CATEGORIES]
    rows += [
        ("overall", lambda c: c["overall"]),
        ("held-out pairs", lambda c: c["held_out"]),
        ("seen pairs (same cat.)", lambda c: c["seen_pairs"]),
        ("Frechet distance", lambda c: c["frechet_distance"]),
    ]
    for label, value in rows:
        print(f"  {label:<22}" + "".join(_cell(value(column)) for column in columns.values()))
    print(f"  Frechet distance in the parser's features to {report['frechet_reference']}")
    print(f"  report {out_dir / 'report.json'}   images {grid}")


def _cell(value: float | None) -> str:
    return f"{'-':>16}" if value is None else f"{value:16.4f}"
