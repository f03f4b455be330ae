"""Latents from a trained DiT: guidance, sampler and seeds composed in one place (stage previews and the pipeline)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ldm.caching import BlockCache, CacheSchedule, cached
from ldm.diffusion.samplers import (
    FLOW_SAMPLERS,
    SAMPLERS,
    SPACINGS,
    Denoiser,
    InpaintDenoiser,
    cfg_denoiser,
    check_guidance_interval,
    model_calls,
    per_sample_generators,
    randn_like_per_sample,
    run_sampler,
    seeded_generators,
)
from ldm.diffusion.schedules import DiffusionConfig, make_schedule
from ldm.models.dit import DiT

X0_SAMPLERS = (
    "ddim",
    "dpm++2m",
    "dpm++2m-sde",
    "euler",
    "heun",
)  # samplers that step on the x0 estimate (inpainting needs one)


def default_sampler(diffusion: DiffusionConfig) -> str:
    """DPM-Solver++ 2M for the discrete chain, Euler for rectified flow, MeanFlow steps for a MeanFlow model."""
    return {"flow": "flow-euler", "meanflow": "meanflow"}.get(diffusion.objective, "dpm++2m")


VARIANCES = ("small", "large")  # ddpm's fixed variance when the model does not learn it (beta-tilde, beta)


def option(flag: str, help: str, **click_options: Any) -> dict[str, Any]:
    """Field metadata of a setting the sampling commands take as `flag` (stages/cli.py builds the options from it)."""
    return {"flag": flag, "help": help, **click_options}


@dataclass(frozen=True)
class SamplingSettings:
    """Every option of a sampling run, validated once where it is built (the pipeline, `ldm sample`,
    `ldm eval samples`, `ldm ema` and training previews all pass one of these down to the sampler).

    A field with an `option` in its metadata is a command-line flag of every sampling command, which
    takes its name, help and choices from here; the others are set from Python.
    """

    sampler: str | None = field(
        default=None,
        metadata=option(
            "--sampler",
            "Default: dpm++2m, flow-euler for a rectified-flow model, meanflow (MeanFlow steps) for a MeanFlow model.",
            choices=SAMPLERS,
        ),
    )
    num_steps: int = field(
        default=25, metadata=option("--steps", "Sampler steps (network calls; heun and flow-heun make 2 per step).")
    )
    # Classifier-free guidance (0: unconditional, 1: none). None: the caller's default once the model is known,
    # 1 for a distilled student (guidance built in); `resolved` chooses.
    guidance_scale: float | None = field(
        default=1.0, metadata=option("--cfg", "Classifier-free guidance scale (0: unconditional, 1: no guidance).")
    )
    guidance_interval: tuple[float, float] | None = field(
        default=None,
        metadata=option(
            "--cfg-interval",
            "Guide only at network timesteps in [T_LO, T_HI] (0-999; flow: 1000 t), the conditional model elsewhere.",
            metavar="T_LO T_HI",
        ),
    )
    guide_scale: float = field(  # needs a guide model
        default=1.0, metadata=option("--guide-scale", "Autoguidance scale, with --guide (default 2; 1: none).")
    )
    spacing: str = field(
        default="trailing",
        metadata=option(
            "--spacing",
            "Timestep grid of ddpm, ddim and dpm++2m(-sde) (euler and heun use Karras sigmas).",
            choices=SPACINGS,
        ),
    )
    eta: float = 0.0  # ddim's noise (0: deterministic, 1: ddpm's marginals)
    variance: str = "small"  # ddpm's fixed variance when not learned
    rho: float = 7.0  # Karras sigma spacing of euler and heun
    # None: the model's own training shift (diffusion.time_shift, SD3 samples at the shift it trained at), 1 for
    # a sampler of another grid; `resolved` chooses.
    shift: float | None = field(
        default=None,
        metadata=option(
            "--shift",
            "Time shift of the flow samplers' grid (SD3): above 1 spends more steps at high noise. "
            "Default: the model's training time_shift (1 unless it trained shifted).",
        ),
    )
    seed: int = field(default=0, metadata=option("--seed", "Image i uses seed + i, whatever the batch size."))
    batch_size: int = field(default=64, metadata=option("--batch-size", "Images sampled at once."))
    cache: CacheSchedule | None = None  # step caching: blocks that reuse their previous residual (ldm.caching)

    def __post_init__(self) -> None:
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(SAMPLERS)}")
        for name, low in (("num_steps", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{_named(name)} must be an integer >= {low}, got {value!r}")
        # A negative scale extrapolates away from the condition: a silent mistake, never a setting.
        if self.guidance_scale is not None:  # None: chosen by `resolved`
            _check_real("guidance_scale", self.guidance_scale, 0.0, "0: unconditional, 1: no guidance")
        _check_real("guide_scale", self.guide_scale, 0.0, "1: no autoguidance")
        _check_real("eta", self.eta, 0.0, "0: deterministic ddim")
        _check_real("rho", self.rho, 1e-12, "a positive number")
        if self.shift is not None:  # None: chosen by `resolved`
            _check_real("shift", self.shift, 1e-12, "a positive number")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {self.spacing!r}")
        if self.variance not in VARIANCES:
            raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got {self.variance!r}")
        object.__setattr__(self, "guidance_interval", check_guidance_interval(self.guidance_interval))
        if self.cache is not None:
            if not isinstance(self.cache, CacheSchedule):
                raise ValueError(
                    f"cache must be a CacheSchedule (LatentDiffusionPipeline.calibrate_cache makes one), "
                    f"got {type(self.cache).__name__}"
                )
            if self.sampler is not None and self.cache.calls != model_calls(self.sampler, self.num_steps):
                raise ValueError(
                    f"the cache schedule is for {self.cache.calls} network calls, but {self.sampler} with "
                    f"{self.num_steps} steps makes {model_calls(self.sampler, self.num_steps)}: calibrate one "
                    f"for this setting"
                )

    def resolved(self, diffusion: DiffusionConfig, default_guidance: float = 1.0) -> SamplingSettings:
        """These settings with the sampler chosen for the objective; when guidance_scale is None, the guidance: 1 for
        a student with guidance built in, else `default_guidance`; when shift is None, the model's time_shift for a
        flow sampler (1 for any other). Raise ValueError for what does not fit."""
        if self.guidance_scale is None:
            guidance = 1.0 if diffusion.built_in_guidance else default_guidance
            return replace(self, guidance_scale=guidance).resolved(diffusion)
        sampler = self.sampler or default_sampler(diffusion)
        if self.shift is None:
            shift = diffusion.time_shift if sampler in FLOW_SAMPLERS and diffusion.is_flow else 1.0
            return replace(self, shift=shift).resolved(diffusion)
        if (sampler in FLOW_SAMPLERS) != diffusion.is_flow or (
            sampler == "meanflow" and diffusion.objective != "meanflow"
        ):
            raise ValueError(f"sampler {sampler!r} does not fit the {diffusion.objective!r} objective")
        if self.shift != 1.0 and sampler not in FLOW_SAMPLERS:
            raise ValueError(
                f"shift (--shift) {self.shift:g} moves the time grid of the flow samplers; {sampler!r} has "
                f"its own grid (--spacing, rho): leave shift at 1"
            )
        if diffusion.built_in_guidance and (self.guidance_scale != 1 or self.guide_scale != 1):
            raise ValueError(
                f"this model was distilled with classifier-free guidance {diffusion.built_in_guidance:g} built "
                f"in (one call is one guided pass); sample it with guidance_scale 1 (--cfg 1) and no guide"
            )
        return replace(self, sampler=sampler)

    def sampler_options(self) -> dict[str, Any]:
        """The keyword arguments of `run_sampler` these settings fix."""
        return {
            "spacing": self.spacing,
            "eta": self.eta,
            "variance": self.variance,
            "rho": self.rho,
            "shift": self.shift,
        }


def _named(name: str) -> str:
    """A setting's name, with its command-line flag where it has one."""
    flag = SETTING_FIELDS[name].metadata.get("flag") if name in SETTING_FIELDS else None
    return f"{name} ({flag})" if flag else name


