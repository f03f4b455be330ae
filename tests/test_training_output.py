"""A training prints no notice that looks like a problem and is none; every real warning still shows."""

import logging
import warnings

import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from conftest import needs_fmnist, train_cli
from ldm import training
from ldm.config import TrainerConfig

# Lightning's cloud adverts (litlogger, litmodels), its pytree helper's deprecation, and its fit loop's notice
# about the frozen networks (LPIPS, EMA copies) a stage keeps in eval mode on purpose.
NOISE = (
    "💡 Tip: For seamless cloud",
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "module(s) in eval mode at the start of training",
)
RANK_ZERO_LOG = "lightning.pytorch.utilities.rank_zero"  # the logger of Lightning's rank_zero_info
PYTREE, FIT_LOOP = "lightning.pytorch.utilities._pytree", "lightning.pytorch.loops.fit_loop"


@pytest.fixture
def lightning_log(caplog, monkeypatch):
    """caplog with Lightning's INFO records, which Lightning keeps from the root logger if it had no handler."""
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO)
    return caplog


def warn(message: str, category: type[Warning], module: str) -> None:
    """Issue a warning as if raised by a line of `module`."""
    warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)


def test_building_a_trainer_hides_exactly_the_three_notices(tmp_path, lightning_log):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training.build_trainer(TrainerConfig(progress=False), tmp_path / "run")
        warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
            "treespec.is_leaf()` instead.",
            FutureWarning,
            PYTREE,
        )
        warn("Found 101 module(s) in eval mode at the start of training.", PossibleUserWarning, FIT_LOOP)
        # Real problems in the same places still show.
        warn("`LeafSpec` is deprecated", FutureWarning, "ldm.models.dit")
        warn("the `foo` argument is deprecated", FutureWarning, PYTREE)
        warn("Found 3 module(s) with non-finite weights.", PossibleUserWarning, FIT_LOOP)
        warn("Found 101 module(s) in eval mode at the start of training.", UserWarning, "ldm.training")
    log = logging.getLogger(RANK_ZERO_LOG)
    log.info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]")
    log.info("GPU available: False, used: False")

    shown = [str(w.message) for w in caught]
    assert shown == [
        "`LeafSpec` is deprecated",
        "the `foo` argument is deprecated",
        "Found 3 module(s) with non-finite weights.",
        "Found 101 module(s) in eval mode at the start of training.",
    ]
    logged = [r.getMessage() for r in lightning_log.records if r.name == RANK_ZERO_LOG]
    assert "GPU available: False, used: False" in logged
    assert not [message for message in logged if message.startswith("💡 Tip")]


class GenuineWarning(Callback):
    """Warns once as training starts, as a real problem of the run would."""

    def on_train_start(self, trainer, module):
        warnings.warn("a genuine problem of this run", UserWarning, stacklevel=2)


@pytest.mark.slow
@needs_fmnist
@pytest.mark.timeout(120)
def test_a_tiny_training_prints_none_of_the_notices(tmp_path, monkeypatch, lightning_log):
    build_trainer = training.build_trainer

    def with_genuine_warning(config, run_dir, *, callbacks=(), **kwargs):
        return build_trainer(config, run_dir, callbacks=[*callbacks, GenuineWarning()], **kwargs)

    monkeypatch.setattr(training, "build_trainer", with_genuine_warning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # TINY_AUTOENCODER trains with an LPIPS network: the frozen modules in eval mode are there.
        result = train_cli(tmp_path / "store", tmp_path / "run", "trainer.max_steps=2")
    assert result.exit_code == 0, result.output

    output = "\n".join([result.output, lightning_log.text, *(str(w.message) for w in caught)])
    assert [notice for notice in NOISE if notice in output] == []
    assert "a genuine problem of this run" in output
    assert "GPU available" in lightning_log.text  # Lightning's other notices still show
