"""The `ldm` command: staged training, encoding, evaluation and the artifact store.

It lives in `stages/` because it composes the stages; the library `ldm/` never imports them.
"""

from __future__ import annotations

import json
import shlex
import sys
import warnings
from pathlib import Path

import click
from safetensors import SafetensorError

from ldm.artifacts import (
    Artifact,
    ArtifactError,
    ArtifactStore,
    ArtifactWarning,
    TempFolder,
    Verdict,
)
from ldm.config import ConfigError, load_config
from ldm.data.folder import ImageReadError
from ldm.destinations import WriteError, write_error
from ldm.runtime import DEVICE_FORMS, check_device, tune_cpu_allocator


def _store(ctx: click.Context) -> ArtifactStore:
    return ArtifactStore(ctx.obj["store"])


def _fail(err: Exception) -> None:
    message = str(err)
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep the worker's own message
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    raise click.ClickException(message) from err


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML preset (see configs/); without it the dataclass defaults are used.",
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set trainer.max_steps=500 --set model.ch=32 (repeatable).",
)
resume_option = click.option(
    "--resume", is_flag=True, help="Continue the run from its last checkpoint (optimizer, step and all state)."
)
allow_change_option = click.option(
    "--allow-change",
    "allow_changes",
    multiple=True,
    metavar="KEY",
    help="With --resume: accept a changed trainer.lr, trainer.grad_clip or trainer.precision (repeatable). Steps, "
    "logging and devices may change without it; any other difference from the run's config is refused.",
)
run_dir_option = click.option(
    "--run-dir", default=None, help="Run folder for checkpoints, logs and pictures (default: the config's run_dir)."
)


