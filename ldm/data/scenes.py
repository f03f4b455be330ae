"""Scenes: captioned 64x64 colour images composed from Fashion-MNIST, the data of text-to-image.

Canvas. A scene is a 64x64 RGB image on a black background, cut into a 2x2 grid of 32x32 cells
numbered in reading order (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right). One to four
cells hold an item: a 28x28 Fashion-MNIST image placed 0..4 px from its cell's corner (centred
+-2 px, so items never overlap) and tinted with a colour of `PALETTE` (pixel = intensity x colour:
a white item is the grey original, a red one lives in the red channel alone). Values are in
[-1, 1] as `to_model_range` maps Fashion-MNIST: background -1, a full-intensity white pixel +1.

Items. Fashion-MNIST's classes, with the four upper-body ones (T-shirt/top, pullover, coat,
shirt) merged into one item "top": at 28x28 px even a good classifier confuses them, so neither a
generator nor the parser that judges its images could be held to the difference. Dresses are left
out for the same reason: every parser trained on scenes read them worst (0.90-0.955 where the
other items reached 0.96-0.99). `ITEM_OF_CLASS` is the table; deleting an
item's rows drops it from every scene and caption.

Categories and grammar, after GenEval's six (Ghosh et al. 2023)::

    caption      := prefix body                prefix := "" | "a photo of " | "an image of " | "a picture of "
    single_object:  np                          "a sneaker", "a red sneaker"
    colors       :  np, colour always named     "an orange bag"
    two_object   :  np join np                  "a trouser and a bag", "a red sneaker with a blue bag"
    color_attr   :  np join np, two items of two colours, both named (swapping them is a wrong scene)
    counting     :  number [colour] plural      "two blue bags", "three tops" (2-4 copies of one item and colour)
    position     :  np relation np              "a green trouser to the left of a white sandal"
    np := article [colour] item    join := " and " | " with "    number := "two" | "three" | "four"
    relation := "to the left of" | "left of" | "to the right of" | "right of" | "above" | "below" | "beneath"

A caption mentions every item of its scene, in either order. Colours are named in half the
captions of single_object, two_object, counting and position, in every one of colors and
color_attr, and in every caption of a scene holding a held-out pair. Positions follow the cells:
left/right compare two cells of a row, above/below two cells of a column.

Held-out pairs. The (item, colour) pairs of `HELD_OUT` never appear in training scenes, so never
in their captions; `held_out=True` draws evaluation scenes (test split) that each hold one, to
measure whether a model composes an item and a colour it has only seen apart.

Determinism. Scene i is drawn by its own numpy Generator seeded by (seed, split, held_out, i):
its truth (category, cells, which Fashion-MNIST image each item is, its jitter), then its caption.
A scene is rebuilt anywhere from those four numbers, without drawing the scenes before it. Train
scenes take their items from the train split only, test scenes from the test split.

Through `build_dataset` (name "scenes") the stages see the image-dataset contract, (image, label),
with the scene's category index as the label (`SceneImages`); `ScenesDataset` serves the captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.fmnist import check_split, load_fmnist

SCENE_SIZE = 64
CELL_SIZE = 32
ITEM_SIZE = 28
NUM_CELLS = 4  # a 2x2 grid, reading order
MAX_JITTER = CELL_SIZE - ITEM_SIZE  # an item's offset in its cell is 0..4 px on each axis
SCENES_VERSION = 2  # bump when the scene drawn for a (seed, split, index) changes
DEFAULT_SEED = 0
SPLIT_SIZES: dict[str, int] = {"train": 60000, "test": 10000}  # scenes per split, as many as Fashion-MNIST images
SPLIT_CODES: dict[str, int] = {"train": 0, "test": 1}  # a split's word in the seed of its scenes

# Fashion-MNIST class -> item; the four upper-body classes read as one item (see the module docstring).
ITEM_OF_CLASS: dict[int, str] = {
    0: "top",  # T-shirt/top
    1: "trouser",
    2: "top",  # pullover
    4: "top",  # coat
    5: "sandal",
    6: "top",  # shirt
    7: "sneaker",
    8: "bag",
    9: "ankle boot",
}
ITEMS: tuple[str, ...] = tuple(dict.fromkeys(ITEM_OF_CLASS[c] for c in sorted(ITEM_OF_CLASS)))
PLURALS: dict[str, str] = {
    "top": "tops",
    "trouser": "trousers",
    "sandal": "sandals",
    "sneaker": "sneakers",
    "bag": "bags",
    "ankle boot": "ankle boots",
}
# Named colours as RGB multipliers of an item's intensity; hues about 30 degrees or more apart.
PALETTE: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "red": (1.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.3, 1.0),
    "purple": (0.6, 0.0, 1.0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
_PALETTE_RGB = torch.tensor(list(PALETTE.values()))  # (colours, 3)
# (item, colour) pairs no training scene holds; kept off "top" so that dropping it leaves them all.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("sneaker", "red"),
    ("trouser", "blue"),
    ("bag", "green"),
    ("ankle boot", "orange"),
    ("sandal", "purple"),
)
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
PREFIXES: tuple[str, ...] = ("", "a photo of ", "an image of ", "a picture of ")
JOINERS: tuple[str, ...] = (" and ", " with ")
RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "beneath"),
}
LINES: tuple[tuple[int, int], ...] = ((0, 1), (2, 3), (0, 2), (1, 3))  # the cell pairs of a row or a column


class Cell(NamedTuple):
    """What a grid cell shows: an item of `ITEMS` in a colour of `PALETTE`."""

    item: str
    colour: str


TRAIN_PAIRS: tuple[Cell, ...] = tuple(Cell(i, c) for i in ITEMS for c in COLOURS if (i, c) not in HELD_OUT)
ALL_PAIRS: tuple[Cell, ...] = tuple(Cell(i, c) for i in ITEMS for c in COLOURS)


@dataclass(frozen=True)
class SceneTruth:
    """What a scene shows, cell by cell, and how its pixels were made."""

    category: str  # one of CATEGORIES: the grammar its captions follow
    cells: tuple[Cell | None, ...]  # 4 cells in reading order; None: empty
    split: str  # the Fashion-MNIST split the items come from
    sources: tuple[int, ...]  # each cell's item: its index in the split's images; -1 where empty
    offsets: tuple[tuple[int, int], ...]  # each cell's item: (dy, dx) from the cell's corner, 0..MAX_JITTER

    def __post_init__(self) -> None:
        # Plain tuples are accepted (a hand-written truth, one read back from JSON) and stored as Cells.
        object.__setattr__(self, "cells", tuple(None if c is None else Cell(*c) for c in self.cells))
        object.__setattr__(self, "sources", tuple(int(s) for s in self.sources))
        object.__setattr__(self, "offsets", tuple((int(dy), int(dx)) for dy, dx in self.offsets))
        check_split(self.split)
        if self.category not in CATEGORIES:
            raise ValueError(f"scene category must be one of {list(CATEGORIES)}, got {self.category!r}")
        if not len(self.cells) == len(self.sources) == len(self.offsets) == NUM_CELLS:
            raise ValueError(f"a scene has {NUM_CELLS} cells, sources and offsets, got {self.cells!r}")
        for cell, source, (dy, dx) in zip(self.cells, self.sources, self.offsets):
            if cell is not None and (cell.item not in ITEMS or cell.colour not in PALETTE):
                raise ValueError(f"unknown cell {cell!r}: items are {list(ITEMS)}, colours {list(COLOURS)}")
            if (cell is None) != (source < 0):
                raise ValueError(f"cell {cell!r} has source {source}: a filled cell needs one >= 0, an empty -1")
            if not (0 <= dy <= MAX_JITTER and 0 <= dx <= MAX_JITTER):
                raise ValueError(f"offset {(dy, dx)} leaves its cell: each axis must be in 0..{MAX_JITTER}")

    @property
    def objects(self) -> list[tuple[int, Cell]]:
        """The filled cells as (cell index, cell), in reading order."""
        return [(k, cell) for k, cell in enumerate(self.cells) if cell is not None]

    @property
    def holds_held_out(self) -> bool:
        """Whether any item is a held-out (item, colour) pair."""
        return any(tuple(cell) in HELD_OUT for _, cell in self.objects)


def check_seed(seed: int) -> None:
    """Raise ValueError unless `seed` can seed scenes (an int >= 0)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"scene seed must be an int >= 0, got {seed!r}")


