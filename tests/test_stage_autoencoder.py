"""Stage 1 end to end: training, a killed-and-resumed run, the KL-f8 preset, evaluation, the CLI."""

import copy
import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from lightning.pytorch.callbacks import Callback
from PIL import Image

from conftest import TINY_AUTOENCODER, needs_fmnist, train_process_command
from ldm.artifacts import ArtifactStore
from ldm.config import from_dict, load_config, to_dict
from ldm.data import DataConfig, build_dataset, iterate_images
from ldm.loading import load_autoencoder, load_classifier
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, encoder_fingerprint
from ldm.training import read_metrics
from stages import autoencoder, classifier
from stages.cli import main
from stages.evaluate import evaluate_reconstruction

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(tmp_path, *extra):
    return load_config(
        autoencoder.AutoencoderStageConfig,
        ROOT / "configs/fmnist/autoencoder-quick.yaml",
        [*TINY_AUTOENCODER, f"run_dir={tmp_path / 'run'}", *extra],
    )


class RecordStart(Callback):
    """Records the step and optimiser state a run starts from."""

    def on_train_start(self, trainer, module):
        self.step = module.step
        # state_dict() returns the live tensors, which the next steps update in place: copy them.
        self.optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]


@pytest.mark.slow
@needs_fmnist
def test_killed_run_resumes_from_its_step_with_optimizer_and_discriminator_state(tmp_path):
    store = tmp_path / "store"
    command = train_process_command(
        store,
        tmp_path / "run",
        "trainer.max_steps=100000",
        "trainer.checkpoint_every=3",
        "loss.disc_enabled=true",
        "loss.disc_start=0",
        "loss.discriminator.in_channels=1",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    saved = None
    try:
        while time.time() < deadline and process.poll() is None:
            if checkpoint.exists():
                try:
                    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
                except Exception:  # being replaced right now
                    saved = None
                if saved is not None and saved["global_step"] >= 6:
                    break
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert saved is not None, f"no checkpoint appeared: {process.stderr.read().decode()[-2000:]}"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # the one on disk after the kill
    saved_batches = saved["global_step"] // 2  # two optimiser steps (autoencoder, discriminator) per batch
    assert saved_batches >= 3 and saved_batches % 3 == 0

    config = tiny_config(
        tmp_path,
        f"trainer.max_steps={saved_batches + 2}",
        "trainer.checkpoint_every=3",
        "loss.disc_enabled=true",
        "loss.disc_start=0",
        "loss.discriminator.in_channels=1",
    )
    probe = RecordStart()
    artifact = autoencoder.run(config, ArtifactStore(store), resume=True, callbacks=[probe])

    assert probe.step == saved_batches
    for restored, stored in zip(probe.optimizer_states, saved["optimizer_states"]):
        assert restored["state"].keys() == stored["state"].keys()
        first = next(iter(stored["state"]))
        assert torch.equal(restored["state"][first]["exp_avg"], stored["state"][first]["exp_avg"])
        assert float(restored["state"][first]["step"]) == float(stored["state"][first]["step"]) > 0
    final = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert final["global_step"] == 2 * (saved_batches + 2)
    assert artifact.manifest["training"]["steps"] == saved_batches + 2
    assert artifact.manifest["training"]["resumed"] is True


def test_fresh_run_refuses_a_folder_with_a_checkpoint_and_resume_needs_one(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        autoencoder.run(tiny_config(tmp_path), ArtifactStore(tmp_path / "s"), resume=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--resume"):
        autoencoder.run(tiny_config(tmp_path), ArtifactStore(tmp_path / "s"))


@pytest.mark.slow
def test_kl_f8_preset_trains_a_step_with_the_gan_on_small_random_rgb_images(tmp_path):
    folder = tmp_path / "images" / "train" / "only"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    config = load_config(
        autoencoder.AutoencoderStageConfig,
        ROOT / "configs/imagenet256/autoencoder-kl-f8.yaml",
        [
            f"data.path={tmp_path / 'images'}",
            "data.resolution=64",
            "data.num_workers=0",
            "loss.perceptual.backbone=random",
            "loss.perceptual.net=squeeze",
            "loss.disc_start=0",
            "trainer.max_steps=1",
            "trainer.batch_size=2",
            "trainer.precision=32-true",
            "trainer.progress=false",
            "trainer.image_every=0",
            "preview_images=1",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    assert (config.model.ch, config.model.ch_mult, config.model.latent_channels) == (128, (1, 2, 4, 4), 4)
    artifact = autoencoder.run(config, ArtifactStore(tmp_path / "store"))
    assert artifact.manifest["latent_shape"] == [4, 32, 32]  # at the preset's 256 px
    assert artifact.manifest["training"]["final"]["d_weight"] > 0  # the adaptive GAN weight was computed
    weights = artifact.load_tensors()
    assert sum(v.numel() for v in weights.values()) > 80e6


@pytest.mark.slow
@needs_fmnist
def test_decoder_fine_tune_with_the_gan_keeps_the_encoder_bit_exact_and_names_its_start(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    start = autoencoder.run(tiny_config(tmp_path, "trainer.max_steps=2", f"run_dir={tmp_path / 'start'}"), store)
    tuned = autoencoder.run(
        tiny_config(
            tmp_path,
            "trainer.max_steps=3",
            f"init_from={start.ref}",
            "train_parts=decoder",
            "loss.disc_enabled=true",
            "loss.disc_start=0",
            "loss.discriminator.preset=patchgan-34-small",
            f"run_dir={tmp_path / 'tuned'}",
        ),
        store,
    )
    before, after = start.load_tensors(), tuned.load_tensors()
    encoder_side = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoder_side and all(torch.equal(before[k], after[k]) for k in encoder_side)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    assert tuned.parents == {"autoencoder": start.ref}
    assert tuned.manifest["encoder_sha256"] == start.manifest["encoder_sha256"] == encoder_fingerprint(before)
    assert tuned.manifest["training"]["final"]["d_weight"] > 0  # the GAN term was on

    with pytest.raises(ValueError, match="init_from"):
        tiny_config(tmp_path, "train_parts=decoder")
    with pytest.raises(ValueError, match="same model settings"):
        autoencoder.run(
            tiny_config(tmp_path, f"init_from={start.ref}", "model.ch=16", f"run_dir={tmp_path / 'x'}"), store
        )


@pytest.mark.slow
@needs_fmnist
def test_short_training_lowers_the_loss_and_evaluation_reports_named_metrics(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    config = tiny_config(tmp_path, "trainer.max_steps=60", "trainer.lr=2e-3", "trainer.checkpoint_every=60")
    artifact = autoencoder.run(config, store)
    rec = [value for _, value in read_metrics(tmp_path / "run")["train/rec"]]
    assert np.mean(rec[-10:]) < 0.7 * np.mean(rec[:5])

    clf_config = load_config(
        classifier.ClassifierStageConfig,
        ROOT / "configs/fmnist/classifier-quick.yaml",
        ["trainer.max_steps=20", "trainer.progress=false", f"run_dir={tmp_path / 'clf'}"],
    )
    feature_classifier = classifier.run(clf_config, store)
    report = evaluate_reconstruction(
        store,
        artifact.ref,
        limit=100,
        batch_size=50,
        classifier_ref=feature_classifier.ref,
        lpips="random",
        out_dir=tmp_path / "eval",
    )
    assert report["data"]["images"] == 100
    assert 5 < report["psnr_db"] < 60 and 0 < report["ssim"] <= 1 and report["rfid"] >= 0
    assert "RANDOM" in report["lpips_backbone"]
    assert feature_classifier.ref in report["rfid_features"] and report["rfid_is_standard_fid"] is False
    assert report["encode_images_per_s"] > 0 and report["decode_images_per_s"] > 0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["psnr_db"] == report["psnr_db"]
    assert (tmp_path / "eval" / "reconstructions.png").is_file()
    stored = store.load(artifact.ref).manifest["metrics"]["recon_test"]
    assert stored["psnr_db"] == pytest.approx(report["psnr_db"])
    # Class accuracy of the first 100 test images, as they are and through the posterior mode.
    ae, clf = load_autoencoder(store.load(artifact.ref)), load_classifier(store.load(feature_classifier.ref))
    data = replace(from_dict(DataConfig, store.load(artifact.ref).config()["data"], "data"), hflip=False)
    images, labels = next(iterate_images(build_dataset(data, "test"), 100, 100))
    with torch.no_grad():
        real = (clf(images).argmax(1) == labels).float().mean().item()
        rebuilt = (clf(ae.decode(ae.encode(images).mode()).clamp(-1, 1)).argmax(1) == labels).float().mean().item()
    assert report["real_class_accuracy"] == pytest.approx(real) and report["class_accuracy"] == pytest.approx(rebuilt)
    assert (
        stored["class_accuracy"] == pytest.approx(rebuilt)
        and report["class_accuracy_classifier"] == feature_classifier.ref
    )


def test_scale_equivariance_loss_decodes_the_half_size_latent_against_the_half_size_image():
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), latent_channels=4, norm_groups=4))
    x, z = torch.rand(2, 1, 32, 32) * 2 - 1, torch.randn(2, 4, 8, 8)
    half = lambda t: t.reshape(*t.shape[:2], t.shape[2] // 2, 2, t.shape[3] // 2, 2).mean((3, 5))  # noqa: E731  2x2 means
    expected = (ae.decode(half(z)) - half(x)).abs().sum() / 2  # per image, like the reconstruction term
    assert ae.decode(half(z)).shape == (2, 1, 16, 16)
    assert autoencoder.scale_equivariance_loss(ae, x, z).item() == pytest.approx(expected.item(), rel=1e-5)
    posterior = ae.encode(x)  # through a posterior sample the term trains the encoder too
    autoencoder.scale_equivariance_loss(ae, x, posterior.sample()).backward()
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0


@needs_fmnist
def test_equivariance_weight_adds_its_logged_term_to_the_total(tmp_path):
    artifact = autoencoder.run(
        tiny_config(tmp_path, "trainer.max_steps=3", "equivariance_weight=0.5"), ArtifactStore(tmp_path / "store")
    )
    logged = read_metrics(tmp_path / "run")
    equivariance = [value for _, value in logged["train/equivariance"]]
    assert len(equivariance) == 3 and min(equivariance) > 0
    for (_, total), (_, nll), (_, kl), eq in zip(
        logged["train/total"], logged["train/nll"], logged["train/kl"], equivariance
    ):
        assert total == pytest.approx(nll + 1e-6 * kl + 0.5 * eq, rel=1e-4)
    assert artifact.config()["equivariance_weight"] == 0.5
    with pytest.raises(ValueError, match="equivariance_weight must be >= 0"):
        tiny_config(tmp_path, "equivariance_weight=-1")


class RecordLearningRates(Callback):
    """Records each optimiser's learning rate at the first batch, after every on_train_start hook."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if not hasattr(self, "lrs"):
            self.lrs = [opt.param_groups[0]["lr"] for opt in trainer.optimizers]


@needs_fmnist
def test_disc_lr_scale_gives_the_discriminator_its_own_learning_rate_in_training(tmp_path):
    gan = (
        "loss.disc_enabled=true",
        "loss.disc_start=0",
        "loss.discriminator.preset=patchgan-34-small",
        "trainer.lr=3e-4",
        "trainer.warmup_steps=0",
        "trainer.max_steps=1",
    )
    module = autoencoder.AutoencoderModule(tiny_config(tmp_path, *gan, "disc_lr_scale=4"))
    (opt_ae, opt_disc), _ = module.configure_optimizers()
    assert {id(p) for p in opt_disc.param_groups[0]["params"]} == {
        id(p) for p in module.loss.discriminator_parameters()
    }
    # In a run: the trainer's start-of-training lr reset (there for resumes) must keep the discriminator's own rate.
    probe = RecordLearningRates()
    autoencoder.run(
        tiny_config(tmp_path, *gan, "disc_lr_scale=4"), ArtifactStore(tmp_path / "store"), callbacks=[probe]
    )
    assert probe.lrs == [pytest.approx(3e-4), pytest.approx(1.2e-3)]
    default = RecordLearningRates()
    autoencoder.run(
        tiny_config(tmp_path, *gan, f"run_dir={tmp_path / 'b'}"), ArtifactStore(tmp_path / "store"), callbacks=[default]
    )
    assert default.lrs == [pytest.approx(3e-4), pytest.approx(3e-4)]  # the default: both at trainer.lr
    with pytest.raises(ValueError, match="disc_lr_scale must be > 0"):
        tiny_config(tmp_path, "disc_lr_scale=0")


class RecordDecoderOutputWeights(Callback):
    """Records the decoder's output conv weight after every batch (the iterates an EMA averages)."""

    def __init__(self):
        self.iterates = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.iterates.append(module.autoencoder.decoder.conv_out.weight.detach().clone())


@pytest.mark.slow
@needs_fmnist
def test_ema_decay_stores_the_running_average_of_a_decoder_fine_tune(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    start = autoencoder.run(tiny_config(tmp_path, "trainer.max_steps=2", f"run_dir={tmp_path / 'start'}"), store)
    probe = RecordDecoderOutputWeights()
    tuned = autoencoder.run(
        tiny_config(
            tmp_path,
            "trainer.max_steps=4",
            f"init_from={start.ref}",
            "train_parts=decoder",
            "ema_decay=0.2",
            "loss.disc_enabled=true",
            "loss.disc_start=0",
            "loss.discriminator.preset=patchgan-34-small",
            f"run_dir={tmp_path / 'tuned'}",
        ),
        store,
        callbacks=[probe],
    )
    # The reference: e <- d_b e + (1 - d_b) w_b from the start's weights, d_b = min(0.2, (1 + b) / (10 + b)).
    expected = start.load_tensors()["decoder.conv_out.weight"]
    for b, weight in enumerate(probe.iterates):
        decay = min(0.2, (1 + b) / (10 + b))
        expected = decay * expected + (1 - decay) * weight
    stored = tuned.load_tensors()
    assert len(probe.iterates) == 4
    assert torch.allclose(stored["decoder.conv_out.weight"], expected, atol=1e-6)
    assert not torch.allclose(stored["decoder.conv_out.weight"], probe.iterates[-1], atol=1e-6)  # not the last step
    assert (
        tuned.manifest["encoder_sha256"] == start.manifest["encoder_sha256"]
    )  # the frozen encoder's average is itself
    checkpoint = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["ema.decoder.conv_out.weight"], stored["decoder.conv_out.weight"])
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        tiny_config(tmp_path, "ema_decay=1")


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "--store",
            str(tmp_path),
            "train",
            "autoencoder",
            "--config",
            str(ROOT / "configs/fmnist/autoencoder-quick.yaml"),
            "--set",
            "loss.kl_wieght=1",
        ],
    )
    assert result.exit_code != 0
    assert "loss.kl_wieght" in result.output and "kl_weight" in result.output
    assert "Traceback" not in result.output


def test_cli_artifacts_list_and_show(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = store.save("autoencoder", tensors={"weights.safetensors": {"w": torch.ones(2)}}, config={"a": 1})
    runner = CliRunner()
    listed = runner.invoke(main, ["--store", str(tmp_path), "artifacts", "list"])
    assert listed.exit_code == 0 and saved.ref in listed.output
    shown = runner.invoke(main, ["--store", str(tmp_path), "artifacts", "show", "autoencoder@latest"])
    assert shown.exit_code == 0 and saved.version in shown.output and '"sha256"' in shown.output
    missing = runner.invoke(main, ["--store", str(tmp_path), "artifacts", "show", "diffusion@latest"])
    assert missing.exit_code != 0 and "no diffusion artifacts" in missing.output


@needs_fmnist
def test_tensorboard_logger_writes_event_files_beside_the_csv_the_curves_come_from(tmp_path):
    config = tiny_config(tmp_path, "trainer.max_steps=2", "trainer.logger=tensorboard")
    autoencoder.run(config, ArtifactStore(tmp_path / "store"))
    assert list((tmp_path / "run" / "tensorboard" / "part000").glob("events.out.tfevents.*"))
    assert "train/rec" in read_metrics(tmp_path / "run")


def test_progress_bar_counts_batches_when_a_batch_takes_two_optimiser_steps():
    from types import SimpleNamespace

    from ldm.training import ProgressBar

    def total(steps_per_batch, max_steps, global_step):
        bar = ProgressBar(steps_per_batch)
        # Lightning's trainer counts optimiser steps: an autoencoder with a discriminator takes 2 a batch
        bar._trainer = SimpleNamespace(
            max_epochs=-1,
            max_steps=max_steps * steps_per_batch,
            global_step=global_step * steps_per_batch,
            num_training_batches=float("inf"),
        )
        return bar.total_train_batches

    assert total(2, 5000, 0) == 5000  # was 10000: the bar ended at 50%
    assert total(2, 5000, 1200) == 3800  # resumed
    assert total(1, 2300, 0) == 2300


class StoredStart:
    """An init_from artifact as an older version stored it: a model config without the settings added since."""

    ref = "autoencoder@older"

    def __init__(self, model: AutoencoderKL, config: dict):
        self.model, self.stored_config = model, config

    def config(self) -> dict:
        return {"model": self.stored_config}

    def load_tensors(self, device: str = "cpu") -> dict:
        return self.model.state_dict()


def test_a_start_stored_before_newer_model_settings_still_fine_tunes(tmp_path):
    config = tiny_config(tmp_path)
    start = AutoencoderKL(config.model)
    older = {k: v for k, v in to_dict(config)["model"].items() if k not in ("decoder_head", "vocoder_dim")}
    tuned = AutoencoderKL(config.model)
    autoencoder.load_start(tuned, StoredStart(start, older), config)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), start.state_dict().values()))
    with pytest.raises(ValueError, match="same model settings"):
        autoencoder.load_start(tuned, StoredStart(start, {**older, "ch": 64}), config)
