"""Samplers on an analytic case: Gaussian data, where the exact denoiser and the exact ODE map are known.

Data x0 ~ N(MU, S^2) independently per channel. For x_t = sqrt(a) x0 + sqrt(1 - a) eps,
    E[x0 | x_t] = MU + sqrt(a) S^2 (x_t - sqrt(a) MU) / (a S^2 + 1 - a),
and the probability-flow ODE keeps (x_t - sqrt(a) MU) / sqrt(a S^2 + 1 - a) constant, so the
exact deterministic sample from the prior draw x_T(z) is MU + S z. For rectified flow,
x_t = (1 - t) x0 + t n has E[x0 | x_t] and E[n | x_t] in closed form too, and the exact ODE map
is again MU + S z from x_1 = z.
"""

import re

import pytest
import torch

from ldm.diffusion.objectives import FLOW_TIME_SCALE, prediction_from_x0
from ldm.diffusion.samplers import (
    FLOW_SAMPLERS,
    Denoiser,
    InpaintDenoiser,
    SamplerExtras,
    cfg_denoiser,
    flow_times,
    karras_sigmas,
    per_sample_generators,
    randn_like_per_sample,
    run_sampler,
    sample,
    sample_ddim,
    sample_ddpm,
    timestep_spacing,
)
from ldm.diffusion.schedules import expand_to, make_schedule

F64 = torch.float64
SCHEDULE = make_schedule("linear", 1000)
MU = torch.tensor([0.5, -0.5, 0.0, 0.2], dtype=F64).view(1, 4, 1, 1)
S = torch.tensor([1.0, 0.8, 1.2, 0.6], dtype=F64).view(1, 4, 1, 1)


def exact_vp_model(prediction="eps", var_value=None):
    """model_fn(x_t, t) of the Bayes-optimal network, at fractional t too; optional constant variance channels."""

    def model_fn(x_t, t):
        a = expand_to(1 / (1 + SCHEDULE.t_to_sigma(t.to(F64)) ** 2), x_t).to(x_t.dtype)  # alpha_bar at t
        x0 = MU + a**0.5 * S**2 * (x_t - a**0.5 * MU) / (a * S**2 + 1 - a)
        out = prediction_from_x0(x0, x_t, a, prediction)
        return out if var_value is None else torch.cat([out, torch.full_like(out, var_value)], dim=1)

    return model_fn


def exact_flow_model(x_t, t):
    """Velocity E[noise - x0 | x_t] for x_t = (1 - t) x0 + t noise; t arrives as 1000 t."""
    t = expand_to(t.to(F64) / FLOW_TIME_SCALE, x_t)
    var = (1 - t) ** 2 * S**2 + t**2
    residual = x_t - (1 - t) * MU
    return t / var * residual - (MU + (1 - t) * S**2 / var * residual)


def prior_draw(z):
    """x_T distributed exactly as q(x_T) (not N(0, I)), so only the sampler's own error remains."""
    a = SCHEDULE.alphas_cumprod[-1].item()
    return a**0.5 * MU + (a * S**2 + 1 - a) ** 0.5 * z


def standard_normal(n, seed=0):
    return torch.randn(n, 4, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=F64)


def run(name, z, steps, **kwargs):
    if name in FLOW_SAMPLERS:
        return run_sampler(name, Denoiser(exact_flow_model, "velocity"), z, None, steps, **kwargs)
    return run_sampler(name, Denoiser(exact_vp_model("eps")), prior_draw(z), SCHEDULE, steps, **kwargs)


# ----------------------------------------------------------------------------- grids