def scene_rng(seed: int, split: str, index: int, held_out: bool = False) -> np.random.Generator:
    """The generator that draws scene `index` of (seed, split), and nothing else."""
    check_seed(seed)
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    return np.random.default_rng([seed, SPLIT_CODES[split], int(held_out), int(index)])


def _pick(choices: Sequence[Any], rng: np.random.Generator) -> Any:
    return choices[int(rng.integers(len(choices)))]


def draw_layout(category: str, rng: np.random.Generator, held_out: bool = False) -> tuple[Cell | None, ...]:
    """The 4 cells of a scene of `category`; `held_out`: the first item is a held-out pair, else none is."""
    first = Cell(*HELD_OUT[int(rng.integers(len(HELD_OUT)))]) if held_out else _pick(TRAIN_PAIRS, rng)
    others = ALL_PAIRS if held_out else TRAIN_PAIRS
    if category in ("single_object", "colors"):
        objects = [first]
    elif category == "counting":
        objects = [first] * int(rng.integers(2, 5))
    elif category == "color_attr":  # two items of two colours: the binding is what a model can get wrong
        objects = [first, _pick([p for p in others if p.item != first.item and p.colour != first.colour], rng)]
    else:  # two_object, position: two different items
        objects = [first, _pick([p for p in others if p.item != first.item], rng)]
    if category == "position":
        line = LINES[int(rng.integers(len(LINES)))]
        places = [line[k] for k in rng.permutation(2)]
    else:
        places = rng.permutation(NUM_CELLS)[: len(objects)].tolist()
    cells: list[Cell | None] = [None] * NUM_CELLS
    for place, cell in zip(places, objects):
        cells[place] = cell
    return tuple(cells)


