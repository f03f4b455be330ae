"""Depth pruning: the kept blocks unchanged, the greedy choice, the recovery loss, and the stage end to end."""

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_DIT, needs_fmnist
from ldm.artifacts import ArtifactError
from ldm.config import load_config
from ldm.diffusion.schedules import DiffusionConfig
from ldm.loading import load_dit
from ldm.models.dit import DiT, DiTConfig
from ldm.pruning import (
    PruneConfig,
    calibration_batch,
    choose_blocks,
    prune_blocks,
    recovery_losses,
    removal_distance,
    uniform_blocks,
)
from ldm.training import read_metrics
from stages import diffusion, prune

FLOW = DiffusionConfig(objective="flow", learn_sigma=False)
SMALL = DiTConfig(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2, num_classes=10, learn_sigma=False
)


def trained_like(config=SMALL, seed=0, identity_blocks=()):
    """A DiT whose blocks all update the stream (random adaLN modulation), except `identity_blocks` (zero gates)."""
    torch.manual_seed(seed)
    model = DiT(config)
    for index, block in enumerate(model.blocks):
        if index not in identity_blocks:
            torch.nn.init.normal_(block.adaLN_modulation.weight, std=0.05)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    return model.eval()


def inputs(n=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SMALL.latent_shape, generator=generator)
    return x, torch.rand(n, generator=generator) * 1000, torch.randint(0, 10, (n,), generator=generator)


def test_pruning_keeps_the_kept_blocks_and_everything_else_identical():
    parent = trained_like()
    pruned = prune_blocks(parent, [4, 0, 2]).eval()
    assert pruned.config.depth == 3 and len(pruned.blocks) == 3
    for j, i in enumerate([0, 2, 4]):
        for (name, a), (_, b) in zip(pruned.blocks[j].state_dict().items(), parent.blocks[i].state_dict().items()):
            assert torch.equal(a, b), name
    # The pruned network computes exactly the parent with blocks 1, 3 and 5 skipped.
    x, t, y = inputs()
    with torch.no_grad():
        kept_only = pruned(x, t, y)
        target = parent(x, t, y)
    batch = type("Batch", (), {"x_t": x, "t": t, "y": y, "target": kept_only})
    assert removal_distance(parent, [1, 3, 5], batch) == pytest.approx(0.0, abs=1e-12)
    assert not torch.allclose(kept_only, target)  # and the parent itself is another function
    with torch.no_grad():
        assert torch.equal(parent(x, t, y), target)  # skipping blocks left the parent whole


def test_prune_blocks_refuses_blocks_outside_the_parent_or_named_twice():
    with pytest.raises(ValueError, match="distinct blocks of 0..5"):
        prune_blocks(trained_like(), [0, 6])
    with pytest.raises(ValueError, match="distinct blocks"):
        prune_blocks(trained_like(), [1, 1])


def test_greedy_choice_removes_the_blocks_that_change_the_output_least():
    parent = trained_like(identity_blocks=(0, 2, 3))  # zero-gated blocks: removing them changes nothing
    x, t, y = inputs(8)
    batch = calibration_batch(parent, x, y, FLOW, None, torch.Generator().manual_seed(0))
    keep, rounds = choose_blocks(parent, 3, batch)
    assert keep == [1, 4, 5]
    assert [r["distance"] for r in rounds] == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    assert all(len(r["candidates"]) == 6 - k for k, r in enumerate(rounds))
    assert rounds[0]["candidates"][1] > 0


def test_uniform_choice_keeps_the_first_and_last_blocks():
    assert uniform_blocks(6, 3) == [0, 2, 5] and uniform_blocks(12, 4) == [0, 4, 7, 11] and uniform_blocks(6, 1) == [5]


