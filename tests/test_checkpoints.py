"""Checkpoints and resume: no pickle code runs from a run folder, a corrupt checkpoint is named, --resume
compares the settings, a non-finite stop names the last good checkpoint and a crashed run resumes exactly."""

import ast
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from conftest import AUTOENCODER_QUICK, ROOT, TINY_AUTOENCODER, CrashAt, assert_clean_failure, needs_fmnist, train_cli
from ldm.artifacts import ArtifactStore
from ldm.config import dump_yaml, load_config
from ldm.training import AtomicCheckpointIO, CheckpointError, check_resume_config, lr_factor, read_metrics
from stages import autoencoder

GAN = ["loss.disc_enabled=true", "loss.disc_start=0", "loss.discriminator.in_channels=1"]


class RunsCodeWhenUnpickled:
    """Unpickling this creates the file `path`: a stand-in for any code a pickle can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class PoisonWeightsAt(Callback):
    """Makes the decoder's output NaN at batch `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.step == self.step:
            module.autoencoder.decoder.conv_out.weight.data.fill_(math.nan)


def config_of(run_dir: Path, *extra: str):
    """The quick autoencoder preset with TINY_AUTOENCODER and `extra`, training into `run_dir`."""
    return load_config(
        autoencoder.AutoencoderStageConfig, AUTOENCODER_QUICK, [*TINY_AUTOENCODER, f"run_dir={run_dir}", *extra]
    )