def _noun_phrase(cell: Cell, name_colour: bool) -> str:
    words = f"{cell.colour} {cell.item}" if name_colour else cell.item
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _relation(subject: int, reference: int) -> str:
    """Where cell `subject` is from cell `reference`: 'left', 'right' (one row), 'above', 'below' (one column)."""
    if subject // 2 == reference // 2:
        return "left" if subject % 2 < reference % 2 else "right"
    if subject % 2 == reference % 2:
        return "above" if subject < reference else "below"
    raise ValueError(f"cells {subject} and {reference} share no row or column: a position scene needs one")


def _check_fits(truth: SceneTruth) -> None:
    """Raise ValueError unless the filled cells are what `truth.category` describes."""
    cells = [cell for _, cell in truth.objects]
    n, items, colours = len(cells), {c.item for c in cells}, {c.colour for c in cells}
    fits = {
        "single_object": n == 1,
        "colors": n == 1,
        "counting": n in COUNT_WORDS and len(set(cells)) == 1,
        "two_object": n == 2 and len(items) == 2,
        "position": n == 2 and len(items) == 2,
        "color_attr": n == 2 and len(items) == 2 and len(colours) == 2,
    }[truth.category]
    if not fits:
        raise ValueError(f"a {truth.category} scene cannot hold {cells}: see the grammar in ldm.data.scenes")


def caption_of(truth: SceneTruth, rng: np.random.Generator) -> str:
    """A caption true of `truth` in its category's grammar, its wording and order drawn from `rng`."""
    _check_fits(truth)
    coin = bool(rng.random() < 0.5)
    name_colour = coin or truth.category in ("colors", "color_attr") or truth.holds_held_out
    objects = truth.objects
    if truth.category == "counting":
        cell = objects[0][1]
        colour = f"{cell.colour} " if name_colour else ""
        body = f"{COUNT_WORDS[len(objects)]} {colour}{PLURALS[cell.item]}"
    elif len(objects) == 1:
        body = _noun_phrase(objects[0][1], name_colour)
    else:
        (k1, first), (k2, second) = [objects[k] for k in rng.permutation(2)]
        if truth.category == "position":
            words = RELATIONS[_relation(k1, k2)]
            link = f" {words[int(rng.integers(len(words)))]} "
        else:
            link = JOINERS[int(rng.integers(len(JOINERS)))]
        body = _noun_phrase(first, name_colour) + link + _noun_phrase(second, name_colour)
    return PREFIXES[int(rng.integers(len(PREFIXES)))] + body


