"""Training objectives as pure tensor functions: the forward process, conversions between what a
network may predict, the true and the model posterior, improved DDPM's hybrid loss, rectified flow,
MeanFlow's average-velocity objective, and the opt-in recipe terms (SD3's time shift, LightningDiT's velocity
cosine loss, the dispersive loss).

Shapes: x0, x_t, noise are (N, C, ...); t is (N,) int64 rows of a NoiseSchedule; a model output is
(N, C, ...), or (N, 2C, ...) with learned variance (prediction channels first, variance second, as
DiT). `alpha_bar` arguments are anything that broadcasts against x: a gathered (N, 1, ..., 1)
tensor or a Python float. The v of Salimans & Ho 2022 is v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.diffusion.schedules import DiffusionConfig, NoiseSchedule, expand_to, gather

# Flow time t in [0, 1] reaches the network as FLOW_TIME_SCALE * t: the range DiT's sinusoidal
# timestep embedder was designed for (its frequencies assume timesteps up to ~1000).
FLOW_TIME_SCALE = 1000.0

AlphaBar = Tensor | float
# model(x_t (N, C, H, W), t (N,) float32 network timesteps, y (N,) labels) -> (N, C or 2C, H, W);
# called with return_block=k as well, -> (output, tokens (N, T, D) of the residual stream after block k);
# a MeanFlow network also takes r=(N,), the start of the averaging interval in network units.
ConditionalModel = Callable[..., Tensor | tuple[Tensor, Tensor]]


def mean_flat(x: Tensor) -> Tensor:
    """Return the mean over all dimensions but the first: (N, ...) -> (N,)."""
    return x.flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------- forward process


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Return x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, a draw from q(x_t | x0)."""
    return gather(alphas_cumprod.sqrt(), t, x0) * x0 + gather((1 - alphas_cumprod).sqrt(), t, x0) * noise


# ----------------------------------------------------------------------------- eps / v / x0


def predict_x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """Return x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def predict_eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """Return eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)."""
    return (x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5


def v_target(x0: Tensor, noise: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """Return v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)."""
    return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * x0


def predict_x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """Return x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
    return alpha_bar**0.5 * x_t - (1 - alpha_bar) ** 0.5 * v


