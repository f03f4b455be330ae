"""Samplers as pure functions over a denoiser, each update written as its paper writes it.

A network enters as a `ModelFn`, model_fn(x_t, t) -> raw output, with conditioning (and classifier-
free guidance, `cfg_denoiser`) already closed over. `Denoiser` reads that output through the
training parametrisation: `denoiser(x_t, t, alpha_bar)` is the x0 estimate E[x0 | x_t], and
`denoiser.output(x_t, t)` the raw output (DDPM needs its variance channels). Every sampler takes
the starting state, a schedule and a step grid, loops, and returns x at the end of the chain.
States are (N, C, H, W); per-step coefficients are Python floats computed in float64 from the
schedule, so the loop runs in the state's dtype without rounding the schedule.

Every sampler has one signature, as k-diffusion's: `sample_x(denoiser, x, grid, extras, callback)`, where
`grid` is the descending step grid of its family (network timesteps, Karras sigmas or flow times),
`extras` a `SamplerExtras` of which each sampler reads only its own fields, and `callback(i, x)` is called
after step i. `SAMPLER_SPECS` names each sampler's function and family; `run_sampler` builds the grid and
the starting state of the family and calls it. Discrete samplers (ddpm, ddim, dpm++2m, dpm++2m-sde) start
from x_T in the VP scale at the first timestep of the grid; Karras samplers (euler, heun) run in the EDM
scale x / sqrt(alpha_bar); flow samplers start from pure noise at t = 1. Stochastic steps draw their noise
from per-sample generators when given, so image i depends only on its own seed, never on the batch it was
drawn in.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.objectives import FLOW_TIME_SCALE, ConditionalModel, p_mean_variance, shift_time, x0_from_prediction
from ldm.diffusion.schedules import DiffusionConfig, NoiseSchedule, expand_to

# model_fn(x_t (N, C, H, W), t (N,) float32 network timesteps[, r (N,)]) -> (N, C or 2C, H, W);
# r, the start of a MeanFlow model's averaging interval, is passed only to such a model.
ModelFn = Callable[..., Tensor]

SPACINGS = ("leading", "trailing", "linspace")
Callback = Callable[[int, Tensor], None]  # callback(step index, x after that step)
Grid = Tensor | Sequence[float]  # descending: int64 network timesteps, Karras sigmas or flow times


@dataclass(frozen=True)
class Denoiser:
    """A network seen through its training parametrisation: x0 = denoiser(x_t, t, alpha_bar)."""

    model_fn: ModelFn
    prediction: str = "eps"  # "eps" | "v" | "x0" for the VP chain; "velocity" for rectified flow
    learn_sigma: bool = False  # the output carries C variance channels after the prediction (improved DDPM)
    clip_x0: float | None = None  # clamp x0 to [-clip, clip]: pixel-space models; None for latents (DiT)

    @classmethod
    def from_config(cls, model_fn: ModelFn, config: DiffusionConfig, clip_x0: float | None = None) -> "Denoiser":
        """Return the denoiser of a network trained with `config`."""
        if config.is_flow:
            return cls(model_fn, "velocity", False, clip_x0)
        return cls(model_fn, config.prediction, config.learn_sigma, clip_x0)

    def output(self, x_t: Tensor, t: float) -> Tensor:
        """Return the raw network output at timestep t (network units, may be fractional): (N, C or 2C, H, W)."""
        return self.model_fn(x_t, torch.full((x_t.shape[0],), float(t), device=x_t.device, dtype=torch.float32))

    def mean_velocity(self, x_t: Tensor, t: float, r: float) -> Tensor:
        """Return a MeanFlow network's average velocity over [r, t] at x_t (network units): (N, C, H, W)."""
        full = lambda value: torch.full((x_t.shape[0],), float(value), device=x_t.device, dtype=torch.float32)  # noqa: E731
        return self.model_fn(x_t, full(t), full(r))

    def __call__(self, x_t: Tensor, t: float, alpha_bar: float) -> Tensor:
        """Return the x0 estimate at x_t, with the network queried at t and alpha_bar the noise level of x_t."""
        out = self.output(x_t, t)
        if self.learn_sigma:
            out = out[:, : x_t.shape[1]]  # the variance channels do not enter x0
        x0 = x0_from_prediction(out, x_t, alpha_bar, self.prediction)
        return x0.clamp(-self.clip_x0, self.clip_x0) if self.clip_x0 is not None else x0