def test_spacings_match_lin_et_al_table_2():
    # Lin et al. 2024, Table 2 (1-based there, 0-based here), T = 1000, 10 steps.
    assert timestep_spacing("leading", 1000, 10).tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timestep_spacing("trailing", 1000, 10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timestep_spacing("linspace", 1000, 10).tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    for name in ("leading", "trailing", "linspace"):
        steps = timestep_spacing(name, 1000, 7)  # T not a multiple of the step count
        assert len(steps) == 7 and len(set(steps.tolist())) == 7 and steps.min() >= 0 and steps.max() <= 999


def test_karras_sigmas_follow_eq_5():
    sigmas = karras_sigmas(5, 0.01, 80.0, rho=7.0)
    assert sigmas[-1] == 0.0 and sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.01)
    i = 2
    expected = (80.0 ** (1 / 7) + i / 4 * (0.01 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert sigmas[i] == pytest.approx(expected, rel=1e-12)


def test_flow_time_shift_spends_steps_at_high_noise():
    assert flow_times(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = flow_times(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[2] == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)


# ----------------------------------------------------------------------------- convergence


def stratified_normal(n, seed=0):
    """n draws per channel at the normal quantiles (i + 1/2) / n, shuffled independently per channel.

    The initial noise then has mean 0 and std 1 almost exactly, so a deterministic sampler's
    moments show its discretisation error alone, not the luck of the draw.
    """
    g = torch.Generator().manual_seed(seed)
    quantiles = torch.special.ndtri((torch.arange(n, dtype=F64) + 0.5) / n)
    return torch.stack([quantiles[torch.randperm(n, generator=g)] for _ in range(4)], dim=1).view(n, 4, 1, 1)


@pytest.mark.parametrize(
    "name, steps, kwargs, std_tol",
    [
        ("ddpm", 500, {}, 0.025),
        ("ddim", 300, {}, 0.025),
        ("dpm++2m", 25, {}, 0.025),
        ("dpm++2m-sde", 20, {}, 0.05),
        ("euler", 300, {}, 0.025),
        ("heun", 50, {}, 0.025),
        ("flow-euler", 150, {}, 0.025),
        ("flow-heun", 20, {}, 0.025),
    ],
)
def test_each_sampler_recovers_the_data_mean_and_std(name, steps, kwargs, std_tol):
    """10,000 samples per channel: mean within 5 standard errors, std within `std_tol` (2.5%).

    Budget: sampling error of the std ~0.7% (DDPM's step noise only), discretisation bias <= 1.5%
    at these step counts (DDPM's fixed beta-tilde variance is what costs it 500 steps; at 20 steps
    it is 14-20% too narrow). DDIM with eta = 1 is DDPM step for step (test below), hence the same
    distribution. SDE-DPM-Solver++(2M) at 20 steps: measured 0.1-3.8% too wide (its multistep
    extrapolation carries injected noise), 0.1-0.8% at 500 steps.
    """
    torch.manual_seed(0)  # the stochastic samplers' step noise
    x = run(name, stratified_normal(10_000), steps, **kwargs)
    mean, std = x.mean(dim=0).flatten(), x.std(dim=0).flatten()
    assert ((mean - MU.flatten()).abs() < 5 * S.flatten() / 100).all(), mean
    assert ((std / S.flatten() - 1).abs() < std_tol).all(), std


@pytest.mark.parametrize(
    "name, steps, kwargs, tol",
    [
        ("ddim", 500, {"spacing": "linspace"}, 0.006),
        ("dpm++2m", 50, {}, 0.005),
        ("euler", 400, {}, 0.01),
        ("heun", 100, {}, 0.002),
        ("flow-euler", 400, {}, 0.005),
        ("flow-heun", 50, {}, 0.002),
    ],
)
def test_deterministic_samplers_follow_the_exact_ode_map(name, steps, kwargs, tol):
    """Per-sample RMS distance to the exact endpoint MU + S z below `tol` (data std ~1; measured ~0.6 tol)."""
    z = standard_normal(256, seed=1)
    x = run(name, z, steps, **kwargs)
    assert ((x - (MU + S * z)) ** 2).mean().sqrt() < tol


def test_dpmpp_2m_with_20_steps_matches_ddim_with_500_steps():
    """Second order: 20 steps land within RMS 0.01 of 500 DDIM steps, where 20 DDIM steps are >5x further."""
    z = standard_normal(512, seed=2)
    reference = run("ddim", z, 500)
    dpm = run("dpm++2m", z, 20)
    ddim_20 = run("ddim", z, 20)
    rms = lambda x: ((x - reference) ** 2).mean().sqrt().item()  # noqa: E731
    assert rms(dpm) < 0.01
    assert rms(ddim_20) > 5 * rms(dpm)


def test_flow_heun_is_second_order_where_flow_euler_is_first():
    """Halving the step on the exact Gaussian flow: Euler's error halves, Heun's falls about 4x."""
    z = standard_normal(256, seed=4)
    error = lambda name, steps: ((run(name, z, steps) - (MU + S * z)) ** 2).mean().sqrt().item()  # noqa: E731
    assert 1.8 < error("flow-euler", 20) / error("flow-euler", 40) < 2.2
    assert error("flow-heun", 20) / error("flow-heun", 40) > 3.5
    assert error("flow-heun", 10) < error("flow-euler", 20) / 5  # and better at the same network calls (19 vs 20)


def test_karras_samplers_query_the_network_at_the_fractional_timestep_of_each_sigma():
    seen = []

    def recording_model(x_t, t):
        seen.append(t[0].item())
        return exact_vp_model("eps")(x_t, t)

    run_sampler("euler", Denoiser(recording_model), prior_draw(standard_normal(2)), SCHEDULE, 6)
    sigmas = karras_sigmas(6, SCHEDULE.sigmas[0].item(), SCHEDULE.sigmas[-1].item())[:-1]
    expected = [SCHEDULE.sigma_to_t(s).item() for s in sigmas]
    assert seen == pytest.approx(expected, abs=1e-4)  # float32 timesteps
    assert any(abs(t - round(t)) > 0.01 for t in seen)  # interpolated, not rounded to the grid


# ----------------------------------------------------------------------------- DDPM / DDIM identities


def test_ddim_with_eta_one_is_ddpm_step_for_step():
    """eta = 1 gives DDPM's posterior mean and variance beta-tilde: with the same noise, the same trajectory
    (so in particular the same distribution)."""
    x_T = prior_draw(standard_normal(64, seed=3))
    timesteps = timestep_spacing("trailing", 1000, 25)
    denoiser = Denoiser(exact_vp_model("v"), "v")
    ddpm = sample_ddpm(
        denoiser, x_T, timesteps, SamplerExtras(SCHEDULE, per_sample_generators(0, 64), variance="small")
    )
    ddim = sample_ddim(denoiser, x_T, timesteps, SamplerExtras(SCHEDULE, per_sample_generators(0, 64), eta=1.0))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


def test_sde_dpm_solver_in_its_first_order_form_is_the_ddpm_posterior_step():
    """Two steps: a first-order SDE step (no history yet) T-1 -> T/2-1, then the jump to x0, is DDPM
    (beta-tilde variance) on the same grid with the same noise; 2M then departs from it."""
    x_T = prior_draw(standard_normal(64, seed=3))
    denoiser = Denoiser(exact_vp_model("eps"))
    ddpm = run_sampler("ddpm", denoiser, x_T, SCHEDULE, 2, generators=per_sample_generators(0, 64))
    sde = run_sampler("dpm++2m-sde", denoiser, x_T, SCHEDULE, 2, generators=per_sample_generators(0, 64))
    torch.testing.assert_close(sde, ddpm, rtol=1e-9, atol=1e-9)
    ddpm_3 = run_sampler("ddpm", denoiser, x_T, SCHEDULE, 3, generators=per_sample_generators(0, 64))
    sde_3 = run_sampler("dpm++2m-sde", denoiser, x_T, SCHEDULE, 3, generators=per_sample_generators(0, 64))
    assert not torch.allclose(sde_3, ddpm_3, atol=1e-3)  # the second step uses the multistep estimate


@pytest.mark.parametrize("var_value, fixed", [(-1.0, "small"), (1.0, "large")])
def test_learned_variance_at_its_bounds_is_the_fixed_variance(var_value, fixed):
    x_T = prior_draw(standard_normal(32, seed=4))
    timesteps = timestep_spacing("trailing", 1000, 10)
    learned = Denoiser(exact_vp_model("eps", var_value), "eps", learn_sigma=True)
    fixed_model = Denoiser(exact_vp_model("eps"), "eps")
    a = sample_ddpm(learned, x_T, timesteps, SamplerExtras(SCHEDULE, per_sample_generators(5, 32)))
    b = sample_ddpm(fixed_model, x_T, timesteps, SamplerExtras(SCHEDULE, per_sample_generators(5, 32), variance=fixed))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_variance_channels_do_not_enter_x0():
    x_t = prior_draw(standard_normal(8))
    with_var = Denoiser(exact_vp_model("eps", 0.3), "eps", learn_sigma=True)
    without = Denoiser(exact_vp_model("eps"), "eps")
    a = SCHEDULE.alphas_cumprod[500].item()
    torch.testing.assert_close(with_var(x_t, 500, a), without(x_t, 500, a))


# ----------------------------------------------------------------------------- guidance


class CountingModel:
    """A conditional model whose output depends on the label on every channel; counts its forwards."""

    def __init__(self, out_channels_factor=1):
        self.calls, self.batch_sizes, self.factor = 0, [], out_channels_factor

    def __call__(self, x, t, y):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        out = x * 0.5 + expand_to(y.to(x.dtype), x) + expand_to(t.to(x.dtype), x) / 1000
        return torch.cat([out, out * 2 + 1][: self.factor], dim=1)


def test_cfg_with_scale_one_is_the_conditional_model_in_one_pass():
    model = CountingModel()
    x, t, y = torch.randn(4, 3, 2, 2, dtype=F64), torch.full((4,), 10.0), torch.tensor([0, 1, 2, 3])
    out = cfg_denoiser(model, y, null_label=10, scale=1.0)(x, t)
    assert model.calls == 1 and model.batch_sizes == [4]
    assert torch.equal(out, model(x, t, y))


def test_cfg_guides_every_channel_in_one_batched_forward():
    model = CountingModel()
    x, t, y = torch.randn(4, 3, 2, 2, dtype=F64), torch.full((4,), 10.0), torch.tensor([0, 1, 2, 3])
    out = cfg_denoiser(model, y, null_label=10, scale=4.0)(x, t)
    assert model.calls == 1 and model.batch_sizes == [8]
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))


def test_cfg_keeps_the_conditional_variance_channels_for_learned_sigma():
    model = CountingModel(out_channels_factor=2)
    x, t, y = torch.randn(4, 3, 2, 2, dtype=F64), torch.full((4,), 10.0), torch.tensor([0, 1, 2, 3])
    out = cfg_denoiser(model, y, null_label=10, scale=3.0, learn_sigma=True)(x, t)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])


