"""Moving Fashion-MNIST clips: determinism, the bounce rule, splits, labels and captions."""

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from ldm.data.clips import (
    DIRECTION_NAMES,
    DIRECTIONS,
    ITEM_SIZE,
    ITEM_WORDS,
    ClipMaker,
    ClipsDataset,
    Mover,
    bounce_path,
    caption_of,
    label_parts,
)
from ldm.data.fmnist import FMNIST_CLASSES, load_fmnist


def unfolded(start: int, velocity: int, frames: int, limit: int) -> np.ndarray:
    """The bounce as a reflection of the free path: fold x + v t into [0, limit] with period 2 limit."""
    free = start + velocity * np.arange(frames)
    folded = np.mod(free, 2 * limit)
    return np.where(folded <= limit, folded, 2 * limit - folded)


@pytest.mark.parametrize(("start", "velocity"), [(0, 4), (20, -3), (19, 2), (5, -4), (10, 0)])
def test_bounce_path_stays_inside_and_equals_the_folded_free_path(start, velocity):
    path = bounce_path(start, velocity, 40, 20)
    assert path.min() >= 0 and path.max() <= 20
    np.testing.assert_array_equal(path, unfolded(start, velocity, 40, 20))
    assert np.all(np.abs(np.diff(path)) <= abs(velocity))


def test_labels_and_captions_say_class_and_direction():
    assert len(ITEM_WORDS) == len(FMNIST_CLASSES) and len(DIRECTIONS) == 8
    assert label_parts(8 * 8 + 4) == (8, 4) and DIRECTION_NAMES[4] == "left"
    bag_left = Mover(source=0, label=8, start=(3, 3), velocity=(-3, 0))
    boot_down_right = Mover(source=1, label=9, start=(0, 0), velocity=(2, 2))
    assert bag_left.direction == 4 and boot_down_right.direction == DIRECTION_NAMES.index("down-right")
    assert caption_of((bag_left,)) == "a bag moving left"
    assert caption_of((bag_left, boot_down_right)) == "a bag moving left and an ankle boot moving down-right"


@needs_fmnist
def test_a_clip_is_a_function_of_seed_split_and_index_and_moves_its_item_as_drawn():
    maker = ClipMaker("train")
    frames, label, caption = maker.clip(7)
    again, label_again, caption_again = ClipMaker("train").clip(7)
    assert torch.equal(frames, again) and (label, caption) == (label_again, caption_again)
    assert frames.shape == (8, 1, 48, 48) and frames.min() >= -1 and frames.max() <= 1
    assert not torch.equal(frames, maker.clip(8)[0]) and not torch.equal(frames, ClipMaker("train", seed=1).clip(7)[0])
    (mover,) = maker.draw(7)
    images, labels = load_fmnist("train")
    assert label == int(labels[mover.source]) * 8 + mover.direction
    assert caption.startswith(f"a{'n' if ITEM_WORDS[mover.label][0] in 'aeiou' else ''} {ITEM_WORDS[mover.label]}")
    xs = bounce_path(mover.start[0], mover.velocity[0], 8, 48 - ITEM_SIZE)
    ys = bounce_path(mover.start[1], mover.velocity[1], 8, 48 - ITEM_SIZE)
    for t in (0, 5):  # the item's pixels sit where its path says, in every frame
        window = frames[t, 0, ys[t] : ys[t] + ITEM_SIZE, xs[t] : xs[t] + ITEM_SIZE]
        torch.testing.assert_close(window, images[mover.source].float() / 127.5 - 1)


@needs_fmnist
def test_test_clips_take_test_items_and_bad_settings_are_refused():
    test = ClipMaker("test", items=2)
    movers = test.draw(3)
    assert len(movers) == 2 and all(m.source < 10000 for m in movers)
    assert " and " in test.clip(3)[2]
    assert len(ClipsDataset("test", count=5, frames=4, size=36)) == 5
    assert ClipsDataset("test", count=5, frames=4, size=36)[4][0].shape == (4, 1, 36, 36)
    with pytest.raises(IndexError):
        ClipsDataset("test", count=5)[5]
    for options, message in (
        ({"frames": 1}, "at least 2 frames"),
        ({"size": 32}, "no room to move"),
        ({"items": 3}, "1 or 2 moving items"),
    ):
        with pytest.raises(ValueError, match=message):
            ClipMaker("test", **options)