@dataclass(frozen=True)
class InpaintDenoiser(Denoiser):
    """A denoiser whose x0 estimate is the known latents `known` wherever `regenerate` is 0.

    Every x0-based sampler (ddim, dpm++2m, euler, heun) then carries the known region exactly along
    its own noising path, x_t = sqrt(alpha_bar) known + sqrt(1 - alpha_bar) eps, while the network,
    which sees that region at every step, fills in the rest. ddpm and the flow samplers step on the
    raw output and are not supported.
    """

    known: Tensor | None = None  # (N, C, h, w) clean latents
    regenerate: Tensor | None = None  # (N, 1, h, w) 1 where new content is sampled, 0 where known is kept

    def __call__(self, x_t: Tensor, t: float, alpha_bar: float) -> Tensor:
        x0 = super().__call__(x_t, t, alpha_bar)
        return torch.lerp(self.known.to(x0.dtype), x0, self.regenerate.to(x0.dtype))


@dataclass(frozen=True)
class SamplerExtras:
    """What a sampler may read besides its denoiser, state and grid; each sampler reads only its own fields."""

    schedule: NoiseSchedule | None = None  # the VP chain of the discrete and Karras samplers
    generators: Sequence[torch.Generator] | None = None  # per-sample noise of stochastic steps
    eta: float = 0.0  # ddim: 0 is the ODE, 1 DDPM's posterior
    variance: str = "small"  # ddpm's fixed variance when not learned: "small" (beta-tilde) or "large" (beta)
    sde: bool = False  # dpm++2m: the SDE form

    def vp_schedule(self, name: str) -> NoiseSchedule:
        """Return the schedule a VP sampler steps on; raise ValueError when there is none."""
        if self.schedule is None:
            raise ValueError(f"sampler {name!r} needs a NoiseSchedule")
        return self.schedule


NO_EXTRAS = SamplerExtras()


def _after_step(callback: Callback | None, i: int, x: Tensor) -> None:
    if callback is not None:
        callback(i, x)


# ----------------------------------------------------------------------------- noise, seeds


def per_sample_generators(seed: int, n: int, device: str = "cpu") -> list[torch.Generator]:
    """Return n generators, the i-th seeded with seed + i: image i is a function of seed + i alone."""
    return seeded_generators(range(seed, seed + n), device)


def seeded_generators(seeds: Sequence[int], device: str = "cpu") -> list[torch.Generator]:
    """Return one generator per seed (images of several requests sampled in one batch, each from its own seed)."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


def randn_like_per_sample(
    shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Return standard normal noise of `shape` whose i-th slice comes from generators[i] alone."""
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    # Drawn in float32 on each generator's device, then moved and cast: with CPU generators the same
    # seeds give the same noise whatever the dtype and device the sampler runs in.
    slices = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack([s.to(device) for s in slices]).to(dtype)


