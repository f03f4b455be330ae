"""The sampling commands share one vocabulary: their flags come from SamplingSettings' fields."""

from dataclasses import fields

import click
import pytest

from ldm.diffusion.schedules import DiffusionConfig
from ldm.generation import SamplingSettings
from stages.cli import main

SETTING_FLAGS = {f.metadata["flag"]: f for f in fields(SamplingSettings) if "flag" in f.metadata}


def command(*path: str) -> click.Command:
    found = main
    for name in path:
        found = found.commands[name]
    return found


def flags_of(cmd: click.Command) -> dict[str, click.Option]:
    return {opt: param for param in cmd.params if isinstance(param, click.Option) for opt in param.opts}


@pytest.mark.parametrize("path", [("sample",), ("eval", "samples"), ("ema",)])
def test_every_sampling_command_takes_the_settings_flags_with_their_help(path):
    flags = flags_of(command(*path))
    expected = set(SETTING_FLAGS) - ({"--guide-scale"} if path == ("ema",) else set())
    assert expected <= set(flags)
    for flag in expected:
        assert flags[flag].name == SETTING_FLAGS[flag].name  # the option fills the field of its name
        assert flags[flag].help.startswith(SETTING_FLAGS[flag].metadata["help"])


def test_the_commands_differ_only_in_their_own_defaults():
    sample, evaluation, ema = (flags_of(command(*p)) for p in [("sample",), ("eval", "samples"), ("ema",)])
    assert [f["--steps"].default for f in (sample, evaluation, ema)] == [25, 20, 20]
    assert [f["--batch-size"].default for f in (sample, evaluation, ema)] == [64, 250, 250]
    assert all(f["--cfg"].default is None for f in (sample, evaluation, ema))  # chosen once the model is known
    assert "Default: 2," in sample["--cfg"].help and "Default: 1.5," in ema["--cfg"].help
    assert {f["--spacing"].default for f in (sample, evaluation, ema)} == {"trailing"}


def test_an_unchosen_guidance_is_the_commands_default_or_one_for_a_student():
    plain = DiffusionConfig(objective="flow", learn_sigma=False)
    student = DiffusionConfig(objective="meanflow", learn_sigma=False, built_in_guidance=3.0)
    unchosen = SamplingSettings(guidance_scale=None)
    assert unchosen.resolved(plain, default_guidance=1.5).guidance_scale == 1.5
    assert unchosen.resolved(student, default_guidance=1.5).guidance_scale == 1.0
    assert SamplingSettings(guidance_scale=2.5).resolved(plain, default_guidance=1.5).guidance_scale == 2.5


def test_errors_name_the_flag_of_the_setting():
    with pytest.raises(ValueError, match=r"num_steps \(--steps\) must be an integer >= 1"):
        SamplingSettings(num_steps=0)
    with pytest.raises(ValueError, match=r"guide_scale \(--guide-scale\) must be a finite number"):
        SamplingSettings(guide_scale=-1.0)