def predict_eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """Return eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
    return (1 - alpha_bar) ** 0.5 * x_t + alpha_bar**0.5 * v


def x0_from_prediction(output: Tensor, x_t: Tensor, alpha_bar: AlphaBar, prediction: str) -> Tensor:
    """Return the x0 implied by a network output of type `prediction` ("eps" | "v" | "x0")."""
    if prediction == "eps":
        return predict_x0_from_eps(x_t, output, alpha_bar)
    if prediction == "v":
        return predict_x0_from_v(x_t, output, alpha_bar)
    if prediction == "x0":
        return output
    raise ValueError(f"unknown prediction {prediction!r}; expected 'eps', 'v' or 'x0'")


def prediction_from_x0(x0: Tensor, x_t: Tensor, alpha_bar: AlphaBar, prediction: str) -> Tensor:
    """Return the network output of type `prediction` that implies x0 at x_t (inverse of x0_from_prediction)."""
    if prediction == "eps":
        return predict_eps_from_x0(x_t, x0, alpha_bar)
    if prediction == "v":
        return v_target(x0, predict_eps_from_x0(x_t, x0, alpha_bar), alpha_bar)
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction {prediction!r}; expected 'eps', 'v' or 'x0'")


# ----------------------------------------------------------------------------- posteriors


def q_posterior_mean_variance(
    x0: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule
) -> tuple[Tensor, Tensor, Tensor]:
    """Return mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 6-7)."""
    mean = gather(schedule.posterior_mean_coef1, t, x_t) * x0 + gather(schedule.posterior_mean_coef2, t, x_t) * x_t
    variance = gather(schedule.posterior_variance, t, x_t)  # (N, 1, ..., 1)
    log_variance = gather(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


def split_variance(model_output: Tensor, channels: int, learn_sigma: bool) -> tuple[Tensor, Tensor | None]:
    """Return (prediction (N, C, ...), variance values (N, C, ...) or None) of a model output."""
    if not learn_sigma:
        if model_output.shape[1] != channels:
            raise ValueError(f"model output has {model_output.shape[1]} channels, expected {channels}")
        return model_output, None
    if model_output.shape[1] != 2 * channels:
        raise ValueError(f"learn_sigma: model output has {model_output.shape[1]} channels, expected {2 * channels}")
    prediction, var_values = model_output.split(channels, dim=1)
    return prediction, var_values


def p_mean_variance(
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    learn_sigma: bool = False,
    fixed_variance: str = "small",
    clip_x0: float | None = None,
) -> dict[str, Tensor]:
    """Return the reverse step p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_x0).

    Mean: the true posterior mean at the predicted x0. Variance: with `learn_sigma`, the network's
    variance channel v in [-1, 1] interpolates the log-variance between beta-tilde_t (v = -1) and
    beta_t (v = +1) (Nichol & Dhariwal 2021, eq. 15); otherwise `fixed_variance` "small" (beta-tilde_t)
    or "large" (beta_t, with row 0 set to beta-tilde_1 as improved DDPM, for a finite decoder NLL).
    """
    output, var_values = split_variance(model_output, x_t.shape[1], learn_sigma)
    if learn_sigma:
        min_log = gather(schedule.posterior_log_variance_clipped, t, x_t)
        max_log = gather(schedule.betas.log(), t, x_t)
        frac = (var_values + 1) / 2  # not clamped: the bounds are a parametrisation, not a constraint (improved DDPM)
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = log_variance.exp()
    elif fixed_variance == "small":
        variance = gather(schedule.posterior_variance, t, x_t)
        log_variance = gather(schedule.posterior_log_variance_clipped, t, x_t)
    elif fixed_variance == "large":
        large = schedule.betas
        if schedule.num_timesteps > 1:
            large = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]])
        variance = gather(large, t, x_t)
        log_variance = gather(large.log(), t, x_t)
    else:
        raise ValueError(f"unknown fixed_variance {fixed_variance!r}; expected 'small' or 'large'")
    pred_x0 = x0_from_prediction(output, x_t, gather(schedule.alphas_cumprod, t, x_t), prediction)
    if clip_x0 is not None:
        pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
    mean, _, _ = q_posterior_mean_variance(pred_x0, x_t, t, schedule)
    return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0}


# ----------------------------------------------------------------------------- likelihood terms


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Return KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Return log P(x) elementwise for data x in [-1, 1] quantised to 256 levels, under N(means, exp(log_scales)^2).

    Each level owns a bin of width 2/255; the end bins extend to -inf and +inf (Ho et al. 2020,
    eq. 13). Exact log normal CDFs replace improved DDPM's tanh approximation, and an inner bin's
    mass is computed in log space on the lower-tail side, so it stays exact far from the mean
    instead of cancelling to a floor.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    upper = inv_stdv * (centered + 1.0 / 255.0)  # standardised bin edges
    lower = inv_stdv * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)  # bottom bin: P(z <= upper)
    log_sf_lower = torch.special.log_ndtr(-lower)  # top bin: P(z >= lower)
    # P(lower <= z <= upper), by symmetry of the normal taken on whichever side keeps lower' <= 0.
    flip = lower > 0
    lo, hi = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_hi = torch.special.log_ndtr(hi)
    ratio = -torch.expm1(torch.special.log_ndtr(lo) - log_hi)  # 1 - Phi(lo) / Phi(hi), in (0, 1]
    log_bin = log_hi + torch.log(ratio.clamp(min=torch.finfo(ratio.dtype).tiny))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


def vlb_terms(
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    learn_sigma: bool = True,
    fixed_variance: str = "small",
) -> Tensor:
    """Return the per-sample VLB term L_t in bits per dimension, (N,).

    L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, and the decoder NLL
    -log p(x0 | x_1) on 8-bit bins at t = 0 (Ho et al. 2020, eq. 5).
    """
    true_mean, _, true_log_variance = q_posterior_mean_variance(x0, x_t, t, schedule)
    p = p_mean_variance(model_output, x_t, t, schedule, prediction, learn_sigma, fixed_variance)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


# ----------------------------------------------------------------------------- DDPM loss


def min_snr_weight(alpha_bar: Tensor, prediction: str, gamma: float) -> Tensor:
    """Return the Min-SNR-gamma weight of an MSE on `prediction` at alpha_bar (Hang et al. 2023).

    In x0 space the weight is min(SNR, gamma), SNR = alpha_bar / (1 - alpha_bar). An eps error is an x0
    error scaled by sqrt(SNR), and a v error by sqrt(SNR + 1), so the same weighting of an eps MSE is
    min(SNR, gamma) / SNR and of a v MSE min(SNR, gamma) / (SNR + 1).
    """
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "x0":
        return clipped
    raise ValueError(f"unknown prediction {prediction!r}; expected 'eps', 'v' or 'x0'")


def diffusion_loss(
    model_output: Tensor,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    config: DiffusionConfig,
    schedule: NoiseSchedule,
) -> dict[str, Tensor]:
    """Return per-sample losses (N,): dict(loss, mse) plus vb when config.learn_sigma.

    mse regresses the `config.prediction` target; the loss weighs it per timestep when
    `config.loss_weighting` is "min-snr" (mse is logged unweighted). With learned variance the loss
    is improved DDPM's hybrid L_simple + L_vlb, where L_vlb sees the prediction detached: it trains
    only the variance channels and the mean learns from the MSE alone (Nichol & Dhariwal 2021, sec. 3.1).
    """
    model_output = model_output.to(x0.dtype)  # the loss in the data's precision even under autocast
    x_t = q_sample(x0, t, noise, schedule.alphas_cumprod)
    output, var_values = split_variance(model_output, x0.shape[1], config.learn_sigma)
    if config.prediction == "eps":
        target = noise
    elif config.prediction == "v":
        target = v_target(x0, noise, gather(schedule.alphas_cumprod, t, x0))
    else:
        target = x0
    mse = mean_flat((target - output) ** 2)
    weighted = mse
    if config.loss_weighting == "min-snr":
        # The weight from the float64 table, cast only at the end: SNR spans ~1e-5 to ~1e4.
        weight = min_snr_weight(schedule.alphas_cumprod[t], config.prediction, config.min_snr_gamma)
        weighted = mse * weight.to(mse.dtype)
    if not config.learn_sigma:
        return {"loss": weighted, "mse": mse}
    frozen = torch.cat([output.detach(), var_values], dim=1)  # gradient to the variance channels only
    vb = vlb_terms(frozen, x0, x_t, t, schedule, config.prediction, learn_sigma=True)
    # L_hybrid = L_simple + lambda L_vlb, lambda = 1/1000 (Nichol & Dhariwal 2021, sec. 3.1), and
    # L_vlb = T E_t[L_t]: the sampled L_t weighs T / 1000 (RESCALED_MSE there; 1 at T = 1000, as DiT).
    vb = vb * (config.num_timesteps / 1000.0)
    return {"loss": weighted + vb, "mse": mse, "vb": vb}


# ----------------------------------------------------------------------------- rectified flow
# Convention (SiT, LightningDiT, SD3): x_t = (1 - t) x0 + t noise, t = 0 data, t = 1 noise; the
# velocity dx_t/dt = noise - x0 is what the network regresses, and sampling integrates t from 1 to 0.


def flow_interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Return x_t = (1 - t) x0 + t noise for t (N,) in [0, 1]."""
    t = expand_to(t, x0).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def flow_velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Return the rectified-flow velocity target noise - x0 (= d x_t / dt)."""
    return noise - x0


def flow_sample_t(
    n: int,
    config: DiffusionConfig,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Return n float32 flow times in (0, 1): uniform or logit-normal t = sigmoid(m + s n), then `shift_time`d (SD3)."""
    draw_on = generator.device if generator is not None else device
    if config.time_sampling == "uniform":
        t = torch.rand(n, generator=generator, device=draw_on)
    else:
        # Logit-normal puts more training on intermediate t, where the velocity is hardest to predict.
        normal = torch.randn(n, generator=generator, device=draw_on)
        t = torch.sigmoid(config.logit_normal_mean + config.logit_normal_std * normal)
    if config.time_shift != 1:
        t = shift_time(t, config.time_shift)
    return t.to(device) if device is not None else t


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Return t' = s t / (1 + (s - 1) t), the time shift of Esser et al. 2024 (SD3, eq. 23); s > 1 moves t toward noise.

    SD3 takes s = sqrt(m / n) for m pixels against a base resolution of n: at more pixels the same
    noise level destroys less of the image, so training (and sampling) spends more time at high noise.
    """
    return shift * t / (1 + (shift - 1) * t)


def flow_loss(model_output: Tensor, x0: Tensor, noise: Tensor) -> dict[str, Tensor]:
    """Return per-sample losses (N,): dict(loss, mse) of the velocity regression."""
    mse = mean_flat((flow_velocity_target(x0, noise) - model_output.to(x0.dtype)) ** 2)
    return {"loss": mse, "mse": mse}


def velocity_cosine_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Return per-sample 1 - cos(prediction, target), the cosine over channels at each position, averaged: (N,).

    LightningDiT's cos loss (hustvl/LightningDiT, transport/transport.py:
    `mean_flat(1 - cosine_similarity(model_output, ut, dim=1))`, added to the MSE with weight 1): it
    trains the velocity's direction apart from its length. 0 for any positive multiple of the target,
    2 for its negative.
    """
    return mean_flat(1 - F.cosine_similarity(prediction, target, dim=1))  # cosine (N, H, W) -> (N,)