def _noise_like(x: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
    return torch.randn_like(x) if generators is None else randn_like_per_sample(x.shape, generators, x.device, x.dtype)


# ----------------------------------------------------------------------------- step grids


def timestep_spacing(name: str, num_timesteps: int, num_steps: int) -> Tensor:
    """Return `num_steps` timesteps of a T-step chain, descending, int64 (Lin et al. 2024, Table 2).

    "leading": 0, T/S, 2T/S, ... (never reaches T-1: the first step starts at a noise level the
    model never trained at as a start); "trailing": T-1, T-1-T/S, ..., ends at T/S-1; "linspace":
    round(linspace(0, T-1, S)), includes both ends.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps = {num_steps}; expected 1..{num_timesteps}")
    if name == "leading":
        steps = torch.arange(num_steps, dtype=torch.float64) * (num_timesteps // num_steps)
    elif name == "trailing":
        steps = (num_timesteps - torch.arange(num_steps, dtype=torch.float64) * (num_timesteps / num_steps)).round() - 1
    elif name == "linspace":
        steps = torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown spacing {name!r}; expected one of {SPACINGS}")
    return steps.long().sort(descending=True).values


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Return num_steps + 1 noise levels sigma_max ... sigma_min, 0 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho
    return sigmas.tolist() + [0.0]


def flow_times(num_steps: int, shift: float = 1.0) -> list[float]:
    """Return num_steps + 1 flow times from 1 to 0; shift > 1 spends more steps at high noise (SD3, eq. 23)."""
    return shift_time(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift).tolist()


# ----------------------------------------------------------------------------- discrete VP samplers


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    extras: SamplerExtras = NO_EXTRAS,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) on the chain respaced to `timesteps`; returns x_0.

    The variance is learned when the denoiser has variance channels, else fixed (extras.variance).
    Respacing recomputes the betas between kept steps (improved DDPM, sec. 4).
    """
    chain = extras.vp_schedule("ddpm").respace(timesteps).to(x.device)
    for step, i in enumerate(reversed(range(chain.num_timesteps))):
        row = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = denoiser.output(x, float(chain.timestep_map[i]))  # (N, C or 2C, H, W)
        p = p_mean_variance(
            out, x, row, chain, denoiser.prediction, denoiser.learn_sigma, extras.variance, denoiser.clip_x0
        )
        x = p["mean"]
        if i > 0:  # the last step returns the mean of p(x_0 | x_1)
            x = x + torch.exp(0.5 * p["log_variance"]) * _noise_like(x, extras.generators)
        _after_step(callback, step, x)
    return x


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    extras: SamplerExtras = NO_EXTRAS,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) over descending rows `timesteps`; extras.eta = 0 is the ODE, 1 DDPM's posterior.

    The step after the last row lands on clean data (alpha_bar = 1), where x = x0.
    """
    schedule = extras.vp_schedule("ddim")
    alpha_bars = schedule.alphas_cumprod.cpu()[timesteps.cpu()].tolist() + [1.0]  # the chain ends on clean data
    for i, t in enumerate(schedule.timestep_map.cpu()[timesteps.cpu()].tolist()):
        a, a_next = alpha_bars[i], alpha_bars[i + 1]
        x0 = denoiser(x, t, a)
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5  # from the (possibly clipped) x0, as improved DDPM
        sigma = extras.eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5
        x = a_next**0.5 * x0 + max(1 - a_next - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _noise_like(x, extras.generators)
        _after_step(callback, i, x)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    extras: SamplerExtras = NO_EXTRAS,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep on x0 in lambda = log(alpha / sigma).

    One network call per timestep; the first step is first order (no history yet) and so is the
    last, which lands on sigma = 0 where the update reduces to x = x0 (lower-order final step).

    extras.sde is the same multistep estimate d of x0 in the solver of the reverse diffusion SDE
    (SDE-DPM-Solver++(2M), same paper's data-prediction SDE): with h = lambda_next - lambda,
    x_next = (sigma_next / sigma) e^-h x + alpha_next (1 - e^-2h) d + sigma_next sqrt(1 - e^-2h) z.
    Its first-order form (d = x0) is DDPM's posterior step, so it injects fresh noise each step
    as DDPM does, at the ODE solver's cost.
    """
    schedule = extras.vp_schedule("dpm++2m")
    alpha_bars = schedule.alphas_cumprod.cpu()[timesteps.cpu()].tolist() + [1.0]
    alphas = [a**0.5 for a in alpha_bars]
    sigmas = [(1 - a) ** 0.5 for a in alpha_bars]
    lambdas = [math.log(al / s) if s > 0 else math.inf for al, s in zip(alphas, sigmas)]
    x0_prev, h_prev = None, None
    for i, t in enumerate(schedule.timestep_map.cpu()[timesteps.cpu()].tolist()):
        x0 = denoiser(x, t, alpha_bars[i])
        if sigmas[i + 1] == 0:
            x = x0  # the limit h -> inf of the updates below
            _after_step(callback, i, x)
            break
        h = lambdas[i + 1] - lambdas[i]
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        if extras.sde:
            kept = -math.expm1(-2 * h)  # 1 - e^-2h
            x = (sigmas[i + 1] / sigmas[i] * math.exp(-h)) * x + (alphas[i + 1] * kept) * d
            x = x + (sigmas[i + 1] * kept**0.5) * _noise_like(x, extras.generators)
        else:
            x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
        _after_step(callback, i, x)
    return x