def test_autoguidance_guides_by_the_weaker_model_alone_or_added_to_cfg():
    model, weak = CountingModel(), CountingModel(out_channels_factor=2)  # the guide may carry variance channels

    def guide(x, t, y):
        return 0.5 * weak(x, t, y)

    x, t, y = torch.randn(4, 3, 2, 2, dtype=F64), torch.full((4,), 10.0), torch.tensor([0, 1, 2, 3])
    cond, uncond, bad = model(x, t, y), model(x, t, torch.full_like(y, 10)), guide(x, t, y)[:, :3]
    model.batch_sizes.clear(), weak.batch_sizes.clear()
    out = cfg_denoiser(model, y, null_label=10, scale=1.0, guide=guide, guide_scale=2.5)(x, t)
    assert model.batch_sizes == [4] and weak.batch_sizes == [4]  # one conditional pass per network, no null labels
    torch.testing.assert_close(out, bad + 2.5 * (cond - bad))  # the paper's form
    both = cfg_denoiser(model, y, null_label=10, scale=1.5, guide=guide, guide_scale=2.0)(x, t)
    torch.testing.assert_close(both, uncond + 1.5 * (cond - uncond) + 1.0 * (cond - bad))
    model.batch_sizes.clear(), weak.batch_sizes.clear()
    assert torch.equal(cfg_denoiser(model, y, null_label=10, scale=1.0, guide=guide, guide_scale=1.0)(x, t), cond)
    assert weak.batch_sizes == []  # guide_scale 1: the guide is never run
    inside_only = cfg_denoiser(
        model, y, null_label=10, scale=1.0, interval=(100.0, 500.0), guide=guide, guide_scale=2.5
    )
    assert (
        torch.equal(inside_only(x, torch.full((4,), 800.0)), model(x, torch.full((4,), 800.0), y))
        and weak.batch_sizes == []
    )
    with pytest.raises(ValueError, match="guide_scale 2 needs a guide model"):
        cfg_denoiser(model, y, null_label=10, scale=1.0, guide_scale=2.0)


