"""Bad input is refused up front in one line: configs, devices, imports, sampling arguments, image folders."""

import argparse
import json
import math
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import ROOT, assert_one_line_failure, cli
from ldm.config import ConfigError, brief, load_config, to_dict
from ldm.data import DataConfig, build_dataset
from ldm.data.folder import ImageReadError, load_image
from ldm.interop import (
    InteropError,
    export_autoencoder_to_diffusers,
    export_dit_to_diffusers,
    load_compvis_autoencoder,
    load_diffusers_autoencoder,
    load_diffusers_dit,
    load_original_dit,
)
from ldm.interop.autoencoder import autoencoder_state_dict_to_compvis
from ldm.interop.checkpoints import read_checkpoint
from ldm.interop.dit import dit_state_dict_to_original
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.dit import DiT, DiTConfig
from ldm.runtime import check_device
from pipeline import LatentDiffusionPipeline
from stages import autoencoder as autoencoder_stage
from stages.interop import quantize_diffusion

QUICK = str(ROOT / "configs/fmnist/autoencoder-quick.yaml")


# ---- 1-4. configs: YAML errors, tags, aliases, long values -----------------------------------


def train(tmp_path, *args: str):
    return cli(tmp_path / "store", "train", "autoencoder", "--run-dir", tmp_path / "run", *args)