# ----------------------------------------------------------------------------- ODE steps (Karras and flow samplers)

# derivative(x, s) -> dx/ds at grid point s: (x - D(x; sigma)) / sigma in the EDM scale, v(x, t) in flow time
Derivative = Callable[[Tensor, float], Tensor]


def euler_steps(derivative: Derivative, x: Tensor, grid: Sequence[float], callback: Callback | None = None) -> Tensor:
    """Euler on dx/ds = derivative(x, s) along the descending grid; returns x at its last point."""
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        x = x + (s_next - s) * derivative(x, s)
        _after_step(callback, i, x)
    return x


def heun_steps(derivative: Derivative, x: Tensor, grid: Sequence[float], callback: Callback | None = None) -> Tensor:
    """Heun's method (Karras et al. 2022, Alg. 1, deterministic) on dx/ds = derivative(x, s) along the grid.

    The step onto s = 0 is Euler, as in Karras' algorithm: one network call fewer, and the network is
    never queried at the clean end it was (almost) never trained on.
    """
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        d = derivative(x, s)
        x_euler = x + (s_next - s) * d
        if s_next == 0:
            x = x_euler
        else:
            x = x + (s_next - s) * (d + derivative(x_euler, s_next)) / 2
        _after_step(callback, i, x)
    return x


def edm_denoise(denoiser: Denoiser, x: Tensor, sigma: float, schedule: NoiseSchedule) -> Tensor:
    """Return D(x; sigma) (Karras et al. 2022) of a VP network, queried at x * sqrt(alpha_bar) and the t of sigma."""
    alpha_bar = 1.0 / (1.0 + sigma**2)
    t = schedule.sigma_to_t(sigma).item()
    return denoiser(x * alpha_bar**0.5, t, alpha_bar)


def edm_derivative(denoiser: Denoiser, extras: SamplerExtras, name: str) -> Derivative:
    """dx/dsigma = (x - D(x; sigma)) / sigma, the probability-flow ODE in the EDM scale (Karras et al. 2022)."""
    schedule = extras.vp_schedule(name)
    return lambda x, sigma: (x - edm_denoise(denoiser, x, sigma, schedule)) / sigma


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Sequence[float],
    extras: SamplerExtras = NO_EXTRAS,
    callback: Callback | None = None,
) -> Tensor:
    """Euler on the probability-flow ODE over Karras sigmas, EDM scale."""
    return euler_steps(edm_derivative(denoiser, extras, "euler"), x, sigmas, callback)


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Sequence[float],
    extras: SamplerExtras = NO_EXTRAS,
    callback: Callback | None = None,
) -> Tensor:
    """Heun on the probability-flow ODE over Karras sigmas, EDM scale; Euler on the last step to sigma = 0."""
    return heun_steps(edm_derivative(denoiser, extras, "heun"), x, sigmas, callback)


