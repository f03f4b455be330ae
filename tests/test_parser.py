"""The scene parser: its shapes, its cells and targets, its loss, its measurement and the `parser` stage."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import assert_one_line_failure, cli, needs_fmnist
from ldm.artifacts import ArtifactStore
from ldm.data.scenes import COLOURS, ITEMS, Cell, SceneMaker, ScenesDataset
from ldm.loading import load_parser
from ldm.models.parser import EMPTY, IGNORE, SceneParser, SceneParserConfig, cell_targets, cells_of, split_cells
from stages.parser import parser_accuracy, parser_loss, recolour

TINY = SceneParserConfig(width=4, cell_features=8)


def test_parser_gives_item_and_colour_logits_per_cell_and_features_per_scene():
    parser = SceneParser(TINY)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    item_logits, colour_logits = parser(images)
    assert item_logits.shape == (3, 4, 1 + len(ITEMS))
    assert colour_logits.shape == (3, 4, len(COLOURS))
    assert parser.features(images).shape == (3, 4 * 8)
    assert parser.features(images[:0]).shape == (0, 32)


def test_parse_returns_four_cells_per_scene_in_eval_mode_and_restores_the_mode():
    parser = SceneParser(TINY).train()
    parsed = parser.parse(torch.zeros(2, 3, 64, 64))
    assert len(parsed) == 2 and all(len(cells) == 4 for cells in parsed)
    assert all(cell is None or isinstance(cell, Cell) for cells in parsed for cell in cells)
    assert parser.training
    assert parser.parse(torch.zeros(1, 3, 64, 64)) == parser.parse(torch.zeros(1, 3, 64, 64))  # BN running stats


def mirror_each_cell(images: torch.Tensor) -> torch.Tensor:
    """Scenes (N, C, 64, 64) with each 32x32 cell mirrored left-right in place."""
    grid = images.reshape(len(images), images.shape[1], 2, 32, 2, 32)  # (N, C, row, y, col, x)
    return grid.flip(-1).reshape(images.shape)


def test_mirror_average_reads_a_cell_and_its_mirror_alike_and_only_in_eval_mode():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    config = replace(TINY, pool_grid=2)  # a spatial grid: a mirrored cell reads differently
    plain = SceneParser(config).eval()
    averaged = SceneParser(replace(config, mirror_average=True)).eval()
    averaged.load_state_dict(plain.state_dict())
    logits = averaged(images)[0]
    torch.testing.assert_close(averaged(mirror_each_cell(images))[0], logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(mirror_each_cell(images))[0], plain(images)[0], atol=1e-6, rtol=0)
    expected = (plain(images)[0] + plain(mirror_each_cell(images))[0]) / 2
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(averaged.features(images), plain.features(images))  # features stay single reads
    averaged.train(), plain.train()
    torch.testing.assert_close(averaged(images)[0], plain(images)[0])  # training reads once


def test_the_parser_refuses_images_that_are_not_64x64():
    with pytest.raises(ValueError, match="64x64"):
        SceneParser(TINY)(torch.zeros(1, 3, 32, 32))


def test_split_cells_cuts_each_scene_into_its_quadrants_in_reading_order():
    images = torch.zeros(2, 3, 64, 64)
    for k in range(4):
        top, left = 32 * (k // 2), 32 * (k % 2)
        images[:, :, top : top + 32, left : left + 32] = k
    images[1] += 10
    cells = split_cells(images)  # (8, 3, 32, 32)
    assert cells.shape == (8, 3, 32, 32)
    assert [int(c.unique()) for c in cells] == [0, 1, 2, 3, 10, 11, 12, 13]


@needs_fmnist
def test_cell_targets_and_cells_of_round_trip_scene_truths():
    maker = SceneMaker("test", download=False)
    truths = [maker.draw(i)[0] for i in range(200)]
    items, colours = cell_targets(truths)
    assert items.shape == colours.shape == (200, 4)
    assert ((items == EMPTY) == (colours == IGNORE)).all()
    assert cells_of(items, colours.clamp_min(0)) == [t.cells for t in truths]


@needs_fmnist
def test_recolour_repaints_a_cell_exactly_as_the_scene_would_be_rendered_in_that_colour():
    maker = SceneMaker("train", download=False)
    truth, _ = maker.draw(7)
    for colour in COLOURS:
        painted = replace(truth, cells=tuple(None if c is None else Cell(c.item, colour) for c in truth.cells))
        expected = split_cells(maker.render(painted)[None])
        got = recolour(split_cells(maker.render(truth)[None]), torch.full((4,), COLOURS.index(colour)))
        assert torch.allclose(got, expected, atol=1e-6), colour


def test_the_colour_loss_ignores_empty_cells():
    items = torch.tensor([0, 3, 0, 5])
    colours = torch.tensor([IGNORE, 2, IGNORE, 7])
    item_logits = torch.randn(4, 1 + len(ITEMS))
    colour_logits = torch.randn(4, len(COLOURS), requires_grad=True)
    parser_loss(item_logits, colour_logits, items, colours).backward()
    assert (colour_logits.grad[[0, 2]] == 0).all()
    assert (colour_logits.grad[[1, 3]] != 0).any()
    empty = parser_loss(item_logits[[0, 2]], colour_logits[[0, 2]], items[[0, 2]], colours[[0, 2]])
    assert torch.isfinite(empty)  # a batch of empty cells only has no colour loss, not a NaN


class OracleParser(SceneParser):
    """A parser that knows the truth of given scenes: it returns their cells' one-hot logits (for tests)."""

    def __init__(self, scenes: ScenesDataset) -> None:
        super().__init__(TINY)
        self.truths = {image.numpy().tobytes(): truth for image, _, truth in scenes}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items, colours = cell_targets([self.truths[image.numpy().tobytes()] for image in images])
        item_logits = torch.nn.functional.one_hot(items, 1 + len(ITEMS)).float()
        return item_logits, torch.nn.functional.one_hot(colours.clamp_min(0), len(COLOURS)).float()


