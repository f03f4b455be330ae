"""The demo: the quick preset of every stage on Fashion-MNIST, end to end, on one machine."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from ldm.artifacts import ArtifactStore
from ldm.config import load_config
from ldm.data.fmnist import ensure_fmnist
from ldm.destinations import check_writable
from ldm.generation import SamplingSettings
from ldm.training import Timer, format_seconds
from stages import autoencoder, classifier, diffusion
from stages.encode import EncodeConfig, encode
from stages.evaluate import evaluate_reconstruction
from stages.sample import evaluate_samples, write_samples

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "fmnist"


def run_demo(out: Path) -> dict[str, object]:
    """Train and evaluate every stage's quick preset into `out`; return what was made."""
    timer = Timer()
    check_writable(out, "--out")
    data_dir = ensure_fmnist(download=True, install_system_package=True)
    print(f"Fashion-MNIST: {data_dir}")
    if out.exists():
        shutil.rmtree(out)
    store = ArtifactStore(out / "artifacts")
    runs = out / "runs"

    print("\n== classifier (feature extractor for Frechet distances) ==")
    classifier_config = load_config(
        classifier.ClassifierStageConfig, CONFIGS / "classifier-quick.yaml", [f"run_dir={runs / 'classifier'}"]
    )
    feature_classifier = classifier.run(classifier_config, store)

    print("\n== stage 1: autoencoder ==")
    ae_config = load_config(
        autoencoder.AutoencoderStageConfig, CONFIGS / "autoencoder-quick.yaml", [f"run_dir={runs / 'autoencoder'}"]
    )
    ae = autoencoder.run(ae_config, store)

    print("\n== reconstruction evaluation ==")
    recon = evaluate_reconstruction(
        store, ae.ref, split="test", limit=2000, classifier_ref=feature_classifier.ref, out_dir=out / "eval-recon"
    )

    print("\n== encode: the latent cache ==")
    cache = encode(store, ae.ref, EncodeConfig(split="train", limit=20_000))  # the quick DiT sees 32k latents

    print("\n== stage 2: diffusion transformer ==")
    dit_config = load_config(
        diffusion.DiffusionStageConfig,
        CONFIGS / "diffusion-quick.yaml",
        [f"latents={cache.ref}", f"run_dir={runs / 'diffusion'}"],
    )
    model = diffusion.run(dit_config, store)

    print("\n== stage 3: sample and decode ==")
    # 19 network calls per image. The grid and the measurement use the same guidance: with the quick DiT, cfg 3.5
    # buys class accuracy (0.66 at cfg 1.5, 0.74 at 2, 0.84 at 3.5) for little FD (9.10, 8.10, 8.42; docs/results.md).
    picture = SamplingSettings(sampler="flow-heun", num_steps=10, guidance_scale=3.5)
    samples = write_samples(store, model.ref, picture, n=100, out_dir=out / "samples", single_images=False)

    print("\n== sample evaluation ==")
    measured = replace(picture, batch_size=250)
    sample_report = evaluate_samples(
        store, model.ref, measured, n=1000, classifier_ref=feature_classifier.ref, out_dir=out / "eval-samples"
    )

    print(f"\ndemo finished in {format_seconds(timer())}")
    print(f"  artifacts:        {store.root}   (ldm --store {store.root} artifacts list)")
    print(
        f"  classifier:       {feature_classifier.ref}  "
        f"test accuracy {feature_classifier.manifest['metrics']['test']['accuracy']:.4f}"
    )
    print(f"  autoencoder:      {ae.ref}  PSNR {recon['psnr_db']:.2f} dB, SSIM {recon['ssim']:.4f}")
    print(f"  reconstructions:  {out / 'eval-recon' / 'reconstructions.png'}")
    print(f"  latent cache:     {cache.ref}  ({cache.manifest['images']} images x {cache.manifest['views']} views)")
    print(
        f"  diffusion:        {model.ref}  "
        f"final loss {model.manifest['training']['final'].get('loss', float('nan')):.4f}"
    )
    print(
        f"  samples:          FD {sample_report['frechet_distance']:.3f} "
        f"(real train vs test {sample_report['real_reference_distance']:.3f}, "
        f"reconstructed train vs test {sample_report['autoencoder_reference_distance']:.3f}), "
        f"class accuracy {sample_report['class_accuracy']:.3f} "
        f"(reconstructed train images {sample_report['autoencoder_class_accuracy']:.3f}), "
        f"{1000 * sample_report['seconds_per_image']:.1f} ms/image "
        f"({sample_report['n']} samples, {sample_report['features'].split(' ')[0]} features)"
    )
    print(
        f"  sample grid:      {out / 'samples' / 'grid.png'} "
        f"(one row per class, flow-heun 10 steps, CFG {samples['guidance_scale']})"
    )
    print(f"  training curves:  {runs / 'autoencoder' / 'loss.png'}, {runs / 'diffusion' / 'loss.png'}")
    return {
        "classifier": feature_classifier,
        "autoencoder": ae,
        "recon": recon,
        "latents": cache,
        "diffusion": model,
        "samples": sample_report,
    }