def test_recovery_loss_is_the_output_distance_and_trains_only_the_pruned_network():
    parent = trained_like()
    pruned = prune_blocks(parent, [0, 1, 2]).train()
    x0, _, y = inputs(6)
    config = PruneConfig(task_weight=0.5, feature_weight=0.1)
    losses = recovery_losses(pruned, parent, x0, y, FLOW, config, generator=torch.Generator().manual_seed(3))
    # The same draws by hand: noise first, then t, as the loss draws them.
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=generator)
    from ldm.diffusion.objectives import flow_sample_t

    t = flow_sample_t(6, FLOW, generator, x0.device)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        expected = ((pruned(x_t, t * 1000, y) - parent(x_t, t * 1000, y)) ** 2).mean(dim=(1, 2, 3))
        task = ((pruned(x_t, t * 1000, y) - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["output"], expected)
    torch.testing.assert_close(losses["task"], task)
    assert losses["feature"].shape == (6,) and (losses["feature"] > 0).all()
    torch.testing.assert_close(losses["loss"], expected + 0.5 * task + 0.1 * losses["feature"])
    losses["loss"].mean().backward()
    assert all(p.grad is None for p in parent.parameters())
    assert pruned.blocks[0].attn.qkv.weight.grad is not None


def test_prune_config_refuses_contradictions():
    with pytest.raises(ValueError, match="names a block twice"):
        PruneConfig(keep=[1, 1])
    with pytest.raises(ValueError, match="set one of them"):
        PruneConfig(depth=2, keep=[0, 1, 2])
    with pytest.raises(ValueError, match="not all 0"):
        PruneConfig(output_weight=0.0)
    with pytest.raises(ValueError, match="keeps 1 to 5"):
        PruneConfig(depth=6).target_depth(6)


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def parent(store_with_cache, tmp_path_factory):
    """A briefly trained 4-block rectified-flow DiT on the fixture's cache."""
    store, _, cache = store_with_cache
    root = tmp_path_factory.mktemp("parent")
    config = load_config(
        diffusion.DiffusionStageConfig,
        ROOT / "configs/fmnist/diffusion-fast.yaml",
        [*TINY_DIT, "model.depth=4", f"latents={cache.ref}", f"run_dir={root / 'run'}", "trainer.max_steps=40"],
    )
    return diffusion.run(config, store)


def prune_config(tmp_path, parent, *extra):
    return load_config(
        prune.PruneStageConfig,
        ROOT / "configs/fmnist/prune.yaml",
        [
            f"parent={parent.ref}",
            "trainer.batch_size=32",
            "trainer.log_every=1",
            "trainer.image_every=0",
            "trainer.progress=false",
            "trainer.warmup_steps=5",
            "trainer.lr=2e-3",
            "prune.calibration_size=64",
            f"run_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


@pytest.mark.slow
@needs_fmnist
def test_a_pruned_dit_recovers_loads_samples_and_names_its_parent(tmp_path, store_with_cache, parent):
    store = store_with_cache[0]
    artifact = prune.run(prune_config(tmp_path, parent, "trainer.max_steps=50"), store)
    record = artifact.manifest["pruning"]
    assert artifact.parents == {"latents": parent.parents["latents"], "diffusion": parent.ref}
    assert record["parent"] == parent.ref and record["choice"] == "greedy" and len(record["rounds"]) == 2
    assert len(record["kept_blocks"]) == 2 and sorted(record["kept_blocks"] + record["removed_blocks"]) == [0, 1, 2, 3]
    output = [v for _, v in read_metrics(tmp_path / "run")["train/output"]]
    assert np.mean(output[-10:]) < 0.8 * np.mean(output[:10])  # it learns its parent's output on real latents
    model = load_dit(artifact)
    assert model.config.depth == 2 and model.config.class_dropout_prob == load_dit(parent).config.class_dropout_prob
    from pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_artifacts(artifact.ref, store=store)
    images = pipe.sample([0, 1, 2], num_steps=2, guidance_scale=2.0)
    assert images.shape[0] == 3 and torch.isfinite(images).all()


def tiny_parent(store, latents, run_dir, seed):
    config = load_config(
        diffusion.DiffusionStageConfig,
        ROOT / "configs/fmnist/diffusion-fast.yaml",
        [
            *TINY_DIT,
            "model.depth=4",
            f"latents={latents}",
            f"run_dir={run_dir}",
            "trainer.max_steps=2",
            f"trainer.seed={seed}",
        ],
    )
    return diffusion.run(config, store)


@pytest.mark.slow
@needs_fmnist
def test_prune_refuses_a_wrong_parent_on_resume_and_other_latents(tmp_path, store_with_cache, parent):
    store, ae, _ = store_with_cache
    from ldm.config import ConfigError
    from stages.encode import EncodeConfig, encode

    uniform = ("trainer.max_steps=4", "prune.importance=uniform")
    prune.run(prune_config(tmp_path, parent, *uniform), store)
    other = tiny_parent(store, parent.parents["latents"], tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match=f"parent: '{parent.ref}' -> '{other.ref}'"):
        prune.run(prune_config(tmp_path, other, "trainer.max_steps=8", "prune.importance=uniform"), store, resume=True)
    # A reference that moved between the runs: the settings read the same, the checkpoint's lineage does not.
    latest = prune_config(tmp_path / "latest", other, *uniform)
    latest.parent = "diffusion@latest"
    prune.run(latest, store)
    third = tiny_parent(store, parent.parents["latents"], tmp_path / "third", seed=2)
    latest.trainer.max_steps = 8
    with pytest.raises(ArtifactError, match=f"parent {store.load(other.ref).ref}, but {third.ref} was given"):
        prune.run(latest, store, resume=True)
    cache = encode(store, ae.ref, EncodeConfig(limit=300, batch_size=300, shard_size=300))
    with pytest.raises(ArtifactError, match="on the parent's own latents"):
        prune.run(prune_config(tmp_path / "b", parent, f"latents={cache.ref}"), store)
    with pytest.raises(ValueError, match="no model"):
        prune.run(prune_config(tmp_path / "c", parent, "model.depth=3"), store)