def test_a_yaml_syntax_error_is_one_line_naming_the_file_line_and_column(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("trainer:\n  max_steps: [1, 2\nmodel: {}\n")
    line = assert_one_line_failure(train(tmp_path, "--config", config), str(config), "line 3, column 6")
    assert "expected ',' or ']'" in line
    assert not (tmp_path / "run").exists()


def test_a_yaml_syntax_error_in_an_override_names_the_override_and_the_column():
    with pytest.raises(ConfigError, match=r"override 'trainer.max_steps=\[1': line 1, column 21: "):
        load_config(autoencoder_stage.AutoencoderStageConfig, None, ["trainer.max_steps=[1"])


def test_a_config_that_is_not_utf8_text_is_one_line_naming_the_file(tmp_path):
    config = tmp_path / "binary.yaml"
    config.write_bytes(b"\xff\xfe\x00trainer")
    assert_one_line_failure(train(tmp_path, "--config", config), str(config), "UTF-8")


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_yaml_tag_is_refused_naming_the_file_or_the_override(tmp_path, where):
    tag = '!!python/object/apply:os.system ["touch pwned"]'
    if where == "file":
        config = tmp_path / "tagged.yaml"
        config.write_text(f"trainer: {tag}\n")
        args, named = ("--config", config), str(config)
    else:
        args, named = ("--set", f"trainer={tag}"), "override 'trainer=!!python/object/apply:os.system"
    assert_one_line_failure(
        train(tmp_path, *args), named, "YAML tags are not allowed", "!!python/object/apply:os.system"
    )


def test_a_harmless_tag_is_refused_too_so_the_rule_is_simple():
    with pytest.raises(ConfigError, match="YAML tags are not allowed .*!!str"):
        load_config(autoencoder_stage.AutoencoderStageConfig, None, ["run_dir=!!str runs/x"])


BOMB = (
    "".join(
        f"{name}: &{name} [" + ",".join([f"*{prev}" if prev else '"lol"'] * 9) + "]\n"
        for name, prev in zip("abcdefghi", [None, *"abcdefgh"])
    )
    + "trainer: *i\n"
)  # nine levels of nine: 9**9 = 387 million strings from 600 bytes


@pytest.mark.timeout(20)
def test_an_alias_bomb_in_a_config_file_is_refused_at_once(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    assert len(BOMB) < 700
    start = time.perf_counter()
    assert_one_line_failure(train(tmp_path, "--config", config), str(config), "aliases", "not allowed", "line 2")
    assert time.perf_counter() - start < 5


@pytest.mark.timeout(20)
def test_an_alias_in_an_override_is_refused():
    with pytest.raises(ConfigError, match=r"override .*: line 1, column \d+: YAML aliases \(\*name\) are not allowed"):
        load_config(autoencoder_stage.AutoencoderStageConfig, None, ["model.ch_mult=[&a 1, *a]"])


def test_an_anchor_without_alias_is_plain_data():
    config = load_config(autoencoder_stage.AutoencoderStageConfig, None, ["model.ch_mult=&a [1, 2]"])
    assert config.model.ch_mult == (1, 2)


def test_errors_cut_long_values_with_an_ellipsis(tmp_path):
    huge = "x" * 100_000
    line = assert_one_line_failure(train(tmp_path, "--set", f"trainer.max_steps={huge}"), "trainer.max_steps", "...")
    assert len(line) < 400
    line = assert_one_line_failure(train(tmp_path, "--set", f"nonsense={huge}", "--set", f"trainer.logger={huge}"))
    assert len(line) < 600


def test_brief_keeps_short_values_and_cuts_long_ones_to_the_limit():
    assert brief([1, 2]) == "[1, 2]"
    assert brief("y" * 200) == "'" + "y" * 76 + "..." and len(brief("y" * 200)) == 80


def test_config_keys_that_are_not_strings_are_named_not_a_crash(tmp_path):
    config = tmp_path / "numbers.yaml"
    config.write_text("1: 2\ntrainer: {max_steps: 3}\n")
    assert_one_line_failure(train(tmp_path, "--config", config), "unknown config key(s) 1")


def test_a_flood_of_unknown_keys_is_listed_briefly(tmp_path):
    config = tmp_path / "many.yaml"
    config.write_text("".join(f"key{i}: 0\n" for i in range(5000)))
    line = assert_one_line_failure(train(tmp_path, "--config", config), "unknown config key(s)", "(5000 in all)")
    assert len(line) < 1200


# ---- 5. --device --------------------------------------------------------------------------------


def test_check_device_accepts_cpu_and_names_the_valid_forms_for_nonsense():
    assert check_device("cpu") == "cpu"
    for bogus in ("bogus", "cuda:x", "cpu:0:1", "gpu", ""):
        with pytest.raises(ValueError, match="cpu, cuda, cuda:N or mps"):
            check_device(bogus)


def test_check_device_says_when_cuda_is_missing_or_the_index_too_high(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"cuda:2.*2 CUDA devices \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")


# Every command with --device; its model does not exist, so an error about the device came before any loading.
DEVICE_COMMANDS = [
    ["sample", "--model", "diffusion@no-such-version", "--n", "1"],
    ["eval", "samples", "--model", "diffusion@no-such-version", "--n", "1"],
    ["eval", "recon", "--autoencoder", "autoencoder@no-such-version", "--n", "1"],
    ["ema", "--model", "diffusion@no-such-version", "--sigma-rel", "0.05"],
]


@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_device_option_refuses_a_bogus_device_before_loading(tmp_path, command):
    result = cli(tmp_path, *command, "--out", tmp_path / "out", "--device", "bogus")
    assert_one_line_failure(result, "--device", "'bogus'", "cpu, cuda, cuda:N or mps")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_device_option_says_cuda_is_missing_before_loading(tmp_path, command, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cli(tmp_path, *command, "--out", tmp_path / "out", "--device", "cuda")
    assert_one_line_failure(result, "--device", "CUDA is not available")


def test_encode_device_setting_is_checked_before_loading(tmp_path):
    result = cli(tmp_path, "encode", "--autoencoder", "autoencoder@no-such-version", "--set", "device=bogus")
    assert_one_line_failure(result, "'bogus'", "cpu, cuda, cuda:N or mps")


def test_the_pipeline_checks_its_device_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        LatentDiffusionPipeline.from_artifacts("diffusion@no-such-version", store=tmp_path, device="tpu")


# ---- 6. imported configs against the weights' shapes -----------------------------------------

SMALL_DIT = DiTConfig(
    input_size=4,
    patch_size=2,
    in_channels=4,
    hidden_size=16,
    depth=2,
    num_heads=2,
    num_classes=10,
    timestep_freq_shift=1,
)
SMALL_AE = AutoencoderConfig(
    in_channels=3, resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4
)


def diffusers_folder(tmp_path: Path, model, export, **config_changes) -> Path:
    """A diffusers folder of `model` whose config.json then gets `config_changes`."""
    folder = export(model, tmp_path / "model", verify=False).path
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "changes, phrase",
    [
        ({"attention_head_dim": 3_000_000}, "pos_embed.proj.weight"),  # 6M wide: ~360 TB of weights
        ({"num_layers": 1_000_000}, "num_layers"),
        ({"sample_size": 2_000_000}, "sample_size"),
    ],
)
def test_a_diffusers_dit_config_that_does_not_fit_its_weights_is_refused_before_allocating(tmp_path, changes, phrase):
    folder = diffusers_folder(tmp_path, DiT(SMALL_DIT), export_dit_to_diffusers, **changes)
    start = time.perf_counter()
    with pytest.raises(InteropError) as err:
        load_diffusers_dit(folder)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert str(folder / "config.json") in message and phrase in message and "\n" not in message


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "changes, phrase",
    [
        ({"block_out_channels": [8_000_000, 16_000_000]}, "decoder.conv_in.weight"),
        ({"layers_per_block": 1_000_000}, "layers_per_block"),
        (
            {
                "block_out_channels": [8] * 100_000,
                "down_block_types": ["DownEncoderBlock2D"] * 100_000,
                "up_block_types": ["UpDecoderBlock2D"] * 100_000,
            },
            "block_out_channels",
        ),
    ],
)
def test_a_diffusers_autoencoder_config_that_does_not_fit_its_weights_is_refused_before_allocating(
    tmp_path, changes, phrase
):
    folder = diffusers_folder(tmp_path, AutoencoderKL(SMALL_AE), export_autoencoder_to_diffusers, **changes)
    start = time.perf_counter()
    with pytest.raises(InteropError) as err:
        load_diffusers_autoencoder(folder)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert str(folder / "config.json") in message and phrase in message and "\n" not in message


def test_a_diffusers_config_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path):
    folder = diffusers_folder(tmp_path, DiT(SMALL_DIT), export_dit_to_diffusers, num_layers=[2])
    with pytest.raises(InteropError, match=r"config\.json: num_layers must be a positive integer, got \[2\]"):
        load_diffusers_dit(folder)


