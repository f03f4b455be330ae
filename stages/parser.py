"""The scene parser stage: train the per-cell item and colour classifier that judges text-to-image on scenes.

It trains on train-split scenes rendered on the fly, each cell's truth its target, and is measured on
test-split scenes and on the held-out scenes (test split, each holding an (item, colour) pair no train
scene holds). No generator ever trains on the parser: it only scores (`stages.prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from ldm.artifacts import Artifact, ArtifactStore
from ldm.config import TrainerConfig, to_dict
from ldm.data import DataConfig, data_fingerprint
from ldm.data.order import FlippableItems, StepBatchSampler
from ldm.data.scenes import COLOURS, HELD_OUT, ITEMS, PALETTE, SCENE_SIZE, ScenesDataset, collate_scenes
from ldm.destinations import check_run_writable
from ldm.models.parser import EMPTY, IGNORE, SceneParser, SceneParserConfig, cell_targets, split_cells
from ldm.training import (
    adamw_cosine,
    fit_stage,
    format_seconds,
    leave_stop_signals_to_the_main_process,
    open_run,
    seed_step,
)

PALETTE_RGB = torch.tensor(list(PALETTE.values()))  # (colours, 3), in COLOURS' order


def _trainer_defaults() -> TrainerConfig:
    return TrainerConfig(
        max_steps=1000, batch_size=128, lr=2e-3, weight_decay=5e-4, warmup_steps=50, checkpoint_every=250
    )


def _scenes_data() -> DataConfig:
    return DataConfig(name="scenes", channels=3, resolution=SCENE_SIZE)


@dataclass
class ParserStageConfig:
    """Everything that defines a scene parser run."""

    model: SceneParserConfig = field(default_factory=SceneParserConfig)
    data: DataConfig = field(default_factory=_scenes_data)  # scenes only: where Fashion-MNIST is, loader workers
    trainer: TrainerConfig = field(default_factory=_trainer_defaults)
    # Half of all cells are empty and an empty cell is the easiest thing to tell: each step trains on every filled
    # cell and on this share of the empty ones, about 2.5 cells a scene instead of 4. No translation augmentation:
    # every item already sits at a random 0..4 px offset in its cell, and a shift of the scene would move items
    # across cell borders.
    empty_share: float = 0.25
    # Every filled cell repainted in a colour drawn uniformly from the palette (`recolour`), so that the parser sees
    # every (item, colour) pair, the held-out ones too, which train scenes never hold. A judge must read those pairs:
    # without it, the preset's parser read 0.48 of held-out pairs right against 0.96 of the others.
    recolour: bool = True
    # Every cell mirrored left-right with probability 1/2: a mirrored item is the same item (a cell alone has no left
    # or right; the scene is never mirrored, which would swap the relations of its captions).
    mirror: bool = True
    test_scenes: int = 2000  # test-split scenes measured after training
    held_out_scenes: int = 500  # held-out scenes (test split) measured after training
    run_dir: str = "runs/parser"

    def __post_init__(self) -> None:
        if self.data.name != "scenes":
            raise ValueError(f"the parser reads scenes: data.name must be 'scenes', got {self.data.name!r}")
        if not 0.0 < self.empty_share <= 1.0:
            raise ValueError(
                f"empty_share must be in (0, 1] (the share of empty cells trained on), got {self.empty_share}"
            )
        for name in ("test_scenes", "held_out_scenes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class SceneCells(Dataset):
    """Scenes as (image (3, 64, 64) in [-1, 1], targets (2, 4): item indices (0: empty), colour indices)."""

    def __init__(self, scenes: ScenesDataset) -> None:
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _, truth = self.scenes[index]
        items, colours = cell_targets([truth])  # (1, 4) each
        return image, torch.cat([items, colours])


def recolour(cells: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Cells (M, 3, 32, 32) of scenes with each one's item repainted in colour index colours (M,); empty cells stay.

    Exact: a scene's pixel is intensity x colour - 1 and every palette colour has a full channel, so a cell's
    channel maximum + 1 is its item's intensity, which the new colour multiplies as `render_scene` does.
    """
    intensity = (cells + 1).amax(1, keepdim=True)  # (M, 1, 32, 32), in [0, 2]
    return intensity * PALETTE_RGB.to(cells)[colours][:, :, None, None] - 1


