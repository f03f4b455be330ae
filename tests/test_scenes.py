"""Scenes: captioned colour compositions of Fashion-MNIST items, their truths, captions and held-out pairs."""

from __future__ import annotations

import itertools
import re
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import needs_fmnist
from ldm.data import DataConfig, build_dataset, data_fingerprint, iterate_images, with_data
from ldm.data.fmnist import load_fmnist, to_model_range
from ldm.data.scenes import (
    CATEGORIES,
    HELD_OUT,
    ITEM_OF_CLASS,
    PALETTE,
    Cell,
    SceneMaker,
    ScenesDataset,
    SceneTruth,
    caption_of,
    collate_scenes,
    render_scene,
)

pytestmark = needs_fmnist

# The spec's vocabulary, written out here so that the checker does not lean on the module's tables.
SINGULAR_OF = {
    "tops": "top",
    "trousers": "trouser",
    "sandals": "sandal",
    "sneakers": "sneaker",
    "bags": "bag",
    "ankle boots": "ankle boot",
}
NUMBERS = {"two": 2, "three": 3, "four": 4}
COLOUR = "|".join(PALETTE)
ITEM = "|".join(SINGULAR_OF.values())
NOUN_PHRASE = rf"(an?) (?:({COLOUR}) )?({ITEM})"
RELATION = r"to the left of|left of|to the right of|right of|above|below|beneath"
PREFIX = r"(?:a photo of |an image of |a picture of )?"


@pytest.fixture(scope="module")
def train():
    return SceneMaker("train", download=False)


@pytest.fixture(scope="module")
def test():
    return SceneMaker("test", download=False)


def parse(caption: str) -> tuple[list[tuple[str | None, str]], str | None, str]:
    """A caption read back: one (colour or None, item) per object it names, its relation, and its form."""
    body = re.fullmatch(rf"{PREFIX}(.*)", caption).group(1)
    if m := re.fullmatch(rf"(two|three|four) (?:({COLOUR}) )?({'|'.join(SINGULAR_OF)})", body):
        return [(m.group(2), SINGULAR_OF[m.group(3)])] * NUMBERS[m.group(1)], None, "count"
    phrases = []
    if m := re.fullmatch(rf"{NOUN_PHRASE} ({RELATION}) {NOUN_PHRASE}", body):
        relation, phrases, form = m.group(4), [m.groups()[0:3], m.groups()[4:7]], "relation"
    elif m := re.fullmatch(rf"{NOUN_PHRASE} (?:and|with) {NOUN_PHRASE}", body):
        relation, phrases, form = None, [m.groups()[0:3], m.groups()[3:6]], "pair"
    elif m := re.fullmatch(NOUN_PHRASE, body):
        relation, phrases, form = None, [m.groups()], "single"
    else:
        raise AssertionError(f"caption outside the grammar: {caption!r}")
    for article, colour, item in phrases:
        assert article == ("an" if (colour or item)[0] in "aeiou" else "a"), caption
    return [(colour, item) for _, colour, item in phrases], relation, form


def is_true_of(caption: str, truth: SceneTruth) -> bool:
    """Whether `caption` describes exactly the objects of `truth`, their named colours and their relation."""
    mentions, relation, form = parse(caption)
    objects = [(k, cell) for k, cell in enumerate(truth.cells) if cell is not None]
    if len(mentions) != len(objects):
        return False
    expected_form = {
        "single_object": "single",
        "colors": "single",
        "two_object": "pair",
        "color_attr": "pair",
        "counting": "count",
        "position": "relation",
    }
    if expected_form[truth.category] != form:
        return False
    if truth.category in ("colors", "color_attr") and any(colour is None for colour, _ in mentions):
        return False
    for order in itertools.permutations(objects):
        if all(c.item == item and colour in (None, c.colour) for (_, c), (colour, item) in zip(order, mentions)):
            if relation is None:
                return True
            (subject, _), (reference, _) = order
            row, col = divmod(subject, 2), divmod(reference, 2)
            holds = {
                "left": row[0] == col[0] and row[1] < col[1],
                "right": row[0] == col[0] and row[1] > col[1],
                "above": row[1] == col[1] and row[0] < col[0],
                "below": row[1] == col[1] and row[0] > col[0],
            }
            word = {"beneath": "below"}.get(relation, relation.replace("to the ", "").removesuffix(" of"))
            if holds[word]:
                return True
    return False