class DeviceType(click.ParamType):
    """A --device value, checked against this machine as the command line is parsed (before any model loads)."""

    name = "device"

    def convert(self, value, param, ctx) -> str:
        try:
            return check_device(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


DEVICE_OPTION = click.option("--device", type=DeviceType(), default="cpu", show_default=True, help=f"{DEVICE_FORMS}.")


class Commands(click.Group):
    """The `ldm` group: a full or read-only disk that no command turned into a message is one line as well."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (OSError, SafetensorError) as err:
            error = write_error(err, (ctx.obj or {}).get("store"))
            if error is None:
                raise
            _fail(error)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    envvar="LDM_HOME",
    default="artifacts",
    show_default=True,
    help="Artifact store folder (also LDM_HOME).",
)
@click.pass_context
def main(ctx: click.Context, store: str) -> None:
    """Staged latent diffusion: train an autoencoder, encode a latent cache, train a DiT, sample."""
    tune_cpu_allocator()  # large CPU activations reuse freed heap instead of fresh pages (see ldm/runtime.py)
    ctx.ensure_object(dict)
    ctx.obj["store"] = store
    ctx.with_resource(warnings.catch_warnings())  # the hook below lasts as long as the command
    warnings.showwarning = _store_warnings_in_one_line(warnings.showwarning)


def _store_warnings_in_one_line(show):
    """A `warnings.showwarning` printing the store's warnings as one `warning: ...` line; others go to `show`."""

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ArtifactWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


@main.group()
def train() -> None:
    """Train one stage and store its artifact."""


# Errors a user can fix (bad config, missing artifact or checkpoint, unreadable image, diverged run, a
# destination that cannot be written): a message, no traceback.
USER_ERRORS = (
    ConfigError,
    ArtifactError,
    FileNotFoundError,
    FileExistsError,
    FloatingPointError,
    ValueError,
    ImageReadError,
    WriteError,
)


def _train(
    ctx: click.Context,
    config_class: type,
    run,
    config_path: str | None,
    overrides: tuple[str, ...],
    resume: bool,
    allow_changes: tuple[str, ...],
    data: str | None = None,
    **fields: str | None,
) -> None:
    """Load a stage's config (fields given as options win over the file and --set) and run the stage.

    SIGTERM (a scheduler ending the job) and SIGINT stop the run cleanly: exit status 128 + the signal's
    number (143, 130), one line naming the step saved and the command that continues the run.
    """
    from dataclasses import replace

    from ldm.data import with_data
    from ldm.training import TrainingInterrupted, interrupted_message, stop_on_signals

    try:
        config = load_config(config_class, config_path, overrides)
        if data is not None:  # replace() runs the config's checks again on the new data
            config = replace(config, data=with_data(config.data, data))
        for key, value in fields.items():
            if value:  # set as given, not parsed as YAML: a version prefix like 0123 stays a string
                setattr(config, key, value)
        with stop_on_signals():
            run(config, store=_store(ctx), resume=resume, allow_changes=allow_changes)
    except TrainingInterrupted as stop:
        click.echo(interrupted_message(stop, config.run_dir, _resume_command()), err=True)
        ctx.exit(128 + stop.signum)
    except USER_ERRORS as err:
        _fail(err)


def _resume_command() -> str:
    """This process's command line with --resume added (once): what continues an interrupted run."""
    argv = list(sys.argv)
    # `python -m stages.cli ...` has the module's file as argv[0]: give the interpreter and -m back.
    launcher = sys.orig_argv[: len(sys.orig_argv) - len(argv) + 1]
    if "-m" in launcher:
        argv = [*launcher, *argv[1:]]
    return shlex.join(argv if "--resume" in argv else [*argv, "--resume"])


def train_options(command):
    """The options every `ldm train` command takes: --config, --set, --resume, --allow-change, --run-dir."""
    for option in (click.pass_context, run_dir_option, allow_change_option, resume_option, set_option, config_option):
        command = option(command)
    return command


data_option = click.option(
    "--data",
    default=None,
    help="Train on this data instead of the config's: fmnist or an image folder; for a sound config fsdd, a folder "
    "holding FSDD's recordings/ (else $LDM_DATA/fsdd, ~/.cache/ldm/fsdd or a download), or a folder of WAV files.",
)


@train.command("autoencoder")
@data_option
@train_options
def train_autoencoder(ctx: click.Context, **options) -> None:
    """Stage 1: train the KL autoencoder (L1/L2 + LPIPS + KL, optional PatchGAN) and store an `autoencoder` artifact."""
    from stages.autoencoder import AutoencoderStageConfig, run

    _train(ctx, AutoencoderStageConfig, run, **options)


@train.command("classifier")
@data_option
@train_options
def train_classifier(ctx: click.Context, **options) -> None:
    """Train the classifier whose features measure Frechet distances and class accuracy (images, or spoken digits
    through a log-mel front end); store a `classifier` artifact."""
    from stages.classifier import ClassifierStageConfig, run

    _train(ctx, ClassifierStageConfig, run, **options)


@train.command("parser")
@train_options
def train_parser(ctx: click.Context, **options) -> None:
    """Train the scene parser that judges text-to-image on scenes (each cell's item and colour); store a `parser`
    artifact. It only scores: no generator trains on it."""
    from stages.parser import ParserStageConfig, run

    _train(ctx, ParserStageConfig, run, **options)


@train.command("diffusion")
@click.option(
    "--latents", default=None, help="Latent cache reference (default: the config's `latents`, latents@latest)."
)
@train_options
def train_diffusion(ctx: click.Context, **options) -> None:
    """Stage 2: train a DiT on a latent cache; store a `diffusion` artifact that names its cache and autoencoder."""
    from stages.diffusion import DiffusionStageConfig, run

    _train(ctx, DiffusionStageConfig, run, **options)


@train.command("distill")
@click.option(
    "--teacher",
    default=None,
    help="Rectified-flow `diffusion` artifact to distil (default: the config's `teacher`, diffusion@latest).",
)
@train_options
def train_distill(ctx: click.Context, **options) -> None:
    """Distil a flow DiT into a student that samples in 1, 2 or 4 calls with its guidance built in; store a
    `diffusion` artifact that names its teacher (on the teacher's own latents only)."""
    from stages.distill import DistillStageConfig, run

    _train(ctx, DistillStageConfig, run, **options)


@train.command("prune")
@click.option(
    "--parent",
    default=None,
    help="Trained `diffusion` artifact to prune (default: the config's `parent`, diffusion@latest).",
)
@train_options
def train_prune(ctx: click.Context, **options) -> None:
    """Prune a DiT's blocks (named, evenly spaced, or chosen by measured importance) and recover the smaller DiT on
    its parent's output; store a `diffusion` artifact that names its parent and the blocks removed."""
    from stages.prune import PruneStageConfig, run

    _train(ctx, PruneStageConfig, run, **options)


# Options of more than one command.
AUTOENCODER_DATA_OPTION = click.option(
    "--data",
    default=None,
    help="fmnist or an image folder path; for sound, fsdd, a folder holding FSDD's recordings/, or a folder of WAV "
    "files (default: the data the autoencoder was trained on).",
)
FEATURES_OPTION = click.option(
    "--features",
    type=click.Choice(["auto", "inception", "classifier"]),
    default="auto",
    show_default=True,
    help="Feature extractor of the Frechet distance; auto uses Inception when its weights are present.",
)


@main.command("encode")
@click.option(
    "--autoencoder",
    "autoencoder_ref",
    default="autoencoder@latest",
    show_default=True,
    help="Autoencoder artifact reference.",
)
@AUTOENCODER_DATA_OPTION
@click.option("--split", default="train", show_default=True)
@set_option
@click.pass_context
def encode_command(
    ctx: click.Context, autoencoder_ref: str, data: str | None, split: str, overrides: tuple[str, ...]
) -> None:
    """Encode a data set once into a `latents` artifact (posterior mean/std, flips, latent statistics).

    Settings (--set key=value): flips, stats (channel|global|source: an imported autoencoder's own), batch_size,
    shard_size, dtype, autocast_bf16, limit, device. A re-run with the same inputs returns the stored cache.
    """

    from ldm.config import from_dict
    from ldm.data import DataConfig, with_data
    from stages.encode import EncodeConfig, encode

    try:
        config = load_config(EncodeConfig, None, [*overrides, f"split={split}"])
        check_device(config.device)
        store = _store(ctx)
        data_config = None
        if data is not None:
            base = from_dict(
                DataConfig, store.load(autoencoder_ref, stage="autoencoder", verify=False).config()["data"], "data"
            )
            data_config = with_data(base, data)
        encode(store, autoencoder_ref, config, data_config)
    except USER_ERRORS as err:
        _fail(err)


@main.group("eval")
def evaluate() -> None:
    """Evaluate stored artifacts."""


@evaluate.command("recon")
@click.option(
    "--autoencoder",
    "autoencoder_ref",
    default="autoencoder@latest",
    show_default=True,
    help="Autoencoder artifact reference.",
)
@AUTOENCODER_DATA_OPTION
@click.option(
    "--split", default="test", show_default=True, help="Data split (fmnist: train or test; folders: a subfolder)."
)
@click.option("--n", "limit", default=0, show_default=True, help="Evaluate only the first N images (0: all).")
@click.option("--batch-size", default=250, show_default=True)
@click.option(
    "--classifier",
    "classifier_ref",
    default="classifier@latest",
    show_default=True,
    help="Classifier artifact for the Frechet distance when Inception weights are absent.",
)
@FEATURES_OPTION
@click.option(
    "--lpips",
    type=click.Choice(["auto", "pretrained", "random"]),
    default="auto",
    show_default=True,
    help="LPIPS backbone; auto uses the pretrained one when its weights are present and says so.",
)
@click.option(
    "--out",
    "out_dir",
    default=None,
    help="Folder for report.json and reconstructions.png (default runs/eval/recon-<version>-<split>).",
)
@DEVICE_OPTION
@click.pass_context
def eval_recon(ctx: click.Context, **kwargs) -> None:
    """Reconstruction quality (PSNR, SSIM, LPIPS, rFID) and encode/decode throughput; numbers go into the manifest."""
    from stages.evaluate import evaluate_reconstruction

    try:
        evaluate_reconstruction(_store(ctx), **kwargs)
    except USER_ERRORS as err:
        _fail(err)


def sampling_options(*, steps: int, cfg: float, batch_size: int, guide: bool = True):
    """The options of a command that samples, made from SamplingSettings' fields (flag, help and choices in their
    metadata) so that every sampling command takes the same flags; `steps`, `cfg` and `batch_size` are this command's
    defaults (cfg: for a model without guidance built in). `settings_from_options` turns them back into settings."""
    from dataclasses import fields

    from ldm.generation import SamplingSettings

    defaults = {"num_steps": steps, "batch_size": batch_size}
    skipped = set() if guide else {"guide_scale"}

    def decorate(command):
        for setting in reversed([f for f in fields(SamplingSettings) if "flag" in f.metadata]):
            if setting.name in skipped:
                continue
            meta = dict(setting.metadata)
            flag, help_text, choices = meta.pop("flag"), meta.pop("help"), meta.pop("choices", None)
            option = {"help": help_text, **meta}
            if choices is not None:
                option["type"] = click.Choice(choices)
            if setting.name == "guidance_interval":
                option.update(nargs=2, type=float, default=None)
            elif setting.name == "guidance_scale":  # None: chosen once the model is known (a student's is 1)
                option.update(type=float, default=None)
                option["help"] += f" Default: {cfg:g}, or 1 for a distilled student (guidance built in)."
            elif setting.name in ("guide_scale", "shift"):  # None: 2 with --guide; the model's time_shift
                option.update(type=float, default=None)
            else:
                option.update(
                    default=defaults.get(setting.name, setting.default), show_default=setting.default is not None
                )
                if "type" not in option:
                    option["type"] = type(option["default"])
            command = click.option(flag, setting.name, **option)(command)
        return command

    return decorate


def settings_from_options(options: dict, guide_ref: str | None = None):
    """Pop the SamplingSettings fields `sampling_options` added from a command's `options` and return the settings,
    validated as they are built; a --guide-scale without --guide is refused, as the pipeline refuses it."""
    from dataclasses import fields, replace

    from ldm.generation import SamplingSettings

    values = {f.name: options.pop(f.name) for f in fields(SamplingSettings) if f.name in options}
    guide_scale = values.pop("guide_scale", None)
    settings = SamplingSettings(**values, guide_scale=2.0 if guide_scale is None else guide_scale)
    if guide_scale is not None and not guide_ref:  # its range was checked above, so a bad value hears that first
        raise click.UsageError(
            "--guide-scale only applies with --guide (autoguidance by a weaker DiT): add "
            "--guide diffusion@<weaker model>, or drop --guide-scale"
        )
    return settings if guide_ref else replace(settings, guide_scale=1.0)


def model_options(command):
    """The options that choose what a sampling command loads (stages.sample.SamplingModel): --model, --autoencoder,
    --guide, --precision, --cache-fraction, --cache-forecast and --device."""
    for option in reversed(
        [
            click.option(
                "--model",
                "model_ref",
                default="diffusion@latest",
                show_default=True,
                help="Diffusion artifact reference.",
            ),
            click.option(
                "--autoencoder",
                "autoencoder_ref",
                default=None,
                help="Decode with this autoencoder instead of the lineage's; it must share the lineage's encoder "
                "(a decoder fine-tune).",
            ),
            click.option(
                "--guide",
                "guide_ref",
                default=None,
                help="Autoguidance by this weaker DiT (same latent cache and objective; smaller or trained less), at "
                "--guide-scale; --cfg 1 for autoguidance alone, above 1 to add classifier-free guidance.",
            ),
            click.option(
                "--precision",
                type=click.Choice(["float32", "bf16", "int8"]),
                default=None,
                help="DiT arithmetic: int8 block linears (CPU), bf16 autocast, or float32. Default: the artifact's own "
                "(float32, or int8 for one stored by `ldm export diffusion --quantize int8`).",
            ),
            click.option(
                "--cache-fraction",
                type=click.FloatRange(0.0, 0.9),
                default=0.0,
                show_default=True,
                help="Step caching: skip this share of the DiT's block evaluations, reusing residuals of the previous "
                "call (a schedule calibrated once per model and setting, kept in the artifact's manifest).",
            ),
            click.option(
                "--cache-forecast",
                is_flag=True,
                help="With --cache-fraction: a skipped block adds the linear forecast in t of its last two residuals "
                "instead of the last one (TaylorSeer's first order).",
            ),
            DEVICE_OPTION,
        ]
    ):
        command = option(command)
    return command


def model_from_options(options: dict):
    """Pop the options `model_options` added and return the SamplingModel they describe."""
    from stages.sample import SamplingModel

    return SamplingModel(
        ref=options.pop("model_ref"),
        autoencoder=options.pop("autoencoder_ref"),
        guide=options.pop("guide_ref"),
        precision=options.pop("precision"),
        cache_fraction=options.pop("cache_fraction"),
        cache_forecast=options.pop("cache_forecast"),
        device=options.pop("device"),
    )


def MEASUREMENT_OPTIONS(command):
    """--classifier and --features of the commands that measure samples (`ldm eval samples`, `ldm ema`)."""
    command = FEATURES_OPTION(command)
    return click.option(
        "--classifier",
        "classifier_ref",
        default="classifier@latest",
        show_default=True,
        help="Classifier for class accuracy (and the Frechet features without Inception).",
    )(command)


@main.command("sample")
@model_options
@click.option("--n", default=64, show_default=True, help="Number of images.")
@click.option("--classes", default=None, help="Class indices, e.g. 3 or 0,2,5 (cycled); default: every class in turn.")
@click.option(
    "--prompt",
    "prompt_texts",
    multiple=True,
    help="A text model's prompt (repeatable); the --n images go to the prompts in turn, n / prompts each.",
)
@click.option("--prompts", "prompts_file", default=None, help="A text file of prompts, one per line (# comments).")
@click.option("--negative-prompt", default=None, help="A text model's guidance pushes away from this prompt.")
@sampling_options(steps=25, cfg=2.0, batch_size=64)
@click.option(
    "--out",
    "out_dir",
    default="out/samples",
    show_default=True,
    help="Folder for grid.png, images/ (audio/ for a sound model: WAV files) and samples.json.",
)
@click.option("--no-images", is_flag=True, help="Write only the grid, not one PNG (or WAV) per sample.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the samples of an earlier run in --out (grid.png, samples.json, images/NNNNNN-classC.png, "
    "audio/NNNNNN-classC.wav; nothing else).",
)
@click.pass_context
def sample_command(
    ctx: click.Context,
    n: int,
    classes: str | None,
    prompt_texts: tuple[str, ...],
    prompts_file: str | None,
    negative_prompt: str | None,
    out_dir: str,
    no_images: bool,
    overwrite: bool,
    **options,
) -> None:
    """Stage 3: sample latents with a DiT (by class, or by prompt for a text model) and decode them.

    Images are written batch by batch as they are made; samples.json says "complete": true once all are.
    """
    from stages.sample import read_prompts, write_samples

    try:
        model = model_from_options(options)
        settings = settings_from_options(options, model.guide)
        prompts = list(prompt_texts) + (read_prompts(prompts_file) if prompts_file else [])
        write_samples(
            _store(ctx),
            model,
            settings,
            n,
            classes,
            out_dir,
            not no_images,
            overwrite,
            default_guidance=2.0,
            prompts=prompts or None,
            negative_prompt=negative_prompt,
        )
    except USER_ERRORS as err:
        _fail(err)


@evaluate.command("samples")
@model_options
@click.option(
    "--n", default=10_000, show_default=True, help="Samples (class-balanced); also the number of real images compared."
)
@sampling_options(steps=20, cfg=1.5, batch_size=250)
@MEASUREMENT_OPTIONS
@click.option(
    "--out", "out_dir", default=None, help="Folder for report.json and samples.png (default runs/eval/samples-...)."
)
@click.pass_context
def eval_samples(
    ctx: click.Context, n: int, classifier_ref: str, features: str, out_dir: str | None, **options
) -> None:
    """Sample quality: Frechet distance to the test split, class accuracy, time per image; numbers go into the manifest.

    --cfg is the guidance of the measurement, often lower than for pictures.
    """
    from stages.sample import evaluate_samples

    try:
        model = model_from_options(options)
        settings = settings_from_options(options, model.guide)
        evaluate_samples(_store(ctx), model, settings, n, classifier_ref, features, out_dir, default_guidance=1.5)
    except USER_ERRORS as err:
        _fail(err)


@main.command("ema")
@click.option(
    "--model",
    "model_ref",
    required=True,
    help="Diffusion artifact trained with posthoc_ema (its snapshots name the run).",
)
@click.option(
    "--sigma-rel",
    "sigma_rel",
    required=True,
    metavar="S1,S2,...",
    help="EMA lengths to reconstruct and compare, relative widths in (0, 0.2887], e.g. 0.03,0.05,0.08,0.12,0.16.",
)
@click.option(
    "--run-dir",
    default=None,
    help="The training run folder, when it moved (default: where the model's manifest says its snapshots are).",
)
@click.option(
    "--n", default=1000, show_default=True, help="Samples per EMA length (class-balanced; the same seeds for each)."
)
@sampling_options(steps=20, cfg=1.5, batch_size=250, guide=False)
@MEASUREMENT_OPTIONS
@click.option(
    "--out",
    "out_dir",
    default=None,
    help="Folder for report.json and one grid per EMA length (default runs/eval/posthoc-ema-...).",
)
@DEVICE_OPTION
@click.pass_context
def ema_command(
    ctx: click.Context,
    model_ref: str,
    sigma_rel: str,
    run_dir: str | None,
    n: int,
    classifier_ref: str,
    features: str,
    out_dir: str | None,
    device: str,
    **options,
) -> None:
    """Post-hoc EMA (Karras et al. 2024): reconstruct EMA lengths from a run's snapshots, measure each, store the best.

    Each --sigma-rel is rebuilt at the model's last step from the power-function EMA snapshots its run
    kept (train with --set posthoc_ema=[0.05,0.10] --set posthoc_snapshot_every=N), then measured as
    `ldm eval samples` does, with the same samples and seeds, beside the model's own EMA. The lowest
    Frechet distance becomes a new `diffusion` artifact whose parent is --model (same config and latents).
    """
    from stages.ema import parse_sigma_rels, posthoc_ema

    try:
        settings = settings_from_options(options)
        posthoc_ema(
            _store(ctx),
            model_ref,
            parse_sigma_rels(sigma_rel),
            settings,
            n,
            run_dir,
            classifier_ref,
            features,
            out_dir,
            device,
            default_guidance=1.5,
        )
    except USER_ERRORS as err:
        _fail(err)


@evaluate.command("prompts")
@model_options
@click.option(
    "--parser", "parser_ref", default="parser@latest", show_default=True, help="Scene parser artifact that judges."
)
@click.option("--per-prompt", default=4, show_default=True, help="Images sampled per prompt (GenEval: 4).")
@click.option(
    "--limit", default=0, show_default=True, help="Only the first N prompts of each category (0: the whole suite)."
)
@click.option(
    "--real-only",
    is_flag=True,
    help="Load no DiT: score the suite's real scenes, and their reconstructions by --autoencoder when given.",
)
@sampling_options(steps=20, cfg=2.0, batch_size=64, guide=False)
@click.option(
    "--out", "out_dir", default=None, help="Folder for report.json and images.png (default runs/eval/prompts-...)."
)
@click.pass_context
def eval_prompts(
    ctx: click.Context, parser_ref: str, per_prompt: int, limit: int, real_only: bool, out_dir: str | None, **options
) -> None:
    """Text-to-image on scenes, GenEval's way: sample the prompt suite (552 prompts in six categories, 60 naming
    held-out pairs), judge every image with the scene parser and print the scores beside those of the real scenes
    and their reconstructions by the autoencoder; the scores go into the DiT's manifest."""
    from stages.prompts import evaluate_prompt_suite

    try:
        model = model_from_options(options)
        settings = settings_from_options(options, model.guide)
        evaluate_prompt_suite(
            _store(ctx), parser_ref, model, settings, per_prompt, limit, real_only, out_dir, default_guidance=2.0
        )
    except USER_ERRORS as err:
        _fail(err)


@main.command("serve")
@click.option("--model", default="diffusion@latest", show_default=True, help="The DiT a request that names none gets.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; others need --token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token", default=None, help="Bearer token every /v1 call must send (needed beyond localhost).")
@click.option("--max-n", default=16, show_default=True, type=click.IntRange(1), help="Images per request.")
@click.option("--max-steps", default=100, show_default=True, type=click.IntRange(1), help="Sampler steps per request.")
@click.option("--max-batch", default=64, show_default=True, type=click.IntRange(1), help="Images per sampler run.")
@click.option(
    "--window-ms",
    default=25.0,
    show_default=True,
    type=click.FloatRange(0),
    help="How long the oldest request waits for others to share its sampler run.",
)
@click.option("--queue-size", default=64, show_default=True, type=click.IntRange(1), help="Requests held; then 503.")
@click.option("--models", default=2, show_default=True, type=click.IntRange(1), help="Pipelines kept loaded (LRU).")
@click.option("--no-batching", is_flag=True, help="One request per sampler run (for comparison).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@click.pass_context
def serve_command(ctx: click.Context, model: str, host: str, port: int, token: str | None, **options) -> None:
    """Serve the sampling API over HTTP with dynamic batching, and a page to try a model at / (extra [serve])."""
    from ldm.serving import ModelPool, RequestError, ServeLimits
    from stages.serve import MissingExtra, serve

    device = options.pop("device")
    try:
        check_device(device)
        limits = ServeLimits(batching=not options.pop("no_batching"), **options)
        store = _store(ctx)
        ModelPool(store, 1).resolve(model)  # a wrong default fails now, not at the first request
        serve(store, host, port, limits, model, token, device)
    except (*USER_ERRORS, MissingExtra) as err:
        _fail(err)
    except RequestError as err:
        _fail(ValueError(err.message))


@main.command()
@click.option(
    "--out",
    default=None,
    help="Folder for the demo's store, runs and pictures, replaced on each run (default out/demo, out/demo-scenes).",
)
@click.option(
    "--scenes",
    is_flag=True,
    help="Text-to-image instead: the quick presets of configs/scenes (parser, autoencoder, text DiT), prompts "
    "sampled and scored (out/demo-scenes by default).",
)
def demo(out: str | None, scenes: bool) -> None:
    """Run the quick preset of every stage on Fashion-MNIST (or, with --scenes, of text-to-image on scenes) and
    print where everything is."""
    from stages.demo import run_demo, run_scenes_demo

    try:
        if scenes:
            run_scenes_demo(Path(out or "out/demo-scenes"))
        else:
            run_demo(Path(out or "out/demo"))
    except USER_ERRORS as err:
        _fail(err)


@main.group()
def artifacts() -> None:
    """Inspect the artifact store."""


@artifacts.command("list")
@click.option("--stage", default=None, help="Only this stage (autoencoder, classifier, latents, diffusion, parser).")
@click.pass_context
def artifacts_list(ctx: click.Context, stage: str | None) -> None:
    """List stored artifacts, oldest first, with their parents and key numbers, then any damaged folder."""
    store = _store(ctx)
    try:
        found, broken = store.scan(stage)
    except (ArtifactError, OSError) as err:
        _fail(err)
    if not found and not broken:
        click.echo(f"no artifacts in {store.root}")
        return
    for artifact in found:
        click.echo(_list_line(artifact))
    for path, reason in broken:
        click.echo(f"BROKEN {path.parent.name}/{path.name}: {reason}")


def _list_line(artifact: Artifact) -> str:
    """One `artifacts list` line; created and metrics are unsealed, so any JSON may be there."""
    parents = ", ".join(artifact.parents.values()) or "-"
    metrics = artifact.manifest.get("metrics")
    summary = "; ".join(
        f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
        for name, values in (metrics.items() if isinstance(metrics, dict) else ())
        if isinstance(values, dict)
    )
    created = str(artifact.manifest.get("created", ""))
    return f"{artifact.ref:<28} {created:<21} parents: {parents}  {summary}"


@artifacts.command("show")
@click.argument("ref")
@click.option(
    "--verify/--no-verify", default=True, show_default=True, help="Check the files' sha256 against the manifest."
)
@click.pass_context
def artifacts_show(ctx: click.Context, ref: str, verify: bool) -> None:
    """Print an artifact's manifest (lineage, metrics, files) and its config."""
    store = _store(ctx)
    try:
        artifact = store.load(ref, verify=verify)
        lineage = " <- ".join(a.ref for a in store.lineage(artifact))
        config = artifact.config_text()
    except (ArtifactError, OSError) as err:
        _fail(err)
    click.echo(f"{artifact.ref}  ({artifact.path})")
    click.echo(f"lineage: {lineage}")
    click.echo(json.dumps(artifact.manifest, indent=2))
    click.echo("config:")
    click.echo(config)


@artifacts.command("verify")
@click.argument("ref", required=False)
@click.pass_context
def artifacts_verify(ctx: click.Context, ref: str | None) -> None:
    """Check REF (or every folder in the store): files against their sha256, manifest against its version.

    One line per artifact (ok, legacy, or FAILED with the reason), then a summary; exit status 1 when any failed.
    Without REF, the temporary folders that writes which died (killed, crashed) left are listed too, and a last
    line counts them; they leave the exit status as it is, since no artifact depends on them.
    """
    store = _store(ctx)
    try:
        verdicts = store.audit(ref)
        stale = [] if ref is not None else [found for found in store.temp_folders() if found.stale]
    except (ArtifactError, OSError) as err:
        _fail(err)
    for verdict in verdicts:
        click.echo(_verdict_line(verdict))
    for found in stale:
        click.echo(
            f"{_temp_label(found):<28} stale temporary folder of a write that did not finish: {_temp_summary(found)}"
        )
    failed = sum(v.problem is not None for v in verdicts)
    legacy = sum(v.problem is None and v.legacy for v in verdicts)
    click.echo(
        f"{len(verdicts)} checked in {store.root}: {len(verdicts) - failed - legacy} ok, {legacy} legacy, "
        f"{failed} failed"
    )
    if stale:
        click.echo(
            f"{_count(len(stale), 'stale temporary folder')}: `ldm artifacts clean` removes "
            f"{'it' if len(stale) == 1 else 'them'}"
        )
    if failed:
        ctx.exit(1)


@artifacts.command("clean")
@click.option("--stage", default=None, help="Only this stage (autoencoder, classifier, latents, diffusion, parser).")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
@click.pass_context
def artifacts_clean(ctx: click.Context, stage: str | None, dry_run: bool) -> None:
    """Remove the temporary folders that writes which died (killed, crashed) left in the store, and print each.

    A folder whose writer is still running holds a lock and is kept (so is one without a lock file that changed
    in the last minute: a write just starting). Nothing else in the store is touched.
    """
    store = _store(ctx)
    try:
        found = store.clean(stage, dry_run=dry_run)
    except (ArtifactError, OSError) as err:
        _fail(err)
    for folder in found:
        if folder.stale:
            click.echo(f"{'would remove' if dry_run else 'removed'} {_temp_label(folder)} ({_temp_summary(folder)})")
        elif folder.held:
            click.echo(f"kept {_temp_label(folder)}: being written (a running write holds its lock)")
        else:
            click.echo(f"kept {_temp_label(folder)}: no lock file, changed {_ago(folder.age)}; a write may be starting")
    stale = [folder for folder in found if folder.stale]
    if not stale:
        click.echo(f"no stale temporary folders in {store.root}")
        return
    done = "would remove" if dry_run else "removed"
    click.echo(
        f"{done} {_count(len(stale), 'stale temporary folder')} ({_size(sum(f.bytes for f in stale))}) "
        f"from {store.root}"
    )


def _temp_label(found: TempFolder) -> str:
    return f"{found.path.parent.name}/{found.path.name}"


def _temp_summary(found: TempFolder) -> str:
    return f"{_size(found.bytes)}, last changed {_ago(found.age)}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _size(n: int) -> str:
    """`n` bytes in the largest unit it fills: 512 bytes, 4.1 kB, 3.2 GB."""
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _ago(seconds: float) -> str:
    for scale, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= scale:
            return f"{seconds / scale:.1f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _verdict_line(verdict: Verdict) -> str:
    if verdict.problem is not None:
        return f"{verdict.name:<28} FAILED: {verdict.problem}"
    if verdict.legacy:
        return f"{verdict.name:<28} legacy: manifest fields not sealed (files ok; re-create it to seal them)"
    return f"{verdict.name:<28} ok"


import_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a config field of the import, e.g. --set model.resolution=512 (repeatable).",
)


@main.group("import")
def import_group() -> None:
    """Import pretrained weights (diffusers, CompVis latent-diffusion, facebookresearch/DiT) as artifacts."""


@import_group.command("autoencoder")
@click.option(
    "--from-diffusers",
    type=click.Path(),
    default=None,
    help="diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors or .bin), or a pipeline "
    "folder with vae/.",
)
@click.option(
    "--from-compvis",
    type=click.Path(),
    default=None,
    help="CompVis latent-diffusion / taming AutoencoderKL checkpoint (.ckpt, .pt or .safetensors); its shape is the "
    "kl-f8 one unless --set model.* says otherwise.",
)
@click.option(
    "--data",
    default=None,
    help="Default data of `ldm encode` / `ldm eval recon` for this autoencoder: fmnist or an image folder (default: "
    "fmnist for 1 channel, none for RGB).",
)
@import_set_option
@click.pass_context
def import_autoencoder_command(
    ctx: click.Context,
    from_diffusers: str | None,
    from_compvis: str | None,
    data: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Store a pretrained KL autoencoder as an `autoencoder` artifact (weights checked key by key and shape by shape).

    --set takes model.* (AutoencoderConfig: e.g. model.resolution, or for CompVis model.ch, model.ch_mult,
    model.num_res_blocks, model.latent_channels, model.in_channels) and data.* fields. A diffusers
    scaling_factor / shift_factor (or latents_mean / latents_std) is kept as the artifact's latent_stats.
    """
    from stages.interop import import_autoencoder

    try:
        import_autoencoder(_store(ctx), from_diffusers, from_compvis, overrides, data)
    except USER_ERRORS as err:
        _fail(err)


@import_group.command("diffusion")
@click.option(
    "--from-dit",
    type=click.Path(),
    default=None,
    help="facebookresearch/DiT checkpoint (e.g. DiT-XL-2-256x256.pt, or .safetensors): a state dict, or one under "
    '"ema" / "model".',
)
@click.option(
    "--from-diffusers",
    type=click.Path(),
    default=None,
    help="diffusers DiTTransformer2DModel folder (config.json + weights), or a DiT pipeline folder with transformer/.",
)
@click.option(
    "--autoencoder",
    "autoencoder_ref",
    required=True,
    help="The autoencoder artifact whose latents the DiT was trained on (e.g. an imported SD VAE).",
)
@click.option(
    "--num-heads",
    type=int,
    default=None,
    help="Attention heads (not readable from the weights; default: the DiT paper's for its depth and width).",
)
@click.option(
    "--scaling-factor",
    type=float,
    default=None,
    help="Latent scale the DiT was trained with, (z - shift) * scale (default: the autoencoder's source latent stats).",
)
@click.option("--shift-factor", type=float, default=None, help="Latent shift, with --scaling-factor (default 0).")
@import_set_option
@click.pass_context
def import_diffusion_command(
    ctx: click.Context,
    from_dit: str | None,
    from_diffusers: str | None,
    autoencoder_ref: str,
    num_heads: int | None,
    scaling_factor: float | None,
    shift_factor: float | None,
    overrides: tuple[str, ...],
) -> None:
    """Store a pretrained DiT as a `diffusion` artifact that `ldm sample` and the pipeline can use.

    The architecture is read from the weights (original DiT) or config.json (diffusers); --set takes
    model.* (DiTConfig) and diffusion.* (DiffusionConfig; default DiT's linear-schedule DDPM, eps).
    """
    from stages.interop import import_diffusion

    try:
        import_diffusion(
            _store(ctx), autoencoder_ref, from_dit, from_diffusers, overrides, num_heads, scaling_factor, shift_factor
        )
    except USER_ERRORS as err:
        _fail(err)


@main.group("export")
def export_group() -> None:
    """Export artifacts as diffusers model folders."""


@export_group.command("autoencoder")
@click.argument("ref")
@click.option(
    "--to-diffusers",
    "out_dir",
    required=True,
    type=click.Path(),
    help="New folder for config.json + diffusion_pytorch_model.safetensors.",
)
@click.option(
    "--latents",
    "latents_ref",
    default=None,
    help="Latent cache whose statistics become scaling_factor (default: the source's, else the newest cache of this "
    "autoencoder).",
)
@click.pass_context
def export_autoencoder_command(ctx: click.Context, ref: str, out_dir: str, latents_ref: str | None) -> None:
    """Write an autoencoder artifact as a diffusers AutoencoderKL folder (loaded back and compared when diffusers is
    installed)."""
    from stages.interop import export_autoencoder

    try:
        export_autoencoder(_store(ctx), ref, out_dir, latents_ref)
    except USER_ERRORS as err:
        _fail(err)


@export_group.command("diffusion")
@click.argument("ref")
@click.option(
    "--to-diffusers",
    "out_dir",
    default=None,
    type=click.Path(),
    help="New folder for config.json + diffusion_pytorch_model.safetensors.",
)
@click.option(
    "--weights",
    type=click.Choice(["ema", "raw"]),
    default="ema",
    show_default=True,
    help="EMA (sampling) or raw weights.",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="Instead: store the EMA DiT with int8 block linears as a new diffusion artifact (CPU sampling, ~3.5x "
    "smaller).",
)
@click.option(
    "--keep",
    multiple=True,
    metavar="PATTERN",
    help="With --quantize: layers that stay float32, fnmatch patterns, e.g. 'blocks.*.adaLN_modulation' (repeatable).",
)
@click.pass_context
def export_diffusion_command(
    ctx: click.Context, ref: str, out_dir: str | None, weights: str, quantize: str | None, keep: tuple[str, ...]
) -> None:
    """Write a diffusion artifact's DiT as a diffusers DiTTransformer2DModel folder and print how closely diffusers
    reproduces it, or (--quantize int8) store it quantised for `ldm sample` and the pipeline, which load it as int8.

    diffusers' DiT has fixed timestep frequencies; a DiT trained here (timestep_freq_shift 0, as the
    original DiT) is then not exact, and the printed relative output difference says by how much.
    """
    from stages.interop import export_diffusion, quantize_diffusion

    if (out_dir is None) == (quantize is None):
        raise click.UsageError("give either --to-diffusers DIR or --quantize int8")
    if keep and quantize is None:
        raise click.UsageError("--keep only applies with --quantize")
    try:
        if quantize:
            quantize_diffusion(_store(ctx), ref, keep)
        else:
            export_diffusion(_store(ctx), ref, out_dir, weights)
    except USER_ERRORS as err:
        _fail(err)


if __name__ == "__main__":
    sys.exit(main())