def render_scene(truth: SceneTruth, images: torch.Tensor) -> torch.Tensor:
    """The scene of `truth` as float32 (3, 64, 64) in [-1, 1]; `images`: uint8 (N, 28, 28) of `truth.split`."""
    canvas = torch.zeros(3, SCENE_SIZE, SCENE_SIZE)  # intensity x colour in [0, 2]; -1 below makes it model range
    objects = truth.objects
    if objects:
        sources = torch.tensor([truth.sources[k] for k, _ in objects])
        rgb = _PALETTE_RGB[[COLOURS.index(cell.colour) for _, cell in objects]]  # (K, 3)
        # u / 127.5 - 1 is to_model_range's map, so a white item is exactly the Fashion-MNIST image.
        tinted = rgb[:, :, None, None] * (images[sources].to(torch.float32) / 127.5)[:, None]  # (K, 3, 28, 28)
        for (k, _), item in zip(objects, tinted):
            dy, dx = truth.offsets[k]
            top, left = (k // 2) * CELL_SIZE + dy, (k % 2) * CELL_SIZE + dx
            canvas[:, top : top + ITEM_SIZE, left : left + ITEM_SIZE] = item
    return canvas.sub_(1.0)


class SceneMaker:
    """The scenes of one Fashion-MNIST split: truths and captions from (seed, index), images from truths."""

    def __init__(self, split: str, seed: int = DEFAULT_SEED, root: str | None = None, download: bool = True):
        check_split(split)
        check_seed(seed)
        self.split, self.seed = split, seed
        self.images, labels = load_fmnist(split, root=root, download=download)  # uint8 (N, 28, 28), (N,)
        # item -> indices of the split's images of that item
        self.pools: dict[str, np.ndarray] = {
            item: np.flatnonzero(np.isin(labels.numpy(), [c for c, name in ITEM_OF_CLASS.items() if name == item]))
            for item in ITEMS
        }

    def compose(self, cells: Sequence[Cell | None], category: str, rng: np.random.Generator) -> SceneTruth:
        """The truth of `cells`, each item an image of this split drawn from `rng`, jittered in its cell."""
        sources = tuple(-1 if c is None else int(_pick(self.pools[c.item], rng)) for c in cells)
        offsets = rng.integers(0, MAX_JITTER + 1, size=(NUM_CELLS, 2)).tolist()  # drawn for empty cells too
        return SceneTruth(category, tuple(cells), self.split, sources, offsets)

    def draw(self, index: int, held_out: bool = False) -> tuple[SceneTruth, str]:
        """Scene `index`'s truth and caption, without its image; `held_out`: evaluation scenes (test split)."""
        if held_out and self.split != "test":
            raise ValueError(f"held-out pairs are for evaluation: use split 'test' with held_out, not {self.split!r}")
        rng = scene_rng(self.seed, self.split, index, held_out)
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        truth = self.compose(draw_layout(category, rng, held_out), category, rng)
        return truth, caption_of(truth, rng)

    def render(self, truth: SceneTruth) -> torch.Tensor:
        """The image (3, 64, 64) of a truth of this split."""
        if truth.split != self.split:
            raise ValueError(f"a {truth.split} scene needs the {truth.split} images; this maker holds {self.split}")
        return render_scene(truth, self.images)

    def scene(self, index: int, held_out: bool = False) -> tuple[torch.Tensor, str, SceneTruth]:
        """Scene `index` as (image float32 (3, 64, 64) in [-1, 1], caption, truth)."""
        truth, caption = self.draw(index, held_out)
        return self.render(truth), caption, truth


class ScenesDataset(Dataset):
    """Scenes 0..size-1 of (split, seed) as (image float32 (3, 64, 64) in [-1, 1], caption str, truth SceneTruth).

    Batch it with `collate_scenes`. `held_out`: every scene holds a held-out pair (test split only).
    """

    def __init__(
        self,
        split: str,
        size: int | None = None,
        seed: int = DEFAULT_SEED,
        held_out: bool = False,
        root: str | None = None,
        download: bool = True,
    ) -> None:
        check_split(split)
        size = SPLIT_SIZES[split] if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"scenes size must be an int >= 1, got {size!r}")
        if held_out and split != "test":
            raise ValueError(f"held-out pairs are for evaluation: use split 'test' with held_out, not {split!r}")
        self.maker = SceneMaker(split, seed, root=root, download=download)
        self.size, self.held_out = size, held_out
        self.classes = CATEGORIES

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, SceneTruth]:
        if not 0 <= index < self.size:
            raise IndexError(f"scene {index} is out of range for {self.size} scenes")
        return self.maker.scene(index, self.held_out)


class SceneImages(Dataset):
    """Scenes as the stages' image items: (image float32 (3, 64, 64) in [-1, 1], category index)."""

    def __init__(self, scenes: ScenesDataset) -> None:
        self.scenes = scenes
        self.classes = CATEGORIES

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _, truth = self.scenes[index]
        return image, CATEGORIES.index(truth.category)

    def caption(self, index: int) -> str:
        """Scene `index`'s caption, drawn without rendering its image (what a latent cache stores beside it)."""
        if not 0 <= index < len(self.scenes):
            raise IndexError(f"scene {index} is out of range for {len(self.scenes)} scenes")
        return self.scenes.maker.draw(index, self.scenes.held_out)[1]


def collate_scenes(
    batch: Sequence[tuple[torch.Tensor, str, SceneTruth]],
) -> tuple[torch.Tensor, list[str], list[SceneTruth]]:
    """A DataLoader batch of scenes: (images (B, 3, 64, 64), captions, truths)."""
    images, captions, truths = zip(*batch)
    return torch.stack(images), list(captions), list(truths)


def scenes_identity(split: str) -> dict[str, int]:
    """What, beside the Fashion-MNIST files, fixes the scenes `build_dataset` serves for `split` (fingerprints)."""
    return {"version": SCENES_VERSION, "seed": DEFAULT_SEED, "size": SPLIT_SIZES[split]}