@pytest.mark.timeout(30)
def test_compvis_and_original_dit_sizes_from_set_are_checked_before_allocating(tmp_path):
    model = AutoencoderKL(SMALL_AE)
    save_file(
        {k: v.contiguous() for k, v in autoencoder_state_dict_to_compvis(model.state_dict(), SMALL_AE).items()},
        tmp_path / "kl.safetensors",
    )
    huge = AutoencoderConfig(**{**to_dict(SMALL_AE), "ch_mult": (1, 2), "ch": 4_000_000, "norm_groups": 4})
    with pytest.raises(
        InteropError, match=r"decoder\.conv_in\.weight: expected \(8000000, 4, 3, 3\), got \(16, 4, 3, 3\)"
    ):
        load_compvis_autoencoder(tmp_path / "kl.safetensors", huge)
    dit = DiT(SMALL_DIT)
    save_file(dit_state_dict_to_original(dit.state_dict(), SMALL_DIT), tmp_path / "dit.safetensors")
    with pytest.raises(InteropError, match="input_size"):
        load_original_dit(tmp_path / "dit.safetensors", {"num_heads": 2, "input_size": 2_000_000})
    with pytest.raises(InteropError, match="depth"):
        load_original_dit(tmp_path / "dit.safetensors", {"num_heads": 2, "depth": 1_000_000})


