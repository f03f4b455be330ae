"""Pruning: a stored DiT made shallower, recovered by learning its parent's output on the parent's own latents.

The blocks to keep are named (`prune.keep`), spread evenly, or chosen greedily by how little removing
each moves the parent's output on a calibration batch of the cache (`ldm.pruning`). The pruned DiT
starts as an exact copy of the kept blocks, trains against the frozen parent (`recovery_losses`) and
is stored as a `diffusion` artifact whose parents are the cache and the DiT it was pruned from, with
what was removed. It samples, exports to int8 and distils into a few-call student like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from lightning.pytorch.callbacks import Callback

from ldm.artifacts import Artifact, ArtifactStore
from ldm.config import TrainerConfig
from ldm.data.latents import LatentBatches
from ldm.destinations import check_run_writable
from ldm.diffusion.schedules import DiffusionConfig, make_schedule
from ldm.loading import dit_configs, load_dit
from ldm.models.dit import DiT, DiTConfig
from ldm.pruning import (
    PruneConfig,
    calibration_batch,
    choose_blocks,
    prune_blocks,
    pruned_config,
    recovery_losses,
    uniform_blocks,
)
from stages.diffusion import (
    DiffusionModule,
    DiffusionStageConfig,
    check_model_fits_cache,
    open_own_cache,
    train_and_store,
)


def _trainer_defaults() -> TrainerConfig:
    return TrainerConfig(max_steps=2000, batch_size=64, lr=2e-4, warmup_steps=50, grad_clip=1.0)


@dataclass
class PruneStageConfig(DiffusionStageConfig):
    """A pruning run. `model` and `diffusion` are the pruned network's and come from the parent: leave them out."""

    parent: str = "diffusion@latest"  # the trained `diffusion` artifact to prune (objective flow or ddpm)
    prune: PruneConfig = field(default_factory=PruneConfig)
    latents: str = ""  # "": the parent's own cache; any other cache is refused
    trainer: TrainerConfig = field(default_factory=_trainer_defaults)
    ema_decay: float = 0.999
    lr_schedule: str = "cosine"
    run_dir: str = "runs/prune"


class PruneModule(DiffusionModule):
    """DiffusionModule whose network starts as the kept blocks of a frozen parent (not a submodule: not saved) and
    whose loss is `recovery_losses` against it."""

    def __init__(self, config: PruneStageConfig, lineage: dict[str, str], parent: DiT):
        super().__init__(config, lineage)
        self.model.load_state_dict(prune_blocks(parent, config.prune.keep).state_dict())
        self.ema.load_state_dict(self.model.state_dict())
        # Labels are dropped once, in batch_losses, so that the parent sees the labels the pruned network sees.
        self.model.y_embedder.dropout_prob = 0.0
        self.__dict__["parent"] = parent.requires_grad_(False).eval()

    def on_train_start(self) -> None:
        super().on_train_start()
        self.parent.to(self.device)

    def batch_losses(self, z: torch.Tensor, y: torch.Tensor, model=None) -> dict[str, torch.Tensor]:
        y = self.parent.y_embedder.drop_labels(y) if self.config.model.class_dropout_prob > 0 else y
        return recovery_losses(
            model or self.train_forward, self.parent, z, y, self.config.diffusion, self.config.prune, self.schedule
        )


def blocks_to_keep(
    config: PruneStageConfig, parent: DiT, diffusion: DiffusionConfig, batches: LatentBatches
) -> tuple[list[int], str, list[dict]]:
    """The parent's blocks the pruned network keeps, how they were chosen, and the greedy rounds (empty otherwise)."""
    depth = config.prune.target_depth(parent.config.depth)
    if config.prune.keep:
        if any(not 0 <= i < parent.config.depth for i in config.prune.keep):
            raise ValueError(f"prune.keep {config.prune.keep} names blocks outside 0..{parent.config.depth - 1}")
        return sorted(config.prune.keep), "named", []
    if config.prune.importance == "uniform":
        return uniform_blocks(parent.config.depth, depth), "uniform", []
    z, y = batches.batch(0)[:2]
    schedule = None if diffusion.is_flow else make_schedule(diffusion.schedule, diffusion.num_timesteps)
    generator = torch.Generator().manual_seed(config.trainer.seed)
    keep, rounds = choose_blocks(parent, depth, calibration_batch(parent, z, y, diffusion, schedule, generator))
    return keep, "greedy", rounds


