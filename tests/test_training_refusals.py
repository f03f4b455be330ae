"""Training refuses, before it stores anything, a run of no steps, nonsense trainer settings and unreadable images."""

import numpy as np
import pytest
from PIL import Image

from conftest import AUTOENCODER_QUICK, assert_clean_failure, train_cli
from ldm.config import ConfigError, load_config
from stages import autoencoder

# ---- nothing untrained is stored ------------------------------------------------------------


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_a_run_of_no_steps_is_refused_before_anything_is_stored(tmp_path, steps):
    result = train_cli(tmp_path / "store", tmp_path / "run", f"trainer.max_steps={steps}")
    assert_clean_failure(result, "max_steps must be >= 1", steps)
    assert not (tmp_path / "store").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, phrase",
    [
        ("trainer.lr=-1e-4", "lr must be a positive number"),
        ("trainer.batch_size=0", "batch_size must be >= 1"),
        ("trainer.checkpoint_every=0", "checkpoint_every must be >= 1"),
        ("trainer.grad_clip=-1", "grad_clip must be >= 0"),
    ],
)
def test_nonsense_trainer_settings_are_refused_naming_the_key(override, phrase):
    with pytest.raises(ConfigError, match=phrase):
        load_config(autoencoder.AutoencoderStageConfig, AUTOENCODER_QUICK, [override])


# ---- unreadable data ------------------------------------------------------------------------


def test_a_corrupt_image_in_a_folder_is_one_line_naming_the_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = train_cli(
        tmp_path / "store",
        tmp_path / "run",
        "data.name=folder",
        f"data.path={folder}",
        "trainer.max_steps=2",
        "train_subset=0",
        "trainer.batch_size=3",
        "preview_images=1",
    )
    assert_clean_failure(result, f"cannot read image {folder / '1.png'}")
    assert not (tmp_path / "store" / "autoencoder").exists()


@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
@pytest.mark.parametrize(
    "override, phrase",
    [
        ("lr_schedule=linear", "lr_schedule must be"),
        ("betas=[0.9,1.0]", "betas must be"),
        ("ema_decay=1.0", "ema_decay"),
    ],
)
def test_every_trained_stage_checks_its_optimizer_settings_alike(stage, override, phrase):
    from stages.autoencoder import AutoencoderStageConfig
    from stages.diffusion import DiffusionStageConfig

    config_class = {"autoencoder": AutoencoderStageConfig, "diffusion": DiffusionStageConfig}[stage]
    with pytest.raises(ConfigError, match=phrase):
        load_config(config_class, None, [override])
