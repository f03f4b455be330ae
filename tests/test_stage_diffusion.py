"""Stage 2 end to end: the latent cache, DiT training, exact resume, lineage checks, 2-process DDP."""

import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from conftest import TINY_DIT, CrashAt, dit_config, needs_fmnist
from ldm.artifacts import ArtifactError, ArtifactStore
from ldm.config import load_config, to_dict
from ldm.data import DataConfig
from ldm.data.latents import LatentBatches, LatentCache, measure_stats
from ldm.generation import SamplingSettings
from ldm.loading import load_autoencoder
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.training import read_metrics
from stages import diffusion
from stages.encode import EncodeConfig, encode

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@needs_fmnist
def test_cache_holds_posterior_of_images_and_flips_with_measured_stats(store_with_cache):
    store, ae, artifact = store_with_cache
    assert artifact.parents == {"autoencoder": ae.ref}
    assert sorted(n for n in artifact.manifest["files"] if n.startswith("shard-")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    cache = LatentCache(artifact)
    assert cache.mean.shape == (2000, 2, 4, 8, 8) and cache.labels.shape == (2000,)
    assert cache.labels[:5].tolist() == [9, 0, 0, 3, 0]

    model = load_autoencoder(ae)
    from ldm.data.fmnist import FashionMNIST

    images = FashionMNIST("train").images[:4]
    with torch.no_grad():
        posterior = model.encode(images)
        flipped = model.encode(images.flip(-1))
    torch.testing.assert_close(cache.mean[:4, 0], posterior.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.std[:4, 0], posterior.std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.mean[:4, 1], flipped.mean, atol=1e-5, rtol=1e-5)

    stats = measure_stats(cache.mean, cache.std, "channel")
    samples = cache.mean + cache.std * torch.randn_like(cache.mean)  # (N, V, C, h, w)
    per_channel = samples.transpose(0, 2).reshape(samples.shape[2], -1)
    np.testing.assert_allclose(stats.mean, per_channel.mean(1).numpy(), atol=0.02 * max(stats.std))
    np.testing.assert_allclose(stats.std, per_channel.std(1).numpy(), rtol=0.02)
    assert artifact.manifest["latent_stats"] == stats.to_dict()


@pytest.mark.slow
@needs_fmnist
def test_cache_is_memory_mapped_and_gathers_items_across_shards(store_with_cache, monkeypatch):
    import ldm.artifacts

    def no_full_loads(*args, **kwargs):
        raise AssertionError("the latent cache must map its shards, not read them whole")

    monkeypatch.setattr(ldm.artifacts, "load_file", no_full_loads)
    cache = LatentCache(store_with_cache[2])  # shards of 768, 768, 464 items
    assert [len(m) for m in cache.shard_means] == [768, 768, 464] and cache.shard_starts.tolist() == [0, 768, 1536]
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the shards are mapped files of this process, not copies on its heap
        mapped = maps.read_text()
        assert all(str(cache.artifact.path / f"shard-0000{i}.safetensors") in mapped for i in range(3))
    indices = torch.tensor([1999, 0, 767, 768, 1535, 1536, 5, 1200])
    views = torch.tensor([1, 0, 1, 0, 1, 0, 1, 1])
    mean, std = cache.gather(indices, views)
    torch.testing.assert_close(mean, cache.mean[indices, views], rtol=0, atol=0)
    torch.testing.assert_close(std, cache.std[indices, views], rtol=0, atol=0)


def test_only_image_folders_are_mirror_invariant():
    assert DataConfig(name="folder", path="x").mirror_invariant
    assert not DataConfig(name="fmnist").mirror_invariant and not DataConfig(name="fsdd").mirror_invariant


@needs_fmnist
def test_fashion_mnist_cache_holds_no_flips_by_default_and_warns_when_asked_for_them(tmp_path, capsys):
    # Every Fashion-MNIST shoe faces one way; a cache with flips taught the DiT mirrored shoes (docs/results.md).
    store = ArtifactStore(tmp_path / "store")
    torch.manual_seed(0)
    config = AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), latent_channels=4)
    ae = store.save(
        "autoencoder",
        tensors={"weights.safetensors": AutoencoderKL(config).state_dict()},
        config={"model": to_dict(config), "data": to_dict(DataConfig())},
    )
    plain = encode(store, ae.ref, EncodeConfig(limit=50, batch_size=50))
    assert plain.manifest["views"] == 1 and LatentCache(plain).num_views == 1
    assert "warning" not in capsys.readouterr().out
    flipped = encode(store, ae.ref, EncodeConfig(limit=50, batch_size=50, flips=True))
    assert flipped.manifest["views"] == 2 and flipped.ref != plain.ref
    assert "warning: flips=true on 'fmnist'" in capsys.readouterr().out