def test_a_fitting_diffusers_dit_still_imports(tmp_path):
    folder = diffusers_folder(tmp_path, DiT(SMALL_DIT), export_dit_to_diffusers)
    assert load_diffusers_dit(folder).config.hidden_size == 16


# ---- 7. export --quantize --keep ------------------------------------------------------------------


def test_a_keep_pattern_that_matches_no_layer_is_refused_naming_it(store):
    before = len(store.list("diffusion"))
    ref = store.list("diffusion")[0].ref
    result = cli(
        store,
        "export",
        "diffusion",
        ref,
        "--quantize",
        "int8",
        "--keep",
        "blocks.*.adaLN_modulation",
        "--keep",
        "blocks.*.no_such_layer",
    )
    line = assert_one_line_failure(result, "--keep 'blocks.*.no_such_layer' matches no int8 layer", "blocks.0.attn.qkv")
    assert "'blocks.*.adaLN_modulation' matches" not in line  # the pattern that matches is not blamed
    assert len(store.list("diffusion")) == before


def test_a_keep_pattern_matching_only_layers_that_stay_float_anyway_is_refused(store):
    with pytest.raises(ValueError, match="'final_layer.linear' matches no int8 layer"):
        quantize_diffusion(store, store.list("diffusion")[0].ref, ["final_layer.linear"])


# ---- 8. --guide-scale without --guide ----------------------------------------------------------


@pytest.mark.parametrize("command", [["sample"], ["eval", "samples"]])
def test_guide_scale_without_guide_is_refused_before_loading(tmp_path, command):
    result = cli(
        tmp_path, *command, "--model", "diffusion@no-such-version", "--guide-scale", "3", "--out", tmp_path / "out"
    )
    assert_one_line_failure(result, "--guide-scale", "--guide")
    assert "no-such-version" not in result.output


def test_guide_scale_keeps_its_range_check_without_guide(tmp_path):
    result = cli(tmp_path, "sample", "--guide-scale", "-1", "--out", tmp_path / "out")
    assert_one_line_failure(result, "--guide-scale", "got -1")


# ---- 9, 10. pipeline arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, shown",
    [
        ([1.5], "1.5"),
        (1.5, "1.5"),
        (torch.tensor([0.0, 2.5]), "2.5"),
        ([True, False], "True"),
        ([float("nan")], "nan"),
        (["3"], "'3'"),
    ],
)
def test_labels_that_are_not_integers_are_refused_naming_the_value(pipe, labels, shown):
    with pytest.raises(ValueError, match="class labels must be integers") as err:
        pipe.sample(labels, num_steps=1)
    assert shown in str(err.value)


def test_integral_labels_of_any_type_are_accepted(pipe):
    assert pipe.sample(torch.tensor([1.0, 2.0]), num_steps=1).shape[0] == 2
    assert pipe.sample(np.array([3, 4]), num_steps=1).shape[0] == 2
    assert pipe.sample(np.int64(5), num_steps=1).shape[0] == 1


def test_a_long_list_of_bad_labels_is_shown_briefly(pipe):
    with pytest.raises(ValueError) as err:
        pipe.sample([1] * 5000 + [99], num_steps=1)
    assert "0..9" in str(err.value) and len(str(err.value)) < 200


@pytest.mark.parametrize("strength", [float("nan"), float("inf")])
def test_img2img_refuses_a_non_finite_strength_in_one_line(pipe, strength):
    with pytest.raises(ValueError, match=rf"strength must be in \[0, 1\].*got {strength}$"):
        pipe.img2img(torch.zeros(1, 1, 32, 32), strength=strength, class_labels=[0], num_steps=2)


# ---- 11. the conversion hint for pickles ---------------------------------------------------------


def test_the_pickle_conversion_hint_says_it_runs_the_files_code(tmp_path):
    torch.save({"x": torch.zeros(1), "args": argparse.Namespace(lr=1.0)}, tmp_path / "dit.pt")  # not weights-only
    with pytest.raises(InteropError) as err:
        read_checkpoint(tmp_path / "dit.pt")
    message = str(err.value)
    assert "unpickles" in message and "runs any code" in message and "source you trust" in message
    assert "weights_only=False" in message and str(tmp_path / "dit.safetensors") in message