# ----------------------------------------------------------------------------- MeanFlow


def meanflow_sample_times(
    n: int, config: DiffusionConfig, generator: torch.Generator | None = None, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Return (t, r) (N,) with r <= t: two draws of `flow_sample_t`, sorted; a share 1 - meanflow_ratio gets r = t."""
    a, b = flow_sample_t(n, config, generator, device), flow_sample_t(n, config, generator, device)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    draw_on = generator.device if generator is not None else device
    same = (torch.rand(n, generator=generator, device=draw_on) >= config.meanflow_ratio).to(t.device)
    return t, torch.where(same, t, r)


def meanflow_target(
    model: ConditionalModel, x0: Tensor, noise: Tensor, y: Tensor, t: Tensor, r: Tensor
) -> tuple[Tensor, Tensor]:
    """Return (u, target) (N, C, ...) of the MeanFlow objective (Geng et al. 2025, eq. 10 and Alg. 1): the
    network's average velocity u(x_t, r, t) and its regression target, detached.

    The average velocity u(x_t, r, t) = 1/(t - r) int_r^t v(x_s, s) ds obeys the MeanFlow identity
    u = v - (t - r) du/dt, with du/dt = v . d_x u + d_t u the total derivative along the path. Its
    right side, with the network's own u in the derivative (a Jacobian-vector product with tangent
    (v, 0, 1) in (x, r, t)) and the conditional velocity v = noise - x0, is the regression target,
    held fixed (stop-gradient); its mean given x_t is the identity's right side with the marginal velocity.
    The product runs with the math attention kernel: the fused CPU kernel has no forward-mode derivative.
    """
    x_t = flow_interpolate(x0, noise, t)
    v = flow_velocity_target(x0, noise)

    def u_fn(x: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model(x, t_ * FLOW_TIME_SCALE, y, r=r_ * FLOW_TIME_SCALE).to(x0.dtype)

    with sdpa_kernel(SDPBackend.MATH):
        u, du_dt = torch.func.jvp(u_fn, (x_t, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return u, (v - expand_to(t - r, v).to(v.dtype) * du_dt).detach()


def meanflow_loss(
    model: ConditionalModel, x0: Tensor, noise: Tensor, y: Tensor, t: Tensor, r: Tensor, config: DiffusionConfig
) -> dict[str, Tensor]:
    """Return per-sample losses (N,) of MeanFlow: the squared error to `meanflow_target` divided by
    sg((err + c)^p), the paper's adaptive weight (sec. 4.3), and the plain error as "mse"."""
    u, target = meanflow_target(model, x0, noise, y, t, r)
    err = mean_flat((u - target) ** 2)
    weight = (err.detach() + config.meanflow_weight_c) ** config.meanflow_weight_power
    return {"loss": err / weight, "mse": err}