@needs_fmnist
def test_parser_accuracy_of_an_oracle_is_one_everywhere_and_of_a_random_parser_is_not():
    scenes = ScenesDataset("test", 60, held_out=True, download=False)
    accuracy = parser_accuracy(OracleParser(scenes), scenes, batch_size=25)
    assert set(accuracy.values()) == {1.0}
    assert {"cells", "objects", "items", "colours", "empty", "held_out_pairs"} <= set(accuracy)
    torch.manual_seed(0)
    assert parser_accuracy(SceneParser(TINY), scenes)["objects"] < 0.5


# ----------------------------------------------------------------------------- the stage


@needs_fmnist
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_train_parser_stores_an_artifact_with_its_accuracies(tmp_path):
    result = cli(
        tmp_path / "store",
        "train",
        "parser",
        "--run-dir",
        tmp_path / "run",
        *("--set", "model.width=4", "--set", "model.cell_features=8", "--set", "trainer.max_steps=3"),
        *("--set", "trainer.batch_size=8", "--set", "trainer.progress=false"),
        *("--set", "test_scenes=20", "--set", "held_out_scenes=10"),
    )
    assert result.exit_code == 0, result.output
    artifact = ArtifactStore(tmp_path / "store").load("parser@latest", stage="parser")
    metrics = artifact.manifest["metrics"]
    assert {"cells", "objects", "items", "colours", "empty"} <= set(metrics["test"])
    assert set(metrics["test_items"]) <= set(ITEMS) and set(metrics["test_colours"]) <= set(COLOURS)
    assert {"pairs", "cells"} <= set(metrics["held_out"])
    assert "test cells read right" in result.output
    parser = load_parser(artifact)
    assert parser.config == SceneParserConfig(width=4, cell_features=8)
    listed = cli(tmp_path / "store", "artifacts", "list", "--stage", "parser")
    assert artifact.ref in listed.output


def test_train_parser_refuses_data_other_than_scenes_in_one_line(tmp_path):
    fmnist = ("--set", "data.name=fmnist", "--set", "data.channels=1", "--set", "data.resolution=32")
    result = cli(tmp_path / "store", "train", "parser", "--run-dir", tmp_path / "run", *fmnist)
    assert_one_line_failure(result, "data.name must be 'scenes'")
    assert not (tmp_path / "run").exists()


def test_a_parser_stored_with_grey_channel_true_loads_and_false_is_refused():
    from ldm.config import ConfigError, from_dict

    assert from_dict(SceneParserConfig, {"width": 8, "grey_channel": True}, "model") == SceneParserConfig(width=8)
    with pytest.raises(ConfigError, match="grey_channel"):
        from_dict(SceneParserConfig, {"width": 8, "grey_channel": False}, "model")
