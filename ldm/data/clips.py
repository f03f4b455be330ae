"""Clips: Moving Fashion-MNIST, short grey videos of items moving in one of eight directions and bouncing.

Moving MNIST (Srivastava, Mansimov & Salakhutdinov 2015) moves MNIST digits at constant speed over a
64x64 canvas and reflects them off its walls. Here the items are Fashion-MNIST images, and each clip
says what moves and where to: every item starts in one of eight compass directions, so a clip is
conditioned on (class, direction) or captioned ("a bag moving left").

Canvas. `frames` frames of `size` x `size` grey pixels, background -1 and a full intensity pixel +1, as
`to_model_range` maps Fashion-MNIST. The defaults, 8 frames of 48x48, are the least that still shows a
bounce and leaves an item room to travel: every stage pays for a clip as for 8 images of 2.25 times a
Fashion-MNIST image's pixels, on 2 CPU cores. An item is its 28x28 image at an integer
top-left position; where two items overlap, the brighter pixel wins (Moving MNIST's max).

Motion. An item starts at a position drawn uniformly over the canvas, with a speed of 2 to 4 pixels a
frame along its direction (both axes move by the speed on a diagonal). Each frame it moves by its
velocity; a coordinate that would leave [0, size - 28] is reflected back inside and that component of
the velocity changes sign (the bounce). The clip's direction is the one it starts with: a bounce turns
it, as in Moving MNIST, and an evaluator reads the direction from the first frames.

Labels. A one-item clip's label is class * 8 + direction (80 labels); `label_parts` splits it back.

Determinism. Clip i is drawn by its own numpy Generator seeded by (seed, split, i): its items, their
images, starts, speeds and directions. Train clips take their items from the train split, test clips
(the reference of every evaluation) from the test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.fmnist import check_split, load_fmnist

ITEM_SIZE = 28
DEFAULT_FRAMES, DEFAULT_SIZE, DEFAULT_SEED = 8, 48, 0
MIN_SPEED, MAX_SPEED = 2, 4  # pixels per frame along each moving axis
SPLIT_SIZES: dict[str, int] = {"train": 60000, "test": 10000}
SPLIT_CODES: dict[str, int] = {"train": 0, "test": 1}
# Compass directions, counter-clockwise from "right"; (dx, dy) in image axes (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0),
    "up-right": (1, -1),
    "up": (0, -1),
    "up-left": (-1, -1),
    "left": (-1, 0),
    "down-left": (-1, 1),
    "down": (0, 1),
    "down-right": (1, 1),
}
DIRECTION_NAMES: tuple[str, ...] = tuple(DIRECTIONS)
# Caption words of Fashion-MNIST's classes, in label order (FMNIST_CLASSES).
ITEM_WORDS: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"
)  # fmt: skip


@dataclass(frozen=True)
class Mover:
    """One item of a clip: which Fashion-MNIST image, its class, start (x, y), and velocity (vx, vy) in px/frame."""

    source: int
    label: int
    start: tuple[int, int]
    velocity: tuple[int, int]

    @property
    def direction(self) -> int:
        """Index into DIRECTION_NAMES of the direction it starts in."""
        sign = tuple(int(np.sign(v)) for v in self.velocity)
        return DIRECTION_NAMES.index(next(name for name, step in DIRECTIONS.items() if step == sign))


def bounce_path(start: int, velocity: int, frames: int, limit: int) -> np.ndarray:
    """Positions (frames,) of a coordinate moving by `velocity` a frame from `start`, reflected at 0 and `limit`."""
    positions, x, v = [], start, velocity
    for _ in range(frames):
        positions.append(x)
        x += v
        if x < 0 or x > limit:
            x = -x if x < 0 else 2 * limit - x
            v = -v
    return np.asarray(positions)


def label_parts(label: int) -> tuple[int, int]:
    """(class, direction) of a one-item clip's label class * 8 + direction."""
    return divmod(int(label), len(DIRECTIONS))