# ----------------------------------------------------------------------------- representation regulariser


def dispersive_loss(z: Tensor, temperature: float = 1.0) -> Tensor:
    """Return the dispersive loss of a batch of representations z (N, ...), a scalar in [-log N, 0].

    L_disp = log mean_{i,j} exp(-D(z_i, z_j) / tau), D the squared L2 distance of the flattened
    representations divided by their dimension, the mean over all N^2 ordered pairs, i = j included
    (Wang & He 2025, "Diffuse and Disperse", the InfoNCE-L2 variant, as in their code raywang4/DispLoss):
    InfoNCE's repulsion without positive pairs. Collapsed representations give log 1 = 0, the maximum.
    """
    z = z.flatten(1)  # (N, D)
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # exp(-D) of bf16 distances is too coarse
    n, dim = z.shape
    sq_dist = F.pdist(z).pow(2) / dim  # (N (N - 1) / 2,), pairs i < j: exact differences, not |a|^2 + |b|^2 - 2ab
    # Each pair i < j stands for (i, j) and (j, i); the N diagonal terms are exp(0) = 1.
    return torch.log((2 * torch.exp(-sq_dist / temperature).sum() + n) / n**2)


def dispersive_block_index(config: DiffusionConfig, depth: int | None) -> int | None:
    """Return the block whose tokens the dispersive loss reads (-1 resolves to depth // 2), or None when it is off."""
    if config.dispersive_weight == 0:
        return None
    if config.dispersive_block >= 0:
        block = config.dispersive_block
    elif depth is None:
        raise ValueError("diffusion.dispersive_block = -1 (the middle block) needs the network's depth")
    else:
        block = depth // 2
    if depth is not None and block >= depth:
        raise ValueError(f"diffusion.dispersive_block = {block}, but the network has {depth} blocks (0..{depth - 1})")
    return block


