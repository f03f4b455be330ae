"""One config and seed, one result: a deterministic run gives bit-identical weights, whatever thread count the
process was started with (OMP_NUM_THREADS, torch.set_num_threads), which is what made two runs part."""

import pytest
import torch

from conftest import AUTOENCODER_QUICK, TINY_AUTOENCODER, needs_fmnist
from ldm.artifacts import ArtifactStore
from ldm.config import TrainerConfig, load_config
from ldm.training import deterministic_run, reproducible
from stages import autoencoder

# The cheapest run through every path of the stage: LPIPS, the discriminator from the first step, the EMA.
GAN = [
    "trainer.max_steps=3",
    "loss.disc_enabled=true",
    "loss.disc_start=0",
    "loss.discriminator.in_channels=1",
    "ema_decay=0.5",
]


def weights_with_threads(tmp_path, name: str, threads: int, *overrides: str) -> dict[str, torch.Tensor]:
    """The stored weights of the tiny GAN run started by a process set to `threads` threads."""
    config = load_config(
        autoencoder.AutoencoderStageConfig,
        AUTOENCODER_QUICK,
        [*TINY_AUTOENCODER, *GAN, *overrides, f"run_dir={tmp_path / name}"],
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return autoencoder.run(config, ArtifactStore(tmp_path / "store")).load_tensors()
    finally:
        torch.set_num_threads(before)


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
@pytest.mark.timeout(180)
@needs_fmnist
def test_the_thread_count_of_the_process_changes_a_run_that_is_not_deterministic(tmp_path):
    # The cause of two CPU runs parting: a convolution's sums split over 1 or 2 threads round differently.
    one = weights_with_threads(tmp_path, "one", 1, "trainer.deterministic=false")
    two = weights_with_threads(tmp_path, "two", 2, "trainer.deterministic=false")
    assert not identical(one, two)


@pytest.mark.slow
@pytest.mark.timeout(180)
@needs_fmnist
def test_a_deterministic_run_gives_identical_weights_whatever_threads_the_process_had(tmp_path):
    one = weights_with_threads(tmp_path, "one", 1)  # deterministic by default on the CPU
    two = weights_with_threads(tmp_path, "two", 2)
    assert identical(one, two)


def test_deterministic_is_on_for_cpu_runs_by_default_and_can_be_forced_either_way():
    assert deterministic_run(TrainerConfig(accelerator="cpu"))
    assert not deterministic_run(TrainerConfig(accelerator="cpu", deterministic=False))
    assert deterministic_run(TrainerConfig(accelerator="gpu", deterministic=True))
    assert not deterministic_run(TrainerConfig(accelerator="gpu"))


def test_a_deterministic_cpu_run_pins_its_threads_and_gives_the_process_its_settings_back():
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with reproducible(TrainerConfig(accelerator="cpu", cpu_threads=3)):
        assert torch.get_num_threads() == 3
        torch.use_deterministic_algorithms(True)  # as Lightning's deterministic flag does
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
