"""Noise schedules and the float64 tables that objectives and samplers read.

Conventions (Ho et al. 2020, 0-based): discrete time t = 0, ..., T-1 indexes every table, and
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,   alpha_bar_t = prod_{s <= t} (1 - beta_s),
so t = 0 already carries one step of noise and the chain ends on clean data (alpha_bar = 1) one step
"before" t = 0. The same process in the EDM parametrisation of Karras et al. 2022 is
x / sqrt(alpha_bar) = x0 + sigma eps with sigma = sqrt((1 - alpha_bar) / alpha_bar).

Tables stay float64; a value is gathered at a batch's timesteps and only then cast to the batch's
dtype (`gather`), so bf16 or fp16 runs never see a rounded schedule (alpha_bar near 1 and near 0
is where rounding hurts).
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

OBJECTIVES = ("ddpm", "flow", "meanflow")
SCHEDULES = ("linear", "cosine", "continuous-cosine")
PREDICTIONS = ("eps", "v", "x0")
TIME_SAMPLINGS = ("uniform", "logit-normal")
LOSS_WEIGHTINGS = ("uniform", "min-snr")


@dataclass
class DiffusionConfig:
    """How training corrupts data and what the network predicts.

    objective "ddpm": the discrete VP chain of `schedule` with T = `num_timesteps`; the network gets
    integer timesteps in [0, T) and predicts `prediction`, plus C variance channels if `learn_sigma`
    (improved DDPM's hybrid loss, as DiT).
    objective "flow": rectified flow x_t = (1 - t) x0 + t noise, t in [0, 1] (SiT, LightningDiT); the
    network predicts the velocity noise - x0 and gets 1000 t as its timestep. `schedule`,
    `num_timesteps` and `prediction` are unused, and `learn_sigma` must be false.
    objective "meanflow": the same path, but the network u(x_t, r, t) predicts the average velocity over
    [r, t], (x_t - x_r) / (t - r), trained by the MeanFlow identity (Geng et al. 2025, arXiv 2505.13447)
    with no teacher; at r = t it is the flow velocity, so the flow samplers work too, and the `meanflow`
    sampler jumps x_r = x_t - (t - r) u in 1, 2 or a few network calls. Needs `model.interval_embed`.
    """

    objective: str = "ddpm"  # "ddpm" | "flow" | "meanflow"
    schedule: str = "linear"  # "linear" (DDPM/DiT) | "cosine" (improved DDPM) | "continuous-cosine"
    num_timesteps: int = 1000
    prediction: str = "eps"  # "eps" | "v" | "x0"
    learn_sigma: bool = True  # DiT's default; flow runs must set it to false
    time_sampling: str = "uniform"  # flow: "uniform" | "logit-normal" (SD3, LightningDiT)
    logit_normal_mean: float = 0.0  # flow, logit-normal: t = sigmoid(mean + std * n), n ~ N(0, 1)
    logit_normal_std: float = 1.0
    # ddpm: "min-snr" weighs each timestep's MSE as min(SNR_t, gamma) would weigh it in x0 space
    # (Hang et al. 2023, Min-SNR-gamma, gamma = 5): low-noise steps, where the loss is easy and
    # their gradients conflict with the high-noise ones, stop dominating the update.
    loss_weighting: str = "uniform"  # "uniform" | "min-snr"
    min_snr_gamma: float = 5.0
    # Recipe options below default to off; each names its source.
    velocity_cosine_weight: float = (
        0.0  # flow: + w (1 - cos(v_pred, v)) over channels, LightningDiT's cos loss (Yao et al. 2025)
    )
    time_shift: float = (
        1.0  # flow: train at t' = s t / (1 + (s - 1) t), s > 1 more at high noise (Esser et al. 2024, SD3)
    )
    dispersive_weight: float = (
        0.0  # + w L_disp of one block's tokens, Dispersive Loss (Wang & He 2025, arXiv 2506.09027)
    )
    dispersive_block: int = -1  # the block (0-based) whose tokens are dispersed; -1: the middle one, depth // 2
    dispersive_temperature: float = 1.0  # tau of L_disp; the official PyTorch code uses 1, the paper's JAX runs 0.5
    # meanflow: share of samples drawn with r < t (the rest r = t, plain flow matching); MeanFlow's best
    # ImageNet setting draws 25% with r != t (Geng et al. 2025, Table 1a).
    meanflow_ratio: float = 0.25
    # meanflow: adaptive loss weight 1 / (err + c)^p on each sample's squared error (MeanFlow sec. 4.3, p = 1, c = 1e-3)
    meanflow_weight_power: float = 1.0
    meanflow_weight_c: float = 1.0e-3
    # A student of `ldm train distill` learned its teacher's velocity under classifier-free guidance at this
    # scale: one network pass is one guided evaluation, and sampling it with guidance again is refused. 0: none.
    built_in_guidance: float = 0.0

    @property
    def is_flow(self) -> bool:
        """Rectified-flow path x_t = (1 - t) x0 + t noise (objectives flow and meanflow), not the discrete chain."""
        return self.objective in ("flow", "meanflow")

    def __post_init__(self) -> None:
        for name, allowed in (
            ("objective", OBJECTIVES),
            ("schedule", SCHEDULES),
            ("prediction", PREDICTIONS),
            ("time_sampling", TIME_SAMPLINGS),
            ("loss_weighting", LOSS_WEIGHTINGS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"diffusion.{name} = {getattr(self, name)!r}; expected one of {allowed}")
        if self.num_timesteps < 2:
            raise ValueError(f"diffusion.num_timesteps = {self.num_timesteps}; need at least 2")
        if self.is_flow and self.learn_sigma:
            raise ValueError(
                f"diffusion.learn_sigma must be false for objective {self.objective!r} (a velocity has no variance)"
            )
        if self.is_flow and self.loss_weighting != "uniform":
            raise ValueError(
                f"diffusion.loss_weighting must be 'uniform' for objective {self.objective!r} "
                "(use time_sampling instead)"
            )
        if not 0.0 <= self.meanflow_ratio <= 1.0:
            raise ValueError(f"diffusion.meanflow_ratio = {self.meanflow_ratio}; must be in [0, 1]")
        if not (self.meanflow_weight_power >= 0 and self.meanflow_weight_c > 0):
            raise ValueError("diffusion.meanflow_weight_power must be >= 0 and diffusion.meanflow_weight_c > 0")
        if self.objective == "meanflow" and (self.velocity_cosine_weight > 0 or self.dispersive_weight > 0):
            raise ValueError(
                "objective 'meanflow' takes neither velocity_cosine_weight nor dispersive_weight: set them to 0"
            )
        if self.min_snr_gamma <= 0:
            raise ValueError(f"diffusion.min_snr_gamma = {self.min_snr_gamma}; must be positive")
        if self.logit_normal_std <= 0:
            raise ValueError(f"diffusion.logit_normal_std = {self.logit_normal_std}; must be positive")
        if not self.velocity_cosine_weight >= 0:
            raise ValueError(f"diffusion.velocity_cosine_weight = {self.velocity_cosine_weight}; must be >= 0")
        if not self.is_flow and self.velocity_cosine_weight > 0:
            raise ValueError(
                "diffusion.velocity_cosine_weight applies to objective 'flow' only "
                "(a ddpm network predicts no velocity)"
            )
        if not self.time_shift > 0:
            raise ValueError(
                f"diffusion.time_shift = {self.time_shift}; must be positive (1 leaves the times as drawn)"
            )
        if not self.is_flow and self.time_shift != 1:
            raise ValueError("diffusion.time_shift applies to objective 'flow' only; keep it at 1 for 'ddpm'")
        if not self.dispersive_weight >= 0:
            raise ValueError(f"diffusion.dispersive_weight = {self.dispersive_weight}; must be >= 0")
        if self.dispersive_block < -1:
            raise ValueError(
                f"diffusion.dispersive_block = {self.dispersive_block}; must be a block index >= 0, "
                "or -1 for the middle block"
            )
        if not self.dispersive_temperature > 0:
            raise ValueError(f"diffusion.dispersive_temperature = {self.dispersive_temperature}; must be positive")
        if not (self.built_in_guidance == 0 or (self.built_in_guidance >= 1 and self.is_flow)):
            raise ValueError(
                f"diffusion.built_in_guidance = {self.built_in_guidance}; 0 (none), or a guidance scale >= 1 "
                f"that a distilled flow student learned (set by ldm train distill)"
            )


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Return the (T,) float64 betas of DDPM's linear schedule (Ho et al. 2020, as in DiT)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Return the (T,) float64 betas of improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # f(t); the f(0) normalisation cancels in the ratio
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    # max_beta keeps the last steps from being (numerically) beta = 1, a singular reverse step.
    return betas.clamp(max=max_beta)


def continuous_cosine_log_snr(t: Tensor, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> Tensor:
    """Return the log-SNR of the cosine schedule at continuous time t in [0, 1], clipped to [logsnr_min, logsnr_max].

    alpha_bar = cos^2(pi t / 2) has log-SNR = log(alpha_bar / (1 - alpha_bar)) = -2 log tan(pi t / 2),
    infinite at both ends; the angle is mapped into the interval where the log-SNR stays finite
    (Kingma et al. 2021, VDM; Hoogeboom et al. 2023, simple diffusion), so t = 0 and t = 1 are
    usable noise levels.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    angle_min = math.atan(math.exp(-0.5 * logsnr_max))
    angle_max = math.atan(math.exp(-0.5 * logsnr_min))
    return -2 * torch.log(torch.tan(angle_min + t * (angle_max - angle_min)))


def continuous_cosine_alpha_bar(t: Tensor, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> Tensor:
    """Return alpha_bar(t) = sigmoid(log-SNR(t)) of the clipped continuous cosine schedule, float64."""
    return torch.sigmoid(continuous_cosine_log_snr(t, logsnr_min, logsnr_max))


def continuous_cosine_alphas_cumprod(num_timesteps: int = 1000) -> Tensor:
    """Return the (T,) float64 table alpha_bar((t + 1) / T) that samples the continuous cosine at t = 0..T-1."""
    return continuous_cosine_alpha_bar(torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps)


@dataclass(eq=False)
class NoiseSchedule:
    """Float64 tables of a discrete VP chain, one row per step (t = 0..T-1, or the kept steps of a respaced chain).

    Built from alphas_cumprod alone: the betas are recovered as 1 - alpha_bar_t / alpha_bar_{t-1}, which
    is what makes a respaced chain (a subset of the steps) a valid chain of its own (Nichol &
    Dhariwal 2021, sec. 4). `timestep_map[i]` is the timestep the network was trained with for row i.
    """

    alphas_cumprod: Tensor  # (T,) float64, strictly decreasing in (0, 1)
    timestep_map: Tensor | None = None  # (T,) int64; identity unless respaced
    betas: Tensor = field(init=False, repr=False)
    alphas_cumprod_prev: Tensor = field(init=False, repr=False)  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    posterior_variance: Tensor = field(init=False, repr=False)  # beta-tilde_t of Ho et al. 2020, eq. 7
    posterior_log_variance_clipped: Tensor = field(init=False, repr=False)
    posterior_mean_coef1: Tensor = field(init=False, repr=False)  # multiplies x0
    posterior_mean_coef2: Tensor = field(init=False, repr=False)  # multiplies x_t
    log_sigmas: Tensor = field(init=False, repr=False)  # log of the EDM sigma sqrt((1 - alpha_bar) / alpha_bar)

    def __post_init__(self) -> None:
        ac = self.alphas_cumprod.to(torch.float64)
        if ac.ndim != 1 or len(ac) < 1 or not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D table of values in (0, 1)")
        if len(ac) > 1 and not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        if self.timestep_map is None:
            self.timestep_map = torch.arange(len(ac), device=ac.device)
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.betas = 1 - ac / self.alphas_cumprod_prev
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - ac)
        # beta-tilde_0 = 0, so its log is clipped to beta-tilde_1 (improved DDPM); only the learned
        # variance interpolation reads row 0, and sampling adds no noise there anyway.
        first = self.posterior_variance[1:2] if len(ac) > 1 else self.betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - ac)
        self.log_sigmas = 0.5 * (torch.log1p(-ac) - torch.log(ac))

    @classmethod
    def from_betas(cls, betas: Tensor) -> "NoiseSchedule":
        """Return the schedule of alpha_bar_t = prod_{s <= t} (1 - beta_s), in float64."""
        return cls(torch.cumprod(1 - betas.to(torch.float64), dim=0))

    @property
    def num_timesteps(self) -> int:
        """Return the number of rows (steps) of the chain."""
        return len(self.alphas_cumprod)

    @property
    def sigmas(self) -> Tensor:
        """Return the (T,) EDM noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing."""
        return self.log_sigmas.exp()

    def respace(self, timesteps: Tensor) -> "NoiseSchedule":
        """Return the chain that visits only `timesteps` (any order; each kept once), with betas recomputed."""
        kept = torch.unique(torch.as_tensor(timesteps, dtype=torch.long, device=self.alphas_cumprod.device))  # sorted
        return NoiseSchedule(self.alphas_cumprod[kept], self.timestep_map[kept])

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """Return the same schedule with its tables on `device` (still float64)."""
        return NoiseSchedule(self.alphas_cumprod.to(device), self.timestep_map.to(device))

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Return sigma at fractional timesteps t in [0, T-1], interpolating log sigma linearly between rows."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.log_sigmas.device).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """Return the fractional timestep whose interpolated sigma is `sigma` (inverse of `t_to_sigma`), in [0, T-1]."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64, device=self.log_sigmas.device).log()
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = (log_sigma - self.log_sigmas[low]) / (self.log_sigmas[high] - self.log_sigmas[low])
        return (low + w.clamp(0, 1)).to(torch.float64)


def make_schedule(name: str, num_timesteps: int = 1000) -> NoiseSchedule:
    """Return the named schedule ("linear", "cosine", "continuous-cosine") with T = num_timesteps."""
    if name == "linear":
        # improved DDPM / DiT scale the endpoints by 1000 / T so that any T reaches the same terminal SNR.
        scale = 1000 / num_timesteps
        return NoiseSchedule.from_betas(linear_betas(num_timesteps, scale * 1e-4, scale * 0.02))
    if name == "cosine":
        return NoiseSchedule.from_betas(cosine_betas(num_timesteps))
    if name == "continuous-cosine":
        return NoiseSchedule(continuous_cosine_alphas_cumprod(num_timesteps))
    raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")


def expand_to(v: Tensor, x: Tensor) -> Tensor:
    """Return v of shape (N,) viewed as (N, 1, ..., 1) so it broadcasts against x of shape (N, ...)."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def gather(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Return table[t] cast to x's dtype and device, shaped (N, 1, ..., 1) to broadcast against x."""
    if table.device != t.device:
        table = table.to(t.device)
    return expand_to(table[t.long()], x).to(device=x.device, dtype=x.dtype)