def test_the_checker_rejects_false_captions():
    truth = SceneTruth(
        "position", (Cell("bag", "red"), Cell("trouser", "blue"), None, None), "test", (0, 1, -1, -1), [(2, 2)] * 4
    )
    assert is_true_of("a red bag to the left of a blue trouser", truth)
    assert is_true_of("a photo of a trouser right of a bag", truth)
    assert not is_true_of("a red bag to the right of a blue trouser", truth)
    assert not is_true_of("a blue bag to the left of a red trouser", truth)  # colours bound to the wrong items
    assert not is_true_of("a red bag above a blue trouser", truth)
    assert not is_true_of("a red bag and a blue trouser", truth)  # the form of another category


def test_items_merge_the_four_upper_body_classes_into_top():
    assert {c for c, item in ITEM_OF_CLASS.items() if item == "top"} == {0, 2, 4, 6}
    assert sorted(set(ITEM_OF_CLASS.values())) == sorted(SINGULAR_OF.values())
    assert all(item != "top" for item, _ in HELD_OUT)  # dropping "top" keeps every held-out pair


def test_scene_is_a_function_of_seed_split_and_index_alone(train):
    alone = SceneMaker("train", download=False).scene(37)
    again = train.scene(37)
    assert alone[1] == again[1] and alone[2] == again[2] and torch.equal(alone[0], again[0])
    images, captions, truths = next(
        iter(DataLoader(ScenesDataset("train", size=64, download=False), batch_size=64, collate_fn=collate_scenes))
    )
    assert images.shape == (64, 3, 64, 64)
    assert torch.equal(images[37], alone[0]) and captions[37] == alone[1] and truths[37] == alone[2]
    other_seed = SceneMaker("train", seed=1, download=False)
    assert sum(other_seed.draw(i) != train.draw(i) for i in range(20)) >= 18
    assert train.draw(37, held_out=False) != SceneMaker("test", download=False).draw(37)


def test_train_scenes_are_made_of_train_items_and_test_scenes_of_test_items(train, test):
    for maker, split in ((train, "train"), (test, "test")):
        images, labels = load_fmnist(split, download=False)
        for index in range(100):
            image, _, truth = maker.scene(index)
            assert truth.split == split
            for k, cell in enumerate(truth.cells):
                if cell is None:
                    continue
                source = truth.sources[k]
                assert ITEM_OF_CLASS[int(labels[source])] == cell.item
                (dy, dx), (row, col) = truth.offsets[k], divmod(k, 2)
                top, left = 32 * row + dy, 32 * col + dx
                rgb = torch.tensor(PALETTE[cell.colour])[:, None, None]
                expected = rgb * (images[source].float() / 127.5) - 1  # the item's own pixels, tinted
                assert torch.allclose(image[:, top : top + 28, left : left + 28], expected, atol=1e-6)


def test_held_out_pairs_never_appear_in_5000_train_scenes_or_their_captions(train):
    held = {Cell(*pair) for pair in HELD_OUT}
    seen = set()
    for index in range(5000):
        truth, caption = train.draw(index)
        cells = {cell for cell in truth.cells if cell is not None}
        assert not cells & held, (index, truth)
        assert not {(item, colour) for colour, item in parse(caption)[0]} & set(HELD_OUT), caption
        seen |= cells
    assert len(seen) == 6 * len(PALETTE) - len(HELD_OUT)  # every other pair does appear


def test_held_out_scenes_each_hold_a_held_out_pair_named_in_their_caption(train, test):
    dataset = ScenesDataset("test", size=300, held_out=True, download=False)
    categories = set()
    for index in range(len(dataset)):
        truth, caption = dataset.maker.draw(index, held_out=True)
        pairs = [(cell.item, cell.colour) for cell in truth.cells if cell is not None]
        named = [(item, colour) for colour, item in parse(caption)[0]]
        assert set(pairs) & set(HELD_OUT) & set(named), caption
        categories.add(truth.category)
    assert categories == set(CATEGORIES)
    with pytest.raises(ValueError, match="held-out pairs are for evaluation: use split 'test'"):
        train.draw(0, held_out=True)
    with pytest.raises(ValueError, match="held-out pairs are for evaluation"):
        ScenesDataset("train", held_out=True, download=False)


def test_every_caption_is_true_of_its_truth_across_all_categories_and_wordings(train, test):
    drawn = [train.draw(i) for i in range(1500)] + [test.draw(i, held_out=True) for i in range(500)]
    for truth, caption in drawn:
        assert is_true_of(caption, truth), (caption, truth)
    assert {truth.category for truth, _ in drawn} == set(CATEGORIES)
    relations = {parse(caption)[1] for _, caption in drawn} - {None}
    assert relations == set(RELATION.split("|"))
    assert any(caption.startswith("a photo of ") for _, caption in drawn)
    assert any(" with " in caption for _, caption in drawn)


