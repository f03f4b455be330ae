"""The latent sampling API: a trained DiT and the autoencoder its latents came from, as one object.

    from pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_artifacts("diffusion@latest")
    images = pipe.sample(class_labels=[0, 1, 2, 3], num_steps=20, guidance_scale=2.0, seed=0)  # (4, C, H, W) in [-1, 1]
    pils = pipe.sample([7] * 8, output="pil")
    settings = SamplingSettings(sampler="flow-heun", num_steps=10, guidance_scale=1.5)  # from ldm.generation
    images = pipe.sample([0, 1], settings, seed=3)  # fields by name override the settings
    edited = pipe.img2img(images, strength=0.5, class_labels=[3, 3, 3, 3])
    filled = pipe.inpaint(images, mask, class_labels=[0, 1, 2, 3])  # mask (N, 1, H, W): 1 = paint anew

A sound model is used the same way: `sample` returns signals (N, 1, L) in [-1, 1], and
`pipe.save_audio(signals, "out/")` writes them as WAV files at `pipe.sample_rate` (None for images).

The diffusion artifact names the autoencoder its latent cache was encoded with and the latent
statistics it was trained on; `from_artifacts` loads exactly that autoencoder (checksums verified)
and applies the statistics here and nowhere else, so the scale can never be mismatched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ldm.artifacts import ArtifactStore
from ldm.audio import write_wav
from ldm.caching import BlockCache, CacheSchedule, schedule_from_changes
from ldm.config import brief, from_dict
from ldm.data import DataConfig
from ldm.data.latents import LatentStats
from ldm.diffusion.schedules import DiffusionConfig
from ldm.generation import SamplingSettings, check_prompts, check_strength, model_calls, sample_latents
from ldm.images import check_range, to_pil
from ldm.loading import (
    check_guide,
    dit_configs,
    load_decoder,
    load_dit,
    load_frozen_text_encoder,
    stored_precision,
)
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.dit import DiT
from ldm.quantize import check_precision
from ldm.runtime import check_device

Labels = int | Sequence[int] | torch.Tensor
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _integral_values(class_labels: Labels) -> torch.Tensor:
    """The labels as a flat tensor of their own dtype; ValueError naming the first that is not a whole number.

    Read as given, not cast to long: a cast would take label 1.5 for class 1. Booleans, strings and
    NaN are refused too; integral floats (2.0) pass.
    """
    try:
        values = torch.as_tensor(class_labels).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"class labels must be integers, got {brief(class_labels)}") from None
    if not (values.is_floating_point() or values.dtype in INTEGER_DTYPES):  # bool, complex
        raise ValueError(f"class labels must be integers, got {brief(class_labels)}")
    if values.is_floating_point():
        fractional = values[values != values.round()]  # NaN != NaN: caught here too
        if len(fractional):
            raise ValueError(f"class labels must be integers, got {fractional[0].item()!r}")
    return values


@dataclass
class Provenance:
    """Which artifacts a pipeline was built from."""

    diffusion: str
    autoencoder: str
    latents: str | None = None
    autoencoder_override: bool = (
        False  # True when the caller forced an autoencoder with another encoder than the lineage's
    )
    lineage_autoencoder: str | None = (
        None  # the autoencoder the latents came from (`autoencoder` may share only its encoder)
    )
    guide: str | None = None  # the weaker DiT that guides this one (autoguidance), if any


class LatentDiffusionPipeline:
    """Sample, encode, decode, img2img and inpaint with a DiT and its autoencoder.

    Images are float tensors (N, C, H, W) in [-1, 1] (the autoencoder's range); latents passed to or
    returned from this class are normalised with the training statistics (what the DiT sees).
    """

    def __init__(
        self,
        model: DiT,
        autoencoder: AutoencoderKL,
        diffusion: DiffusionConfig,
        stats: LatentStats,
        provenance: Provenance | None = None,
        guide: DiT | None = None,
        precision: str = "float32",
        sample_rate: int | None = None,
        text_encoder: torch.nn.Module | None = None,
    ) -> None:
        if (sample_rate is not None) != (autoencoder.config.spatial_dims == 1):
            raise ValueError(
                f"sample_rate is for sound (a 1-D autoencoder) only; got {sample_rate} for a "
                f"{autoencoder.config.spatial_dims}-D autoencoder"
            )
        self.sample_rate = sample_rate  # Hz of the signals a sound model makes; None for images
        if tuple(autoencoder.config.latent_shape) != model.config.latent_shape:
            raise ValueError(
                f"the autoencoder makes {tuple(autoencoder.config.latent_shape)} latents but the DiT expects "
                f"{model.config.latent_shape}"
            )
        if len(stats.mean) not in (1, model.config.in_channels):
            raise ValueError(
                f"latent statistics for {len(stats.mean)} channels, the DiT has {model.config.in_channels}"
            )
        self.model = model.eval().requires_grad_(False)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.diffusion = diffusion
        self.stats = stats
        self.provenance = provenance
        self.precision = check_precision(precision)  # "bf16": the DiT runs under bf16 autocast; "int8": it is quantised
        self.block_evaluations = {
            "evaluated": 0,
            "skipped": 0,
        }  # DiT blocks run and reused by step caching, summed over calls
        if model.config.text_encoder == "pretrained" and text_encoder is None:
            raise ValueError(
                "this DiT reads a frozen pretrained text encoder's features: pass the encoder it was trained with "
                "(from_artifacts loads it from the folder the artifact records, or text_encoder=FOLDER)"
            )
        self.text_encoder = None if text_encoder is None else text_encoder.eval().requires_grad_(False)
        self.guide = None
        if guide is not None:
            ours, theirs = ((c.latent_shape, c.num_classes) for c in (model.config, guide.config))
            if theirs != ours:
                raise ValueError(f"the guide DiT takes (latent shape, classes) {theirs}, the DiT {ours}")
            self.guide = guide.eval().requires_grad_(False)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_artifacts(
        cls,
        model: str = "diffusion@latest",
        store: ArtifactStore | str | None = None,
        autoencoder: str | None = None,
        allow_autoencoder_mismatch: bool = False,
        weights: str = "ema",
        device: str | torch.device = "cpu",
        guide: str | None = None,
        precision: str | None = None,
        text_encoder: str | None = None,
    ) -> LatentDiffusionPipeline:
        """Load a `diffusion` artifact and the autoencoder of its lineage (files checksum-verified).

        `autoencoder`: the autoencoder the latents were encoded with, or one with the very same encoder
        weights (a decoder fine-tuned from it, `train_parts: decoder`); any other is refused unless
        `allow_autoencoder_mismatch` (its latents would decode wrongly).
        `weights`: "ema" (for sampling) or "raw" (the trained weights).
        `guide`: a weaker `diffusion` artifact (smaller, or trained for less) of the same latents and
        parametrisation, for autoguidance (Karras et al. 2024) by `sample(..., guide_scale=...)`. Any
        other is refused (see `check_guide`).
        `precision`: "float32"; "bf16" (autocast, for GPUs and CPUs with bf16 matmuls); "int8" (the block
        linears quantised for the CPU, `ldm.quantize`; the guide too). None: the artifact's own, which is
        "int8" for one stored by `ldm export diffusion --quantize int8`.
        `text_encoder`: for a DiT trained on a frozen pretrained text encoder, the folder to load it from (default:
        the folder its artifact records); an encoder other than the one it was trained with is refused.
        """
        device = check_device(str(device))  # a typo or a missing GPU, before anything loads
        store = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
        artifact = store.load(model, stage="diffusion")
        chosen, decoder, override = load_decoder(store, artifact, autoencoder, allow_autoencoder_mismatch, device)
        dit_config, diffusion = dit_configs(artifact)
        precision = check_precision(precision or stored_precision(artifact))
        dit = load_dit(artifact, weights, device, precision)
        stats = LatentStats.from_dict(artifact.manifest["latent_stats"])
        guide_model = None
        if guide is not None:
            guide_artifact = store.load(guide, stage="diffusion")
            check_guide(artifact, dit_config, diffusion, guide_artifact, *dit_configs(guide_artifact))
            guide_model = load_dit(guide_artifact, weights, device, "int8" if precision == "int8" else None)
            guide = guide_artifact.ref
        provenance = Provenance(
            artifact.ref, chosen.ref, artifact.parents.get("latents"), override, artifact.manifest["autoencoder"], guide
        )
        frozen = load_frozen_text_encoder(artifact, dit_config, text_encoder, device)
        sample_rate = None
        if decoder.config.spatial_dims == 1:  # the rate of the sound the autoencoder was trained on
            sample_rate = from_dict(DataConfig, chosen.config()["data"], "data").sample_rate
        return cls(dit, decoder, diffusion, stats, provenance, guide_model, precision, sample_rate, frozen)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @property
    def takes_prompts(self) -> bool:
        """Whether the DiT is conditioned on text prompts (else on class labels)."""
        return bool(self.model.config.text_dim)

    def save_audio(self, signals: torch.Tensor, folder: str | Path, prefix: str = "sample") -> list[Path]:
        """Write signals (N, 1, L) as 16-bit WAV files `<prefix>-NNNNNN.wav` in folder; return their paths."""
        if self.sample_rate is None:
            raise ValueError(
                "save_audio is for sound models; this pipeline makes images (use output='pil' or ldm.images)"
            )
        folder = Path(folder)
        return [
            write_wav(folder / f"{prefix}-{i:06d}.wav", signal, self.sample_rate)
            for i, signal in enumerate(signals.cpu())
        ]

    # ------------------------------------------------------------------ latents <-> images

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised latents (N, C, h, w) of images (N, C_img, H, W) in [-1, 1]: posterior mode, or a sample."""
        self._check_images(images)
        posterior = self.autoencoder.encode(images.to(self.device, torch.float32))
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.stats.normalize(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (N, C_img, H, W) in [-1, 1] of normalised latents (N, C, h, w)."""
        return self.autoencoder.decode(self.stats.denormalize(latents.to(self.device, torch.float32))).clamp(-1, 1)

    # ------------------------------------------------------------------ generation

    def sample(
        self,
        class_labels: Labels | None = None,
        settings: SamplingSettings | None = None,
        *,
        prompts: Sequence[str] | None = None,
        negative_prompts: Sequence[str] | None = None,
        output: str = "tensor",
        return_latents: bool = False,
        progress: bool = False,
        on_model_call: Callable[[], None] | None = None,
        seeds: Sequence[int] | None = None,
        **options,
    ):
        """Class-conditional images (N, C, H, W) in [-1, 1] (sound: signals (N, 1, L)), or PIL images with output="pil".

        `settings` (a SamplingSettings) and/or its fields by name (`num_steps=20, guidance_scale=2.0,
        seed=0, ...`, which override those of `settings`) say how: the sampler, steps, classifier-free
        guidance, autoguidance by the pipeline's guide (`from_artifacts(..., guide=...)`; guide_scale
        alone is the paper's form, both above 1 add the two terms), the grid, the seed and the batch.
        Image i depends on seed + i alone, so splitting into batches of any size gives the same images;
        `seeds` (one per image, each >= 0) replaces seed + i (several callers' images sampled as one batch).
        on_model_call is called after every network evaluation (a progress bar the caller keeps over
        several calls). A text model takes `prompts` (one per image) instead of class labels, and guidance
        pushes away from `negative_prompts` (one per image, or one for all; default the empty prompt).
        """
        settings = self.settings(settings, **options)
        labels, text = self._conditions(class_labels, prompts, negative_prompts)
        if seeds is not None:
            seeds = [int(seed) for seed in seeds]
            if len(seeds) != len(labels) or min(seeds) < 0:
                raise ValueError(f"seeds must be {len(labels)} integers >= 0, one per image; got {brief(seeds)}")
        latents = self._generate(labels, settings, progress, on_model_call, text=text, seeds=seeds)
        images = self._decode_batched(latents, settings.batch_size)
        return self._output(images, output, latents if return_latents else None)

    def img2img(
        self,
        images: torch.Tensor,
        strength: float,
        class_labels: Labels | None = None,
        settings: SamplingSettings | None = None,
        *,
        prompts: Sequence[str] | None = None,
        negative_prompts: Sequence[str] | None = None,
        output: str = "tensor",
        progress: bool = False,
        **options,
    ):
        """SDEdit in latent space: noise the images' latents to `strength` of the chain and denoise.

        strength 0 returns the autoencoder's reconstruction of the input; strength 1 ignores it.
        `settings`, `options` and prompts as in `sample`.
        """
        settings = self.settings(settings, **options)
        check_strength(strength)
        labels, text = self._conditions(class_labels, prompts, negative_prompts, len(images))
        x0 = self.encode(images)
        latents = self._generate(labels, settings, progress, x0=x0, strength=strength, text=text)
        return self._output(self._decode_batched(latents, settings.batch_size), output)

    def inpaint(
        self,
        images: torch.Tensor,
        mask: torch.Tensor,
        class_labels: Labels | None = None,
        settings: SamplingSettings | None = None,
        *,
        prompts: Sequence[str] | None = None,
        negative_prompts: Sequence[str] | None = None,
        output: str = "tensor",
        keep_known_pixels: bool = True,
        progress: bool = False,
        **options,
    ):
        """Repaint where mask (N or 1, 1, H, W) is 1, keep the images where it is 0 (masked resampling in latent space).

        A latent is regenerated when any pixel of its f x f patch is masked. At every step the known
        latents replace the model's x0 estimate outside the mask, so they follow their own noising
        path and the model fills the hole around them (samplers ddim, dpm++2m, euler, heun).
        keep_known_pixels pastes the input back outside the mask after decoding. `settings`, `options` and
        prompts as in `sample`.
        """
        settings = self.settings(settings, **options)
        if self.sample_rate is not None:
            raise ValueError("inpaint takes image masks; this pipeline makes sound (img2img works on signals too)")
        self._check_images(images)
        if (
            mask.ndim != 4
            or mask.shape[1] != 1
            or mask.shape[-2:] != images.shape[-2:]
            or mask.shape[0] not in (1, len(images))
        ):
            raise ValueError(
                f"mask must be (N or 1, 1, H, W) matching images {tuple(images.shape)}, got {tuple(mask.shape)}"
            )
        check_range("mask", mask, 0.0, 1.0, "1 = paint anew, 0 = keep")
        mask = (mask.to(self.device, torch.float32) > 0.5).float().expand(len(images), -1, -1, -1)
        size = self.model.config.input_size
        regenerate = F.adaptive_max_pool2d(mask, (size, size))  # (N, 1, h, w)
        labels, text = self._conditions(class_labels, prompts, negative_prompts, len(images))
        x0 = self.encode(images)
        latents = self._generate(labels, settings, progress, x0=x0, regenerate=regenerate, text=text)
        result = self._decode_batched(latents, settings.batch_size)
        if keep_known_pixels:
            result = torch.lerp(images.to(result).clamp(-1, 1), result, mask)  # clamp: inputs may carry round-off
        return self._output(result, output)

    def calibrate_cache(
        self,
        settings: SamplingSettings | None = None,
        fraction: float = 0.3,
        n: int | None = None,
        seed: int = 1_000_000,
        extrapolate: bool = False,
        **options,
    ) -> CacheSchedule:
        """A step-caching schedule for these settings that skips `fraction` of the DiT's block evaluations.

        Samples n class-balanced latents (default 4 per class) once without skipping, from seeds far from
        those an evaluation uses, and marks the (call, block) pairs whose residual changed least from the
        previous call (`ldm.caching.schedule_from_changes`). Pass the result as `sample(..., cache=schedule)`.
        `extrapolate`: skipped blocks add a linear forecast of their residual in t instead of the last one, and
        the pairs chosen are those where that forecast erred least.
        """
        settings = self.settings(settings, **options)
        labels = torch.arange(n or 4 * self.num_classes) % self.num_classes
        recorder = BlockCache(record=True, extrapolate=extrapolate)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            sample_latents(
                self.model,
                self.diffusion,
                labels,
                replace(settings, seed=seed, cache=None),
                guide=self.guide,
                cache=recorder,
            )
        return replace(schedule_from_changes(recorder.changes, fraction), extrapolate=extrapolate)

    # ------------------------------------------------------------------ internals

    def _conditions(
        self,
        class_labels: Labels | None,
        prompts: Sequence[str] | None,
        negative_prompts: Sequence[str] | None,
        n: int | None = None,
    ) -> tuple[torch.Tensor, tuple[list[str], list[str] | None] | None]:
        """The labels (N,) and, for a text model, (prompts, negative prompts) of N images; ValueError for a
        condition the model does not take."""
        if not self.takes_prompts:
            if prompts is not None or negative_prompts is not None:
                raise ValueError("this model is class-conditional: pass class labels, not prompts")
            if class_labels is None:
                raise ValueError("no class labels given: pass one label per image")
            return self._labels(class_labels, n), None
        if class_labels is not None:
            raise ValueError("this model takes text prompts, not class labels: pass prompts=[...]")
        if prompts is None:
            raise ValueError("this model takes text prompts: pass prompts=[...] (one per image)")
        if isinstance(prompts, str):
            prompts = [prompts] * (n or 1)
        prompts = check_prompts(prompts, n or len(prompts))
        if not prompts:
            raise ValueError("no prompts given: pass one prompt per image")
        negatives = (
            None if negative_prompts is None else check_prompts(negative_prompts, len(prompts), "negative prompts")
        )
        return torch.full((len(prompts),), self.model.null_class), (prompts, negatives)

    def _labels(self, class_labels: Labels, n: int | None = None) -> torch.Tensor:
        values = _integral_values(class_labels)
        bad = values[(values < 0) | (values >= self.num_classes)]  # checked before the cast, where 1e30 would wrap
        if len(bad):
            raise ValueError(
                f"class labels must be in 0..{self.num_classes - 1}, got {brief(bad[0].item())} "
                f"({len(bad)} of {len(values)} out of range)"
            )
        labels = values.long()
        if n is not None and len(labels) == 1:
            labels = labels.expand(n)
        if n is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} class labels for {n} images")
        if len(labels) == 0:
            raise ValueError("no class labels given: pass one label per image")
        return labels

    def _check_images(self, images: torch.Tensor) -> None:
        config = self.autoencoder.config
        f = config.downsample_factor
        if config.spatial_dims == 1:
            length = self.model.config.input_size * f
            if images.ndim != 3 or tuple(images.shape[1:]) != (config.in_channels, length):
                raise ValueError(
                    f"signals must be (N, {config.in_channels}, {length}) in [-1, 1] for this model, "
                    f"got {tuple(images.shape)}"
                )
            check_range("signals", images, -1.0, 1.0, "the autoencoder's range")
            return
        if images.ndim != 4 or images.shape[1] != config.in_channels:
            raise ValueError(f"images must be (N, {config.in_channels}, H, W) in [-1, 1], got {tuple(images.shape)}")
        if images.shape[-2] != self.model.config.input_size * f or images.shape[-1] != self.model.config.input_size * f:
            side = self.model.config.input_size * f
            raise ValueError(f"images must be {side}x{side} for this model, got {tuple(images.shape[-2:])}")
        check_range("images", images, -1.0, 1.0, "the autoencoder's range")

    def settings(
        self, settings: SamplingSettings | None = None, default_guidance: float = 1.0, **options
    ) -> SamplingSettings:
        """Return `settings` (default SamplingSettings()) with `options` (its fields by name) applied, validated,
        and the sampler chosen for this model's objective; a guidance_scale of None becomes `default_guidance`
        (1 for a student with guidance built in); a guide scale needs the pipeline's guide."""
        unknown = sorted(set(options) - {f.name for f in fields(SamplingSettings)})
        if unknown:
            raise TypeError(
                f"unknown sampling option(s) {', '.join(unknown)}; SamplingSettings has "
                f"{', '.join(f.name for f in fields(SamplingSettings))}"
            )
        settings = replace(settings or SamplingSettings(), **options).resolved(self.diffusion, default_guidance)
        if settings.guide_scale != 1.0 and self.guide is None:
            raise ValueError(
                f"guide_scale {settings.guide_scale:g} needs a guide DiT: load the pipeline with "
                f"from_artifacts(..., guide='diffusion@<weaker model>')"
            )
        return settings

    def _generate(
        self,
        labels: torch.Tensor,
        settings: SamplingSettings,
        progress: bool = False,
        on_model_call: Callable[[], None] | None = None,
        x0: torch.Tensor | None = None,
        strength: float = 1.0,
        regenerate: torch.Tensor | None = None,
        text: tuple[list[str], list[str] | None] | None = None,
        seeds: list[int] | None = None,
    ) -> torch.Tensor:
        size = settings.batch_size
        prompts, negatives = text or (None, None)
        bar = tqdm(
            total=math.ceil(len(labels) / size) * model_calls(settings.sampler, settings.num_steps, strength),
            desc=f"{settings.sampler} x{settings.num_steps}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        out = []
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16")
        with bar, autocast:
            for start in range(0, len(labels), size):
                part = slice(start, start + size)
                cache = None if settings.cache is None else BlockCache(settings.cache)
                out.append(
                    sample_latents(
                        self.model,
                        self.diffusion,
                        labels[part],
                        replace(settings, seed=settings.seed + start),  # image i always draws from seed + i
                        x0=None if x0 is None else x0[part],
                        strength=strength,
                        regenerate=None if regenerate is None else regenerate[part],
                        on_model_call=on_model_call or (bar.update if progress else None),
                        guide=self.guide,
                        cache=cache,
                        prompts=None if prompts is None else prompts[part],
                        negative_prompts=None if negatives is None else negatives[part],
                        text_encoder=self.text_encoder,
                        seeds=None if seeds is None else seeds[part],
                    )
                )
                if cache is not None:
                    self.block_evaluations["evaluated"] += cache.evaluated
                    self.block_evaluations["skipped"] += cache.skipped
        return torch.cat(out)

    def _decode_batched(self, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.cat([self.decode(latents[i : i + batch_size]) for i in range(0, len(latents), batch_size)])

    @staticmethod
    def _output(images: torch.Tensor, output: str, latents: torch.Tensor | None = None):
        if output not in ("tensor", "pil"):
            raise ValueError(f"output must be 'tensor' or 'pil', got {output!r}")
        if output == "pil" and images.ndim == 3:
            raise ValueError(
                "output='pil' is for images; a sound model returns signals (output='tensor', then save_audio)"
            )
        result: torch.Tensor | list[Image.Image] = to_pil(images) if output == "pil" else images
        return (result, latents) if latents is not None else result