def caption_of(movers: tuple[Mover, ...]) -> str:
    """ "a bag moving left", or two such phrases joined by "and"."""
    words = [ITEM_WORDS[m.label] for m in movers]
    phrases = [f"a{'n' * (w[0] in 'aeiou')} {w} moving {DIRECTION_NAMES[m.direction]}" for w, m in zip(words, movers)]
    return " and ".join(phrases)


class ClipMaker:
    """The clips of one Fashion-MNIST split: movers from (seed, index), frames from movers."""

    def __init__(
        self,
        split: str,
        frames: int = DEFAULT_FRAMES,
        size: int = DEFAULT_SIZE,
        items: int = 1,
        seed: int = DEFAULT_SEED,
        root: str | None = None,
        download: bool = True,
    ):
        check_split(split)
        if frames < 2:
            raise ValueError(f"a clip needs at least 2 frames, got {frames}")
        if size < ITEM_SIZE + 2 * MAX_SPEED:
            raise ValueError(f"a clip of side {size} leaves no room to move a {ITEM_SIZE}px item; use >= 36")
        if items not in (1, 2):
            raise ValueError(f"a clip holds 1 or 2 moving items, got {items}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split, self.frames, self.size, self.items, self.seed = split, frames, size, items, seed
        self.images, self.labels = load_fmnist(split, root=root, download=download)  # uint8 (N, 28, 28), (N,)

    @property
    def limit(self) -> int:
        """The largest top-left coordinate that keeps an item inside the canvas."""
        return self.size - ITEM_SIZE

    def draw(self, index: int) -> tuple[Mover, ...]:
        """The movers of clip `index`, a function of (seed, split, index) alone."""
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], int(index)])
        movers = []
        for _ in range(self.items):
            source = int(rng.integers(len(self.images)))
            dx, dy = DIRECTIONS[DIRECTION_NAMES[int(rng.integers(len(DIRECTIONS)))]]
            speed = int(rng.integers(MIN_SPEED, MAX_SPEED + 1))
            start = tuple(int(v) for v in rng.integers(0, self.limit + 1, size=2))
            movers.append(Mover(source, int(self.labels[source]), start, (dx * speed, dy * speed)))
        return tuple(movers)

    def render(self, movers: tuple[Mover, ...]) -> torch.Tensor:
        """The clip (frames, 1, size, size) in [-1, 1] of `movers`."""
        canvas = torch.zeros(self.frames, self.size, self.size, dtype=torch.uint8)
        for mover in movers:
            xs = bounce_path(mover.start[0], mover.velocity[0], self.frames, self.limit)
            ys = bounce_path(mover.start[1], mover.velocity[1], self.frames, self.limit)
            image = self.images[mover.source]
            for frame, (x, y) in enumerate(zip(xs.tolist(), ys.tolist())):
                window = canvas[frame, y : y + ITEM_SIZE, x : x + ITEM_SIZE]
                torch.maximum(window, image, out=window)
        return (canvas.float() / 127.5 - 1.0).unsqueeze(1)

    def clip(self, index: int) -> tuple[torch.Tensor, int, str]:
        """Clip `index`: frames (T, 1, S, S), label (class * 8 + direction of its first item), caption."""
        movers = self.draw(index)
        first = movers[0]
        return self.render(movers), first.label * len(DIRECTIONS) + first.direction, caption_of(movers)


class ClipsDataset(Dataset):
    """`count` clips of a split (default: as many as the split has images), as (frames, label, caption)."""

    def __init__(self, split: str, count: int | None = None, **maker_options) -> None:
        self.maker = ClipMaker(split, **maker_options)
        self.count = SPLIT_SIZES[split] if count is None else count
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        if not 0 <= index < self.count:
            raise IndexError(f"clip {index} out of range for {self.count} clips")
        return self.maker.clip(index)