def run(
    config: PruneStageConfig,
    store: ArtifactStore | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    allow_changes: Sequence[str] = (),
) -> Artifact | None:
    """Prune the parent, recover it on the parent's own latent cache and return the stored `diffusion` artifact."""
    store = store or ArtifactStore()
    check_run_writable(store, config.run_dir)  # fails now rather than after training
    if config.model != DiTConfig() or config.diffusion != DiffusionConfig():
        raise ValueError(
            "a pruning config sets no model.* or diffusion.*: the pruned network and its objective come from "
            "its parent (prune.* and trainer.* are the settings of this stage)"
        )
    if config.init_from:
        raise ValueError(f"init_from ({config.init_from}): a pruned network starts from its parent; leave it unset")
    parent_artifact = store.load(config.parent, stage="diffusion")
    cache = open_own_cache(
        store,
        config,
        parent_artifact,
        lambda own, named: (
            f"{parent_artifact.ref} was trained on {own}, but the pruned network would train on "
            f"{named}: it learns its parent's output on the parent's own latents. Leave latents unset"
        ),
    )
    parent_model, diffusion = dit_configs(parent_artifact)
    if parent_model.text_dim:
        raise ValueError(f"{parent_artifact.ref} conditions on text: pruning takes class-conditional DiTs for now")
    if parent_model.interval_embed:
        raise ValueError(
            f"{parent_artifact.ref} is a few-call student: prune its teacher, then distil the pruned network"
        )
    parent = load_dit(parent_artifact, precision="float32")
    calibration = LatentBatches(cache, config.prune.calibration_size, seed=config.trainer.seed)
    keep, choice, rounds = blocks_to_keep(config, parent, diffusion, calibration)
    removed = sorted(set(range(parent_model.depth)) - set(keep))
    model = pruned_config(parent_model, len(keep))
    config = replace(
        config, model=model, diffusion=diffusion, latents=cache.artifact.ref, prune=replace(config.prune, keep=keep)
    )
    check_model_fits_cache(config.model, cache)
    print(
        f"pruning {parent_artifact.ref}: keeping blocks {keep} of 0..{parent_model.depth - 1}, removing {removed} "
        f"({choice}{', by output distance on the calibration batch' if rounds else ''})"
    )
    for entry in rounds:
        print(
            f"  removed block {entry['removed']}: output distance {entry['distance']:.4g} "
            f"(candidates {', '.join(f'{i}: {d:.3g}' for i, d in entry['candidates'].items())})"
        )
    lineage = {"latents": cache.artifact.ref, "autoencoder": cache.autoencoder_ref, "parent": parent_artifact.ref}
    return train_and_store(
        store,
        config,
        cache,
        lambda: PruneModule(config, lineage, parent),
        resume,
        callbacks,
        allow_changes,
        parents={"latents": cache.artifact.ref, "diffusion": parent_artifact.ref},
        metadata={
            "pruning": {
                "parent": parent_artifact.ref,
                "parent_depth": parent_model.depth,
                "kept_blocks": keep,
                "removed_blocks": removed,
                "choice": choice,
                "rounds": [{**r, "candidates": {str(i): d for i, d in r["candidates"].items()}} for r in rounds],
                "recovery": {
                    "output_weight": config.prune.output_weight,
                    "task_weight": config.prune.task_weight,
                    "feature_weight": config.prune.feature_weight,
                },
            }
        },
    )
