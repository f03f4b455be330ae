"""Fast inference: int8 block linears (and their stored artifact), bf16 autocast, step caching."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from conftest import TOY_SIGMA, save_autoencoder, save_dit, toy_average_velocity, toy_slope
from ldm.artifacts import ArtifactError, ArtifactStore
from ldm.caching import BlockCache, CacheSchedule, cached, schedule_from_changes
from ldm.diffusion.schedules import DiffusionConfig
from ldm.evaluation import trajectory_name
from ldm.generation import SamplingSettings, model_calls, sample_latents
from ldm.models.dit import DiT, DiTConfig, unpatchify
from ldm.quantize import Int8Linear, int8_layer_names, quantize_int8, quantize_weight, weight_bytes
from pipeline import LatentDiffusionPipeline
from stages.cli import main
from stages.interop import quantize_diffusion

DIT = DiTConfig(
    input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=2, num_classes=10, learn_sigma=False
)
FLOW = DiffusionConfig(objective="flow", learn_sigma=False)


def random_dit(seed=0, config=DIT):
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():  # a fresh adaLN-Zero DiT outputs exactly 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def flow_store(tmp_path_factory):
    """A store with a random autoencoder and a random three-block flow DiT (conftest's `store` holds a DDPM one)."""
    store = ArtifactStore(tmp_path_factory.mktemp("inference") / "store")
    ae = save_autoencoder(store, 0)
    save_dit(store, DIT, FLOW, 3, ae.ref)
    return store


# ----------------------------------------------------------------------------- int8


def test_weight_quantisation_is_per_channel_symmetric_and_within_half_a_step():
    weight = torch.randn(16, 32) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different scale
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.allclose(scale, weight.abs().amax(1) / 127)
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int8_linear_matches_the_float_layer_and_keeps_only_int8_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        ref = linear(x)
    out = layer(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 0.03  # 7-bit inputs, 8-bit weights
    state = layer.state_dict()
    assert state["weight_int8"].dtype == torch.int8 and set(state) == {"weight_int8", "weight_scale", "bias"}
    assert torch.equal(state["weight_int8"], quantize_weight(linear.weight)[0])
    assert not list(layer.parameters())  # the packed weight is the only copy


def test_quantize_int8_replaces_only_block_linears_and_shrinks_the_weights_3_5x():
    model = random_dit(
        config=DiTConfig(
            input_size=8,
            patch_size=2,
            in_channels=8,
            hidden_size=256,
            depth=6,
            num_heads=4,
            num_classes=10,
            learn_sigma=False,
        )
    )  # DiT-F/2 on 8x8x8 latents
    before = weight_bytes(model)
    names = int8_layer_names(model)
    assert len(names) == 6 * 5 and all(name.startswith("blocks.") for name in names)
    kept = int8_layer_names(model, keep=["blocks.*.adaLN_modulation"])
    assert len(kept) == 6 * 4
    quantize_int8(model)
    assert isinstance(model.blocks[0].attn.qkv, Int8Linear) and isinstance(model.final_layer.linear, nn.Linear)
    assert before / weight_bytes(model) >= 3.5


def test_int8_artifact_round_trip_gives_the_same_samples_as_before_export(flow_store, tmp_path):
    float_ref = flow_store.list("diffusion")[-1].ref
    in_memory = LatentDiffusionPipeline.from_artifacts(float_ref, store=flow_store, precision="int8")
    settings = SamplingSettings(sampler="flow-heun", num_steps=4, guidance_scale=2.0)
    before = in_memory.sample([0, 1, 2], settings)
    quantized = quantize_diffusion(flow_store, float_ref)
    assert quantized.manifest["precision"] == "int8" and quantized.parents["diffusion"] == float_ref
    assert (
        quantized.manifest["files"]["weights.safetensors"]["bytes"]
        < flow_store.load(float_ref).manifest["files"]["weights.safetensors"]["bytes"] / 2.5
    )
    loaded = LatentDiffusionPipeline.from_artifacts(quantized.ref, store=flow_store)  # int8 from its manifest
    assert loaded.precision == "int8" and isinstance(loaded.model.blocks[0].mlp.fc1, Int8Linear)
    assert torch.equal(loaded.sample([0, 1, 2], settings), before)
    plain = LatentDiffusionPipeline.from_artifacts(float_ref, store=flow_store).sample([0, 1, 2], settings)
    assert 0 < (before - plain).abs().max() < 0.2  # quantised, and close
    with pytest.raises(ArtifactError, match="int8 sampling weights only"):
        LatentDiffusionPipeline.from_artifacts(quantized.ref, store=flow_store, precision="float32")
    with pytest.raises(ArtifactError, match="int8 sampling weights only"):
        LatentDiffusionPipeline.from_artifacts(quantized.ref, store=flow_store, weights="raw")
    with pytest.raises(ArtifactError, match="stored as int8 already"):
        quantize_diffusion(flow_store, quantized.ref)


def test_export_quantize_command_and_its_usage_errors(flow_store, tmp_path):
    runner = CliRunner()
    float_ref = flow_store.list("diffusion")[0].ref
    result = runner.invoke(
        main,
        [
            "--store",
            str(flow_store.root),
            "export",
            "diffusion",
            float_ref,
            "--quantize",
            "int8",
            "--keep",
            "blocks.*.adaLN_modulation",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "smaller" in result.output and "kept float32: blocks.*.adaLN_modulation" in result.output
    newest = [
        a
        for a in flow_store.list("diffusion")
        if a.manifest.get("precision") == "int8" and not any("adaLN" in name for name in a.manifest["int8_layers"])
    ]
    assert newest, "the --keep layers stay float32 in the stored artifact"
    result = runner.invoke(main, ["--store", str(flow_store.root), "export", "diffusion", float_ref])
    assert result.exit_code != 0 and "either --to-diffusers DIR or --quantize int8" in result.output
    result = runner.invoke(
        main,
        [
            "--store",
            str(flow_store.root),
            "export",
            "diffusion",
            newest[0].ref,
            "--to-diffusers",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code != 0 and "export the model it was quantised from" in result.output


def test_bf16_precision_samples_in_float32_close_to_float32(flow_store):
    settings = SamplingSettings(sampler="flow-euler", num_steps=4, guidance_scale=2.0)
    float_ref = flow_store.list("diffusion")[0].ref
    plain = LatentDiffusionPipeline.from_artifacts(float_ref, store=flow_store)
    bf16 = LatentDiffusionPipeline.from_artifacts(float_ref, store=flow_store, precision="bf16")
    _, latents = plain.sample([0, 5], settings, return_latents=True)
    _, low = bf16.sample([0, 5], settings, return_latents=True)
    assert low.dtype == torch.float32
    assert 0 < (low - latents).abs().max() < 0.1 * latents.abs().max()
    with pytest.raises(ValueError, match="precision must be one of"):
        LatentDiffusionPipeline.from_artifacts(float_ref, store=flow_store, precision="fp8")


# ----------------------------------------------------------------------------- step caching


def run(model, settings, cache=None, labels=(0, 3, 7)):
    return sample_latents(model, FLOW, torch.tensor(labels), settings, cache=cache)


def test_cache_that_skips_nothing_equals_the_plain_sampler_bit_for_bit():
    model = random_dit()
    settings = SamplingSettings(sampler="flow-heun", num_steps=5, guidance_scale=2.0)
    plain = run(model, settings)
    calls = model_calls("flow-heun", 5)
    cache = BlockCache(CacheSchedule(calls, DIT.depth, ()))
    assert torch.equal(run(model, settings, cache), plain)
    assert cache.evaluated == calls * DIT.depth and cache.skipped == 0
    assert torch.equal(
        run(
            model,
            SamplingSettings(
                sampler="flow-heun", num_steps=5, guidance_scale=2.0, cache=CacheSchedule(calls, DIT.depth, ())
            ),
        ),
        plain,
    )
    assert model.block_cache is None  # removed after the run


def test_a_skipped_block_adds_its_residual_of_the_previous_call():
    model = random_dit()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    cache = BlockCache(CacheSchedule(2, DIT.depth, ((1, 1),)), record=True)
    with torch.no_grad(), cached(model, cache):
        model(x, torch.full((2,), 900.0), y)
        residual = cache.residuals[1].clone()
        out = model(x, torch.full((2,), 800.0), y)
    assert cache.skipped == 1 and cache.evaluated == 2 * DIT.depth - 1
    # the same call by hand: blocks 0 and 2 run, block 1 is replaced by the stored residual
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed
        c_act = torch.nn.functional.silu(model.t_embedder(torch.full((2,), 800.0)) + model.y_embedder(y))
        h = model.blocks[0](h, c_act)
        h = h + residual
        h = model.blocks[2](h, c_act)
        expected = unpatchify(model.final_layer(h, c_act), 2, (4, 4))
    assert torch.allclose(out, expected, atol=1e-6)
    assert len(cache.changes) == 2 and all(
        change != change for change in cache.changes[0]
    )  # NaN: nothing to compare with
    assert cache.changes[1][0] > 0 and len(cache.changes[1]) == 2  # blocks 0 and 2 ran at the second call


class LinearInTime(nn.Module):
    """A block whose residual is a + b t for the timestep t it is given: what a forecast gets exactly right."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.randn(3, 5), torch.randn(3, 5)

    def forward(self, x, t):
        return x + self.a + self.b * t


def forecast_run(extrapolate, times, skips):
    block, outputs = LinearInTime(), []
    cache = BlockCache(CacheSchedule(len(times), 1, skips, extrapolate=extrapolate))
    for t in times:
        cache.begin(3, torch.full((3,), t))
        outputs.append(cache.run(0, block, torch.zeros(3, 5), t))
    return outputs, [block(torch.zeros(3, 5), t) for t in times]


def test_a_forecast_residual_continues_the_last_two_in_time():
    # Euler-like calls at falling timesteps: the skipped call 2 is forecast exactly, reuse is one step stale
    times = [1.0, 0.8, 0.5, 0.3]
    outputs, exact = forecast_run(True, times, ((2, 0),))
    torch.testing.assert_close(outputs[2], exact[2])
    stale, exact = forecast_run(False, times, ((2, 0),))
    torch.testing.assert_close(stale[2], exact[1])
    # Heun-like calls (corrector and next predictor share a timestep): the slope comes from two timesteps that differ
    times = [1.0, 0.75, 0.75, 0.5, 0.5]
    outputs, exact = forecast_run(True, times, ((3, 0),))
    torch.testing.assert_close(outputs[3], exact[3])
    # only one evaluation before the skip: nothing to draw a line through, so the residual is reused
    outputs, exact = forecast_run(True, [1.0, 0.5, 0.2], ((1, 0),))
    torch.testing.assert_close(outputs[1], exact[0])
    schedule = CacheSchedule(4, 1, ((2, 0),), extrapolate=True)
    assert CacheSchedule.from_dict(schedule.to_dict()) == schedule
    assert CacheSchedule.from_dict({"calls": 4, "depth": 1, "skips": [[2, 0]]}).extrapolate is False  # older manifests


def test_forecast_calibration_records_forecast_errors_and_stays_close():
    model = random_dit()
    settings = SamplingSettings(sampler="flow-euler", num_steps=12, guidance_scale=2.0)
    plain = run(model, settings)
    changes = {}
    for extrapolate in (False, True):
        recorder = BlockCache(record=True, extrapolate=extrapolate)
        assert torch.equal(run(model, settings, recorder), plain)  # recording never changes the samples
        changes[extrapolate] = recorder.changes
        schedule = replace(schedule_from_changes(recorder.changes, 0.3), extrapolate=extrapolate)
        cache = BlockCache(schedule)
        out = run(model, settings, cache)
        assert cache.skipped / (cache.skipped + cache.evaluated) >= 0.3
        assert not torch.equal(out, plain) and (out - plain).norm() / plain.norm() < 0.1
    # call 1 has one residual before it, so its forecast is that residual; from call 2 on the errors differ
    assert changes[True][1] == changes[False][1] and changes[True][2] != changes[False][2]


def test_calibrated_schedule_saves_the_asked_fraction_and_stays_close():
    model = random_dit()
    settings = SamplingSettings(sampler="flow-heun", num_steps=10, guidance_scale=2.0)
    recorder = BlockCache(record=True)
    plain = run(model, settings, recorder)
    assert len(recorder.changes) == model_calls("flow-heun", 10) and len(recorder.changes[1]) == DIT.depth
    schedule = schedule_from_changes(recorder.changes, 0.3)
    assert schedule.fraction >= 0.3 and all(call > 0 for call, _ in schedule.skips)
    assert not any((call + 1, block) in schedule.skips for call, block in schedule.skips)  # never twice in a row
    cache = BlockCache(schedule)
    out = run(model, settings, cache)
    assert cache.skipped == len(schedule.skips) and cache.skipped / (cache.skipped + cache.evaluated) >= 0.3
    assert not torch.equal(out, plain) and (out - plain).norm() / plain.norm() < 0.1
    assert CacheSchedule.from_dict(schedule.to_dict()) == schedule


def test_schedule_rules_and_errors():
    changes = [[float("nan")] * 2] + [[0.1, 0.5]] * 3
    schedule = schedule_from_changes(changes, 2 / 8)
    assert schedule.skips == ((1, 0), (3, 0))  # block 0 changes least; not at calls 1 and 2 both
    with pytest.raises(ValueError, match="at most"):
        schedule_from_changes(changes, 0.7)
    with pytest.raises(ValueError, match="outside calls"):
        CacheSchedule(4, 2, ((0, 1),))
    with pytest.raises(ValueError, match="network calls"):
        SamplingSettings(sampler="flow-heun", num_steps=4, cache=CacheSchedule(4, 2, ()))


def test_pipeline_calibrates_and_counts_saved_block_evaluations(flow_store):
    pipe = LatentDiffusionPipeline.from_artifacts(flow_store.list("diffusion")[0].ref, store=flow_store)
    settings = pipe.settings(sampler="flow-heun", num_steps=6, guidance_scale=2.0)
    schedule = pipe.calibrate_cache(settings, fraction=0.3, n=10)
    assert schedule.calls == 11 and schedule.depth == DIT.depth
    pipe.block_evaluations = {"evaluated": 0, "skipped": 0}
    pipe.sample([0, 1, 2, 3], settings, cache=schedule, batch_size=2)
    counts = pipe.block_evaluations
    assert (
        counts["skipped"] == 2 * len(schedule.skips) and counts["evaluated"] + counts["skipped"] == 2 * 11 * DIT.depth
    )


# ----------------------------------------------------------------------------- MeanFlow (few-step generation)
def test_meanflow_target_of_the_true_average_velocity_is_unbiased_on_a_gaussian_toy():
    from ldm.diffusion.objectives import meanflow_target

    torch.manual_seed(0)
    n = 200_000
    for r_value, t_value in ((0.2, 0.9), (0.0, 1.0), (0.5, 0.5)):
        x0, noise = TOY_SIGMA * torch.randn(n, 1), torch.randn(n, 1)
        t, r = torch.full((n,), t_value), torch.full((n,), r_value)
        u, target = meanflow_target(toy_average_velocity, x0, noise, torch.zeros(n, dtype=torch.long), t, r)
        x_t = (1 - t_value) * x0 + t_value * noise
        # E[target | x_t] = u(x_t, r, t): regressing the target on x_t recovers the true slope
        slope = float((target * x_t).sum() / (x_t * x_t).sum())
        true = float(toy_slope(torch.tensor(r_value), torch.tensor(t_value)))
        assert slope == pytest.approx(true, rel=0.01, abs=2e-3)
        assert torch.allclose(u, true * x_t, atol=1e-5)
    # the true u is a fixed point of the target; a network that ignores r (the flow velocity) is not where r < t
    wrong = lambda x, t_net, y, r=None: toy_average_velocity(x, t_net, y)  # noqa: E731
    x0, noise = TOY_SIGMA * torch.randn(n, 1), torch.randn(n, 1)
    t, r = torch.full((n,), 1.0), torch.full((n,), 0.0)
    u, target = meanflow_target(wrong, x0, noise, torch.zeros(n, dtype=torch.long), t, r)
    own = float(u[0] / noise[0])  # x_1 = noise; the velocity's slope at t = 1 is 1
    assert own == pytest.approx(1.0) and float((target * noise).sum() / (noise * noise).sum()) < 0.9 * own


def test_one_meanflow_step_of_the_true_average_velocity_maps_noise_to_the_data_law():
    from ldm.diffusion.samplers import Denoiser, run_sampler

    denoiser = Denoiser(lambda x, t, r=None: toy_average_velocity(x, t, None, r), "velocity")
    noise = torch.randn(4096, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    one = run_sampler("meanflow", denoiser, noise, None, 1)
    assert torch.allclose(one, TOY_SIGMA * noise, atol=1e-6)  # x_0 = x_1 s_0 / s_1: exactly N(0, TOY_SIGMA^2)
    assert torch.allclose(run_sampler("meanflow", denoiser, noise, None, 2), one, atol=1e-6)  # exact at any step count
    euler = run_sampler("flow-euler", denoiser, noise, None, 1)  # one Euler step of the velocity is not
    assert not torch.allclose(euler, TOY_SIGMA * noise, atol=1e-2)


def test_meanflow_sampler_fits_only_a_meanflow_model_and_makes_one_call_per_step():
    meanflow = DiffusionConfig(objective="meanflow", learn_sigma=False)
    assert SamplingSettings().resolved(meanflow).sampler == "meanflow"
    assert SamplingSettings(sampler="flow-heun").resolved(meanflow).sampler == "flow-heun"  # u(x, t, t) = v
    with pytest.raises(ValueError, match="does not fit"):
        SamplingSettings(sampler="meanflow").resolved(FLOW)
    assert model_calls("meanflow", 1) == 1 and model_calls("meanflow", 2) == 2
    model = random_dit(config=DiTConfig(**{**DIT.__dict__, "interval_embed": True}))
    calls = []
    sample_latents(
        model,
        meanflow,
        torch.tensor([1, 2]),
        SamplingSettings(sampler="meanflow", num_steps=2, guidance_scale=2.0),
        on_model_call=lambda: calls.append(1),
    )
    assert len(calls) == 2
    with pytest.raises(ValueError, match="no interval embedding"):
        random_dit()(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.tensor([0]), r=torch.tensor([0.0]))


def test_sample_command_calibrates_a_cache_schedule_once_and_stores_it_with_the_model(flow_store, tmp_path):
    runner = CliRunner()
    ref = flow_store.list("diffusion")[0].ref
    args = [
        "--store",
        str(flow_store.root),
        "sample",
        "--model",
        ref,
        "--n",
        "4",
        "--sampler",
        "flow-heun",
        "--steps",
        "6",
        "--cfg",
        "2",
        "--cache-fraction",
        "0.3",
        "--no-images",
    ]
    first = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "calibrated cache-flow-heun-6-cfg2-f0.3" in first.output
    stored = flow_store.load(ref).manifest["metrics"]["cache-flow-heun-6-cfg2-f0.3"]
    assert CacheSchedule.from_dict(stored).calls == 11 and stored["fraction"] >= 0.3
    second = runner.invoke(main, [*args, "--out", str(tmp_path / "b")])
    assert second.exit_code == 0 and "the stored schedule" in second.output
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png").read_bytes()
    forecast = runner.invoke(main, [*args, "--cache-forecast", "--out", str(tmp_path / "c")])
    assert forecast.exit_code == 0 and "calibrated cache-flow-heun-6-cfg2-f0.3-forecast" in forecast.output
    assert flow_store.load(ref).manifest["metrics"]["cache-flow-heun-6-cfg2-f0.3-forecast"]["extrapolate"] is True
    # Guidance in an interval takes another path through the DiT: it gets its own schedule, never the one above.
    interval = runner.invoke(main, [*args, "--cfg-interval", "200", "800", "--out", str(tmp_path / "d")])
    assert interval.exit_code == 0 and "calibrated cache-flow-heun-6-cfg2-t200-800-f0.3" in interval.output, (
        interval.output
    )


def test_inference_bench_reads_caching_forecast_and_guidance_interval_settings():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.inference import Setting

    setting = Setting.parse("flow-euler:20:cache0.3:forecast:interval220-840")
    assert (setting.sampler, setting.steps, setting.cache, setting.forecast, setting.interval) == (
        "flow-euler",
        20,
        0.3,
        True,
        (220.0, 840.0),
    )
    assert setting.family == "float32 + cache forecast"
    assert Setting.parse("student:meanflow:2").source == "student" and Setting.parse("flow-heun:10").interval is None
    pruned, pruned_student = Setting.parse("pruned:flow-heun:10:int8"), Setting.parse("pruned-student:meanflow:2")
    assert (pruned.source, pruned.precision, pruned.family) == ("pruned", "int8", "pruned int8")
    args = SimpleNamespace(model="m", student=None, pruned="p", pruned_student="ps", cfg=2.0)
    assert (pruned.model(args), pruned.cfg(args), pruned_student.model(args), pruned_student.cfg(args)) == (
        "p",
        2.0,
        "ps",
        1.0,
    )
    with pytest.raises(SystemExit, match="needs --student"):
        Setting.parse("student:meanflow:1").model(args)
    with pytest.raises(SystemExit, match="forecast needs"):
        Setting.parse("flow-euler:20:forecast")
    with pytest.raises(SystemExit, match="unknown part"):
        Setting.parse("student:meanflow:1:interval220-840")  # a student's guidance is built in


def test_shift_option_moves_the_flow_grid_is_recorded_and_is_refused_off_a_flow_sampler(flow_store, tmp_path):
    runner = CliRunner()
    ref = flow_store.list("diffusion")[0].ref
    args = [
        "--store",
        str(flow_store.root),
        "sample",
        "--model",
        ref,
        "--n",
        "4",
        "--sampler",
        "flow-heun",
        "--steps",
        "4",
        "--cfg",
        "2",
        "--no-images",
    ]

    def grid(name, *extra):
        result = runner.invoke(main, [*args, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        return (tmp_path / name / "grid.png").read_bytes(), json.loads((tmp_path / name / "samples.json").read_text())

    plain, plain_report = grid("plain")
    unit, _ = grid("unit", "--shift", "1")
    shifted, report = grid("shifted", "--shift", "3")
    assert unit == plain and shifted != plain
    assert plain_report["shift"] == 1.0 and report["shift"] == 3.0
    pipe = LatentDiffusionPipeline.from_artifacts(ref, store=flow_store)
    assert (
        trajectory_name(pipe, pipe.settings(sampler="flow-heun", num_steps=4, shift=3.0)) == "flow-heun-4-shift3-cfg1"
    )
    # Unset, the shift is the model's training shift for a flow sampler (SD3 samples at the shift it trained at).
    shifted_model = DiffusionConfig(objective="flow", learn_sigma=False, time_shift=3.0)
    assert SamplingSettings().resolved(shifted_model).shift == 3.0
    assert SamplingSettings(shift=1.0).resolved(shifted_model).shift == 1.0
    assert SamplingSettings(sampler="ddim").resolved(DiffusionConfig()).shift == 1.0
    with pytest.raises(ValueError, match=r"shift \(--shift\) 3 .*'ddim'"):
        SamplingSettings(sampler="ddim", shift=3.0).resolved(DiffusionConfig())
    bad = runner.invoke(main, [*args, "--shift", "0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--shift" in bad.output and "positive" in bad.output