def flow_velocity(denoiser: Denoiser, name: str) -> Derivative:
    """dx/dt = v(x, t) for x_t = (1 - t) x0 + t noise, the network queried at 1000 t."""
    if denoiser.prediction != "velocity":
        raise ValueError(f"{name} needs a velocity model, got prediction {denoiser.prediction!r}")
    return lambda x, t: denoiser.output(x, t * FLOW_TIME_SCALE)  # (N, C, H, W)


def sample_flow_euler(
    denoiser: Denoiser,
    x: Tensor,
    times: Sequence[float],
    extras: SamplerExtras = NO_EXTRAS,
    callback: Callback | None = None,
) -> Tensor:
    """Euler on dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data)."""
    return euler_steps(flow_velocity(denoiser, "flow-euler"), x, times, callback)


def sample_flow_heun(
    denoiser: Denoiser,
    x: Tensor,
    times: Sequence[float],
    extras: SamplerExtras = NO_EXTRAS,
    callback: Callback | None = None,
) -> Tensor:
    """Heun on dx/dt = v(x, t) in flow time, as SiT samples its ODE; Euler on the step onto t = 0."""
    return heun_steps(flow_velocity(denoiser, "flow-heun"), x, times, callback)


def sample_meanflow(
    denoiser: Denoiser,
    x: Tensor,
    times: Sequence[float],
    extras: SamplerExtras = NO_EXTRAS,
    callback: Callback | None = None,
) -> Tensor:
    """MeanFlow sampling (Geng et al. 2025, eq. 12): x_r = x_t - (t - r) u(x_t, r, t), one network call per step.

    Exact for any number of steps when u is the true average velocity; one step maps noise to data.
    """
    flow_velocity(denoiser, "meanflow")  # checks the parametrisation
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        u = denoiser.mean_velocity(x, t * FLOW_TIME_SCALE, t_next * FLOW_TIME_SCALE)
        x = x - (t - t_next) * u
        _after_step(callback, i, x)
    return x


# ----------------------------------------------------------------------------- the registry


Sampler = Callable[[Denoiser, Tensor, Grid, SamplerExtras, Callback | None], Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler's function, the family whose grid and starting state it takes, and its network calls per step."""

    function: Sampler
    family: str  # "vp": network timesteps on --spacing; "karras": Karras sigmas, EDM scale; "flow": flow times
    second_order: bool = False  # two calls a step, one on the last (heun, flow-heun)
    extras: dict | None = None  # fixed SamplerExtras fields (dpm++2m-sde: sde=True)


SAMPLER_SPECS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, "vp"),
    "ddim": SamplerSpec(sample_ddim, "vp"),
    "dpm++2m": SamplerSpec(sample_dpmpp_2m, "vp"),
    "dpm++2m-sde": SamplerSpec(sample_dpmpp_2m, "vp", extras={"sde": True}),
    "euler": SamplerSpec(sample_euler, "karras"),
    "heun": SamplerSpec(sample_heun, "karras", second_order=True),
    "flow-euler": SamplerSpec(sample_flow_euler, "flow"),
    "flow-heun": SamplerSpec(sample_flow_heun, "flow", second_order=True),
    "meanflow": SamplerSpec(sample_meanflow, "flow"),  # MeanFlow models only
}
SAMPLERS = tuple(SAMPLER_SPECS)
FLOW_SAMPLERS = tuple(name for name, spec in SAMPLER_SPECS.items() if spec.family == "flow")


def kept_steps(num_steps: int, strength: float = 1.0) -> int:
    """Steps of a num_steps grid that a run at `strength` takes: the last round(strength * num_steps) (SDEdit)."""
    return num_steps if strength >= 1.0 else min(num_steps, int(num_steps * strength + 0.5))