def test_caption_of_a_given_truth_is_true_and_refuses_a_truth_its_category_cannot_hold(test):
    cells = (None, Cell("sneaker", "white"), None, Cell("bag", "yellow"))
    truth = test.compose(cells, "position", np.random.default_rng(0))
    for seed in range(20):
        assert is_true_of(caption_of(truth, np.random.default_rng(seed)), truth)
    diagonal = test.compose(
        (Cell("sneaker", "white"), None, None, Cell("bag", "yellow")), "position", np.random.default_rng(0)
    )
    with pytest.raises(ValueError, match="share no row or column"):
        caption_of(diagonal, np.random.default_rng(0))
    with pytest.raises(ValueError, match="a counting scene cannot hold"):
        caption_of(test.compose(cells, "counting", np.random.default_rng(0)), np.random.default_rng(0))


def test_counting_captions_name_the_number_of_copies_of_one_item_and_colour(train):
    counted = 0
    for index in range(600):
        truth, caption = train.draw(index)
        if truth.category != "counting":
            continue
        cells = [cell for cell in truth.cells if cell is not None]
        number = re.search(r"\b(two|three|four)\b", caption).group(1)
        assert NUMBERS[number] == len(cells) and len(set(cells)) == 1, (caption, truth)
        counted += 1
    assert counted > 50


def test_a_white_item_is_grey_and_a_red_item_lives_in_the_red_channel_alone(test):
    truth = test.compose(
        (Cell("bag", "white"), None, Cell("sneaker", "red"), None), "two_object", np.random.default_rng(3)
    )
    image = test.render(truth)  # (3, 64, 64)
    white, red = image[:, :32, :32], image[:, 32:, :32]
    assert torch.equal(white[0], white[1]) and torch.equal(white[1], white[2])
    (dy, dx), source = truth.offsets[0], truth.sources[0]
    fmnist = to_model_range(test.images[source : source + 1], resolution=28)[0, 0]  # the grey original
    assert torch.equal(white[0, dy : dy + 28, dx : dx + 28], fmnist)
    assert (red[1:] == -1).all() and red[0].max() > 0
    assert (image[:, :, 32:] == -1).all()  # the empty cells are background


def test_images_are_float32_3x64x64_within_minus_one_one(test):
    dataset = ScenesDataset("test", size=50, download=False)
    for image, caption, truth in dataset:
        assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
        assert image.min() >= -1 and image.max() <= 1 and image.max() > 0
        assert isinstance(caption, str) and isinstance(truth, SceneTruth)
    assert len(list(dataset)) == 50


def test_render_scene_refuses_a_truth_of_another_split(train, test):
    truth, _ = train.draw(0)
    with pytest.raises(ValueError, match="a train scene needs the train images"):
        test.render(truth)
    assert torch.equal(render_scene(truth, train.images), train.render(truth))


def test_a_thousand_scenes_render_in_well_under_a_few_seconds(train):
    start = time.perf_counter()
    for index in range(1000):
        train.scene(index)
    assert time.perf_counter() - start < 3.0


def test_build_dataset_serves_scenes_as_image_and_category_pairs():
    config = DataConfig(name="scenes", channels=3, resolution=64, download=False)
    dataset = build_dataset(config, "test")
    assert len(dataset) == 10000 and dataset.classes == CATEGORIES
    image, label = dataset[5]
    _, _, truth = ScenesDataset("test", download=False)[5]
    assert image.shape == (3, 64, 64) and label == CATEGORIES.index(truth.category)
    images, labels = next(iterate_images(dataset, batch_size=8, limit=8))
    assert images.shape == (8, 3, 64, 64) and labels.dtype == torch.int64
    assert data_fingerprint(config, "train") != data_fingerprint(config, "test")
    assert data_fingerprint(config, "test") != data_fingerprint(DataConfig(), "test")


@pytest.mark.parametrize("fields", [{}, {"channels": 3}, {"channels": 3, "resolution": 64, "hflip": True}])
def test_config_refuses_scenes_that_are_not_64x64_rgb_unflipped(fields):
    with pytest.raises(ValueError, match="scenes are 64x64 RGB and a mirror swaps left and right"):
        DataConfig(name="scenes", **fields)


def test_data_option_scenes_points_an_image_config_at_the_scenes():
    config = with_data(DataConfig(name="folder", path="x", channels=3, resolution=64), "scenes")
    assert (config.name, config.path) == ("scenes", None)
    with pytest.raises(ValueError, match="set data.channels 3, data.resolution 64"):
        with_data(DataConfig(), "scenes")  # a Fashion-MNIST config is grey and 32 px