SETTING_FIELDS = {f.name: f for f in fields(SamplingSettings)}


def _check_real(name: str, value: float, low: float, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < low:
        raise ValueError(f"{_named(name)} must be a finite number >= {low:g} ({meaning}), got {value!r}")


def check_strength(strength: float) -> None:
    """Raise ValueError unless the img2img strength is a number in [0, 1] (NaN is not)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"strength must be in [0, 1] (0: the input's reconstruction, 1: a fresh sample), got {strength!r}"
        )


class PromptConditioned:
    """A text DiT seen as a labelled model: label i selects row i of encoded prompts (tokens, mask, pooled).

    So everything written for labels (training losses, guidance's concatenated batch, the samplers) conditions a
    text DiT unchanged: guidance passes the prompt rows as the labels and the empty or negative prompts' rows as
    the null labels. The DiT's own label input gets its null class.
    """

    def __init__(self, model: DiT, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> None:
        self.model, self.tokens, self.mask, self.pooled = model, tokens, mask, pooled
        self.null_class = model.null_class

    def __call__(self, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, *args: Any, **kwargs: Any):
        null = torch.full_like(rows, self.null_class)
        text = {"text_tokens": self.tokens[rows], "text_mask": self.mask[rows], "text_pooled": self.pooled[rows]}
        return self.model(x, t, null, *args, **text, **kwargs)


def encode_prompts(
    model: DiT, prompts: Sequence[str], text_encoder: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text DiT's inputs (tokens (N, L, D), mask (N, L), pooled (N, D)) for prompts: from its own jointly
    trained encoder, or from `text_encoder` (a frozen pretrained one, for model.text_encoder "pretrained")."""
    encoder = getattr(model, "text_encoder", None) if text_encoder is None else text_encoder
    if encoder is None:
        raise ValueError(
            "this text DiT was trained on a pretrained text encoder's features: load that encoder "
            "(ldm.models.pretrained_text) and pass it as text_encoder"
        )
    return encoder.encode(list(prompts))


def check_prompts(prompts: Sequence[str] | None, n: int, what: str = "prompts") -> list[str]:
    """`prompts` as a list of n strings (one prompt for all is repeated); ValueError naming what is wrong."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is None or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a list of strings, got {prompts!r:.80}")
    prompts = list(prompts)
    if len(prompts) == 1 and n > 1:
        prompts = prompts * n
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} {what} for {n} images: give one per image, or one for all")
    return prompts


@torch.no_grad()
def sample_latents(
    model: DiT,
    diffusion: DiffusionConfig,
    labels: torch.Tensor,
    settings: SamplingSettings,
    x0: torch.Tensor | None = None,
    strength: float = 1.0,
    regenerate: torch.Tensor | None = None,
    on_model_call: Callable[[], None] | None = None,
    guide: DiT | None = None,
    cache: BlockCache | None = None,
    prompts: Sequence[str] | None = None,
    negative_prompts: Sequence[str] | None = None,
    text_encoder: torch.nn.Module | None = None,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Return normalised latents (N, C, h, w) for class `labels` (N,); image i depends only on settings.seed + i,
    or on seeds[i] where `seeds` (N) is given (images of several requests sampled as one batch).

    A text DiT takes `prompts` (N strings) instead, its labels unused; guidance pushes away from
    `negative_prompts` (N strings; default the empty prompt, the null condition it was trained with).
    `text_encoder`: the frozen encoder of a DiT trained on a pretrained one's features.

    x0 (N, C, h, w) with strength < 1: start from x0 noised part of the way (SDEdit). x0 with
    `regenerate` (N, 1, h, w): keep x0 where regenerate is 0 and sample the rest (inpainting).
    `on_model_call` is called after every sampler evaluation (progress bars). `guide`: a weaker DiT
    of the same latents and parametrisation, for autoguidance at settings.guide_scale (see
    `cfg_denoiser`); the caller checks that it fits. `settings.batch_size` is the caller's business:
    all of `labels` is one batch here. `cache`: a BlockCache for this run (made from settings.cache when
    None and the settings have a schedule); the caller may read its counts of evaluated and skipped blocks.
    """
    check_strength(strength)
    settings = settings.resolved(diffusion)
    config = model.config
    device = next(model.parameters()).device
    labels = labels.to(device)
    network, null = model, model.null_class
    if config.text_dim:
        n = len(labels)
        prompts = check_prompts(prompts, n)
        negatives = [""] * n if negative_prompts is None else check_prompts(negative_prompts, n, "negative prompts")
        if guide is not None:
            raise ValueError("autoguidance (a guide DiT) is for class-conditional models; a text DiT guides by prompts")
        network = PromptConditioned(model, *encode_prompts(model, prompts + negatives, text_encoder))
        labels, null = torch.arange(n, device=device), torch.arange(n, 2 * n, device=device)
    elif prompts is not None or negative_prompts is not None:
        raise ValueError("this DiT is class-conditional (model.text_dim = 0): pass class labels, not prompts")
    model_fn = cfg_denoiser(
        network,
        labels,
        null,
        settings.guidance_scale,
        settings.guidance_interval,
        config.learn_sigma,
        guide,
        settings.guide_scale,
    )
    if on_model_call is not None:
        guided = model_fn

        def model_fn(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
            out = guided(x, t, r)
            on_model_call()
            return out

    denoiser = Denoiser.from_config(model_fn, diffusion)
    if regenerate is not None:
        if settings.sampler not in X0_SAMPLERS:
            raise ValueError(
                f"inpainting needs a sampler that steps on the x0 estimate, one of {X0_SAMPLERS}; "
                f"got {settings.sampler!r}"
            )
        if x0 is None:
            raise ValueError("inpainting needs the known latents x0")
        denoiser = InpaintDenoiser(
            denoiser.model_fn,
            denoiser.prediction,
            denoiser.learn_sigma,
            denoiser.clip_x0,
            known=x0.to(device),
            regenerate=regenerate.to(device),
        )
    schedule = None if diffusion.is_flow else make_schedule(diffusion.schedule, diffusion.num_timesteps)
    shape = (len(labels), *config.latent_shape)
    if seeds is None:
        generators = per_sample_generators(settings.seed, len(labels))
    elif len(seeds) != len(labels):
        raise ValueError(f"{len(seeds)} seeds for {len(labels)} images")
    else:
        generators = seeded_generators(seeds)
    noise = randn_like_per_sample(shape, generators, device, torch.float32)
    x0 = None if x0 is None else x0.to(device, torch.float32)
    if cache is None and settings.cache is not None:
        if settings.cache.depth != config.depth:
            raise ValueError(f"the cache schedule is for {settings.cache.depth} blocks, the DiT has {config.depth}")
        cache = BlockCache(settings.cache)
    with nullcontext() if cache is None else cached(model, cache):
        return run_sampler(
            settings.sampler,
            denoiser,
            noise,
            schedule,
            settings.num_steps,
            generators=generators,
            strength=strength,
            x0=x0,
            **settings.sampler_options(),
        )