SCENES_CONFIGS = CONFIGS.parent / "scenes"
# The demo's prompts: one per category of the suite's grammar, and two naming held-out (item, colour) pairs.
DEMO_PROMPTS = (
    "a bag",
    "a trouser and a sneaker",
    "three tops",
    "a yellow ankle boot",
    "a trouser to the left of a sandal",
    "a green top with a white bag",
    "a red sneaker",
    "a blue trouser above a white top",
)


def run_scenes_demo(out: Path, limit: int = 16) -> dict[str, object]:
    """Train the quick preset of every stage of text-to-image on scenes into `out`, sample captioned prompts and
    score the first `limit` prompts of each category of the prompt suite; return what was made."""
    from stages import parser
    from stages.prompts import evaluate_prompt_suite
    from stages.sample import SamplingModel

    timer = Timer()
    check_writable(out, "--out")
    data_dir = ensure_fmnist(download=True, install_system_package=True)
    print(f"Fashion-MNIST: {data_dir}")
    if out.exists():
        shutil.rmtree(out)
    store = ArtifactStore(out / "artifacts")
    runs = out / "runs"

    print("\n== the judge: scene parser (evaluation only) ==")
    parser_config = load_config(
        parser.ParserStageConfig, SCENES_CONFIGS / "parser-quick.yaml", [f"run_dir={runs / 'parser'}"]
    )
    judge = parser.run(parser_config, store)

    print("\n== stage 1: autoencoder (64x64 RGB scenes -> 16x16x8 latents) ==")
    ae_config = load_config(
        autoencoder.AutoencoderStageConfig,
        SCENES_CONFIGS / "autoencoder-quick.yaml",
        [f"run_dir={runs / 'autoencoder'}"],
    )
    ae = autoencoder.run(ae_config, store)

    print("\n== encode: the latent cache, with each scene's caption ==")
    cache = encode(store, ae.ref, EncodeConfig(split="train", limit=20_000))

    print("\n== stage 2: text-conditioned diffusion transformer ==")
    dit_config = load_config(
        diffusion.DiffusionStageConfig,
        SCENES_CONFIGS / "diffusion-quick.yaml",
        [f"latents={cache.ref}", f"run_dir={runs / 'diffusion'}"],
    )
    model = diffusion.run(dit_config, store)

    print("\n== stage 3: sample prompts ==")
    picture = SamplingSettings(num_steps=20, guidance_scale=3.0)
    samples = write_samples(
        store, model.ref, picture, n=4 * len(DEMO_PROMPTS), out_dir=out / "samples", prompts=list(DEMO_PROMPTS)
    )

    print("\n== prompt evaluation ==")
    report = evaluate_prompt_suite(
        store, judge.ref, SamplingModel(model.ref), picture, 2, limit, out_dir=out / "eval-prompts"
    )
    generated, real = report["columns"]["generated"], report["columns"]["real"]
    print(f"\nscenes demo finished in {format_seconds(timer())}")
    print(f"  artifacts:   {store.root}   (ldm --store {store.root} artifacts list)")
    print(f"  parser:      {judge.ref}")
    print(f"  autoencoder: {ae.ref}   diffusion: {model.ref}")
    print(f"  prompts:     {out / 'samples' / 'grid.png'} (each prompt 4 times, captioned)")
    print(
        f"  prompt score {generated['overall']:.3f} overall, {generated['held_out']:.3f} on held-out pairs "
        f"(real test scenes {real['overall']:.3f}; {report['prompts']} prompts x 2 images)"
    )
    return {
        "parser": judge,
        "autoencoder": ae,
        "latents": cache,
        "diffusion": model,
        "samples": samples,
        "report": report,
    }
