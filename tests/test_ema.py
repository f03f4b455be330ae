"""Post-hoc EMA (EDM2): profile lengths, power-function EMA updates, reconstruction, training snapshots, `ldm ema`."""

import math

import pytest
import torch
from click.testing import CliRunner

from conftest import CrashAt, dit_config, needs_fmnist
from ldm.ema import (
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    posthoc_coefficients,
    profile_inner_products,
    reconstruct,
    sigma_rel_to_gamma,
)
from ldm.models.classifier import Classifier, ClassifierConfig
from ldm.models.dit import DiTConfig
from pipeline import LatentDiffusionPipeline
from stages import diffusion
from stages.cli import main

POSTHOC = ["posthoc_ema=[0.05,0.10]", "posthoc_snapshot_every=3"]


class Toy(torch.nn.Module):
    """A 'model' whose three parameters follow known functions of the step."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=dtype))


def theta(step: int) -> torch.Tensor:
    """The toy parameters after `step` optimiser steps: a drift, an oscillation and a decay."""
    return torch.tensor(
        [math.sin(step / 200), (step / 1000) ** 2, math.exp(-step / 300) + 0.1 * math.cos(step / 37)],
        dtype=torch.float64,
    )


def train_toy(sigma_rels, steps, snapshot_every=0, folder=None):
    """Run the toy trajectory for `steps` steps with profiles of `sigma_rels`.

    Snapshots go into `folder` every `snapshot_every` steps.
    """
    toy = Toy()
    ema = PowerFunctionEMA(toy, sigma_rels)
    for step in range(1, steps + 1):
        toy.w.data.copy_(theta(step))
        ema.update(toy, step)
        if snapshot_every and step % snapshot_every == 0:
            ema.write_snapshots(folder, step)
    return ema


# ---- lengths ----------------------------------------------------------------------------------


def test_sigma_rel_and_gamma_convert_into_each_other():
    for sigma_rel in (0.01, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    for gamma in (0.0, 0.5, 3.0, 6.94, 16.97, 100.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_edm2_lengths_0_05_and_0_10_are_the_exponents_16_97_and_6_94():
    # EDM2 keeps these two profiles (NVlabs/edm2 training/phema.py, std_to_exp: largest root of Eq. 126's cubic)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(12**-0.5)  # gamma 0: the plain average, the widest profile


def test_lengths_outside_the_power_function_range_are_refused():
    for bad in (0.0, -0.05, 0.29, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            sigma_rel_to_gamma(bad)


def test_profile_inner_products_match_numerical_integration():
    for t_a, gamma_a, t_b, gamma_b in (
        (700.0, 6.94, 1000.0, 16.97),
        (1000.0, 3.0, 400.0, 0.5),
        (500.0, 2.0, 500.0, 9.0),
    ):
        tau = torch.linspace(0, max(t_a, t_b), 2_000_001, dtype=torch.float64)
        density_a = torch.where(tau <= t_a, (gamma_a + 1) * tau**gamma_a / t_a ** (gamma_a + 1), 0.0)  # Eq. 121
        density_b = torch.where(tau <= t_b, (gamma_b + 1) * tau**gamma_b / t_b ** (gamma_b + 1), 0.0)
        integral = torch.trapezoid(density_a * density_b, tau)
        assert float(profile_inner_products(t_a, gamma_a, t_b, gamma_b)) == pytest.approx(float(integral), rel=1e-4)


# ---- the EMA and its reconstruction -------------------------------------------------------------


def test_power_function_ema_is_the_closed_form_average_of_the_trajectory():
    ema = PowerFunctionEMA(Toy(), [0.05, 0.15])
    toy = Toy()
    trajectory = torch.stack([theta(step) for step in range(1, 301)])  # (T, 3)
    for step in range(1, 301):
        toy.w.data.copy_(trajectory[step - 1])
        ema.update(toy, step)
        if step in (1, 17, 300):
            for index, gamma in enumerate(ema.gammas):
                # step i's share: the profile density (gamma+1) tau^gamma / t^(gamma+1) integrated over (i-1, i]
                i = torch.arange(1, step + 1, dtype=torch.float64)
                shares = (i / step) ** (gamma + 1) - ((i - 1) / step) ** (gamma + 1)  # (t,)
                expected = shares @ trajectory[:step]
                torch.testing.assert_close(ema.profile_weights(index)["w"], expected, rtol=1e-12, atol=1e-12)


def test_reconstruction_from_two_profiles_matches_a_third_tracked_directly(tmp_path):
    train_toy([0.05, 0.10], 1000, snapshot_every=25, folder=tmp_path)
    direct = train_toy([0.07, 0.12], 1000)
    snapshots = list_snapshots(tmp_path)
    assert len(snapshots) == 80 and {s.sigma_rel for s in snapshots} == {0.05, 0.10}
    rebuilt, coefficients = reconstruct(snapshots, [0.07, 0.12])
    assert coefficients.shape == (80, 2)
    torch.testing.assert_close(coefficients.sum(0), torch.ones(2, dtype=torch.float64))
    for index, sigma_rel in enumerate((0.07, 0.12)):
        error = (rebuilt[index]["w"] - direct.profile_weights(index)["w"]).abs().max()
        assert error < 1e-3, (sigma_rel, error)  # the parameters move by ~1 over the run
    # a length outside the tracked ones is reconstructed less well, but the least squares still get close
    wide = train_toy([0.2], 1000).profile_weights(0)["w"]
    assert (reconstruct(snapshots, [0.2])[0][0]["w"] - wide).abs().max() < 0.03


def test_reconstructing_a_stored_profile_returns_its_own_snapshot(tmp_path):
    ema = train_toy([0.05, 0.10], 600, snapshot_every=50, folder=tmp_path)
    rebuilt, _ = reconstruct(list_snapshots(tmp_path), [0.05, 0.10])
    for index in range(2):
        torch.testing.assert_close(rebuilt[index]["w"], ema.profile_weights(index)["w"], rtol=0, atol=1e-12)
    # and at an earlier snapshot's step, from the snapshots up to it
    earlier, _ = reconstruct(list_snapshots(tmp_path), [0.10], step=300)
    torch.testing.assert_close(earlier[0]["w"], train_toy([0.10], 300).profile_weights(0)["w"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="no snapshot at step 310"):
        reconstruct(list_snapshots(tmp_path), [0.10], step=310)


def test_coefficients_do_not_depend_on_the_time_unit():
    # EDM2 counts training images, we count steps: the same run in either unit gives the same shares
    steps, gammas = [100, 200, 300, 100, 200, 300], [16.97] * 3 + [6.94] * 3
    by_step = posthoc_coefficients(steps, gammas, 300, [10.0])
    by_image = posthoc_coefficients([256 * s for s in steps], gammas, 256 * 300, [10.0])
    torch.testing.assert_close(by_step, by_image)


# ---- training ---------------------------------------------------------------------------------


def test_posthoc_ema_settings_are_checked():
    with pytest.raises(ValueError, match="needs posthoc_snapshot_every >= 1"):
        diffusion.DiffusionStageConfig(posthoc_ema=[0.05])
    with pytest.raises(ValueError, match="posthoc_ema is empty"):
        diffusion.DiffusionStageConfig(posthoc_snapshot_every=100)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        diffusion.DiffusionStageConfig(posthoc_ema=[0.05, 0.5], posthoc_snapshot_every=100)
    with pytest.raises(ValueError, match="twice"):
        diffusion.DiffusionStageConfig(posthoc_ema=[0.05, 0.05], posthoc_snapshot_every=100)


def test_the_profiles_are_module_state_only_when_posthoc_ema_is_on():
    tiny = DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    lineage = {"latents": "latents@x", "autoencoder": "autoencoder@y"}
    module = diffusion.DiffusionModule(diffusion.DiffusionStageConfig(model=tiny), lineage)
    assert module.power_ema is None
    assert {key.split(".")[0] for key in module.state_dict()} == {"model", "ema"}
    profiled = diffusion.DiffusionModule(
        diffusion.DiffusionStageConfig(model=tiny, posthoc_ema=[0.05, 0.1], posthoc_snapshot_every=10), lineage
    )
    assert {key.split(".")[0] for key in profiled.state_dict()} == {"model", "ema", "power_ema"}
    assert all(not p.requires_grad for p in profiled.power_ema.parameters())  # the optimizer never sees them


@pytest.mark.slow
@needs_fmnist
def test_keeping_profiles_leaves_the_trained_weights_and_ema_bit_identical(tmp_path, store_with_cache):
    store = store_with_cache[0]
    common = ["trainer.max_steps=6", "model.class_dropout_prob=0.5"]
    plain = diffusion.run(dit_config(tmp_path / "plain", store_with_cache, *common), store)
    profiled = diffusion.run(dit_config(tmp_path / "profiled", store_with_cache, *common, *POSTHOC), store)
    assert "posthoc_ema" not in plain.manifest["training"]
    assert not (tmp_path / "plain" / "run" / "ema-snapshots").exists()
    for name in ("weights.safetensors", "raw.safetensors"):
        a, b = plain.load_tensors(name), profiled.load_tensors(name)
        assert all(torch.equal(a[key], b[key]) for key in a), name


@pytest.mark.slow
@needs_fmnist
def test_training_writes_snapshots_and_a_crashed_run_resumes_its_profiles_exactly(tmp_path, store_with_cache, capsys):
    store, _, cache = store_with_cache
    common = ["trainer.max_steps=8", "trainer.checkpoint_every=4", "model.class_dropout_prob=0.5", *POSTHOC]
    straight = diffusion.run(dit_config(tmp_path / "a", store_with_cache, *common), store)
    record = straight.manifest["training"]["posthoc_ema"]
    folder = tmp_path / "a" / "run" / "ema-snapshots"
    assert record["sigma_rel"] == [0.05, 0.10] and record["snapshots"] == str(folder.resolve())
    assert record["snapshot_steps"] == [3, 6, 8]  # every 3 steps, and the last
    snapshots = list_snapshots(folder)
    assert [(s.step, s.sigma_rel) for s in snapshots] == [(3, 0.05), (3, 0.1), (6, 0.05), (6, 0.1), (8, 0.05), (8, 0.1)]
    assert all(s.metadata["latents"] == cache.ref for s in snapshots)
    assert snapshots[0].load().keys() == straight.load_tensors().keys()

    config = dit_config(tmp_path / "b", store_with_cache, *common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        diffusion.run(config, store, callbacks=[CrashAt(7)])  # after the snapshot of step 6, past the checkpoint of 4
    checkpoint = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and any(key.startswith("power_ema.") for key in checkpoint["state_dict"])
    resumed = diffusion.run(config, store, resume=True)
    assert "removed 2 post-hoc EMA snapshots after step 4" in capsys.readouterr().out

    again = list_snapshots(tmp_path / "b" / "run" / "ema-snapshots")
    assert [(s.step, s.sigma_rel) for s in again] == [(s.step, s.sigma_rel) for s in snapshots]
    for first, second in zip(snapshots, again):
        a, b = first.load(), second.load()
        assert all(torch.equal(a[key], b[key]) for key in a), f"step {first.step} sigma_rel {first.sigma_rel} differs"
    for name in ("weights.safetensors", "raw.safetensors"):
        a, b = straight.load_tensors(name), resumed.load_tensors(name)
        assert all(torch.equal(a[key], b[key]) for key in a), name


@pytest.mark.slow
@needs_fmnist
def test_ldm_ema_stores_the_lowest_fd_length_as_a_child_artifact_the_pipeline_loads(tmp_path, store_with_cache):
    store, _, cache = store_with_cache
    model = diffusion.run(dit_config(tmp_path, store_with_cache, "trainer.max_steps=9", *POSTHOC), store)
    classifier = Classifier(ClassifierConfig(width=8, feature_dim=16))
    classifier_artifact = store.save(
        "classifier",
        tensors={"weights.safetensors": classifier.eval().state_dict()},
        config={"model": {"width": 8, "feature_dim": 16}},
    )
    result = CliRunner().invoke(
        main,
        [
            "--store",
            str(store.root),
            "ema",
            "--model",
            model.ref,
            "--sigma-rel",
            "0.12,0.05",
            "--n",
            "20",
            "--steps",
            "2",
            "--batch-size",
            "10",
            "--features",
            "classifier",
            "--classifier",
            classifier_artifact.ref,
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "<- stored" in result.output and "the model's EMA" in result.output

    child = store.load("diffusion@latest")
    assert child.ref != model.ref
    assert child.parents == {"latents": cache.ref, "diffusion": model.ref}
    assert child.config() == model.config() and child.manifest["latent_stats"] == model.manifest["latent_stats"]
    table = child.manifest["metrics"]["posthoc_ema"]
    assert [row["sigma_rel"] for row in table["table"]] == [None, 0.05, 0.12]  # the model's own EMA first
    assert len({row["frechet_distance"] for row in table["table"]}) == 3  # no tie: the choice below means something
    chosen = child.manifest["posthoc_ema"]["sigma_rel"]
    assert (
        chosen
        == table["chosen_sigma_rel"]
        == min(table["table"][1:], key=lambda row: row["frechet_distance"])["sigma_rel"]
    )
    assert child.manifest["posthoc_ema"]["step"] == 9

    expected = reconstruct(list_snapshots(tmp_path / "run" / "ema-snapshots"), [chosen], step=9)[0][0]
    stored = child.load_tensors()
    assert all(torch.equal(stored[key], expected[key]) for key in expected)

    pipe = LatentDiffusionPipeline.from_artifacts(child.ref, store=store)
    assert pipe.provenance.latents == cache.ref and pipe.provenance.autoencoder == model.manifest["autoencoder"]
    images = pipe.sample([0, 1], num_steps=2, seed=0)
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()


@pytest.mark.slow
@needs_fmnist
def test_ldm_ema_refuses_a_model_trained_without_profiles(tmp_path, store_with_cache):
    store = store_with_cache[0]
    model = diffusion.run(dit_config(tmp_path, store_with_cache, "trainer.max_steps=2"), store)
    result = CliRunner().invoke(main, ["--store", str(store.root), "ema", "--model", model.ref, "--sigma-rel", "0.1"])
    assert result.exit_code != 0 and "trained without post-hoc EMA profiles" in result.output
