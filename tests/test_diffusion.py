"""Schedules and training objectives against float64 references written out from the papers."""

import math

import pytest
import torch

from ldm.diffusion.objectives import (
    FLOW_TIME_SCALE,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    dispersive_loss,
    flow_interpolate,
    flow_loss,
    flow_sample_t,
    flow_velocity_target,
    normal_kl,
    p_mean_variance,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    prediction_from_x0,
    q_posterior_mean_variance,
    q_sample,
    shift_time,
    training_losses,
    v_target,
    velocity_cosine_loss,
    vlb_terms,
    x0_from_prediction,
)
from ldm.diffusion.schedules import (
    DiffusionConfig,
    NoiseSchedule,
    continuous_cosine_alpha_bar,
    continuous_cosine_alphas_cumprod,
    continuous_cosine_log_snr,
    cosine_betas,
    expand_to,
    gather,
    linear_betas,
    make_schedule,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return make_schedule("linear", 1000)


def _batch(n=6, c=3, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, c, h, w, generator=g, dtype=F64) * 2 - 1
    noise = torch.randn(n, c, h, w, generator=g, dtype=F64)
    return x0, noise


# ----------------------------------------------------------------------------- schedules


def test_linear_betas_match_float64_reference():
    betas = linear_betas(1000, 1e-4, 0.02)
    reference = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    assert betas.dtype == F64
    torch.testing.assert_close(betas, torch.tensor(reference, dtype=F64), rtol=0, atol=1e-15)


def test_cosine_betas_match_improved_ddpm_formula():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    reference = [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)]
    betas = cosine_betas(T, s, 0.999)
    assert betas.dtype == F64
    torch.testing.assert_close(betas, torch.tensor(reference, dtype=F64), rtol=1e-12, atol=1e-15)
    assert betas[-1] == 0.999  # the clip is active at the end of the chain


def test_schedule_tables_match_ddpm_formulas():
    betas = linear_betas(50, 1e-3, 0.2)
    sched = NoiseSchedule.from_betas(betas)
    alpha_bar, prev = [], 1.0
    for b in betas.tolist():
        prev *= 1 - b
        alpha_bar.append(prev)
    ab = torch.tensor(alpha_bar, dtype=F64)
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    torch.testing.assert_close(sched.alphas_cumprod, ab, rtol=1e-14, atol=0)
    torch.testing.assert_close(sched.betas, betas, rtol=1e-12, atol=1e-15)  # recovered from the ratio
    # Ho et al. 2020, eq. 7
    torch.testing.assert_close(sched.posterior_variance, betas * (1 - ab_prev) / (1 - ab), rtol=1e-12, atol=1e-18)
    torch.testing.assert_close(sched.posterior_mean_coef1, betas * ab_prev.sqrt() / (1 - ab), rtol=1e-12, atol=0)
    coef2 = (1 - betas).sqrt() * (1 - ab_prev) / (1 - ab)
    torch.testing.assert_close(sched.posterior_mean_coef2, coef2, rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.sigmas, ((1 - ab) / ab).sqrt(), rtol=1e-12, atol=0)


def test_posterior_log_variance_is_clipped_at_t0():
    sched = make_schedule("linear", 100)
    assert sched.posterior_variance[0] == 0
    assert sched.posterior_log_variance_clipped[0] == torch.log(sched.posterior_variance[1])
    torch.testing.assert_close(sched.posterior_log_variance_clipped[1:], sched.posterior_variance[1:].log())


def test_linear_schedule_endpoints_scale_with_T_as_improved_ddpm():
    sched = make_schedule("linear", 2000)
    torch.testing.assert_close(sched.betas[[0, -1]], torch.tensor([0.5e-4, 0.01], dtype=F64), rtol=1e-9, atol=0)


