"""Hostile input and faults: each gives one clear error (no traceback) and loses nothing, or is handled correctly.

Sections follow the cases of the review: checkpoints that would run code, the artifact store's
manifests, untrained artifacts, --resume with changed settings, unreadable data, non-finite stops
and exact resume, sampling options, input ranges, output folders and streamed writes.
"""

import ast
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from lightning.pytorch.callbacks import Callback
from PIL import Image

from conftest import needs_fmnist
from ldm.artifacts import ArtifactError, ArtifactStore
from ldm.config import ConfigError, dump_yaml, load_config
from ldm.generation import SamplingSettings, sample_latents
from ldm.models.dit import DiT
from ldm.training import AtomicCheckpointIO, CheckpointError, check_resume_config, lr_factor, read_metrics
from pipeline import LatentDiffusionPipeline
from stages import autoencoder
from stages.cli import main
from stages.sample import write_samples
from test_pipeline import DIFFUSION, DIT, save_autoencoder, save_dit
from test_stage_autoencoder import TINY

ROOT = Path(__file__).resolve().parent.parent
QUICK = str(ROOT / "configs/fmnist/autoencoder-quick.yaml")
GAN = ["loss.disc_enabled=true", "loss.disc_start=0", "loss.discriminator.in_channels=1"]


class RunsCodeWhenUnpickled:
    """Unpickling this creates the file `path`: a stand-in for any code a pickle can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class CrashAt(Callback):
    """Raises at the start of batch `step`, as a killed process would stop there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.step == self.step:
            raise RuntimeError("simulated crash")


class PoisonWeightsAt(Callback):
    """Makes the decoder's output NaN at batch `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.step == self.step:
            module.autoencoder.decoder.conv_out.weight.data.fill_(math.nan)


def config_of(run_dir: Path, *extra: str):
    return load_config(autoencoder.AutoencoderStageConfig, QUICK, [*TINY, f"run_dir={run_dir}", *extra])


def cli(store, *args: str):
    """Run `ldm --store STORE ARGS` in-process; `store` is a folder or an ArtifactStore."""
    return CliRunner().invoke(main, ["--store", str(getattr(store, "root", store)), *args])


def train_cli(store: Path, run_dir: Path, *overrides: str, resume: bool = False, extra: tuple[str, ...] = ()):
    args = ["train", "autoencoder", "--config", QUICK, "--run-dir", str(run_dir)]
    args += [arg for item in (*TINY, *overrides) for arg in ("--set", item)]
    return cli(store, *args, *(["--resume"] if resume else []), *extra)


def assert_clean_failure(result, *phrases: str) -> None:
    """A non-zero exit with a message, and no traceback (click turns our errors into SystemExit)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"traceback reached the user: {result.exception!r}"
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


def planted_run(run_dir: Path, payload) -> Path:
    """A run folder with a valid config and `payload` saved as its last checkpoint."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config_of(run_dir)))
    torch.save(payload, run_dir / "checkpoints" / "last.ckpt")
    return run_dir / "checkpoints" / "last.ckpt"


# ---- 1. no pickle code runs from a run folder -----------------------------------------------


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


# ---- 3. nothing untrained is stored ---------------------------------------------------------


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_a_run_of_no_steps_is_refused_before_anything_is_stored(tmp_path, steps):
    result = train_cli(tmp_path / "store", tmp_path / "run", f"trainer.max_steps={steps}")
    assert_clean_failure(result, "max_steps must be >= 1", steps)
    assert not (tmp_path / "store").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, phrase", [
    ("trainer.lr=-1e-4", "lr must be a positive number"),
    ("trainer.batch_size=0", "batch_size must be >= 1"),
    ("trainer.checkpoint_every=0", "checkpoint_every must be >= 1"),
    ("trainer.grad_clip=-1", "grad_clip must be >= 0"),
])
def test_nonsense_trainer_settings_are_refused_naming_the_key(override, phrase):
    with pytest.raises(ConfigError, match=phrase):
        load_config(autoencoder.AutoencoderStageConfig, QUICK, [override])


# ---- 4. --resume compares the settings ------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step tiny autoencoder run with a checkpoint at step 4."""
    root = tmp_path_factory.mktemp("hostile-run")
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
    result = train_cli(tmp_path / "store", run_dir, "trainer.max_steps=4", "trainer.checkpoint_every=4", "model.ch=16",
                       "model.latent_channels=2", resume=True)
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
    autoencoder.run(config, ArtifactStore(tmp_path / "store"), resume=True, callbacks=[probe],
                    allow_changes=["trainer.lr"])
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