@pytest.mark.slow
@needs_fmnist
def test_encoding_again_with_the_same_inputs_returns_the_stored_cache(store_with_cache, capsys):
    store, ae, artifact = store_with_cache
    again = encode(store, ae.ref, EncodeConfig(limit=2000, batch_size=250, shard_size=768, flips=True))
    assert again.ref == artifact.ref
    assert "nothing to encode" in capsys.readouterr().out
    assert len(store.list("latents")) == 1


@pytest.mark.slow
@needs_fmnist
def test_latent_batches_are_a_function_of_the_step_and_ranks_split_the_global_batch(store_with_cache):
    cache = LatentCache(store_with_cache[2])
    batches = LatentBatches(cache, batch_size=8, seed=3)
    z, y = batches.batch(5)
    z_again, y_again = LatentBatches(cache, batch_size=8, seed=3).batch(5)
    assert torch.equal(z, z_again) and torch.equal(y, y_again)
    z0, y0 = batches.batch(5, rank=0, world=2)
    z1, y1 = batches.batch(5, rank=1, world=2)
    assert torch.equal(torch.stack([z0, z1], 1).flatten(0, 1), z) and torch.equal(torch.stack([y0, y1], 1).flatten(), y)
    # one epoch visits every item once
    seen = torch.cat([batches.batch_indices(step) for step in range(250)])
    assert sorted(seen.tolist()) == list(range(2000))


@pytest.mark.slow
@needs_fmnist
def test_training_loss_drops_over_200_steps_on_fmnist_latents(tmp_path, store_with_cache):
    store = store_with_cache[0]
    artifact = diffusion.run(
        dit_config(tmp_path, store_with_cache, "trainer.max_steps=200", "trainer.checkpoint_every=200"), store
    )
    losses = [v for _, v in read_metrics(tmp_path / "run")["train/loss"]]
    assert len(losses) == 200
    assert np.mean(losses[-30:]) < 0.8 * np.mean(losses[:10])
    assert artifact.parents == {"latents": store_with_cache[2].ref}
    assert artifact.manifest["autoencoder"] == store_with_cache[1].ref
    assert artifact.manifest["latent_stats"] == store_with_cache[2].manifest["latent_stats"]
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "images" / "samples-final.png").is_file()


def test_ema_decay_warms_up_so_a_short_run_does_not_keep_the_zero_initialised_output():
    assert diffusion.ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert diffusion.ema_decay_at(90, 0.9999) == pytest.approx(0.91)
    assert diffusion.ema_decay_at(10**6, 0.9999) == 0.9999
    # after 500 updates the initial weights keep a small share (the fixed decay 0.999 kept 61%)
    share = np.prod([diffusion.ema_decay_at(s, 0.999) for s in range(500)])
    assert share < 0.01


@pytest.mark.slow
@needs_fmnist
def test_ema_samples_of_a_short_run_stay_on_the_data_scale(tmp_path, store_with_cache):
    store = store_with_cache[0]
    config = dit_config(tmp_path, store_with_cache, "trainer.max_steps=100", "ema_decay=0.999")
    artifact = diffusion.run(config, store)
    from ldm.generation import sample_latents

    spread = {}
    for name in ("weights.safetensors", "raw.safetensors"):  # EMA and trained weights
        model = diffusion.DiT(config.model)
        model.load_state_dict(artifact.load_tensors(name))
        z = sample_latents(
            model.eval(), config.diffusion, torch.arange(8), SamplingSettings(num_steps=20).resolved(config.diffusion)
        )  # the objective's sampler
        spread[name] = z.std().item()
    assert spread["weights.safetensors"] < 2 * spread["raw.safetensors"]


