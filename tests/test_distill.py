"""Few-step distillation (`ldm train distill`): the target against a slow reference and an analytic flow map,
guidance built into the student, and the stage's lineage and refusals."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, TINY_DIT, needs_fmnist, toy_average_velocity, toy_slope
from ldm.artifacts import ArtifactError
from ldm.config import load_config
from ldm.diffusion.distill import DistillConfig, distillation_target, guided_velocity, sample_intervals
from ldm.diffusion.schedules import DiffusionConfig
from ldm.generation import SamplingSettings
from ldm.loading import load_dit
from ldm.training import read_metrics
from stages import diffusion, distill
from stages.cli import main
from stages.encode import EncodeConfig, encode


def toy_velocity(x, t, y):
    """The toy's flow velocity in flow time (conftest's Gaussian toy: every trajectory scales as s_t)."""
    return toy_slope(t, t).view(-1, *[1] * (x.ndim - 1)) * x


def test_the_exact_flow_map_is_a_fixed_point_of_the_half_step_target_and_the_teacher_step_is_close():
    config = DistillConfig(finest_steps=4)
    n = 64
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    t, r = sample_intervals(n, config, torch.Generator().manual_seed(0))
    t, r = t.double(), r.double()
    assert ((t - r) > 0.3).any() and ((t - r) == 0).any()  # every branch is exercised
    target = distillation_target(toy_average_velocity, toy_velocity, x, y, t, r, config.interval_levels[-1])
    exact = toy_slope(r, t).view(-1, 1) * x
    half_steps = (t - r) > 0.25 + 1e-9
    # the student's two half steps of the exact flow map land exactly where one full step does
    torch.testing.assert_close(target[half_steps], exact[half_steps], rtol=1e-10, atol=1e-12)
    anchor = t == r
    torch.testing.assert_close(target[anchor], exact[anchor], rtol=1e-10, atol=1e-12)  # the velocity itself
    # The finest intervals take one Heun step of the true velocity: second order, so its average velocity's error
    # shrinks about 4x when the interval halves.
    errors = []
    for gap in (1 / 8, 1 / 16, 1 / 32):
        t, r = torch.full((n,), 0.5, dtype=torch.float64), torch.full((n,), 0.5 - gap, dtype=torch.float64)
        target = distillation_target(toy_average_velocity, toy_velocity, x, y, t, r, gap)
        errors.append(float((target - toy_slope(r, t).view(-1, 1) * x).abs().max()))
    assert errors[0] > 0 and 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5


def test_distillation_target_equals_a_slow_per_sample_reference():
    torch.manual_seed(0)
    weights = torch.randn(3, 4, 4, dtype=torch.float64) * 0.3  # a nonlinear "network" per label

    def teacher(x, t, y):  # velocity in flow time
        return torch.tanh(torch.einsum("nij,nj->ni", weights[y], x)) * (1 + t[:, None])

    def student(x, t_net, y, r=None):  # average velocity, network units
        t, r = t_net / 1000, r / 1000
        return torch.sin(torch.einsum("nij,nj->ni", weights[(y + 1) % 3], x)) * (1 + t[:, None]) + (t - r)[:, None] * x

    n = 200
    config = DistillConfig(finest_steps=8)
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(3, (n,))
    t, r = (v.double() for v in sample_intervals(n, config, torch.Generator().manual_seed(1)))
    fast = distillation_target(student, teacher, x, y, t, r, config.interval_levels[-1])
    for i in range(n):  # the definition, one sample at a time
        xi, yi, ti, ri = x[i : i + 1], y[i : i + 1], t[i : i + 1], r[i : i + 1]
        gap = float(ti - ri)
        if gap == 0:
            want = teacher(xi, ti, yi)
        elif gap <= 1 / 8 + 1e-12:
            v = teacher(xi, ti, yi)
            want = (v + teacher(xi - gap * v, ri, yi)) / 2
        else:
            s = (ti + ri) / 2
            u1 = student(xi, ti * 1000, yi, r=s * 1000)
            u2 = student(xi - gap / 2 * u1, s * 1000, yi, r=ri * 1000)
            want = (u1 + u2) / 2
        torch.testing.assert_close(fast[i : i + 1], want, rtol=1e-12, atol=1e-12)


def test_intervals_lie_on_the_sampler_grids_taught():
    config = DistillConfig(finest_steps=4, anchor_share=0.25)
    t, r = sample_intervals(40_000, config, torch.Generator().manual_seed(0))
    gap = t - r
    anchor = gap == 0
    assert abs(anchor.float().mean().item() - 0.25) < 0.01
    assert ((t > 0) & (t <= 1) & (r >= 0)).all()
    levels = torch.tensor(config.interval_levels)
    assert config.interval_levels == [1.0, 0.5, 0.25]
    on_level = (gap[~anchor, None] == levels).any(dim=1)
    assert on_level.all()
    # t and r are grid points of the step count 1 / gap, as the meanflow sampler visits them
    steps = 1 / gap[~anchor]
    assert torch.equal(t[~anchor] * steps, (t[~anchor] * steps).round())
    counts = torch.stack([(gap == d).sum() for d in levels])
    assert counts.min() > 0.9 * counts.max()  # levels drawn uniformly


def test_guided_velocity_is_classifier_free_guidance_in_one_batched_call():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return x * (y[:, None].float() + 1) + t[:, None] / 1000

    x, t, y = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 1, 0])
    guided = guided_velocity(model, 9, 3.0)(x, t, y)
    cond, uncond = model(x, t * 1000, y), model(x, t * 1000, torch.full_like(y, 9))
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
    assert calls[0] == 10  # both halves in one call
    assert torch.equal(guided_velocity(model, 9, 1.0)(x, t, y), cond)
    # with an interval of network timesteps, guided inside it and conditional outside
    t = torch.tensor([0.1, 0.3, 0.5, 0.85, 0.95])
    within = guided_velocity(model, 9, 3.0, (220.0, 840.0))(x, t, y)
    cond, uncond = model(x, t * 1000, y), model(x, t * 1000, torch.full_like(y, 9))
    inside = torch.tensor([False, True, True, False, False])
    torch.testing.assert_close(within[inside], (uncond + 3.0 * (cond - uncond))[inside])
    torch.testing.assert_close(within[~inside], cond[~inside])


def test_distill_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="power of 2"):
        DistillConfig(finest_steps=6)
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        DistillConfig(guidance_scale=0.5)
    with pytest.raises(ValueError, match="anchor_share"):
        DistillConfig(anchor_share=1.0)
    with pytest.raises(ValueError, match="reversed"):
        DistillConfig(guidance_interval=(840, 220))


def test_a_student_with_guidance_built_in_refuses_guidance_again():
    student = DiffusionConfig(objective="meanflow", learn_sigma=False, built_in_guidance=2.0)
    assert SamplingSettings(num_steps=1).resolved(student).sampler == "meanflow"
    with pytest.raises(ValueError, match="guidance 2 built in"):
        SamplingSettings(guidance_scale=2.0).resolved(student)
    with pytest.raises(ValueError, match="built_in_guidance"):
        DiffusionConfig(built_in_guidance=2.0)  # the ddpm chain has no distilled students


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def teacher(store_with_cache, tmp_path_factory):
    """A briefly trained tiny rectified-flow teacher on the fixture's cache."""
    store, _, cache = store_with_cache
    root = tmp_path_factory.mktemp("teacher")
    config = load_config(
        diffusion.DiffusionStageConfig,
        ROOT / "configs/fmnist/diffusion-quick.yaml",
        [*TINY_DIT, f"latents={cache.ref}", f"run_dir={root / 'run'}", "trainer.max_steps=40"],
    )
    return diffusion.run(config, store)