def test_cfg_interval_guides_only_inside_the_interval():
    model = CountingModel()
    fn = cfg_denoiser(model, torch.tensor([1, 2]), null_label=10, scale=3.0, interval=(100.0, 500.0))
    x = torch.randn(2, 3, 2, 2, dtype=F64)
    outside = fn(x, torch.full((2,), 800.0))
    assert model.batch_sizes == [2]  # no unconditional pass outside the interval
    assert torch.equal(outside, model(x, torch.full((2,), 800.0), torch.tensor([1, 2])))
    inside = fn(x, torch.full((2,), 300.0))
    assert not torch.allclose(inside, model(x, torch.full((2,), 300.0), torch.tensor([1, 2])))
    mixed = fn(x, torch.tensor([300.0, 800.0]))  # per-sample timesteps: guided where inside only
    torch.testing.assert_close(mixed[0], inside[0])
    torch.testing.assert_close(mixed[1], model(x, torch.tensor([300.0, 800.0]), torch.tensor([1, 2]))[1])
    with pytest.raises(ValueError, match=r"reversed.*\(100, 500\)"):  # was silently "never guide"
        cfg_denoiser(model, torch.tensor([1, 2]), null_label=10, scale=3.0, interval=(500.0, 100.0))


# ----------------------------------------------------------------------------- seeds