def parser_loss(
    item_logits: torch.Tensor, colour_logits: torch.Tensor, items: torch.Tensor, colours: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of cells' items (M,) plus that of their colours (M,), the latter over filled cells only."""
    filled = int((items != EMPTY).sum())
    colour_loss = F.cross_entropy(colour_logits, colours, reduction="sum") / max(1, filled)  # empties: IGNORE
    return F.cross_entropy(item_logits, items) + colour_loss


class ParserModule(L.LightningModule):
    """Cross-entropy training of the parser with AdamW, warm-up and cosine decay."""

    def __init__(self, config: ParserStageConfig):
        super().__init__()
        self.config = config
        self.parser = SceneParser(config.model)

    def configure_optimizers(self):
        return adamw_cosine(self.parser.parameters(), self.config.trainer)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch  # (B, 3, 64, 64), (B, 2, 4)
        items, colours = targets[:, 0].flatten(), targets[:, 1].flatten()  # (B * 4,) each, in split_cells' order
        seed_step(self.config.trainer.seed, self.global_step, self.global_rank, self.trainer.world_size)
        keep = (items != EMPTY) | (torch.rand(len(items), device=items.device) < self.config.empty_share)
        cells, items, colours = split_cells(images)[keep], items[keep], colours[keep]  # (M, 3, 32, 32), (M,), (M,)
        if self.config.recolour:
            drawn = torch.randint(len(COLOURS), (len(cells),), device=cells.device)
            cells, colours = recolour(cells, drawn), torch.where(items == EMPTY, IGNORE, drawn)
        if self.config.mirror:
            flip = torch.rand(len(cells), device=cells.device) < 0.5  # (M,)
            cells = torch.where(flip[:, None, None, None], cells.flip(-1), cells)
        item_logits, colour_logits = self.parser.classify_cells(cells)
        loss = parser_loss(item_logits, colour_logits, items, colours)
        right = item_logits.argmax(1) == items
        self.log_dict({"train/loss": loss, "train/item_accuracy": right.float().mean()}, prog_bar=True, on_step=True)
        return loss


def make_scene_loader(config: ParserStageConfig) -> tuple[DataLoader, StepBatchSampler]:
    """The training loader of train-split scenes with their cell targets, and its step-ordered batch sampler."""
    data = config.data
    dataset = SceneCells(ScenesDataset("train", root=data.path, download=data.download))
    sampler = StepBatchSampler(len(dataset), config.trainer.batch_size, seed=config.trainer.seed)
    loader = DataLoader(
        FlippableItems(dataset),  # never flipped: a mirror swaps left and right
        batch_sampler=sampler,
        num_workers=data.num_workers,
        persistent_workers=data.num_workers > 0,
        worker_init_fn=leave_stop_signals_to_the_main_process,
    )
    return loader, sampler


@torch.no_grad()
def parser_accuracy(parser: SceneParser, scenes: ScenesDataset, batch_size: int = 250) -> dict[str, float]:
    """How often `parser` reads scenes' cells exactly right (item and colour): overall, by kind, by item and colour.

    Keys: cells (all four cells of each scene), objects (the filled cells), items (the item alone right),
    colours (the colour alone right, filled cells), empty (empty cells read as empty), `item:<name>` and
    `colour:<name>` (filled cells of that item or colour read exactly right), and `held_out_pairs` (the cells that
    hold a held-out pair read exactly right; only held-out scenes have them).
    """
    counts: dict[str, list[int]] = {}  # name -> [right, total]

    def tally(name: str, right: bool) -> None:
        entry = counts.setdefault(name, [0, 0])
        entry[0] += int(right)
        entry[1] += 1

    for images, _, truths in DataLoader(scenes, batch_size=batch_size, collate_fn=collate_scenes):
        for truth, parsed in zip(truths, parser.parse(images)):
            for cell, guess in zip(truth.cells, parsed):
                tally("cells", guess == cell)
                if cell is None:
                    tally("empty", guess is None)
                    continue
                tally("objects", guess == cell)
                tally("items", guess is not None and guess.item == cell.item)
                tally("colours", guess is not None and guess.colour == cell.colour)
                tally(f"item:{cell.item}", guess == cell)
                tally(f"colour:{cell.colour}", guess == cell)
                if tuple(cell) in HELD_OUT:
                    tally("held_out_pairs", guess == cell)
    return {name: right / total for name, (right, total) in counts.items()}


def run(
    config: ParserStageConfig,
    store: ArtifactStore | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    allow_changes: Sequence[str] = (),
) -> Artifact | None:
    """Train the scene parser, measure it on test and held-out scenes and return its stored artifact."""
    store = store or ArtifactStore()
    check_run_writable(store, config.run_dir)  # fails now rather than after training
    with open_run(config, resume, allow_changes) as (run_dir, checkpoint):
        loader, batches = make_scene_loader(config)
        module = ParserModule(config)
        trained = fit_stage(config.trainer, run_dir, checkpoint, module, loader, batches, callbacks)
        if trained is None:
            return None
        trainer, seconds = trained
        data = config.data
        test = parser_accuracy(
            module.parser, ScenesDataset("test", config.test_scenes, root=data.path, download=data.download)
        )
        held_out = parser_accuracy(
            module.parser,
            ScenesDataset("test", config.held_out_scenes, held_out=True, root=data.path, download=data.download),
        )
        metrics = {
            "test": {
                **{k: test[k] for k in ("cells", "objects", "items", "colours", "empty")},
                "scenes": config.test_scenes,
            },
            "test_items": {item: test[f"item:{item}"] for item in ITEMS if f"item:{item}" in test},
            "test_colours": {colour: test[f"colour:{colour}"] for colour in COLOURS if f"colour:{colour}" in test},
            "held_out": {
                "pairs": held_out["held_out_pairs"],
                "cells": held_out["cells"],
                "scenes": config.held_out_scenes,
            },
        }
        artifact = store.save(
            "parser",
            tensors={"weights.safetensors": module.parser.state_dict()},
            config=to_dict(config),
            data_fingerprint=data_fingerprint(config.data, "train"),
            metadata={
                "metrics": metrics,
                "training": {"steps": trainer.global_step, "seconds_this_run": round(seconds, 1)},
            },
        )
        print(f"\nwrote {artifact.ref}  ({artifact.path})")
        print_parser_metrics(metrics)
        print(f"  {trainer.global_step} steps in {format_seconds(seconds)}")
        return artifact


def print_parser_metrics(metrics: dict) -> None:
    """Print the parser's accuracies: cells, by item and colour, and on held-out pairs."""
    test, held_out = metrics["test"], metrics["held_out"]
    print(
        f"  test cells read right {test['cells']:.4f} on {test['scenes']} scenes "
        f"(objects {test['objects']:.4f}: item {test['items']:.4f}, colour {test['colours']:.4f}; "
        f"empty cells {test['empty']:.4f})"
    )
    print("  by item:   " + "  ".join(f"{name} {value:.4f}" for name, value in metrics["test_items"].items()))
    print("  by colour: " + "  ".join(f"{name} {value:.4f}" for name, value in metrics["test_colours"].items()))
    print(
        f"  held-out pairs read right {held_out['pairs']:.4f} "
        f"(all cells {held_out['cells']:.4f}) on {held_out['scenes']} held-out scenes"
    )