def planted_run(run_dir: Path, payload) -> Path:
    """A run folder with a valid config and `payload` saved as its last checkpoint."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config_of(run_dir)))
    torch.save(payload, run_dir / "checkpoints" / "last.ckpt")
    return run_dir / "checkpoints" / "last.ckpt"


# ---- no pickle code runs from a run folder --------------------------------------------------


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 1, "state_dict": {}, "x": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match=f"refusing to load {path}"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def test_resume_from_a_planted_pickle_fails_cleanly_runs_nothing_and_writes_nothing(tmp_path):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    checkpoint = planted_run(run_dir, {"global_step": 2, "x": RunsCodeWhenUnpickled(marker)})
    config_before = (run_dir / "config.yaml").read_text()
    result = train_cli(tmp_path / "store", run_dir, resume=True)
    assert_clean_failure(result, "refusing to load", str(checkpoint))
    assert not marker.exists()
    assert not (tmp_path / "store" / "autoencoder").exists()
    assert not list((run_dir / "logs").glob("part*")), "a failed start left a log folder"
    assert (run_dir / "config.yaml").read_text() == config_before


def test_a_truncated_checkpoint_is_named_as_corrupt(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(path)


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            yield owner, node.func.attr, node


def test_no_code_loads_a_pickle_every_torch_load_is_weights_only():
    offenders = []
    files = [ROOT / "pipeline.py", *[p for d in ("ldm", "stages", "bench", "tests") for p in (ROOT / d).rglob("*.py")]]
    for path in files:
        for owner, attr, node in _torch_load_calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "pickle" and attr in ("load", "loads", "Unpickler"):
                offenders.append(f"{where} pickle.{attr}")
            if owner == "torch" and attr == "load":
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{where} torch.load without weights_only=True")
    assert not offenders, offenders


# ---- --resume compares the settings ---------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step tiny autoencoder run with a checkpoint at step 4."""
    root = tmp_path_factory.mktemp("finished-run")
    config = config_of(root / "run", "trainer.max_steps=4", "trainer.checkpoint_every=4")
    autoencoder.run(config, ArtifactStore(root / "store"))
    return root


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished_run / "run", tmp_path / "run")
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    config["run_dir"] = str(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path / "run"


@needs_fmnist
def test_resume_with_another_model_is_refused_listing_the_keys_and_writes_nothing(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    parts = sorted(p.name for p in (run_dir / "logs").iterdir())
    result = train_cli(
        tmp_path / "store",
        run_dir,
        "trainer.max_steps=4",
        "trainer.checkpoint_every=4",
        "model.ch=16",
        "model.latent_channels=2",
        resume=True,
    )
    assert_clean_failure(result, "model.ch: 8 -> 16", "model.latent_channels: 8 -> 2", "another --run-dir")
    assert (run_dir / "config.yaml").read_text() == before
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == parts
    assert not (run_dir / "resumes.json").exists()


@needs_fmnist
def test_a_changed_learning_rate_needs_the_flag_then_is_used_and_recorded(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    settings = ["trainer.max_steps=5", "trainer.checkpoint_every=4", "trainer.lr=1e-5"]
    refused = train_cli(tmp_path / "store", run_dir, *settings, resume=True)
    assert_clean_failure(refused, "trainer.lr: ", "--allow-change trainer.lr")

    class SeeLearningRate(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.lrs = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]

    probe = SeeLearningRate()
    config = config_of(run_dir, *settings)
    autoencoder.run(
        config, ArtifactStore(tmp_path / "store"), resume=True, callbacks=[probe], allow_changes=["trainer.lr"]
    )
    # Step 4 of the preset's warm-up: the new base rate times the schedule's factor there.
    expected = 1e-5 * lr_factor(4, config.trainer.warmup_steps, 5, config.lr_schedule)
    assert probe.lrs and all(lr == pytest.approx(expected) for lr in probe.lrs)
    history = json.loads((run_dir / "resumes.json").read_text())
    assert history[-1]["changes"]["trainer.lr"]["to"] == pytest.approx(1e-5)
    assert history[-1]["changes"]["trainer.max_steps"] == {"from": 4, "to": 5}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["lr"] == pytest.approx(1e-5)


def test_a_setting_added_since_the_run_began_counts_as_its_default_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    planted_run(run_dir, {"global_step": 0})
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    del stored["trainer"]["logger"]  # a run started before trainer.logger existed
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    assert check_resume_config(run_dir, config_of(run_dir)) == {}
    changed = check_resume_config(run_dir, config_of(run_dir, "trainer.logger=tensorboard"))
    assert changed == {"trainer.logger": ("csv", "tensorboard")}


def test_allow_change_of_a_key_that_may_not_change_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    planted_run(run_dir, {"global_step": 0})
    result = train_cli(tmp_path / "store", run_dir, resume=True, extra=("--allow-change", "model.ch"))
    assert_clean_failure(result, "--allow-change model.ch", "only trainer.lr")


# ---- non-finite stop, exact resume ----------------------------------------------------------


@needs_fmnist
def test_a_non_finite_stop_before_any_checkpoint_says_none_was_written(tmp_path):
    config = config_of(tmp_path / "run", "trainer.max_steps=6", "trainer.checkpoint_every=4")
    with pytest.raises(FloatingPointError, match="No checkpoint was written yet") as err:
        autoencoder.run(config, ArtifactStore(tmp_path / "store"), callbacks=[PoisonWeightsAt(2)])
    assert "last.ckpt" not in str(err.value)


@needs_fmnist
def test_a_non_finite_stop_after_a_checkpoint_names_it(tmp_path):
    config = config_of(tmp_path / "run", "trainer.max_steps=6", "trainer.checkpoint_every=2")
    with pytest.raises(
        FloatingPointError, match=f"last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"
    ):
        autoencoder.run(config, ArtifactStore(tmp_path / "store"), callbacks=[PoisonWeightsAt(3)])


@pytest.mark.slow
@needs_fmnist
def test_crashed_and_resumed_autoencoder_logs_the_same_losses_and_ends_with_the_same_weights(tmp_path):
    # Flips, the posterior noise, the discriminator at its own learning rate and the stored EMA all take part;
    # every logged number and every stored (averaged) weight must match.
    common = [
        "trainer.max_steps=8",
        "trainer.checkpoint_every=4",
        "train_subset=40",
        "data.hflip=true",
        *GAN,
        "disc_lr_scale=4",
        "ema_decay=0.5",
    ]
    store = ArtifactStore(tmp_path / "store")
    straight = autoencoder.run(config_of(tmp_path / "a", *common), store)

    config = config_of(tmp_path / "b", *common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        autoencoder.run(config, store, callbacks=[CrashAt(6)])
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * 4
    resumed = autoencoder.run(config, store, resume=True)

    logged_a, logged_b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert logged_a.keys() == logged_b.keys() and "train/d" in logged_a
    for name in logged_a:
        assert logged_a[name] == logged_b[name], f"{name} differs after resume"
    a, b = straight.load_tensors(), resumed.load_tensors()
    assert all(torch.equal(a[key], b[key]) for key in a)
