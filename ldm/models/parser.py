"""The scene parser: a CNN that reads what each cell of a scene holds, the judge of text-to-image on scenes.

A scene (`ldm.data.scenes`) is a 2x2 grid of 32x32 cells, each empty or holding one item in one colour,
placed wholly inside its cell. The parser therefore looks at each cell alone: the image is cut into its
four cells, one small CNN (shared by the cells) classifies each cell's item (index 0: empty) and colour,
and the four answers are the scene in reading order. It plays the part of GenEval's object detector: a
prompt is judged by what the parser finds (`ldm.prompts.judge`). It only scores; no generator trains on it.

`features(x)` is the four cells' penultimate activations side by side, so that a Frechet distance in it
sees both what the items are and where they stand. Distances are comparable only under the same weights.

Layout of the cell network (width w): a stem at 32x32 on the cell's RGB and its channel maximum, then two
stages of two conv-BN-ReLU blocks each at 16x16 and 8x8, each stage after a 2x2 max pool, an average pool to
a pool_grid x pool_grid grid (1: global), one feature layer and two heads. A cell is read alone: an item that a
generator draws across a cell border is judged by its parts, as the scenes grammar never places one there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.data.scenes import CELL_SIZE, COLOURS, ITEMS, NUM_CELLS, SCENE_SIZE, Cell, SceneTruth
from ldm.models.classifier import conv_bn_relu

EMPTY = 0  # item index of an empty cell; item k of ITEMS is index k + 1
IGNORE = -100  # colour target of an empty cell: cross_entropy skips it


@dataclass
class SceneParserConfig:
    """Architecture of `SceneParser`; every field is a plain type so YAML can fill it."""

    width: int = 32  # channels of the stem; the stages use 2w and 4w
    cell_features: int = 64  # penultimate features per cell; `features` gives 4x this per scene
    dropout: float = 0.0  # on the cell features, before the heads only: the features stay deterministic in eval
    pool_grid: int = 1  # the last feature map is average-pooled to a grid of this side before the feature layer
    # Read each cell twice, as it is and mirrored left-right, and average the logits (test-time augmentation; in eval
    # mode only, and never in `features`). False in parsers stored before it existed.
    mirror_average: bool = False

    @staticmethod
    def derive_keys(data: dict) -> dict:
        """Parsers stored while the grey channel was optional say `grey_channel: true`, which is what every parser
        is now: they load as they are; `false` stays an unknown key (that network had 3 input channels)."""
        if isinstance(data, dict) and data.get("grey_channel") is True:
            return {key: value for key, value in data.items() if key != "grey_channel"}
        return data

    def __post_init__(self) -> None:
        for name in ("width", "cell_features", "pool_grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be an int >= 1, got {value!r}")


def split_cells(images: Tensor) -> Tensor:
    """The cells (N * 4, C, 32, 32) of scenes (N, C, 64, 64), each scene's four in reading order."""
    n, c, h, w = images.shape
    if (h, w) != (SCENE_SIZE, SCENE_SIZE):
        raise ValueError(f"the parser reads {SCENE_SIZE}x{SCENE_SIZE} scenes, got images of {h}x{w}")
    grid = images.reshape(n, c, 2, CELL_SIZE, 2, CELL_SIZE)  # (N, C, row, y, col, x)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(n * NUM_CELLS, c, CELL_SIZE, CELL_SIZE)


def cell_targets(truths: Sequence[SceneTruth]) -> tuple[Tensor, Tensor]:
    """Item indices (N, 4) (0: empty) and colour indices (N, 4) (IGNORE where empty) of scene truths."""
    items = [[EMPTY if c is None else ITEMS.index(c.item) + 1 for c in t.cells] for t in truths]
    colours = [[IGNORE if c is None else COLOURS.index(c.colour) for c in t.cells] for t in truths]
    return torch.tensor(items).reshape(-1, NUM_CELLS), torch.tensor(colours).reshape(-1, NUM_CELLS)


def cells_of(items: Tensor, colours: Tensor) -> list[tuple[Cell | None, ...]]:
    """Scenes' cells from item indices (N, 4) and colour indices (N, 4): None where the item is EMPTY."""
    return [
        tuple(None if i == EMPTY else Cell(ITEMS[i - 1], COLOURS[c]) for i, c in zip(row_items, row_colours))
        for row_items, row_colours in zip(items.tolist(), colours.tolist())
    ]


class SceneParser(nn.Module):
    """Per-cell item and colour classifier of scenes (N, 3, 64, 64) in [-1, 1]."""

    def __init__(self, config: SceneParserConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SceneParserConfig()
        w = config.width
        self.body = nn.Sequential(
            conv_bn_relu(4, w),  # RGB and the channel maximum
            nn.MaxPool2d(2),  # 32 -> 16
            conv_bn_relu(w, 2 * w),
            conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 16 -> 8
            conv_bn_relu(2 * w, 4 * w),
            conv_bn_relu(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(config.pool_grid),
            nn.Flatten(),
        )
        self.feature_layer = nn.Sequential(
            nn.Linear(4 * w * config.pool_grid**2, config.cell_features, bias=False),
            nn.BatchNorm1d(config.cell_features),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.item_head = nn.Linear(config.cell_features, 1 + len(ITEMS))
        self.colour_head = nn.Linear(config.cell_features, len(COLOURS))

    def cell_features(self, cells: Tensor) -> Tensor:
        """Penultimate activations (M, cell_features) of cells (M, 3, 32, 32)."""
        # Every palette colour has a full channel, so the channel maximum is the item's intensity whatever its
        # colour: the stem sees the shape apart from the colour.
        cells = torch.cat([cells, cells.amax(1, keepdim=True)], 1)  # (M, 4, 32, 32)
        return self.feature_layer(self.body(cells))  # body: (M, 4w * pool_grid**2)

    def classify_cells(self, cells: Tensor) -> tuple[Tensor, Tensor]:
        """Item logits (M, 1 + len(ITEMS)) (0: empty) and colour logits (M, len(COLOURS)) of cells (M, 3, 32, 32)."""
        h = self.dropout(self.cell_features(cells))
        return self.item_head(h), self.colour_head(h)

    def features(self, images: Tensor) -> Tensor:
        """The four cells' penultimate activations side by side (N, 4 * cell_features), for a Frechet distance."""
        return self.cell_features(split_cells(images)).reshape(len(images), NUM_CELLS * self.config.cell_features)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Item logits (N, 4, 1 + len(ITEMS)) (index 0: empty) and colour logits (N, 4, len(COLOURS)) of scenes."""
        cells = split_cells(images)
        item_logits, colour_logits = self.classify_cells(cells)
        if self.config.mirror_average and not self.training:
            mirrored_items, mirrored_colours = self.classify_cells(cells.flip(-1))
            item_logits, colour_logits = (item_logits + mirrored_items) / 2, (colour_logits + mirrored_colours) / 2
        return item_logits.reshape(len(images), NUM_CELLS, -1), colour_logits.reshape(len(images), NUM_CELLS, -1)

    @torch.no_grad()
    def parse(self, images: Tensor) -> list[tuple[Cell | None, ...]]:
        """What each scene holds: 4 cells in reading order, None where empty (eval mode; the caller's is restored)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        item_logits, colour_logits = self(images.to(device, torch.float32))
        self.train(was_training)
        return cells_of(item_logits.argmax(-1), colour_logits.argmax(-1))