def test_continuous_cosine_is_the_clipped_cosine_log_snr():
    assert continuous_cosine_log_snr(torch.tensor(0.0)).item() == pytest.approx(15.0, abs=1e-9)
    assert continuous_cosine_log_snr(torch.tensor(1.0)).item() == pytest.approx(-15.0, abs=1e-9)
    # Inside the clip the schedule is alpha_bar = cos^2 of the (affinely remapped) angle.
    a_min, a_max = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    t = torch.linspace(0, 1, 101, dtype=F64)
    cosine = torch.cos(a_min + t * (a_max - a_min)) ** 2
    torch.testing.assert_close(continuous_cosine_alpha_bar(t), cosine, rtol=1e-12, atol=1e-15)
    table = continuous_cosine_alphas_cumprod(10)
    torch.testing.assert_close(table, continuous_cosine_alpha_bar(torch.arange(1, 11, dtype=F64) / 10))
    assert bool((table[1:] < table[:-1]).all())
    make_schedule("continuous-cosine", 1000)  # a valid chain: strictly decreasing, inside (0, 1)


def test_gather_indexes_in_float64_then_casts_and_broadcasts():
    table = torch.tensor([1 - 1e-9, 0.5, 1e-9], dtype=F64)
    x = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)
    t = torch.tensor([2, 0])
    out = gather(table, t, x)
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.bfloat16
    assert torch.equal(out.flatten(), table[t].to(torch.bfloat16))
    assert expand_to(torch.ones(5), torch.zeros(5, 2, 3)).shape == (5, 1, 1)


def test_respaced_chain_keeps_alpha_bar_and_recomputes_betas(schedule):
    kept = torch.tensor([999, 499, 0, 250])
    spaced = schedule.respace(kept)
    order = torch.tensor([0, 250, 499, 999])
    assert torch.equal(spaced.timestep_map, order)
    torch.testing.assert_close(spaced.alphas_cumprod, schedule.alphas_cumprod[order])
    ab = schedule.alphas_cumprod[order]
    torch.testing.assert_close(spaced.betas, 1 - ab / torch.cat([torch.ones(1, dtype=F64), ab[:-1]]))


def test_sigma_to_t_inverts_t_to_sigma(schedule):
    t = torch.tensor([0.0, 0.25, 10.5, 500.0, 998.9, 999.0], dtype=F64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(schedule.t_to_sigma(torch.arange(1000.0)), schedule.sigmas)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"objective": "score"},
        {"schedule": "quadratic"},
        {"prediction": "noise"},
        {"time_sampling": "beta"},
        {"objective": "flow", "learn_sigma": True},
        {"num_timesteps": 1},
        {"loss_weighting": "snr"},
        {"min_snr_gamma": 0.0},
        {"objective": "flow", "learn_sigma": False, "loss_weighting": "min-snr"},
    ],
)
def test_diffusion_config_rejects_invalid_values(kwargs):
    with pytest.raises(ValueError):
        DiffusionConfig(**kwargs)


# ----------------------------------------------------------------------------- forward process, conversions