@pytest.mark.slow
@needs_fmnist
def test_crashed_and_resumed_run_ends_with_the_same_ema_weights_and_step_as_an_uninterrupted_one(
    tmp_path, store_with_cache
):
    store = store_with_cache[0]
    common = ["trainer.max_steps=8", "trainer.checkpoint_every=4", "model.class_dropout_prob=0.5"]
    straight = diffusion.run(dit_config(tmp_path / "a", store_with_cache, *common), store)

    config = dit_config(tmp_path / "b", store_with_cache, *common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        diffusion.run(config, store, callbacks=[CrashAt(6)])
    assert torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = diffusion.run(config, store, resume=True)

    assert resumed.manifest["training"]["steps"] == 8
    for name in ("weights.safetensors", "raw.safetensors"):
        a, b = straight.load_tensors(name), resumed.load_tensors(name)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"


class WeightsAtStart(Callback):
    def on_train_start(self, trainer, module):
        self.raw = {k: v.clone() for k, v in module.model.state_dict().items()}
        self.ema = {k: v.clone() for k, v in module.ema.state_dict().items()}


@pytest.mark.slow
@needs_fmnist
def test_init_from_continues_from_both_weight_sets_and_records_the_start_as_a_parent(tmp_path, store_with_cache):
    store, _, cache = store_with_cache
    first = diffusion.run(dit_config(tmp_path / "a", store_with_cache, "trainer.max_steps=4"), store)
    start = WeightsAtStart()
    config = dit_config(tmp_path / "b", store_with_cache, "trainer.max_steps=2", f"init_from={first.ref}")
    second = diffusion.run(config, store, callbacks=[start])

    for name, seen in (("raw.safetensors", start.raw), ("weights.safetensors", start.ema)):
        stored = first.load_tensors(name)
        assert all(torch.equal(stored[key], seen[key]) for key in stored), f"{name} was not the start of the new run"
    assert second.parents == {"latents": cache.ref, "diffusion": first.ref}
    assert not torch.equal(
        second.load_tensors("raw.safetensors")["final_layer.linear.weight"],
        first.load_tensors("raw.safetensors")["final_layer.linear.weight"],
    )  # and it trained on

    with pytest.raises(ValueError, match="continue with the same model settings"):
        diffusion.run(
            dit_config(
                tmp_path / "c", store_with_cache, "trainer.max_steps=2", "model.depth=3", f"init_from={first.ref}"
            ),
            store,
        )
    elsewhere = store.save(
        "diffusion",
        tensors={"raw.safetensors": {"w": torch.zeros(1)}},
        config=to_dict(config),
        parents={"latents": "latents@0123456789ab"},
    )
    try:
        with pytest.raises(ArtifactError, match="another cache is another latent space"):
            diffusion.run(
                dit_config(tmp_path / "d", store_with_cache, "trainer.max_steps=2", f"init_from={elsewhere.ref}"), store
            )
    finally:  # the store is the module's: leave no stand-in behind for the other tests' listings
        shutil.rmtree(elsewhere.path)


@pytest.mark.slow
@needs_fmnist
def test_a_cache_from_another_autoencoder_is_refused(tmp_path, store_with_cache):
    store = store_with_cache[0]
    other = store.save("autoencoder", tensors={"weights.safetensors": {"w": torch.zeros(1)}}, config={"model": {}})
    config = dit_config(tmp_path, store_with_cache, f"autoencoder={other.ref}")
    with pytest.raises(ArtifactError, match=f"encoded by {store_with_cache[1].ref}, not by {other.ref}"):
        diffusion.run(config, store)


@pytest.mark.slow
@needs_fmnist
def test_a_model_that_does_not_fit_the_cache_is_refused(tmp_path, store_with_cache):
    config = dit_config(tmp_path, store_with_cache, "model.input_size=16")
    with pytest.raises(ValueError, match="8x8 latents but the model expects 4x16x16"):
        diffusion.run(config, store_with_cache[0])


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lightning.pytorch.callbacks import Callback
    from safetensors.torch import save_file
    from ldm.artifacts import ArtifactStore
    from ldm.config import load_config
    from stages import diffusion

    store, cache, out, config_path = sys.argv[1:5]
    torch.set_num_threads(1)

    class DumpWeights(Callback):
        def on_train_end(self, trainer, module):
            weights = {k: v.detach().clone().contiguous() for k, v in module.model.state_dict().items()}
            save_file(weights, f"{out}/rank{trainer.global_rank}.safetensors")

    config = load_config(diffusion.DiffusionStageConfig, config_path, sys.argv[5:] + [f"latents={cache}"])
    diffusion.run(config, ArtifactStore(store), callbacks=[DumpWeights()])
    """
)


@pytest.mark.slow
@needs_fmnist
def test_two_process_cpu_ddp_leaves_identical_weights_on_both_ranks(tmp_path, store_with_cache):
    store, _, cache = store_with_cache
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    overrides = [
        *TINY_DIT,
        "trainer.max_steps=2",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        f"run_dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(store.root),
            cache.ref,
            str(tmp_path),
            str(ROOT / "configs/fmnist/diffusion-quick.yaml"),
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    trained = [a for a in store.list("diffusion") if a.manifest["training"]["run_dir"] == str(tmp_path / "run")]
    assert len(trained) == 1 and trained[0].manifest["training"]["steps"] == 2


@pytest.mark.slow
@needs_fmnist
def test_meanflow_trains_from_scratch_and_samples_in_one_and_two_calls(tmp_path, store_with_cache):
    store = store_with_cache[0]
    config = dit_config(
        tmp_path,
        store_with_cache,
        "trainer.max_steps=150",
        "diffusion.objective=meanflow",
        "model.interval_embed=true",
        "model.time_input_scale=0.001",
        "preview.sampling.num_steps=1",
    )
    artifact = diffusion.run(config, store)
    mse = [v for _, v in read_metrics(tmp_path / "run")["train/mse"]]
    assert np.mean(mse[-30:]) < 0.8 * np.mean(mse[:10])
    from pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_artifacts(artifact.ref, store=store)
    assert pipe.settings().sampler == "meanflow"
    calls = []
    images = pipe.sample([0, 1, 2], num_steps=1, guidance_scale=1.0, on_model_call=lambda: calls.append(1))
    assert images.shape[0] == 3 and torch.isfinite(images).all() and len(calls) == 1
    two = pipe.sample([0, 1, 2], num_steps=2, guidance_scale=2.0)
    assert not torch.equal(two, images)


def test_meanflow_objective_and_interval_embedding_go_together(tmp_path):
    store_with_cache = (
        None,
        None,
        SimpleNamespace(ref="latents@0123456789ab"),
    )  # settings alone: nothing reads the cache
    with pytest.raises(ValueError, match="interval_embed"):
        dit_config(tmp_path, store_with_cache, "diffusion.objective=meanflow")
    with pytest.raises(ValueError, match="interval_embed"):
        dit_config(tmp_path, store_with_cache, "model.interval_embed=true")
    with pytest.raises(ValueError, match="time_input_scale 1 with objective 'meanflow'"):
        dit_config(tmp_path, store_with_cache, "diffusion.objective=meanflow", "model.interval_embed=true")


def test_adamw_betas_come_from_the_config_and_bad_ones_are_refused():
    def module(*extra):
        config = load_config(
            diffusion.DiffusionStageConfig, ROOT / "configs/fmnist/diffusion-quick.yaml", [*TINY_DIT, *extra]
        )
        return diffusion.DiffusionModule(config, lineage={})

    assert module().configure_optimizers()["optimizer"].defaults["betas"] == (0.9, 0.999)
    assert module("betas=[0.9,0.95]").configure_optimizers()["optimizer"].defaults["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match=r"betas must be two AdamW decay rates in \[0, 1\)"):
        module("betas=[0.9,1.5]")


@pytest.mark.slow
@needs_fmnist
def test_init_from_a_dit_stored_before_newer_model_settings_is_accepted(tmp_path, store_with_cache):
    store, _, cache = store_with_cache
    config = dit_config(tmp_path / "a", store_with_cache, "init_from=diffusion@latest")
    stored = to_dict(config)
    stored["model"] = {k: v for k, v in stored["model"].items() if k not in ("frames", "time_patch_size", "attention")}
    older = store.save(
        "diffusion",
        tensors={"raw.safetensors": {"w": torch.zeros(1)}, "weights.safetensors": {"w": torch.zeros(1)}},
        config=stored,
        parents={"latents": cache.ref},
    )
    try:
        assert diffusion.starting_point(store, replace(config, init_from=older.ref), cache.ref).ref == older.ref
    finally:  # the store is the module's: leave no stand-in behind for the other tests' listings
        shutil.rmtree(older.path)
