"""Sample output: the output folder is checked before sampling, and images stream to it batch by batch."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_failure, cli
from ldm.generation import SamplingSettings
from pipeline import LatentDiffusionPipeline
from stages.sample import write_samples


def images_in(folder):
    """The sorted file names in folder/images."""
    return sorted(p.name for p in (folder / "images").iterdir())


def pixels(path):
    """The image at `path` as an int16 array, so that differences of grey levels may go negative."""
    return np.asarray(Image.open(path), dtype=np.int16)


# ---- the output folder ----------------------------------------------------------------------


def test_sample_command_refuses_an_out_that_is_a_file_before_sampling(tmp_path, store, monkeypatch):
    calls = []
    monkeypatch.setattr(LatentDiffusionPipeline, "sample", lambda *args, **kwargs: calls.append(1))
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert_clean_failure(
        cli(store, "sample", "--n", "2", "--steps", "2", "--out", str(target)), "is a file, not a folder"
    )
    assert calls == [] and target.read_text() == "mine"


def test_sample_command_refuses_a_folder_holding_earlier_samples(tmp_path, store):
    out = tmp_path / "out"
    assert cli(store, "sample", "--n", "2", "--steps", "2", "--out", str(out)).exit_code == 0
    before = (out / "samples.json").read_bytes()
    assert_clean_failure(
        cli(store, "sample", "--n", "3", "--steps", "2", "--out", str(out)), "already holds samples", "--overwrite"
    )
    assert (out / "samples.json").read_bytes() == before and images_in(out) == [
        "000000-class0.png",
        "000001-class1.png",
    ]


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


# ---- streaming ------------------------------------------------------------------------------


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
    by_two = write_samples(
        store,
        "diffusion@latest",
        SamplingSettings(num_steps=3, seed=4, batch_size=2),
        n=5,
        classes="3,8",
        out_dir=tmp_path / "two",
    )
    by_five = write_samples(
        store,
        "diffusion@latest",
        SamplingSettings(num_steps=3, seed=4, batch_size=5),
        n=5,
        classes="3,8",
        out_dir=tmp_path / "five",
    )
    assert by_two["complete"] and by_two["sampled"] == 5 and by_two["labels"] == by_five["labels"] == [3, 8, 3, 8, 3]
    assert images_in(tmp_path / "two") == images_in(tmp_path / "five")
    for name in ["grid.png", *(f"images/{image}" for image in images_in(tmp_path / "two"))]:
        # image i draws from seed + i alone; the same floats up to round-off, so at most one grey level apart
        assert np.abs(pixels(tmp_path / "two" / name) - pixels(tmp_path / "five" / name)).max() <= 1, name


def test_the_grid_of_a_large_run_holds_whole_rows_of_classes(tmp_path, store):
    write_samples(
        store,
        "diffusion@latest",
        SamplingSettings(num_steps=1, batch_size=130),
        n=260,
        out_dir=tmp_path,
        single_images=False,
    )
    # 260 > 256 images: the first 250 (25 per class), one row per class, 2x upscaled
    assert Image.open(tmp_path / "grid.png").size == (2 * (25 * 34 + 2), 2 * (10 * 34 + 2))