def model_calls(sampler: str, num_steps: int, strength: float = 1.0) -> int:
    """Network forwards one sampling run makes (heun and flow-heun evaluate twice per step but the last)."""
    kept = kept_steps(num_steps, strength)
    return 2 * kept - 1 if SAMPLER_SPECS[sampler].second_order and kept else kept


# ----------------------------------------------------------------------------- guidance


def check_guidance_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    """Return the guidance interval as (t_lo, t_hi) floats, or None for none; raise ValueError unless t_lo <= t_hi."""
    if interval is None or len(interval) == 0:
        return None
    if len(interval) != 2:
        raise ValueError(f"guidance interval must be two timesteps (t_lo, t_hi), got {tuple(interval)}")
    lo, hi = (float(t) for t in interval)
    if not lo <= hi:  # a NaN end fails too
        raise ValueError(
            f"guidance interval ({lo:g}, {hi:g}) is reversed, so no step would be guided: "
            f"give (t_lo, t_hi) = ({hi:g}, {lo:g}) (--cfg-interval {hi:g} {lo:g})"
        )
    return lo, hi


def cfg_denoiser(
    model: ConditionalModel,
    y: Tensor,
    null_label: int | Tensor,
    scale: float,
    interval: tuple[float, float] | None = None,
    learn_sigma: bool = False,
    guide: ConditionalModel | None = None,
    guide_scale: float = 1.0,
) -> ModelFn:
    """Return model_fn(x_t, t) with classifier-free guidance uncond + scale (cond - uncond) (Ho & Salimans 2022).

    Conditional and unconditional run as one forward of the concatenated batch (2N). Guidance acts on
    every channel of the prediction; eps, v, x0 and velocity are affine in each other at fixed
    (x_t, t), so guiding the raw output equals guiding x0. With `learn_sigma` the variance channels
    are the conditional branch's (a guided log-variance has no meaning). `interval` = (t_lo, t_hi) in
    network timestep units applies guidance only there and the conditional model elsewhere
    (Kynkäänniemi et al. 2024). scale = 1 returns the conditional model itself: one pass, exact.

    `guide`, `guide_scale`: autoguidance (Karras et al. 2024). A weaker model of the same data and
    parametrisation (smaller, or trained for less), given the same labels, adds
    (guide_scale - 1) (cond - guide): samples move away from the errors the weaker model makes
    rather than away from the class-free distribution, which sharpens them with less loss of variety
    than classifier-free guidance. With scale = 1 this is guide + guide_scale (cond - guide), the
    paper's form; with both scales above 1 the two terms add (one more forward, of the guide).
    `null_label`: the label of the unconditional branch, an int for all samples or a tensor (N,) of one each.
    """
    interval = check_guidance_interval(interval)
    network = model

    def model(x: Tensor, t: Tensor, labels: Tensor, r: Tensor | None = None, net: ConditionalModel = network) -> Tensor:
        out = net(x, t, labels) if r is None else net(x, t, labels, r=r)
        return out.to(
            torch.promote_types(out.dtype, torch.float32)
        )  # a bf16-autocast network's output too: guidance and steps stay float32

    if guide_scale != 1.0 and guide is None:
        raise ValueError(f"guide_scale {guide_scale:g} needs a guide model")
    autoguided = guide is not None and guide_scale != 1.0
    if scale == 1.0 and not autoguided:
        return lambda x, t, r=None: model(x, t, y, r)
    # One null label for all (the null class), or one per sample (a text model's negative prompts).
    null = null_label if isinstance(null_label, Tensor) else torch.full_like(y, null_label)

    def guided_fn(x: Tensor, t: Tensor, r: Tensor | None = None) -> Tensor:
        active = torch.ones_like(t, dtype=torch.bool) if interval is None else (t >= interval[0]) & (t <= interval[1])
        if not bool(active.any()):
            return model(x, t, y, r)  # outside the interval: no second pass is needed
        if scale != 1.0:
            both = model(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), None if r is None else torch.cat([r, r])
            )  # (2N, C or 2C, H, W)
            cond, uncond = both.chunk(2)
        else:
            cond = model(x, t, y, r)
        channels = cond.shape[1] // 2 if learn_sigma else cond.shape[1]
        mean = cond[:, :channels]
        guided = uncond[:, :channels] + scale * (mean - uncond[:, :channels]) if scale != 1.0 else mean
        if autoguided:
            guided = guided + (guide_scale - 1.0) * (mean - model(x, t, y, r, guide)[:, :channels])
        guided = torch.where(expand_to(active, guided), guided, mean)
        return torch.cat([guided, cond[:, channels:]], dim=1) if learn_sigma else guided

    return guided_fn