def test_randn_like_per_sample_draws_each_slice_from_its_own_generator():
    noise = randn_like_per_sample((3, 2, 4, 4), per_sample_generators(7, 3), torch.device("cpu"), torch.float32)
    for i in range(3):
        assert torch.equal(noise[i], torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(7 + i)))
    as_bf16 = randn_like_per_sample((3, 2, 4, 4), per_sample_generators(7, 3), torch.device("cpu"), torch.bfloat16)
    assert torch.equal(as_bf16, noise.to(torch.bfloat16))  # same draws whatever the dtype


@pytest.mark.parametrize(
    "name, kwargs", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpm++2m", {}), ("dpm++2m-sde", {}), ("flow-euler", {})]
)
def test_first_images_do_not_depend_on_batch_size(name, kwargs):
    denoiser = Denoiser(exact_flow_model, "velocity") if name == "flow-euler" else Denoiser(exact_vp_model("eps"))
    schedule = None if name == "flow-euler" else SCHEDULE
    small = sample(name, denoiser, (8, 4, 1, 1), schedule, 10, per_sample_generators(123, 8), dtype=F64, **kwargs)
    large = sample(name, denoiser, (64, 4, 1, 1), schedule, 10, per_sample_generators(123, 64), dtype=F64, **kwargs)
    assert torch.equal(small, large[:8])
    shifted = sample(name, denoiser, (8, 4, 1, 1), schedule, 10, per_sample_generators(124, 8), dtype=F64, **kwargs)
    assert torch.equal(shifted[:7], large[1:8])  # image i is a function of seed + i alone


def test_run_sampler_rejects_unknown_names_and_missing_schedules():
    x = torch.randn(2, 4, 1, 1, dtype=F64)
    with pytest.raises(ValueError, match="unknown sampler"):
        run_sampler("plms", Denoiser(exact_vp_model()), x, SCHEDULE, 10)
    with pytest.raises(ValueError, match="NoiseSchedule"):
        run_sampler("ddim", Denoiser(exact_vp_model()), x, None, 10)
    for name in ("flow-euler", "flow-heun"):
        with pytest.raises(ValueError, match=f"{name} needs a velocity model"):
            run_sampler(name, Denoiser(exact_vp_model()), x, None, 10)


# ----------------------------------------------------------------------------- partial chains (img2img) and inpainting


def data_draw(n, seed):
    return MU + S * stratified_normal(n, seed)


@pytest.mark.parametrize(
    "name, steps", [("ddim", 200), ("dpm++2m", 20), ("heun", 40), ("flow-euler", 200), ("flow-heun", 20)]
)
def test_a_partial_chain_from_noised_data_keeps_the_data_distribution(name, steps):
    """SDEdit from real data: noising to the kept step's level and running the rest of the exact ODE maps
    q(x_t) to q(x_0), so data in gives the data's mean and std out (Meng et al. 2022)."""
    x0, noise = data_draw(10_000, 3), stratified_normal(10_000, 4)
    if name in FLOW_SAMPLERS:
        x = run_sampler(name, Denoiser(exact_flow_model, "velocity"), noise, None, steps, strength=0.5, x0=x0)
    else:
        x = run_sampler(name, Denoiser(exact_vp_model("eps")), noise, SCHEDULE, steps, strength=0.5, x0=x0)
    assert not torch.allclose(x, x0, atol=1e-2)  # it did move
    assert ((x.mean(dim=0).flatten() - MU.flatten()).abs() < 5 * S.flatten() / 100).all()
    assert ((x.std(dim=0).flatten() / S.flatten() - 1).abs() < 0.025).all()