def distill_config(tmp_path, teacher, *extra):
    return load_config(
        distill.DistillStageConfig,
        ROOT / "configs/fmnist/distill.yaml",
        [
            f"teacher={teacher.ref}",
            "trainer.batch_size=32",
            "trainer.log_every=1",
            "trainer.image_every=0",
            "trainer.progress=false",
            f"run_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


@pytest.mark.slow
@needs_fmnist
def test_a_student_starts_as_its_teacher_trains_and_samples_in_one_call(tmp_path, store_with_cache, teacher):
    store = store_with_cache[0]
    config = distill_config(
        tmp_path, teacher, "trainer.max_steps=60", "distill.finest_steps=4", "trainer.lr=2e-3", "trainer.warmup_steps=5"
    )
    module_teacher = load_dit(teacher)
    student_model, _ = distill.student_configs(
        module_teacher.config, DiffusionConfig(objective="flow", learn_sigma=False), config.distill
    )
    from ldm.models.dit import DiT

    student = DiT(student_model)
    distill.init_student_from_teacher(student, module_teacher)
    student.eval()
    x, t, y = torch.randn(3, *student_model.latent_shape), torch.tensor([900.0, 500.0, 100.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, y, r=torch.tensor([0.0, 250.0, 100.0])), module_teacher(x, t, y))

    artifact = distill.run(config, store)
    mse = [v for _, v in read_metrics(tmp_path / "run")["train/mse"]]
    assert np.mean(mse[-15:]) < 0.8 * np.mean(mse[:15])  # the student learns its targets on real latents
    assert artifact.parents == {"latents": teacher.parents["latents"], "teacher": teacher.ref}
    assert artifact.manifest["distillation"]["teacher"] == teacher.ref
    assert teacher.ref in [a.ref for a in store.lineage(artifact)]
    from pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_artifacts(artifact.ref, store=store)
    assert (
        pipe.settings().sampler == "meanflow"
        and pipe.diffusion.built_in_guidance == config.distill.guidance_scale == 3.0
    )
    calls = []
    images = pipe.sample([0, 1, 2], num_steps=1, on_model_call=lambda: calls.append(1))
    assert images.shape[0] == 3 and torch.isfinite(images).all() and len(calls) == 1  # guidance inside: one pass
    with pytest.raises(ValueError, match="built in"):
        pipe.sample([0], num_steps=1, guidance_scale=2.0)

    # `ldm sample` picks guidance 1 for a student unless told otherwise, and refuses more
    runner = CliRunner()
    args = ["--store", str(store.root), "sample", "--model", artifact.ref, "--n", "2", "--steps", "2", "--no-images"]
    ok = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    refused = runner.invoke(main, [*args, "--cfg", "2", "--out", str(tmp_path / "b")])
    assert refused.exit_code != 0 and "--cfg 1" in refused.output


@pytest.mark.slow
@needs_fmnist
def test_distill_refuses_a_teacher_of_other_latents_and_student_settings(tmp_path, store_with_cache, teacher):
    store, ae, _ = store_with_cache
    other = encode(store, ae.ref, EncodeConfig(limit=600, batch_size=300, shard_size=600))
    assert other.ref != teacher.parents["latents"]
    with pytest.raises(ArtifactError, match=f"teacher {teacher.ref} was trained on {teacher.parents['latents']}"):
        distill.run(distill_config(tmp_path, teacher, f"latents={other.ref}"), store)
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "--store",
            str(store.root),
            "train",
            "distill",
            "--config",
            str(ROOT / "configs/fmnist/distill.yaml"),
            "--teacher",
            teacher.ref,
            "--set",
            f"latents={other.ref}",
            "--run-dir",
            str(tmp_path / "cli"),
        ],
    )
    assert result.exit_code != 0 and "the teacher's own latents" in result.output
    with pytest.raises(ValueError, match="no model"):
        distill.run(distill_config(tmp_path, teacher, "model.depth=3"), store)
    with pytest.raises(ValueError, match="a student starts from its teacher"):
        distill.run(distill_config(tmp_path, teacher, f"init_from={teacher.ref}"), store)
    with pytest.raises(ValueError, match="rectified-flow teacher"):
        distill.student_configs(load_dit(teacher).config, DiffusionConfig(), DistillConfig())


@pytest.mark.parametrize("domain", ["fmnist", "fsdd"])
def test_distill_presets_load(domain):
    config = load_config(distill.DistillStageConfig, ROOT / f"configs/{domain}/distill.yaml")
    assert config.preview.sampling.guidance_scale == 1 and config.distill.guidance_scale > 1
    assert config.run_dir == f"runs/{domain}/distill" and config.latents == ""