def _call_model(
    model: ConditionalModel, x_t: Tensor, t: Tensor, y: Tensor, block: int | None
) -> tuple[Tensor, Tensor | None]:
    """Return (output, tokens after `block` or None); without a block the model is called exactly as (x_t, t, y)."""
    if block is None:
        return model(x_t, t, y), None
    output, tokens = model(x_t, t, y, return_block=block)
    return output, tokens


# ----------------------------------------------------------------------------- training entry


def training_losses(
    model: ConditionalModel,
    x0: Tensor,
    y: Tensor,
    config: DiffusionConfig,
    schedule: NoiseSchedule | None = None,
    generator: torch.Generator | None = None,
    depth: int | None = None,
) -> dict[str, Tensor]:
    """Return per-sample losses (N,) for a batch: dict(loss, mse, [vb], [cos], [disp], t), drawing t and noise.

    ddpm: t are integer timesteps uniform in [0, T), passed to `model` as float32 (N,); `schedule`
    is required. flow: t in (0, 1) per `config.time_sampling` and `config.time_shift`, passed to
    `model` as FLOW_TIME_SCALE * t; `schedule` is unused. A `generator` (on any device) makes the
    draws reproducible; they are made on its device and moved to x0's. The returned "t" is in the
    objective's own units, for logging.

    Options, off by default (then `model` is called as model(x_t, t, y) and the result is unchanged):
    velocity_cosine_weight w (flow): "cos" (N,) is `velocity_cosine_loss`, and loss += w * cos.
    dispersive_weight w: `model` is called with return_block=k (`dispersive_block`; -1 needs `depth`,
    the network's number of blocks, and means depth // 2) and returns (output, tokens). The
    dispersive loss couples the samples, so it is one scalar for the batch; "disp" holds it broadcast
    to (N,) and loss += w * disp, so loss.mean() is the mean diffusion loss + w * L_disp and the
    mean of "disp" logs L_disp itself.
    """
    n = x0.shape[0]
    block = dispersive_block_index(config, depth)
    draw_on = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=draw_on, dtype=x0.dtype).to(x0.device)
    if config.objective == "meanflow":
        t, r = meanflow_sample_times(n, config, generator, x0.device)
        losses, tokens = meanflow_loss(model, x0, noise, y, t, r, config), None
    elif config.objective == "flow":
        t = flow_sample_t(n, config, generator, x0.device)
        x_t = flow_interpolate(x0, noise, t)
        output, tokens = _call_model(model, x_t, t * FLOW_TIME_SCALE, y, block)
        losses = flow_loss(output, x0, noise)
        if config.velocity_cosine_weight > 0:
            cos = velocity_cosine_loss(output.to(x0.dtype), flow_velocity_target(x0, noise))
            losses = {**losses, "loss": losses["loss"] + config.velocity_cosine_weight * cos, "cos": cos}
    else:
        if schedule is None:
            raise ValueError("objective 'ddpm' needs a NoiseSchedule")
        t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator, device=draw_on).to(x0.device)
        x_t = q_sample(x0, t, noise, schedule.alphas_cumprod)
        output, tokens = _call_model(model, x_t, t.to(torch.float32), y, block)
        losses = diffusion_loss(output, x0, t, noise, config, schedule)
    if tokens is not None:
        disp = dispersive_loss(tokens, config.dispersive_temperature).expand(n)  # () -> (N,)
        losses = {**losses, "loss": losses["loss"] + config.dispersive_weight * disp, "disp": disp}
    return {**losses, "t": t}
