"""Sound through the same stages: the 1-D autoencoder and its loss, the spoken-digit classifier, and a
tiny end-to-end run on the shared FSDD recordings (train, encode, train a DiT, sample WAVs, evaluate)."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import FSDD_DIR, needs_fsdd
from ldm.artifacts import ArtifactStore
from ldm.audio import griffin_lim, log_mel_distance, read_wav, spectrogram_features
from ldm.config import load_config
from ldm.data import DataConfig, with_data
from ldm.data.latents import LatentCache
from ldm.loading import load_autoencoder
from ldm.losses.autoencoder import AutoencoderLoss, AutoencoderLossConfig
from ldm.losses.lpips import PerceptualConfig
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.classifier import Classifier, ClassifierConfig
from ldm.models.discriminator import DiscriminatorConfig
from stages import autoencoder, classifier, diffusion
from stages.autoencoder import random_crop
from stages.classifier import random_shift
from stages.encode import EncodeConfig, encode

ROOT = Path(__file__).resolve().parent.parent


def signal_config(**overrides) -> AutoencoderConfig:
    """A tiny 1-D autoencoder: 512-sample clips, strides 4 and 2, (4, 64) latents."""
    return AutoencoderConfig(
        **{
            "in_channels": 1,
            "resolution": 512,
            "ch": 8,
            "ch_mult": (1, 2, 2),
            "latent_channels": 4,
            "norm_groups": 4,
            "spatial_dims": 1,
            "down_strides": (4, 2),
            **overrides,
        }
    )


# ----------------------------------------------------------------------------- the 1-D autoencoder


def test_signal_autoencoder_maps_clips_to_latents_f_times_shorter_and_back():
    config = signal_config()
    model = AutoencoderKL(config)
    x = torch.randn(3, 1, 512).clamp(-1, 1)
    posterior = model.encode(x)
    assert config.downsample_factor == 8 and config.latent_shape == (4, 64)
    assert posterior.mean.shape == (3, 4, 64) and posterior.kl().shape == (3,)
    assert model.decode(posterior.mode()).shape == (3, 1, 512)
    # Convolutional: any multiple of f runs, as whole clips do after training on crops.
    assert model(torch.zeros(1, 1, 1024))[0].shape == (1, 1, 1024)


def test_spectrogram_front_end_encodes_waveforms_reconstructs_features_and_decodes_to_waveforms():
    config = AutoencoderConfig.presets()["fsdd-spec"]
    model = AutoencoderKL(replace(config, ch=8, griffin_lim_iters=2)).eval()
    x = torch.randn(2, 1, 8192).clamp(-1, 1) * 0.5
    assert config.downsample_factor == 256 and config.latent_shape == (16, 32)
    features, posterior = model(model.analysis(x))
    assert features.shape == model.analysis(x).shape == (2, 129, 128) and posterior.mean.shape == (2, 16, 32)
    torch.testing.assert_close(model.encode(x).mean, posterior.mean)
    decoded = model.decode(posterior.mode())
    assert decoded.shape == (2, 1, 8192) and decoded.abs().max() <= 1


def test_griffin_lim_recovers_a_signal_with_the_same_spectrogram_repeatably():
    t = torch.arange(8192) / 8000
    chirp = (0.5 * torch.sin(2 * torch.pi * (200 + 400 * t) * t)).view(1, 1, -1)
    features = spectrogram_features(chirp, 256, 64)
    rebuilt = griffin_lim(features, 256, 64, n_iter=32)
    assert rebuilt.shape == (1, 1, 8192)
    assert torch.equal(rebuilt, griffin_lim(features, 256, 64, n_iter=32))  # a seeded starting phase
    random_phase = griffin_lim(features, 256, 64, n_iter=0)  # the magnitude with its starting phase only
    # The iterations make the phase consistent: the log-mel distance to the chirp halves (0.50 -> 0.22).
    assert log_mel_distance(rebuilt, chirp, 8000).item() < 0.5 * log_mel_distance(random_phase, chirp, 8000).item()


def test_spectrogram_front_end_refuses_a_waveform_loss():
    with pytest.raises(ValueError, match="perceptual.weight 0"):
        load_config(
            autoencoder.AutoencoderStageConfig,
            ROOT / "configs/fsdd/autoencoder.yaml",
            ["loss.perceptual.kind=stft", "loss.perceptual.weight=1.0"],
        )


def test_a_clip_length_other_than_the_models_is_refused():
    with pytest.raises(ValueError, match="must equal data.length 4096"):
        load_config(autoencoder.AutoencoderStageConfig, ROOT / "configs/fsdd/autoencoder.yaml", ["data.length=4096"])


def test_signal_strides_are_checked_against_the_levels_and_the_domain():
    with pytest.raises(ValueError, match="one stride per level"):
        signal_config(down_strides=(4,))
    with pytest.raises(ValueError, match="even"):
        signal_config(down_strides=(3, 2))
    with pytest.raises(ValueError, match="1-D signals"):
        AutoencoderConfig(down_strides=(4, 2))


def test_signal_loss_uses_the_stft_term_and_a_spectrogram_discriminator_with_the_adaptive_weight():
    config = AutoencoderLossConfig(
        perceptual=PerceptualConfig(kind="stft", weight=1.0),
        disc_enabled=True,
        disc_start=0,
        discriminator=DiscriminatorConfig(in_channels=1, ch=8, n_layers=2),
    )
    loss = AutoencoderLoss(config, spatial_dims=1)
    model = AutoencoderKL(signal_config())
    x = torch.randn(2, 1, 2048).clamp(-1, 1)  # long enough for the 512-point STFT's PatchGAN
    recon, posterior = model(x)
    total, logs = loss.generator_loss(x, recon, posterior, global_step=1, last_layer=model.last_layer)
    total.backward()
    assert torch.isfinite(total) and logs["lpips"] > 0 and logs["d_weight"] > 0  # "lpips" logs the perceptual term
    assert model.last_layer.grad is not None
    d_loss, d_logs = loss.discriminator_loss(x, recon, global_step=1)
    assert torch.isfinite(d_loss)
    assert loss.perceptual.describe().startswith("multi-resolution STFT")


def test_lpips_on_signals_and_stft_on_images_are_refused():
    with pytest.raises(ValueError, match="'lpips' for images and 'stft' for sound"):
        AutoencoderLoss(
            AutoencoderLossConfig(perceptual=PerceptualConfig(kind="lpips", backbone="random")), spatial_dims=1
        )
    with pytest.raises(ValueError, match="'lpips' for images and 'stft' for sound"):
        AutoencoderLoss(AutoencoderLossConfig(perceptual=PerceptualConfig(kind="stft")), spatial_dims=2)


def test_random_crops_start_on_the_latent_grid_inside_the_recording():
    torch.manual_seed(0)
    signals = torch.zeros(64, 1, 1024)
    signals[:32, :, :300] = 0.5  # short recordings, then padding
    signals[32:] = 0.5  # recordings that fill the clip
    crops = random_crop(signals, 256, multiple=8)
    assert crops.shape == (64, 1, 256)
    assert (crops[:32].abs().amax(dim=(1, 2)) > 0).all()  # never all padding
    # Windows start at multiples of 8, anywhere a whole window fits.
    index = torch.arange(1024, dtype=torch.float32).expand(64, 1, -1)
    begin = random_crop(index, 256, multiple=8)[:, 0, 0]
    assert torch.equal(begin % 8, torch.zeros(64)) and len(set(begin.tolist())) > 10
    assert begin.max() <= 1024 - 256


# ----------------------------------------------------------------------------- the classifier


def test_logmel_classifier_takes_waveforms_and_gives_features_and_logits():
    model = Classifier(ClassifierConfig(front_end="logmel", width=8, feature_dim=16)).eval()
    x = torch.randn(2, 1, 8192) * 0.1
    assert model.features(x).shape == (2, 16) and model(x).shape == (2, 10)


def test_random_shift_of_signals_moves_them_in_time_and_fills_with_silence():
    torch.manual_seed(0)
    x = torch.arange(1, 11, dtype=torch.float32).view(1, 1, 10).expand(50, 1, 10)
    shifted = random_shift(x, 3, background=0.0)
    for row in shifted[:, 0]:
        kept = row[row != 0]
        assert torch.equal(kept, kept[0] + torch.arange(len(kept), dtype=torch.float32))  # a contiguous run of x
        assert len(kept) >= 7
    assert len({tuple(row.tolist()) for row in shifted[:, 0]}) > 3


def test_sound_data_option_picks_fsdd_or_a_folder(tmp_path):
    sound = DataConfig(name="fsdd")
    assert with_data(sound, "fsdd") == DataConfig(name="fsdd")
    (tmp_path / "fsdd" / "recordings").mkdir(parents=True)
    assert with_data(sound, str(tmp_path / "fsdd")).name == "fsdd"
    assert with_data(sound, str(tmp_path)).name == "soundfolder"
    with pytest.raises(ValueError, match="no flips"):
        DataConfig(name="fsdd", hflip=True)


# ----------------------------------------------------------------------------- end to end


TINY_AE = [
    "model.ch=8",
    "model.norm_groups=4",
    "model.latent_channels=4",
    "model.griffin_lim_iters=4",
    "trainer.max_steps=6",
    "trainer.batch_size=8",
    "trainer.image_every=0",
    "trainer.progress=false",
    "trainer.log_every=1",
    "train_subset=64",
]


@pytest.fixture(scope="module")
def sound_chain(tmp_path_factory):
    """A tiny autoencoder, its latent cache, a DiT and a classifier on the shared FSDD recordings."""
    tmp = tmp_path_factory.mktemp("sound")
    store = ArtifactStore(tmp / "store")
    data = [f"data.path={FSDD_DIR}", "data.download=false"]
    ae_config = load_config(
        autoencoder.AutoencoderStageConfig,
        ROOT / "configs/fsdd/autoencoder.yaml",
        [*TINY_AE, *data, f"run_dir={tmp / 'ae'}"],
    )
    ae = autoencoder.run(ae_config, store)
    cache = encode(store, ae.ref, EncodeConfig(limit=96, batch_size=48))
    dit_config = load_config(
        diffusion.DiffusionStageConfig,
        ROOT / "configs/fsdd/diffusion.yaml",
        [
            "model.hidden_size=32",
            "model.depth=1",
            "model.num_heads=2",
            "model.in_channels=4",
            "trainer.max_steps=4",
            "trainer.batch_size=8",
            "trainer.image_every=0",
            "trainer.progress=false",
            "preview.per_class=1",
            f"latents={cache.ref}",
            f"run_dir={tmp / 'dit'}",
        ],
    )
    dit = diffusion.run(dit_config, store)
    cls_config = load_config(
        classifier.ClassifierStageConfig,
        ROOT / "configs/fsdd/classifier.yaml",
        [
            "model.width=4",
            "trainer.max_steps=3",
            "trainer.batch_size=16",
            "trainer.progress=false",
            *data,
            f"run_dir={tmp / 'cls'}",
        ],
    )
    cls = classifier.run(cls_config, store)
    return store, ae, cache, dit, cls, tmp


@pytest.mark.slow
@needs_fsdd
def test_sound_cache_has_one_view_of_1d_latents_and_names_its_autoencoder(sound_chain, capsys):
    store, ae, cache, *_ = sound_chain
    latents = LatentCache(cache)
    assert cache.parents == {"autoencoder": ae.ref}
    assert latents.num_views == 1 and latents.latent_shape == (4, 32) and len(latents) == 96
    assert ae.manifest["latent_shape"] == [4, 32] and ae.manifest["image_shape"] == [1, 8192]


@pytest.mark.slow
@needs_fsdd
def test_sound_dit_samples_wav_files_and_a_spectrogram_grid(sound_chain):
    from ldm.generation import SamplingSettings
    from stages.sample import write_samples

    store, ae, cache, dit, cls, tmp = sound_chain
    assert dit.parents["latents"] == cache.ref and dit.manifest["autoencoder"] == ae.ref
    report = write_samples(store, dit.ref, SamplingSettings(num_steps=2), n=4, out_dir=tmp / "samples")
    wavs = sorted((tmp / "samples" / "audio").glob("*.wav"))
    assert [path.name for path in wavs] == [f"{i:06d}-class{i}.wav" for i in range(4)]
    signal, rate = read_wav(wavs[0])
    assert rate == 8000 and signal.shape == (8192,)
    assert (tmp / "samples" / "grid.png").is_file() and report["complete"]


@pytest.mark.slow
@needs_fsdd
def test_sound_pipeline_returns_signals_and_saves_them(sound_chain):
    from pipeline import LatentDiffusionPipeline

    store, ae, cache, dit, cls, tmp = sound_chain
    pipe = LatentDiffusionPipeline.from_artifacts(dit.ref, store=store)
    signals = pipe.sample([1, 2], num_steps=2, seed=0)
    assert pipe.sample_rate == 8000 and signals.shape == (2, 1, 8192) and signals.abs().max() <= 1
    paths = pipe.save_audio(signals, tmp / "api")
    assert torch.allclose(read_wav(paths[1])[0], signals[1, 0], atol=1 / 32768 + 1e-6)
    with pytest.raises(ValueError, match="output='pil' is for images"):
        pipe.sample([1], num_steps=1, output="pil")


@pytest.mark.slow
@needs_fsdd
def test_sound_reconstruction_and_sample_evaluation_report_sound_measures(sound_chain):
    from ldm.generation import SamplingSettings
    from stages.evaluate import evaluate_reconstruction
    from stages.sample import evaluate_samples

    store, ae, cache, dit, cls, tmp = sound_chain
    recon = evaluate_reconstruction(
        store, ae.ref, split="test", limit=32, classifier_ref=cls.ref, out_dir=tmp / "recon"
    )
    assert {"si_sdr_db", "mr_stft", "log_mel_distance"} <= recon.keys() and "psnr_db" not in recon
    assert recon["rfid_features"].startswith(cls.ref) and (tmp / "recon" / "audio" / "00-reconstruction.wav").is_file()
    report = evaluate_samples(
        store, dit.ref, SamplingSettings(num_steps=2, batch_size=20), n=20, classifier_ref=cls.ref, out_dir=tmp / "eval"
    )
    assert report["features"].startswith(cls.ref) and report["real_reference"].startswith("20 train vs 20 test")
    assert 0 <= report["class_accuracy"] <= 1 and report["frechet_distance"] > 0


@pytest.mark.slow
@needs_fsdd
def test_an_image_classifier_cannot_measure_sound(sound_chain, tmp_path):
    from ldm.loading import feature_extractor

    store, *_ = sound_chain
    image_classifier = store.save(
        "classifier",
        tensors={"weights.safetensors": Classifier(ClassifierConfig(width=4)).state_dict()},
        config={"model": {"width": 4}},
    )
    with pytest.raises(Exception, match="classifies images, but the data is sound"):
        feature_extractor(store, "auto", image_classifier.ref, torch.device("cpu"), sound=True)


@pytest.mark.slow
@needs_fsdd
def test_a_vocos_head_fine_tune_keeps_the_encoder_bit_exact_and_decodes_without_griffin_lim(sound_chain, tmp_path):
    from ldm.models.vocoder import Vocoder

    store, ae, *_ = sound_chain
    overrides = [*TINY_AE, f"data.path={FSDD_DIR}", "data.download=false", f"init_from={ae.ref}"]
    config = load_config(
        autoencoder.AutoencoderStageConfig,
        ROOT / "configs/fsdd/vocoder.yaml",
        [
            *overrides,
            "model.vocoder_dim=16",
            "model.vocoder_depth=1",
            "trainer.max_steps=3",
            "train_crop=2048",
            f"run_dir={tmp_path / 'vocos'}",
        ],
    )
    tuned = autoencoder.run(config, store)
    before, after = ae.load_tensors(), tuned.load_tensors()
    encoder_side = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoder_side and all(torch.equal(before[k], after[k]) for k in encoder_side)
    assert tuned.manifest["encoder_sha256"] == ae.manifest["encoder_sha256"]
    assert tuned.parents == {"autoencoder": ae.ref} and any(k.startswith("vocoder.") for k in after)
    assert {"mel", "g", "fm", "d"} <= tuned.manifest["training"]["final"].keys()
    model = load_autoencoder(tuned)
    assert isinstance(model.vocoder, Vocoder)
    z = model.encode(torch.zeros(1, 1, 8192)).mode()
    assert model.decode(z).shape == (1, 1, 8192)

    with pytest.raises(ValueError, match="train_parts: decoder"):
        load_config(
            autoencoder.AutoencoderStageConfig,
            ROOT / "configs/fsdd/autoencoder.yaml",
            [*overrides, "model.decoder_head=vocos"],
        )
    with pytest.raises(ValueError, match="needs front_end 'stft'"):
        AutoencoderConfig(spatial_dims=1, decoder_head="vocos")