# ---- 5. unreadable data ---------------------------------------------------------------------


def test_a_corrupt_image_in_a_folder_is_one_line_naming_the_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = train_cli(tmp_path / "store", tmp_path / "run", "data.name=folder", f"data.path={folder}",
                       "trainer.max_steps=2", "train_subset=0", "trainer.batch_size=3", "preview_images=1")
    assert_clean_failure(result, f"cannot read image {folder / '1.png'}")
    assert not (tmp_path / "store" / "autoencoder").exists()


# ---- 7. non-finite stop, exact resume -------------------------------------------------------


@needs_fmnist
def test_a_non_finite_stop_before_any_checkpoint_says_none_was_written(tmp_path):
    config = config_of(tmp_path / "run", "trainer.max_steps=6", "trainer.checkpoint_every=4")
    with pytest.raises(FloatingPointError, match="No checkpoint was written yet") as err:
        autoencoder.run(config, ArtifactStore(tmp_path / "store"), callbacks=[PoisonWeightsAt(2)])
    assert "last.ckpt" not in str(err.value)


@needs_fmnist
def test_a_non_finite_stop_after_a_checkpoint_names_it(tmp_path):
    config = config_of(tmp_path / "run", "trainer.max_steps=6", "trainer.checkpoint_every=2")
    with pytest.raises(FloatingPointError, match=f"last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"):
        autoencoder.run(config, ArtifactStore(tmp_path / "store"), callbacks=[PoisonWeightsAt(3)])


@needs_fmnist
def test_crashed_and_resumed_autoencoder_logs_the_same_losses_and_ends_with_the_same_weights(tmp_path):
    # Flips, the posterior noise, the discriminator at its own learning rate and the stored EMA all take part;
    # every logged number and every stored (averaged) weight must match.
    common = ["trainer.max_steps=8", "trainer.checkpoint_every=4", "train_subset=40", "data.hflip=true", *GAN,
              "disc_lr_scale=4", "ema_decay=0.5"]
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


# ---- 2. the artifact store: edited, broken and legacy manifests -----------------------------


def save_diffusion_like(store, value=1.0, std=1.5, seconds=12.3):
    """A small artifact with the manifest fields a diffusion stage writes."""
    return store.save(
        "diffusion",
        tensors={"weights.safetensors": {"w": torch.full((2, 3), value)}},
        config={"model": {"hidden_size": 8}, "diffusion": {"objective": "ddpm"}},
        parents={"latents": "latents@0123456789ab"},
        data_fingerprint="fmnist-train",
        metadata={
            "autoencoder": "autoencoder@ba9876543210",
            "latent_stats": {"mode": "global", "mean": [0.0], "std": [std]},
            "latent_shape": [4, 8, 8],
            "num_classes": 10,
            "training": {"steps": 2, "seconds_this_run": seconds},
        },
    )


def edit_manifest(artifact, **fields):
    file = artifact.path / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest.update(fields)
    file.write_text(json.dumps(manifest, indent=2))
    return manifest


def assert_no_traceback(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("verify", [True, False])
def test_edited_latent_stats_are_refused_on_load_even_without_verifying_files(tmp_path, verify):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, latent_stats={"mode": "global", "mean": [0.0], "std": [3.0]})
    with pytest.raises(ArtifactError, match=rf"diffusion/{saved.version} is damaged: manifest.json was changed after "
                                            rf"saving .*no longer hash to its version {saved.version}.*restore the file"):
        store.load(saved.ref, verify=verify)


def test_edited_parents_are_refused_on_load(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, parents={"latents": "latents@ffffffffffff"})
    with pytest.raises(ArtifactError, match="manifest.json was changed after saving"):
        store.load(saved.ref, verify=False)