# ----------------------------------------------------------------------------- entry points


def run_sampler(
    name: str,
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule | None,
    num_steps: int,
    spacing: str = "trailing",
    eta: float = 0.0,
    variance: str = "small",
    rho: float = 7.0,
    shift: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    strength: float = 1.0,
    x0: Tensor | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Return samples x_0 (N, C, H, W) from x_T (N, C, H, W) ~ N(0, I) with the named sampler.

    vp samplers (ddpm, ddim, dpm++2m(-sde)): `num_steps` network calls on the `spacing` grid (ddim:
    `eta`; ddpm: `variance` when not learned). karras (euler, heun): `num_steps` Karras sigmas (rho)
    between the schedule's smallest and largest sigma. flow (flow-euler, flow-heun, meanflow):
    `num_steps` steps on the `shift`ed time grid; `schedule` is unused (None). heun and flow-heun call
    the network 2 num_steps - 1 times.

    strength < 1 runs only the last round(strength * num_steps) steps of that grid, starting from
    `x0` noised with x_T to the level of the first kept step (SDEdit, Meng et al. 2022); a strength
    that keeps no step returns x0 unchanged.
    """
    if name not in SAMPLER_SPECS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if strength < 1.0 and x0 is None:
        raise ValueError("strength < 1 starts from clean latents: pass x0")
    kept = kept_steps(num_steps, strength)
    if kept == 0:
        return x0.clone()
    spec = SAMPLER_SPECS[name]
    extras = SamplerExtras(schedule, generators, eta, variance, **(spec.extras or {}))
    partial = kept < num_steps
    if spec.family == "flow":
        times = flow_times(num_steps, shift)[-(kept + 1) :]
        x = (1 - times[0]) * x0 + times[0] * x_T if partial else x_T
        return spec.function(denoiser, x, times, extras, callback)
    schedule = extras.vp_schedule(name)
    if spec.family == "karras":
        sigma_min, sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
        sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)[-(kept + 1) :]
        # EDM scale x / sqrt(alpha_bar): from pure noise, the VP state at sigma_max scaled up
        x = x0 + sigmas[0] * x_T if partial else x_T * (1 + sigma_max**2) ** 0.5
        return spec.function(denoiser, x, sigmas, extras, callback)
    timesteps = timestep_spacing(spacing, schedule.num_timesteps, num_steps)[-kept:]
    x = x_T
    if partial:
        alpha_bar = schedule.alphas_cumprod[timesteps[0]].item()
        x = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * x_T
    return spec.function(denoiser, x, timesteps, extras, callback)


def sample(
    name: str,
    denoiser: Denoiser,
    shape: Sequence[int],
    schedule: NoiseSchedule | None,
    num_steps: int,
    generators: Sequence[torch.Generator],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **sampler_kwargs,
) -> Tensor:
    """Return samples of `shape` (N, C, H, W) whose i-th image depends only on generators[i].

    Initial noise and every stochastic step's noise come from the per-sample generators
    (`per_sample_generators(seed, N)`), so a batch of 8 and the first 8 of a batch of 64 agree.
    """
    x_T = randn_like_per_sample(shape, generators, device, dtype)
    return run_sampler(name, denoiser, x_T, schedule, num_steps, generators=generators, **sampler_kwargs)
