"""Presets: `base:` inheritance, run folders derived from the preset's path, and every shipped preset resolving to
the configuration it had before presets inherited (tests/data/presets-resolved.json)."""

import json
import re
from pathlib import Path

import pytest

from ldm.config import ConfigError, from_dict, load_config, to_dict
from stages.autoencoder import AutoencoderStageConfig
from stages.classifier import ClassifierStageConfig
from stages.diffusion import DiffusionStageConfig
from stages.distill import DistillStageConfig
from stages.parser import ParserStageConfig
from stages.prune import PruneStageConfig

ROOT = Path(__file__).resolve().parent.parent
RESOLVED = json.loads((ROOT / "tests/data/presets-resolved.json").read_text())
# The decoder fine-tunes refuse to load without the autoencoder they fine-tune.
NEEDS_INIT_FROM = {
    "configs/fmnist/autoencoder-gan.yaml",
    "configs/fmnist/autoencoder-fast-gan.yaml",
    "configs/fsdd/vocoder.yaml",
}


def stage_config(name: str) -> type:
    stem = Path(name).stem
    if stem.startswith("parser"):
        return ParserStageConfig
    if stem.startswith("distill"):
        return DistillStageConfig
    if stem.startswith("prune"):
        return PruneStageConfig
    if stem.startswith("diffusion"):
        return DiffusionStageConfig
    return ClassifierStageConfig if stem.startswith("classifier") else AutoencoderStageConfig


def test_every_preset_is_recorded_and_nothing_recorded_is_missing():
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped == set(RESOLVED)


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_each_preset_resolves_to_the_configuration_it_had_before_inheritance(name):
    overrides = ["init_from=autoencoder@stand-in"] if name in NEEDS_INIT_FROM else []
    config = load_config(stage_config(name), ROOT / name, overrides)
    # The records are in the keys of their time (preview.steps beside preview.per_class), read as stored configs are.
    before = from_dict(stage_config(name), RESOLVED[name])
    assert config == before
    assert json.loads(json.dumps(to_dict(config))) == json.loads(json.dumps(to_dict(before)))


def test_a_preview_in_the_older_keys_loads_as_the_same_settings():
    older = {"preview": {"per_class": 1, "sampler": "", "steps": 3, "guidance_scale": 1.5, "seed": 4}}
    preview = from_dict(DiffusionStageConfig, older).preview
    assert (preview.per_class, preview.sampling.sampler, preview.sampling.num_steps) == (1, None, 3)
    assert (preview.sampling.guidance_scale, preview.sampling.seed) == (1.5, 4)
    assert load_config(DiffusionStageConfig, None, ["preview.steps=7"]).preview.sampling.num_steps == 7
    with pytest.raises(ConfigError, match="num_steps"):
        load_config(DiffusionStageConfig, None, ["preview.sampling.num_steps=0"])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_child_overrides_its_base_key_by_key_and_runs_in_its_own_folder(tmp_path):
    write(
        tmp_path / "presets/base.yaml",
        "model: {preset: DiT-T/2, in_channels: 8}\ndiffusion: {learn_sigma: false}\n"
        "trainer: {max_steps: 100, lr: 0.001}\n"
        "run_dir: runs/elsewhere\n",
    )
    child = write(tmp_path / "presets/child.yaml", "base: base.yaml\ntrainer: {max_steps: 7}\n")
    config = load_config(DiffusionStageConfig, child)
    assert (config.trainer.max_steps, config.trainer.lr) == (7, 0.001)  # merged within trainer
    assert (config.model.in_channels, config.model.depth) == (
        8,
        load_config(DiffusionStageConfig, tmp_path / "presets/base.yaml").model.depth,
    )
    assert config.run_dir == "runs/presets/child"  # derived, never the base's folder
    assert load_config(DiffusionStageConfig, child, ["run_dir=mine"]).run_dir == "mine"


def test_a_base_chain_is_followed_relative_to_each_file(tmp_path):
    write(tmp_path / "a/root.yaml", "trainer: {lr: 0.5, max_steps: 3}\n")
    write(tmp_path / "b/middle.yaml", "base: ../a/root.yaml\ntrainer: {max_steps: 4}\n")
    leaf = write(tmp_path / "c/leaf.yaml", "base: ../b/middle.yaml\ntrainer: {batch_size: 8}\n")
    trainer = load_config(ClassifierStageConfig, leaf).trainer
    assert (trainer.lr, trainer.max_steps, trainer.batch_size) == (0.5, 4, 8)


def test_a_base_that_returns_to_itself_is_refused_naming_the_chain(tmp_path):
    write(tmp_path / "one.yaml", "base: two.yaml\n")
    write(tmp_path / "two.yaml", "base: one.yaml\n")
    with pytest.raises(ConfigError, match=r"returns to itself .*one.yaml -> .*two.yaml -> .*one.yaml"):
        load_config(ClassifierStageConfig, tmp_path / "one.yaml")


def test_a_missing_or_malformed_base_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"gone.yaml does not exist \(the base of .*child.yaml\)"):
        load_config(ClassifierStageConfig, write(tmp_path / "child.yaml", "base: gone.yaml\n"))
    with pytest.raises(ConfigError, match="base must name another preset file"):
        load_config(ClassifierStageConfig, write(tmp_path / "bad.yaml", "base: [a.yaml]\n"))


def test_learn_sigma_is_set_once_under_diffusion_and_the_dit_follows(tmp_path):
    learned = write(tmp_path / "learned.yaml", "model: DiT-T/2\ndiffusion: {learn_sigma: true}\n")
    fixed = write(tmp_path / "fixed.yaml", "model: {preset: DiT-S/2}\ndiffusion: {learn_sigma: false}\n")
    assert load_config(DiffusionStageConfig, learned).model.learn_sigma is True  # DiT-T/2 alone predicts no variance
    assert load_config(DiffusionStageConfig, fixed).model.learn_sigma is False  # DiT-S/2 alone does
    with pytest.raises(ConfigError, match="must agree"):  # an explicit disagreement is still refused
        load_config(DiffusionStageConfig, fixed, ["model.learn_sigma=true"])


def test_a_section_given_in_part_keeps_the_stages_own_defaults_for_the_rest():
    from stages.distill import DistillStageConfig

    dit = load_config(DiffusionStageConfig, None, ["trainer.max_steps=5"]).trainer
    assert (dit.max_steps, dit.batch_size, dit.lr) == (5, DiffusionStageConfig().trainer.batch_size, 1e-4)
    assert load_config(DistillStageConfig, None, ["trainer.lr=0.5"]).trainer.grad_clip == 1.0  # the student's default
    preview = load_config(DistillStageConfig, None, ["preview.per_class=1"]).preview.sampling
    assert (preview.sampler, preview.num_steps) == ("meanflow", 2)  # the student's preview, not the class default


def test_every_preset_a_demo_trains_is_shipped():
    """`ldm demo` and `ldm demo --scenes` load their presets by name: each named one must exist and resolve."""
    source = (ROOT / "stages/demo.py").read_text()
    named = re.findall(r'(CONFIGS|SCENES_CONFIGS) / "([\w.-]+\.yaml)"', source)
    assert {"parser-quick.yaml", "autoencoder-quick.yaml", "diffusion-quick.yaml"} <= {name for _, name in named}
    for folder, name in named:
        path = f"configs/{'scenes' if folder == 'SCENES_CONFIGS' else 'fmnist'}/{name}"
        assert path in RESOLVED, f"{path} is trained by a demo but is not a shipped preset"
