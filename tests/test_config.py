from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ldm.config import ConfigError, TrainerConfig, dump_yaml, from_dict, load_config, to_dict


@dataclass
class Inner:
    width: int = 8
    mult: tuple[int, ...] = (1, 2)
    name: str | None = None

    @classmethod
    def presets(cls) -> dict:
        return {"wide": Inner(width=64, mult=(1, 2, 4))}


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rate: float = 0.5
    betas: tuple[float, float] = (0.5, 0.9)  # a fixed-length tuple, as AutoencoderStageConfig.betas


def test_unknown_key_is_an_error_naming_the_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  widht: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    message = str(err.value)
    assert "inner.widht" in message and "width" in message and "mult" in message


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="inner.width: expected an integer"):
        from_dict(Outer, {"inner": {"width": "eight"}})
    with pytest.raises(ConfigError, match="trainer.progress: expected true or false"):
        from_dict(Outer, {"trainer": {"progress": "yes"}})


def test_overrides_are_parsed_as_yaml_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rate: 0.1\ninner:\n  width: 4\n")
    config = load_config(Outer, path, ["inner.mult=[3, 4, 5]", "trainer.lr=1e-3", "inner.name=abc", "rate=2"])
    assert config.inner == Inner(width=4, mult=(3, 4, 5), name="abc")
    assert config.trainer.lr == pytest.approx(1e-3)
    assert config.rate == 2.0 and isinstance(config.rate, float)


def test_fixed_length_tuple_override_is_coerced_item_by_item_and_dumps_to_yaml():
    # Bug: items were paired with their types the wrong way round, so `--set betas=[0.9,0.999]`
    # stored the type `float` itself and writing config.yaml failed with a yaml RepresenterError.
    config = load_config(Outer, None, ["betas=[0.9, 1]"])
    assert config.betas == (0.9, 1.0) and all(type(b) is float for b in config.betas)
    assert "- 0.9" in dump_yaml(config)
    with pytest.raises(ConfigError, match=r"betas\[1\]: expected a number"):
        load_config(Outer, None, ["betas=[0.9, fast]"])
    with pytest.raises(ConfigError, match="betas: expected 2 items, got 3"):
        load_config(Outer, None, ["betas=[0.9, 0.99, 0.999]"])


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["trainer.lr"])


def test_presets_by_name_and_with_overrides():
    assert from_dict(Outer, {"inner": "wide"}).inner == Inner(width=64, mult=(1, 2, 4))
    assert from_dict(Outer, {"inner": {"preset": "wide", "width": 32}}).inner.width == 32
    overridden = load_config(Outer, None, ["inner=wide", "inner.width=16"]).inner
    assert overridden == Inner(width=16, mult=(1, 2, 4))
    with pytest.raises(ConfigError, match="unknown preset 'narrow'; presets: wide"):
        from_dict(Outer, {"inner": "narrow"})


def test_round_trip_through_yaml(tmp_path):
    config = load_config(Outer, None, ["inner.mult=[1, 1, 2]", "trainer.max_steps=7"])
    path = tmp_path / "saved.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(Outer, path) == config
    assert to_dict(config)["inner"]["mult"] == [1, 1, 2]


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


FMNIST_PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "fmnist").glob("*.yaml"))


@pytest.mark.parametrize("path", FMNIST_PRESETS, ids=lambda path: path.name)
def test_every_fmnist_preset_loads_into_its_stage_config(path):
    from stages import autoencoder, classifier, diffusion, distill, prune

    stage_configs = {
        "autoencoder": autoencoder.AutoencoderStageConfig,
        "classifier": classifier.ClassifierStageConfig,
        "diffusion": diffusion.DiffusionStageConfig,
        "distill": distill.DistillStageConfig,
        "prune": prune.PruneStageConfig,
    }
    # the decoder fine-tune names its starting autoencoder on the command line, as its header says
    overrides = ["init_from=autoencoder@latest"] if path.stem.endswith("-gan") else []
    config = load_config(stage_configs[path.stem.split("-")[0]], path, overrides)
    assert config.trainer.max_steps > 0
    assert str(config.run_dir).startswith("runs/fmnist/")