# ---- 12. image folders: a pixel cap read from the header --------------------------------------------


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (8-bit gray) and that holds no pixel data: nothing to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_a_huge_image_is_refused_from_its_header_naming_the_file_size_and_setting(tmp_path):
    path = tmp_path / "huge.png"
    png_header_only(path, 12000, 12000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not be the signal
        with pytest.raises(ImageReadError) as err:
            load_image(path, 32, 1)
    message = str(err.value)
    assert str(path) in message and "12000x12000" in message and "data.max_pixels" in message and "\n" not in message


def test_an_image_beyond_pillows_own_limit_gets_the_same_kind_of_line(tmp_path):
    path = tmp_path / "huger.png"
    png_header_only(path, 20000, 20000)  # 400 Mpx: Pillow refuses it before its size can be read
    with pytest.raises(ImageReadError) as err:
        load_image(path, 32, 1)
    message = str(err.value)
    assert (
        str(path) in message
        and "Pillow's own limit" in message
        and "data.max_pixels" in message
        and "\n" not in message
    )


def test_the_pixel_cap_is_a_data_setting_that_folders_use(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 50), dtype=np.uint8)).save(folder / "a.png")
    assert build_dataset(DataConfig(name="folder", path=str(folder)), "train")[0][0].shape == (1, 32, 32)
    small = build_dataset(DataConfig(name="folder", path=str(folder), max_pixels=1000), "train")
    with pytest.raises(ImageReadError, match=r"50x40 .*data.max_pixels = 1000"):
        small[0]
    with pytest.raises(ValueError, match="data.max_pixels"):
        DataConfig(max_pixels=0)


TINY_AUTOENCODER = [
    "model.ch=8",
    "model.num_res_blocks=1",
    "loss.perceptual.net=squeeze",
    "loss.perceptual.backbone=random",
    "trainer.log_every=1",
    "trainer.image_every=0",
    "trainer.progress=false",
]


@pytest.mark.timeout(120)
def test_training_on_a_folder_with_a_huge_image_stops_in_one_line_and_stores_nothing(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    png_header_only(folder / "huge.png", 12000, 12000)
    overrides = [
        *TINY_AUTOENCODER,
        "data.name=folder",
        f"data.path={folder}",
        "trainer.max_steps=2",
        "train_subset=0",
        "trainer.batch_size=3",
        "preview_images=1",
    ]
    result = train(tmp_path, "--config", QUICK, *[arg for item in overrides for arg in ("--set", item)])
    assert_one_line_failure(result, f"image {folder / 'huge.png'} is 12000x12000", "data.max_pixels", last=False)
    assert not (tmp_path / "store" / "autoencoder").exists()


def test_the_default_cap_reads_a_4096_square_header(tmp_path):
    path = tmp_path / "big.png"
    png_header_only(path, 4096, 4096)
    with pytest.raises(ImageReadError) as err:  # allowed by the cap: decoding then finds no pixel data
        load_image(path, 32, 1)
    assert "max_pixels" not in str(err.value)
    assert math.prod((4096, 4096)) == DataConfig().max_pixels


def test_a_discriminator_for_other_image_channels_is_refused_when_the_config_loads():
    from stages.autoencoder import AutoencoderStageConfig

    with pytest.raises(ConfigError, match=r"discriminator.in_channels is 3, .* 1 channel\(s\).*in_channels=1"):
        load_config(AutoencoderStageConfig, ROOT / "configs/fmnist/autoencoder-quick.yaml", ["loss.disc_enabled=true"])
    fitted = ["loss.disc_enabled=true", "loss.discriminator.preset=patchgan-34-small"]
    assert load_config(AutoencoderStageConfig, ROOT / "configs/fmnist/autoencoder-quick.yaml", fitted).loss.disc_enabled