def test_strength_zero_returns_the_input_and_strength_one_ignores_it():
    x0, noise = data_draw(16, 5), standard_normal(16, 6)
    denoiser = Denoiser(exact_vp_model("eps"))
    assert torch.equal(run_sampler("dpm++2m", denoiser, noise, SCHEDULE, 10, strength=0.0, x0=x0), x0)
    assert torch.equal(
        run_sampler("dpm++2m", denoiser, noise, SCHEDULE, 10, strength=0.04, x0=x0), x0
    )  # keeps 0 of 10 steps
    full = run_sampler("dpm++2m", denoiser, noise, SCHEDULE, 10)
    assert torch.equal(run_sampler("dpm++2m", denoiser, noise, SCHEDULE, 10, strength=1.0, x0=x0), full)
    with pytest.raises(ValueError, match="x0"):
        run_sampler("ddim", denoiser, noise, SCHEDULE, 10, strength=0.5)
    with pytest.raises(ValueError, match="strength"):
        run_sampler("ddim", denoiser, noise, SCHEDULE, 10, strength=1.5, x0=x0)


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "dpm++2m-sde", "euler", "heun"])
def test_inpainting_keeps_the_known_latents_and_samples_the_rest(name):
    x0, noise = data_draw(512, 7), standard_normal(512, 8)
    regenerate = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64).view(1, 4, 1, 1).expand(512, 4, 1, 1)
    # channels 0 and 2 regenerated: the known values are far from the data mean, the model must ignore them there
    known = torch.where(regenerate > 0, torch.full_like(x0, 9.0), x0)
    base = Denoiser(exact_vp_model("eps"))
    denoiser = InpaintDenoiser(base.model_fn, known=known, regenerate=regenerate)
    x = run_sampler(name, denoiser, prior_draw(noise), SCHEDULE, 30, generators=per_sample_generators(0, 512))
    assert torch.allclose(x[:, [1, 3]], x0[:, [1, 3]], atol=1e-9)  # known region: exactly the input
    free = run_sampler(name, base, prior_draw(noise), SCHEDULE, 30, generators=per_sample_generators(0, 512))
    assert torch.allclose(x[:, [0, 2]], free[:, [0, 2]], atol=1e-9)  # independent channels: the free sample


@pytest.mark.parametrize(
    "sampler, steps, calls", [("heun", 6, 11), ("flow-heun", 6, 11), ("flow-euler", 6, 6), ("dpm++2m", 6, 6)]
)
def test_sample_latents_counts_every_network_call_and_matches_sampler_to_objective(sampler, steps, calls):
    from ldm.diffusion.schedules import DiffusionConfig
    from ldm.generation import SamplingSettings, model_calls, sample_latents
    from ldm.models.dit import DiT, DiTConfig

    objective = "flow" if sampler in FLOW_SAMPLERS else "ddpm"
    torch.manual_seed(0)
    model = DiT(
        DiTConfig(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3, learn_sigma=False)
    ).eval()
    diffusion = DiffusionConfig(objective=objective, learn_sigma=False)
    counted = []
    latents = sample_latents(
        model,
        diffusion,
        torch.tensor([0, 2]),
        SamplingSettings(sampler=sampler, num_steps=steps, guidance_scale=2.0),
        on_model_call=lambda: counted.append(1),
    )
    assert latents.shape == (2, 4, 4, 4) and torch.isfinite(latents).all()
    assert len(counted) == model_calls(sampler, steps) == calls
    wrong = "dpm++2m" if objective == "flow" else "flow-heun"
    with pytest.raises(ValueError, match=re.escape(f"sampler '{wrong}' does not fit the '{objective}' objective")):
        sample_latents(model, diffusion, torch.tensor([0]), SamplingSettings(sampler=wrong, num_steps=steps))


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "euler", "heun", "flow-euler", "flow-heun"])
def test_every_sampler_calls_back_once_per_step_with_the_state_it_returns(name):
    steps, seen = 7, []
    x = run(
        name,
        standard_normal(4),
        steps,
        generators=per_sample_generators(0, 4),
        callback=lambda i, state: seen.append((i, state.clone())),
    )
    assert [i for i, _ in seen] == list(range(steps))
    assert torch.equal(seen[-1][1], x)


def test_samplers_of_one_family_share_the_registry_grid_so_euler_and_heun_differ_only_in_the_step():
    from ldm.diffusion.samplers import SAMPLER_SPECS, model_calls

    assert {SAMPLER_SPECS[n].family for n in ("euler", "heun")} == {"karras"}
    assert [model_calls(n, 5) for n in ("heun", "flow-heun", "euler", "dpm++2m", "meanflow")] == [9, 9, 5, 5, 5]
    assert model_calls("heun", 10, strength=0.5) == 9 and model_calls("heun", 10, strength=0.04) == 0