def test_edited_config_yaml_is_refused_on_load_even_without_verifying_files(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    (saved.path / "config.yaml").write_text("model:\n  hidden_size: 8\ndiffusion:\n  objective: flow\n")
    with pytest.raises(ArtifactError, match="config.yaml was changed after saving"):
        store.load(saved.ref, verify=False)
    with pytest.raises(ArtifactError, match="config.yaml was changed after saving"):
        store.load(saved.ref)


def test_removing_manifest_format_from_an_edited_manifest_does_not_pass(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    manifest = edit_manifest(saved, latent_stats={"mode": "global", "mean": [0.0], "std": [3.0]})
    del manifest["manifest_format"]
    (saved.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json was changed after saving"):
        store.load(saved.ref, verify=False)


def test_unsealed_fields_may_be_edited_by_hand(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, created="1999-01-01T00:00:00Z", training={"steps": 1}, metrics={"fid": 3.0})
    assert store.load(saved.ref).manifest["training"] == {"steps": 1}


def test_a_folder_renamed_away_from_its_version_is_damaged(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    saved.path.rename(saved.path.parent / "mymodel")
    with pytest.raises(ArtifactError, match=f"diffusion/mymodel is damaged: the folder holds version {saved.version}"):
        store.load("diffusion@mymodel")


def test_an_artifact_moved_to_another_stage_folder_is_damaged(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    (tmp_path / "latents").mkdir()
    saved.path.rename(tmp_path / "latents" / saved.version)
    with pytest.raises(ArtifactError, match="holds a diffusion artifact; move it to diffusion/"):
        store.load(f"latents@{saved.version}")


def test_same_result_saved_twice_gives_the_same_version_though_its_training_time_differs(tmp_path):
    store = ArtifactStore(tmp_path)
    first = save_diffusion_like(store, seconds=12.3)
    again = save_diffusion_like(store, seconds=45.6)
    assert again.version == first.version and len(store.list("diffusion")) == 1


def test_same_files_with_other_sealed_fields_are_another_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    first = save_diffusion_like(store, std=1.5)
    other = save_diffusion_like(store, std=3.0)
    assert other.version != first.version
    assert store.load(other.ref).manifest["latent_stats"]["std"] == [3.0]


def test_saving_the_same_result_again_replaces_a_damaged_copy(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, latent_stats={"mode": "global", "mean": [0.0], "std": [3.0]})
    again = save_diffusion_like(store)
    assert again.version == saved.version
    assert store.load(saved.ref).manifest["latent_stats"]["std"] == [1.5]


def test_metadata_may_not_overwrite_what_save_writes(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactError, match="metadata must not set parents, version"):
        store.save("diffusion", tensors={}, config={}, metadata={"version": "abc", "parents": {}})


def test_update_manifest_refuses_a_sealed_key_and_names_it(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    with pytest.raises(ArtifactError, match=f"cannot change latent_stats, parents of {saved.ref}: sealed"):
        store.update_manifest(saved, latent_stats={"std": [3.0]}, parents={}, metrics={"fid": 3.0})
    assert "metrics" not in store.load(saved.ref).manifest  # nothing was written


def test_update_manifest_writes_the_manifest_on_disk_not_an_edited_copy_in_memory(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    saved.manifest["latent_stats"] = {"std": [3.0]}
    store.update_manifest(saved, metrics={"fid": 3.0})
    loaded = store.load(saved.ref)
    assert loaded.manifest["latent_stats"]["std"] == [1.5] and loaded.manifest["metrics"] == {"fid": 3.0}


def test_list_cli_shows_good_artifacts_and_a_broken_line_for_a_non_json_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    good = save_diffusion_like(store, 1.0)
    bad = save_diffusion_like(store, 2.0)
    (bad.path / "manifest.json").write_text("{ not json")
    result = cli(store, "artifacts", "list")
    assert_no_traceback(result)
    assert result.exit_code == 0
    assert good.ref in result.output
    assert f"BROKEN diffusion/{bad.version}: manifest.json cannot be read as JSON" in result.output
    assert store.list() == [store.load(good.ref)]


def test_list_cli_survives_unsealed_fields_of_any_type(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, created=None, metrics=[1, 2])
    result = cli(store, "artifacts", "list")
    assert_no_traceback(result)
    assert result.exit_code == 0 and saved.ref in result.output


def test_resolve_by_prefix_names_a_folder_without_manifest_as_damaged(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    (saved.path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=f"diffusion/{saved.version} is damaged: no manifest.json in the folder; "
                                            "delete the folder or restore the file"):
        store.resolve(f"diffusion@{saved.version[:6]}")


def test_latest_with_only_a_broken_folder_says_damaged_not_missing(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    (saved.path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=f"every diffusion folder .* is damaged: diffusion/{saved.version}") as err:
        store.load("diffusion@latest")
    assert "no diffusion artifacts" not in str(err.value)


def test_latest_picks_a_sound_artifact_over_a_newer_damaged_one(tmp_path):
    store = ArtifactStore(tmp_path)
    old = save_diffusion_like(store, 1.0)
    store.update_manifest(old, created="2000-01-01T00:00:00Z")
    newer = save_diffusion_like(store, 2.0)
    edit_manifest(newer, num_classes=3)
    assert store.load("diffusion@latest").version == old.version


def test_show_cli_on_a_broken_artifact_is_a_clean_error(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, num_classes=3)
    result = cli(store, "artifacts", "show", saved.ref, "--no-verify")
    assert_no_traceback(result)
    assert result.exit_code == 1 and "manifest.json was changed after saving" in result.output


def test_verify_cli_says_ok_and_exits_0_for_a_sound_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    result = cli(store, "artifacts", "verify", saved.ref)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == [saved.ref, "ok"]
    assert "1 checked" in result.output and "1 ok, 0 legacy, 0 failed" in result.output


def test_verify_cli_fails_with_exit_1_for_an_edited_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, latent_stats={"mode": "global", "mean": [0.0], "std": [3.0]})
    result = cli(store, "artifacts", "verify", saved.ref)
    assert_no_traceback(result)
    assert result.exit_code == 1
    assert f"diffusion/{saved.version}" in result.output and "FAILED: manifest.json was changed after saving" in result.output


def test_verify_cli_without_ref_reports_every_folder_and_exits_1_when_one_failed(tmp_path):
    store = ArtifactStore(tmp_path)
    good = save_diffusion_like(store, 1.0)
    corrupt = save_diffusion_like(store, 2.0)
    broken = save_diffusion_like(store, 3.0)
    weights = corrupt.path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    (broken.path / "manifest.json").unlink()
    result = cli(store, "artifacts", "verify")
    assert_no_traceback(result)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"{good.ref} ok" in [" ".join(line.split()) for line in lines]
    assert any(line.startswith(corrupt.ref) and "FAILED: checksum mismatch" in line for line in lines)
    assert any(line.startswith(f"diffusion/{broken.version}") and "FAILED: no manifest.json" in line for line in lines)
    assert lines[-1].startswith("3 checked") and lines[-1].endswith("1 ok, 0 legacy, 2 failed")


def test_legacy_manifest_with_the_files_only_version_loads_and_verify_says_legacy(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    manifest = json.loads((saved.path / "manifest.json").read_text())
    del manifest["manifest_format"]
    # The version before manifests were sealed: sha256 over the files' sorted "name:sha256" lines alone.
    lines = "".join(f"{name}:{info['sha256']}\n" for name, info in sorted(manifest["files"].items()))
    manifest["version"] = hashlib.sha256(lines.encode()).hexdigest()[:12]
    (saved.path / "manifest.json").write_text(json.dumps(manifest))
    legacy_path = saved.path.rename(saved.path.parent / manifest["version"])
    loaded = store.load(f"diffusion@{manifest['version']}")
    assert loaded.path == legacy_path and not loaded.sealed
    result = cli(store, "artifacts", "verify")
    assert result.exit_code == 0, result.output
    assert "legacy: manifest fields not sealed" in result.output and "0 ok, 1 legacy, 0 failed" in result.output


# ---- 5, 6, 8. sampling: options, input ranges, output folders, streaming ---------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with a random autoencoder and a random DiT of its latents (no data needed)."""
    store = ArtifactStore(tmp_path_factory.mktemp("hostile") / "store")
    save_dit(store, DIT, DIFFUSION, 2, save_autoencoder(store, 0).ref)
    return store


@pytest.fixture(scope="module")
def pipe(store):
    return LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=store)


def images_in(folder):
    return sorted(p.name for p in (folder / "images").iterdir())


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


# ----------------------------------------------------------------------------- sampling options


def test_pipeline_refuses_zero_steps(pipe):
    with pytest.raises(ValueError, match=r"num_steps \(--steps\) must be an integer >= 1, got 0"):
        pipe.sample([1, 2], num_steps=0)


def test_sample_latents_refuses_zero_steps_so_every_caller_does():
    model = DiT(DIT).eval()  # training previews call sample_latents directly
    with pytest.raises(ValueError, match=r"num_steps .* >= 1, got 0"):
        sample_latents(model, DIFFUSION, torch.tensor([0]), SamplingSettings(num_steps=0))


def test_sample_command_refuses_zero_steps_before_loading_a_model(tmp_path, store):
    result = cli(store, "sample", "--model", "diffusion@no-such-version", "--steps", "0", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "--steps", "got 0")
    assert not (tmp_path / "out").exists()


def test_eval_samples_command_refuses_zero_steps_before_loading_a_model(tmp_path, store):
    result = cli(store, "eval", "samples", "--model", "diffusion@no-such-version", "--steps", "0", "--out", str(tmp_path))
    assert_clean_failure(result, "--steps", "got 0")


def test_pipeline_refuses_negative_guidance(pipe):
    with pytest.raises(ValueError, match=r"guidance_scale \(--cfg\) must be a finite number >= 0 .*got -1"):
        pipe.sample([1], num_steps=2, guidance_scale=-1.0)
    with pytest.raises(ValueError, match=r"guidance_scale .* got nan"):
        pipe.sample([1], num_steps=2, guidance_scale=float("nan"))


def test_guidance_zero_is_the_unconditional_model(pipe):
    assert pipe.sample([1, 2], num_steps=2, guidance_scale=0.0).shape == (2, 1, 32, 32)


def test_sample_command_refuses_negative_cfg_and_guide_scale(tmp_path, store):
    assert_clean_failure(cli(store, "sample", "--cfg", "-2", "--out", str(tmp_path / "a")), "--cfg", "got -2")
    assert_clean_failure(cli(store, "sample", "--guide-scale", "-1", "--out", str(tmp_path / "b")), "--guide-scale", "got -1")


def test_img2img_refuses_a_strength_outside_zero_one(pipe):
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\].*got 1.5"):
        pipe.img2img(torch.zeros(1, 1, 32, 32), strength=1.5, class_labels=[0], num_steps=2)


def test_pipeline_refuses_a_reversed_guidance_interval(pipe):
    with pytest.raises(ValueError, match=r"reversed.*--cfg-interval 100 500"):
        pipe.sample([1], num_steps=2, guidance_scale=2.0, guidance_interval=(500, 100))


# ----------------------------------------------------------------------------- images and masks


def test_img2img_refuses_images_in_0_255_naming_the_range_and_the_fix(pipe):
    images = torch.zeros(2, 1, 32, 32)
    images[0, 0, 0, 0] = 255.0
    with pytest.raises(ValueError, match=r"images must be in \[-1, 1\].*got values in \[0, 255\].*x / 127.5 - 1"):
        pipe.img2img(images, strength=0.5, class_labels=[0, 1], num_steps=2)


def test_encode_refuses_images_outside_minus_one_one(pipe):
    with pytest.raises(ValueError, match=r"got values in \[-3, 0\]: rescale them into \[-1, 1\]"):
        pipe.encode(torch.linspace(-3, 0, 1024).view(1, 1, 32, 32))


def test_encode_refuses_non_finite_images(pipe):
    images = torch.zeros(1, 1, 32, 32)
    images[0, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in images"):
        pipe.encode(images)


def test_inpaint_refuses_images_in_0_255(pipe):
    images = torch.full((1, 1, 32, 32), 200.0)
    with pytest.raises(ValueError, match=r"got values in \[200, 200\].*x / 127.5 - 1"):
        pipe.inpaint(images, torch.ones(1, 1, 32, 32), [0], num_steps=2)


def test_inpaint_refuses_a_mask_outside_zero_one_naming_the_range(pipe):
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 255.0
    with pytest.raises(ValueError, match=r"mask must be in \[0, 1\].*got values in \[0, 255\].*x / 255"):
        pipe.inpaint(torch.zeros(1, 1, 32, 32), mask, [0], num_steps=2)
    with pytest.raises(ValueError, match=r"mask must be in \[0, 1\].*got values in \[-1, 1\]"):
        pipe.inpaint(torch.zeros(1, 1, 32, 32), mask.clamp(max=1) * 2 - 1, [0], num_steps=2)


def test_inputs_off_by_float_round_off_are_accepted_and_the_result_stays_in_range(pipe):
    images = torch.linspace(-1.0005, 1.0005, 1024).view(1, 1, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1.0005
    out = pipe.inpaint(images, mask, [0], num_steps=2)
    assert out.min() >= -1 and out.max() <= 1


# ----------------------------------------------------------------------------- the output folder


def test_sample_command_refuses_an_out_that_is_a_file_before_sampling(tmp_path, store, monkeypatch):
    calls = []
    monkeypatch.setattr(LatentDiffusionPipeline, "sample", lambda *args, **kwargs: calls.append(1))
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert_clean_failure(cli(store, "sample", "--n", "2", "--steps", "2", "--out", str(target)), "is a file, not a folder")
    assert calls == [] and target.read_text() == "mine"


def test_sample_command_refuses_a_folder_holding_earlier_samples(tmp_path, store):
    out = tmp_path / "out"
    assert cli(store, "sample", "--n", "2", "--steps", "2", "--out", str(out)).exit_code == 0
    before = (out / "samples.json").read_bytes()
    assert_clean_failure(cli(store, "sample", "--n", "3", "--steps", "2", "--out", str(out)), "already holds samples", "--overwrite")
    assert (out / "samples.json").read_bytes() == before and images_in(out) == ["000000-class0.png", "000001-class1.png"]


def test_overwrite_replaces_earlier_samples_and_leaves_other_files(tmp_path, store):
    out = tmp_path / "out"
    assert cli(store, "sample", "--n", "4", "--steps", "2", "--out", str(out)).exit_code == 0
    (out / "notes.txt").write_text("mine")
    (out / "images" / "cover.png").write_bytes(b"not ours")
    result = cli(store, "sample", "--n", "2", "--steps", "2", "--seed", "7", "--overwrite", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert images_in(out) == ["000000-class0.png", "000001-class1.png", "cover.png"]  # 000002, 000003 are gone
    assert (out / "notes.txt").read_text() == "mine" and (out / "images" / "cover.png").read_bytes() == b"not ours"
    report = json.loads((out / "samples.json").read_text())
    assert report["n"] == 2 and report["seed"] == 7 and report["complete"]


# ----------------------------------------------------------------------------- streaming


def test_a_run_stopped_after_the_first_batch_keeps_its_images_and_an_incomplete_report(tmp_path, store, monkeypatch):
    sample = LatentDiffusionPipeline.sample
    calls = []

    def interrupted_after_one_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(LatentDiffusionPipeline, "sample", interrupted_after_one_batch)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_samples(store, "diffusion@latest", SamplingSettings(num_steps=2, batch_size=2), n=6, out_dir=out)
    assert images_in(out) == ["000000-class0.png", "000001-class1.png"]
    report = json.loads((out / "samples.json").read_text())
    assert report["complete"] is False and report["sampled"] == 2 and report["labels"] == [0, 1] and report["n"] == 6
    assert not (out / "grid.png").exists()


def test_streamed_images_do_not_depend_on_the_batch_size(tmp_path, store):
    by_two = write_samples(store, "diffusion@latest", SamplingSettings(num_steps=3, seed=4, batch_size=2), n=5, classes="3,8",
                           out_dir=tmp_path / "two")
    by_five = write_samples(store, "diffusion@latest", SamplingSettings(num_steps=3, seed=4, batch_size=5), n=5, classes="3,8",
                            out_dir=tmp_path / "five")
    assert by_two["complete"] and by_two["sampled"] == 5 and by_two["labels"] == by_five["labels"] == [3, 8, 3, 8, 3]
    assert images_in(tmp_path / "two") == images_in(tmp_path / "five")
    for name in ["grid.png", *(f"images/{image}" for image in images_in(tmp_path / "two"))]:
        # image i draws from seed + i alone; the same floats up to round-off, so at most one grey level apart
        assert np.abs(pixels(tmp_path / "two" / name) - pixels(tmp_path / "five" / name)).max() <= 1, name


def test_the_grid_of_a_large_run_holds_whole_rows_of_classes(tmp_path, store):
    write_samples(store, "diffusion@latest", SamplingSettings(num_steps=1, batch_size=130), n=260, out_dir=tmp_path,
                  single_images=False)
    # 260 > 256 images: the first 250 (25 per class), one row per class, 2x upscaled
    assert Image.open(tmp_path / "grid.png").size == (2 * (25 * 34 + 2), 2 * (10 * 34 + 2))