def test_q_sample_matches_closed_form_mean_and_variance(schedule):
    t = torch.tensor([0, 100, 500, 999])
    x0 = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=F64).view(4, 1, 1, 1).expand(4, 1, 100, 200)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    x_t = q_sample(x0, t, noise, schedule.alphas_cumprod)
    ab = schedule.alphas_cumprod[t].view(4, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    # 20,000 draws per row: mean within 5 standard errors, variance within 5%.
    mean, var = x_t.flatten(1).mean(1), x_t.flatten(1).var(1)
    ab = ab.flatten()
    assert torch.allclose(mean, ab.sqrt() * x0[:, 0, 0, 0], atol=5 * (1 / 20000) ** 0.5)
    torch.testing.assert_close(var, 1 - ab, rtol=0.05, atol=0)


@pytest.mark.parametrize("alpha_bar", [0.9999, 0.5, 1e-4])
def test_eps_v_x0_conversions_are_exact_inverses(alpha_bar):
    x0, noise = _batch()
    x_t = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise
    v = v_target(x0, noise, alpha_bar)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(predict_x0_from_eps(x_t, noise, alpha_bar), x0, **tol)
    torch.testing.assert_close(predict_eps_from_x0(x_t, x0, alpha_bar), noise, **tol)
    torch.testing.assert_close(predict_x0_from_v(x_t, v, alpha_bar), x0, **tol)
    torch.testing.assert_close(predict_eps_from_v(x_t, v, alpha_bar), noise, **tol)
    for prediction, target in (("eps", noise), ("v", v), ("x0", x0)):
        torch.testing.assert_close(prediction_from_x0(x0, x_t, alpha_bar, prediction), target, **tol)
        torch.testing.assert_close(x0_from_prediction(target, x_t, alpha_bar, prediction), x0, **tol)


# ----------------------------------------------------------------------------- posteriors


def test_q_posterior_is_bayes_rule_of_the_forward_process(schedule):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): a product of two Gaussians in x_{t-1}."""
    x0, noise = _batch()
    t = torch.tensor([1, 5, 100, 400, 800, 999])
    x_t = q_sample(x0, t, noise, schedule.alphas_cumprod)
    mean, var, _ = q_posterior_mean_variance(x0, x_t, t, schedule)
    beta = schedule.betas[t].view(-1, 1, 1, 1)
    ab_prev = schedule.alphas_cumprod[t - 1].view(-1, 1, 1, 1)
    precision = (1 - beta) / beta + 1 / (1 - ab_prev)
    ref_mean = ((1 - beta).sqrt() * x_t / beta + ab_prev.sqrt() * x0 / (1 - ab_prev)) / precision
    torch.testing.assert_close(var, 1 / precision, rtol=1e-10, atol=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)


def test_learned_variance_interpolates_log_beta_tilde_and_log_beta(schedule):
    x0, noise = _batch()
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    x_t = q_sample(x0, t, noise, schedule.alphas_cumprod)
    for v, expected in (
        (-1.0, schedule.posterior_log_variance_clipped[t]),
        (1.0, schedule.betas[t].log()),
        (0.0, 0.5 * (schedule.posterior_log_variance_clipped[t] + schedule.betas[t].log())),
    ):
        out = torch.cat([noise, torch.full_like(noise, v)], dim=1)
        p = p_mean_variance(out, x_t, t, schedule, "eps", learn_sigma=True)
        torch.testing.assert_close(p["log_variance"], expected.view(-1, 1, 1, 1).expand_as(x_t), rtol=1e-12, atol=1e-12)
        # The exact eps gives back x0 and the true posterior mean.
        torch.testing.assert_close(p["pred_x0"], x0, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(p["mean"], q_posterior_mean_variance(x0, x_t, t, schedule)[0], rtol=1e-8, atol=1e-8)


def test_fixed_variances_are_beta_tilde_and_beta(schedule):
    x0, noise = _batch()
    t = torch.tensor([0, 1, 2, 500, 998, 999])
    x_t = q_sample(x0, t, noise, schedule.alphas_cumprod)
    small = p_mean_variance(noise, x_t, t, schedule, fixed_variance="small")
    large = p_mean_variance(noise, x_t, t, schedule, fixed_variance="large")
    torch.testing.assert_close(small["variance"].flatten(), schedule.posterior_variance[t])
    expected_large = schedule.betas[t].clone()
    expected_large[0] = schedule.posterior_variance[1]  # row 0 borrows beta-tilde_1, as improved DDPM
    torch.testing.assert_close(large["variance"].flatten(), expected_large)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=g, dtype=F64) for _ in range(4))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), reference, rtol=1e-10, atol=1e-12)


def test_discretized_gaussian_log_likelihood_integrates_the_normal_over_8bit_bins():
    levels = torch.arange(256, dtype=F64) / 127.5 - 1  # the 256 values of 8-bit data in [-1, 1]
    mean, log_scale = torch.tensor(0.3, dtype=F64), torch.tensor(math.log(0.2), dtype=F64)
    logp = discretized_gaussian_log_likelihood(levels, mean.expand(256), log_scale.expand(256))
    normal = torch.distributions.Normal(mean, log_scale.exp())
    edges = torch.cat([torch.tensor([-math.inf]), (levels[:-1] + levels[1:]) / 2, torch.tensor([math.inf])]).to(F64)
    reference = normal.cdf(edges[1:]) - normal.cdf(edges[:-1])
    torch.testing.assert_close(logp.exp(), reference, rtol=1e-9, atol=1e-15)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    # 12 standard deviations out, the bin mass (~1e-33) is still exact rather than a clamped floor.
    far = discretized_gaussian_log_likelihood(
        torch.tensor([0.0], dtype=F64), torch.tensor([-0.6], dtype=F64), torch.tensor([math.log(0.05)], dtype=F64)
    )
    z = torch.linspace((0.6 - 1 / 255) / 0.05, (0.6 + 1 / 255) / 0.05, 2001, dtype=F64)  # the bin, standardised
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    mass = torch.trapezoid(pdf, z)  # P(bin) as an integral of the standard normal density
    assert far.item() == pytest.approx(math.log(mass.item()), rel=1e-6)
    assert far.item() < -70


def test_vlb_terms_match_a_manual_computation(schedule):
    x0 = (torch.randint(0, 256, (4, 2, 3, 3), generator=torch.Generator().manual_seed(0)) / 127.5 - 1).to(F64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.tensor([0, 1, 250, 999])
    x_t = q_sample(x0, t, noise, schedule.alphas_cumprod)
    eps_hat = noise + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    var_values = torch.rand(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64) * 2 - 1
    vb = vlb_terms(torch.cat([eps_hat, var_values], 1), x0, x_t, t, schedule, "eps", learn_sigma=True)

    for i, ti in enumerate(t.tolist()):
        ab, ab_prev, beta = (schedule.alphas_cumprod[ti], schedule.alphas_cumprod_prev[ti], schedule.betas[ti])
        x0_hat = (x_t[i] - (1 - ab).sqrt() * eps_hat[i]) / ab.sqrt()
        coef1, coef2 = beta * ab_prev.sqrt() / (1 - ab), (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        frac = (var_values[i] + 1) / 2
        min_log = torch.log(schedule.posterior_variance[max(ti, 1)])
        model_log_var = frac * beta.log() + (1 - frac) * min_log
        model = torch.distributions.Normal(coef1 * x0_hat + coef2 * x_t[i], (0.5 * model_log_var).exp())
        if ti == 0:
            lo = torch.where(x0[i] < -0.999, torch.tensor(-math.inf, dtype=F64), x0[i] - 1 / 255)
            hi = torch.where(x0[i] > 0.999, torch.tensor(math.inf, dtype=F64), x0[i] + 1 / 255)
            expected = -torch.log(model.cdf(hi) - model.cdf(lo)).mean() / math.log(2)
        else:
            true = torch.distributions.Normal(coef1 * x0[i] + coef2 * x_t[i], schedule.posterior_variance[ti].sqrt())
            expected = torch.distributions.kl_divergence(true, model).mean() / math.log(2)
        assert vb[i].item() == pytest.approx(expected.item(), rel=1e-7)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_is_zero_when_the_network_outputs_its_target(schedule, prediction):
    x0, noise = _batch()
    t = torch.tensor([0, 3, 100, 500, 900, 999])
    ab = gather(schedule.alphas_cumprod, t, x0)
    target = {"eps": noise, "v": v_target(x0, noise, ab), "x0": x0}[prediction]
    config = DiffusionConfig(prediction=prediction, learn_sigma=False)
    losses = diffusion_loss(target, x0, t, noise, config, schedule)
    torch.testing.assert_close(losses["loss"], torch.zeros(6, dtype=F64), rtol=0, atol=1e-20)
    assert set(losses) == {"loss", "mse"}
    wrong = diffusion_loss(target + 0.5, x0, t, noise, config, schedule)
    torch.testing.assert_close(wrong["mse"], torch.full((6,), 0.25, dtype=F64))


def test_min_snr_weighting_is_one_x0_space_loss_for_every_prediction(schedule):
    # The same x0 error, expressed as an eps, v or x0 prediction, gets the same weighted loss:
    # min(SNR_t, gamma) times the x0 MSE (Hang et al. 2023); the logged mse stays unweighted.
    x0, noise = _batch()
    t = torch.tensor([0, 1, 50, 400, 800, 999])
    ab = gather(schedule.alphas_cumprod, t, x0)
    x_t = q_sample(x0, t, noise, schedule.alphas_cumprod)
    delta = 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
    expected = snr.clamp(max=2.0) * (delta**2).flatten(1).mean(1)
    assert (snr > 2.0).any() and (snr < 2.0).any()  # both sides of the clip are exercised
    for prediction in ("eps", "v", "x0"):
        output = prediction_from_x0(x0 + delta, x_t, ab, prediction)
        config = DiffusionConfig(prediction=prediction, learn_sigma=False, loss_weighting="min-snr", min_snr_gamma=2.0)
        losses = diffusion_loss(output, x0, t, noise, config, schedule)
        torch.testing.assert_close(losses["loss"], expected, rtol=1e-9, atol=1e-12)
        plain = diffusion_loss(
            output, x0, t, noise, DiffusionConfig(prediction=prediction, learn_sigma=False), schedule
        )
        torch.testing.assert_close(losses["mse"], plain["loss"])


def test_hybrid_loss_vb_gradient_reaches_only_the_variance_channels(schedule):
    x0, noise = _batch()
    t = torch.tensor([0, 1, 50, 400, 800, 999])
    output = torch.cat([noise + 0.3, torch.zeros_like(noise)], dim=1).requires_grad_()
    losses = diffusion_loss(output, x0, t, noise, DiffusionConfig(learn_sigma=True), schedule)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    c = x0.shape[1]
    assert torch.count_nonzero(grad_vb[:, :c]) == 0  # the mean is detached inside the VLB
    assert torch.count_nonzero(grad_vb[:, c:]) == grad_vb[:, c:].numel()
    assert torch.count_nonzero(grad_mse[:, c:]) == 0
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_term_is_scaled_by_T_over_1000():
    sched = make_schedule("linear", 2000)
    x0, noise = _batch()
    t = torch.tensor([0, 10, 100, 1000, 1500, 1999])
    out = torch.cat([noise + 0.1, 0.2 * torch.ones_like(noise)], dim=1)
    losses = diffusion_loss(out, x0, t, noise, DiffusionConfig(num_timesteps=2000, learn_sigma=True), sched)
    x_t = q_sample(x0, t, noise, sched.alphas_cumprod)
    torch.testing.assert_close(losses["vb"], 2.0 * vlb_terms(out, x0, x_t, t, sched, "eps", learn_sigma=True))


def test_flow_interpolates_data_to_noise_and_targets_the_time_derivative():
    x0, noise = _batch()
    torch.testing.assert_close(flow_interpolate(x0, noise, torch.zeros(6, dtype=F64)), x0)
    torch.testing.assert_close(flow_interpolate(x0, noise, torch.ones(6, dtype=F64)), noise)
    t = torch.rand(6, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    x_t = flow_interpolate(x0, noise, t)
    (dx_dt,) = torch.autograd.grad(x_t, t, grad_outputs=torch.ones_like(x_t))
    torch.testing.assert_close(dx_dt, (noise - x0).flatten(1).sum(1))
    torch.testing.assert_close(flow_velocity_target(x0, noise), noise - x0)
    assert torch.equal(flow_loss(noise - x0, x0, noise)["loss"], torch.zeros(6, dtype=F64))


def test_flow_time_sampling_uniform_and_logit_normal():
    g = torch.Generator().manual_seed(0)
    t = flow_sample_t(50_000, DiffusionConfig(objective="flow", learn_sigma=False), g)
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.01
    config = DiffusionConfig(
        objective="flow", learn_sigma=False, time_sampling="logit-normal", logit_normal_mean=0.5, logit_normal_std=0.8
    )
    logit = torch.logit(flow_sample_t(50_000, config, g).double())
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02


class _RecordingModel:
    """A stand-in network that records the timesteps it is called with."""

    def __init__(self, out_channels_factor: int = 1):
        self.factor, self.t_seen = out_channels_factor, None

    def __call__(self, x, t, y):
        self.t_seen = t
        return torch.cat([0.5 * x] * self.factor, dim=1)


def test_training_losses_ddpm_draws_integer_timesteps_reproducibly(schedule):
    x0, _ = _batch(n=32)
    y = torch.zeros(32, dtype=torch.long)
    config = DiffusionConfig(learn_sigma=True)
    model = _RecordingModel(out_channels_factor=2)
    a = training_losses(model, x0, y, config, schedule, torch.Generator().manual_seed(7))
    assert model.t_seen.dtype == torch.float32 and torch.equal(model.t_seen, a["t"].float())
    assert a["t"].min() >= 0 and a["t"].max() < 1000 and a["t"].dtype == torch.long
    assert a["loss"].shape == a["mse"].shape == a["vb"].shape == (32,) and bool(torch.isfinite(a["loss"]).all())
    b = training_losses(model, x0, y, config, schedule, torch.Generator().manual_seed(7))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["t"], b["t"])


def test_training_losses_flow_feeds_the_network_1000_t():
    x0, _ = _batch(n=16)
    model = _RecordingModel()
    config = DiffusionConfig(objective="flow", learn_sigma=False)
    y = torch.zeros(16, dtype=torch.long)
    losses = training_losses(model, x0, y, config, None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.t_seen, losses["t"] * FLOW_TIME_SCALE)
    assert losses["t"].min() > 0 and losses["t"].max() < 1 and losses["loss"].shape == (16,)


# ----------------------------------------------------------------------------- recipe options


def test_velocity_cosine_loss_is_zero_for_a_positively_scaled_target_and_two_for_its_negation():
    x0, noise = _batch()
    target = flow_velocity_target(x0, noise)
    scale = (
        torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * 10 + 0.01
    )  # any > 0, per position
    torch.testing.assert_close(
        velocity_cosine_loss(scale * target, target), torch.zeros(6, dtype=F64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        velocity_cosine_loss(-target, target), torch.full((6,), 2.0, dtype=F64), rtol=0, atol=1e-12
    )


def test_velocity_cosine_loss_matches_a_per_position_loop():
    x0, noise = _batch(n=3, c=4, h=2, w=3)
    prediction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    target = flow_velocity_target(x0, noise)
    expected = []
    for i in range(3):
        per_position = []
        for h in range(2):
            for w in range(3):
                a, b = prediction[i, :, h, w].tolist(), target[i, :, h, w].tolist()
                dot = sum(p * q for p, q in zip(a, b))
                norms = math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b))
                per_position.append(1 - dot / norms)
        expected.append(sum(per_position) / len(per_position))
    torch.testing.assert_close(
        velocity_cosine_loss(prediction, target), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("s", [0.3, 1.0, 3.0])
def test_shift_time_fixes_both_ends_and_maps_one_half_to_s_over_1_plus_s(s):
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    torch.testing.assert_close(shift_time(t, s), torch.tensor([0.0, s / (1 + s), 1.0], dtype=F64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("s", [0.3, 3.0])
def test_shift_time_is_increasing(s):
    shifted = shift_time(torch.linspace(0, 1, 1001, dtype=F64), s)
    assert bool((shifted[1:] > shifted[:-1]).all())


def test_shift_time_with_shift_one_is_the_identity():
    t = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shift_time(t, 1.0), t)


def test_shifted_uniform_flow_times_have_median_s_over_1_plus_s():
    # The shift is increasing, so it carries the median 1/2 of uniform times to s / (1 + s).
    config = DiffusionConfig(objective="flow", learn_sigma=False, time_shift=3.0)
    t = flow_sample_t(50_000, config, torch.Generator().manual_seed(0))
    assert t.median().item() == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(objective="flow", velocity_cosine_weight=-0.1), "velocity_cosine_weight"),
        (dict(objective="ddpm", velocity_cosine_weight=0.5), "velocity_cosine_weight"),
        (dict(objective="flow", time_shift=0.0), "time_shift"),
        (dict(objective="ddpm", time_shift=2.0), "time_shift"),
        (dict(dispersive_weight=-1.0), "dispersive_weight"),
        (dict(dispersive_block=-2), "dispersive_block"),
        (dict(dispersive_temperature=0.0), "dispersive_temperature"),
    ],
)
def test_diffusion_config_refuses_recipe_options_out_of_range(options, field):
    with pytest.raises(ValueError, match=f"diffusion.{field}"):
        DiffusionConfig(learn_sigma=False, **options)


def test_dispersive_loss_matches_a_double_loop():
    z = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)  # (N, T, D) tokens
    tau, flat = 0.7, z.flatten(1).tolist()
    dim = len(flat[0])
    total = sum(
        math.exp(-sum((a - b) ** 2 for a, b in zip(flat[i], flat[j])) / dim / tau) for i in range(5) for j in range(5)
    )
    assert dispersive_loss(z, tau).item() == pytest.approx(math.log(total / 25), rel=1e-12)


def test_dispersive_loss_is_zero_for_collapsed_and_negative_for_spread_representations():
    g = torch.Generator().manual_seed(0)
    collapsed = torch.randn(1, 16, 8, generator=g, dtype=F64).expand(6, 16, 8)
    spread = torch.randn(6, 16, 8, generator=g, dtype=F64)
    assert dispersive_loss(collapsed).item() == 0.0  # log(1), the maximum
    assert -math.log(6) < dispersive_loss(spread).item() < 0  # the N diagonal terms bound it below by log(1 / N)
    assert dispersive_loss(3 * spread).item() < dispersive_loss(spread).item()


class _TokenModel:
    """A stand-in for DiT with its return_block interface: records the call, returns (output, tokens after block k)."""

    def __init__(self):
        self.kwargs, self.tokens = None, None

    def __call__(self, x, t, y, **kwargs):
        self.kwargs = kwargs
        output = 0.5 * x
        if "return_block" not in kwargs:
            return output
        self.tokens = (kwargs["return_block"] + 1) * x.flatten(2).transpose(1, 2) + t.view(-1, 1, 1) / 1000  # (N, T, C)
        return output, self.tokens


def _old_training_losses(model, x0, y, config, schedule, generator):
    """training_losses as written before the recipe options, step for step (uniform flow times)."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    if config.objective == "flow":
        t = torch.rand(x0.shape[0], generator=generator)
        output = model(flow_interpolate(x0, noise, t), t * FLOW_TIME_SCALE, y)
        return {**flow_loss(output, x0, noise), "t": t}
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator)
    output = model(q_sample(x0, t, noise, schedule.alphas_cumprod), t.to(torch.float32), y)
    return {**diffusion_loss(output, x0, t, noise, config, schedule), "t": t}


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_training_losses_with_recipe_options_at_their_defaults_are_bit_identical_to_before(schedule, objective):
    x0, _ = _batch(n=8)
    y = torch.zeros(8, dtype=torch.long)
    config = DiffusionConfig(objective=objective, learn_sigma=False)
    model = _TokenModel()
    old = _old_training_losses(model, x0, y, config, schedule, torch.Generator().manual_seed(3))
    new = training_losses(model, x0, y, config, schedule, torch.Generator().manual_seed(3), depth=4)
    assert model.kwargs == {}  # called as model(x_t, t, y), no return_block
    assert set(new) == set(old)
    for key in old:
        assert torch.equal(new[key], old[key]), key


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_dispersive_weight_calls_the_model_for_block_tokens_and_adds_weight_times_disp(schedule, objective):
    x0, _ = _batch(n=8)
    y = torch.zeros(8, dtype=torch.long)
    plain = training_losses(
        _TokenModel(),
        x0,
        y,
        DiffusionConfig(objective=objective, learn_sigma=False),
        schedule,
        torch.Generator().manual_seed(3),
    )
    config = DiffusionConfig(objective=objective, learn_sigma=False, dispersive_weight=0.25, dispersive_temperature=0.5)
    model = _TokenModel()
    losses = training_losses(model, x0, y, config, schedule, torch.Generator().manual_seed(3), depth=6)
    assert model.kwargs == {"return_block": 3}  # -1: the middle block, depth // 2
    disp = dispersive_loss(model.tokens, 0.5)
    assert disp.item() < 0
    torch.testing.assert_close(losses["disp"], disp.expand(8), rtol=0, atol=0)
    torch.testing.assert_close(losses["loss"], plain["loss"] + 0.25 * disp, rtol=1e-15, atol=0)
    assert torch.equal(losses["mse"], plain["mse"]) and torch.equal(losses["t"], plain["t"])


def test_dispersive_block_is_passed_through_and_checked_against_the_depth():
    x0, _ = _batch(n=4)
    y = torch.zeros(4, dtype=torch.long)
    model = _TokenModel()
    config = DiffusionConfig(objective="flow", learn_sigma=False, dispersive_weight=0.5, dispersive_block=1)
    training_losses(model, x0, y, config, None, torch.Generator().manual_seed(0), depth=6)
    assert model.kwargs == {"return_block": 1}
    with pytest.raises(ValueError, match="diffusion.dispersive_block"):
        training_losses(
            model,
            x0,
            y,
            DiffusionConfig(objective="flow", learn_sigma=False, dispersive_weight=0.5, dispersive_block=6),
            None,
            depth=6,
        )
    with pytest.raises(ValueError, match="depth"):
        training_losses(model, x0, y, DiffusionConfig(objective="flow", learn_sigma=False, dispersive_weight=0.5), None)


def test_velocity_cosine_weight_adds_weight_times_cos_to_the_flow_loss():
    x0, _ = _batch(n=8)
    y = torch.zeros(8, dtype=torch.long)
    plain = training_losses(
        _TokenModel(),
        x0,
        y,
        DiffusionConfig(objective="flow", learn_sigma=False),
        None,
        torch.Generator().manual_seed(5),
    )
    config = DiffusionConfig(objective="flow", learn_sigma=False, velocity_cosine_weight=0.5)
    model = _TokenModel()
    losses = training_losses(model, x0, y, config, None, torch.Generator().manual_seed(5))
    noise = torch.randn(
        x0.shape, generator=torch.Generator().manual_seed(5), dtype=F64
    )  # the draw training_losses made
    x_t = flow_interpolate(x0, noise, losses["t"])
    cos = velocity_cosine_loss(0.5 * x_t, noise - x0)
    assert model.kwargs == {}
    torch.testing.assert_close(losses["cos"], cos, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses["loss"], plain["mse"] + 0.5 * cos, rtol=1e-12, atol=1e-12)
    assert torch.equal(losses["mse"], plain["mse"])
