"""Few-step students: distil a stored rectified-flow DiT into a DiT that samples in 1, 2 or 4 calls.

The student starts as a copy of its teacher with an interval embedding added (zero at first, so the
student begins as the teacher), learns the targets of `ldm.diffusion.distill` on the teacher's own
latent cache, and is stored as a `diffusion` artifact whose parents are that cache and the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from lightning.pytorch.callbacks import Callback

from ldm.artifacts import Artifact, ArtifactStore
from ldm.config import TrainerConfig
from ldm.destinations import check_run_writable
from ldm.diffusion.distill import DistillConfig, distillation_losses, guided_velocity
from ldm.diffusion.schedules import DiffusionConfig
from ldm.generation import SamplingSettings
from ldm.loading import dit_configs, load_dit
from ldm.models.dit import DiT, DiTConfig
from stages.diffusion import (
    DiffusionModule,
    DiffusionStageConfig,
    PreviewConfig,
    check_model_fits_cache,
    open_own_cache,
    train_and_store,
)


def _trainer_defaults() -> TrainerConfig:
    return TrainerConfig(max_steps=2000, batch_size=64, lr=1e-4, warmup_steps=50, grad_clip=1.0)


@dataclass
class DistillStageConfig(DiffusionStageConfig):
    """A distillation run. `model` and `diffusion` are the student's and come from the teacher: leave them out."""

    teacher: str = "diffusion@latest"  # a rectified-flow `diffusion` artifact (objective flow)
    distill: DistillConfig = field(default_factory=DistillConfig)
    latents: str = ""  # "": the teacher's own cache; any other cache is refused
    trainer: TrainerConfig = field(default_factory=_trainer_defaults)
    ema_decay: float = 0.999
    lr_schedule: str = "cosine"
    preview: PreviewConfig = field(
        default_factory=lambda: PreviewConfig(sampling=SamplingSettings(sampler="meanflow", num_steps=2))
    )
    run_dir: str = "runs/distill"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preview.sampling.guidance_scale != 1:
            raise ValueError(
                f"preview.sampling.guidance_scale {self.preview.sampling.guidance_scale:g}: a student has its guidance "
                f"built in "
                f"(distill.guidance_scale); preview it at 1"
            )

    def check_meanflow_time_scale(self) -> None:
        """A student learns no derivative, so it keeps its teacher's timestep range."""


def student_configs(
    teacher_model: DiTConfig, teacher_diffusion: DiffusionConfig, distill: DistillConfig
) -> tuple[DiTConfig, DiffusionConfig]:
    """Return the student's (DiTConfig, DiffusionConfig): the teacher's network with an interval embedding and no
    label dropout (it learns the guided velocity, so it has no unconditional use), sampled as an average-velocity
    model."""
    if teacher_diffusion.objective != "flow":
        raise ValueError(
            f"the teacher's objective is {teacher_diffusion.objective!r}; distillation needs a rectified-flow "
            f"teacher (diffusion.objective flow), such as configs/fmnist/diffusion-fast.yaml trains"
        )
    if distill.guidance_scale != 1 and teacher_model.class_dropout_prob == 0:
        raise ValueError(
            f"distill.guidance_scale {distill.guidance_scale:g} needs a teacher trained with label dropout "
            f"(model.class_dropout_prob > 0), which this one was not; set distill.guidance_scale=1"
        )
    model = replace(teacher_model, interval_embed=True, class_dropout_prob=0.0)
    diffusion = replace(
        teacher_diffusion,
        objective="meanflow",
        velocity_cosine_weight=0.0,
        dispersive_weight=0.0,
        built_in_guidance=distill.guidance_scale,
    )
    return model, diffusion


def init_student_from_teacher(student: DiT, teacher: DiT) -> None:
    """Copy the teacher's weights into the student and zero the interval embedding's output, so that
    the student computes exactly the teacher's function until it trains."""
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not key.startswith("r_embedder.") for key in missing):
        raise ValueError(f"the student does not fit its teacher: missing {missing}, unexpected {unexpected}")
    last = student.r_embedder.mlp[2]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)


class DistillModule(DiffusionModule):
    """DiffusionModule whose loss is the distillation target of a frozen teacher (not a submodule: not saved)."""

    def __init__(self, config: DistillStageConfig, lineage: dict[str, str], teacher: DiT):
        super().__init__(config, lineage)
        init_student_from_teacher(self.model, teacher)
        self.ema.load_state_dict(self.model.state_dict())
        self.__dict__["teacher"] = teacher.requires_grad_(False).eval()

    def on_train_start(self) -> None:
        super().on_train_start()
        self.teacher.to(self.device)

    def batch_losses(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config.distill
        teacher = guided_velocity(self.teacher, self.teacher.null_class, cfg.guidance_scale, cfg.guidance_interval)
        return distillation_losses(self.train_forward, self.model, teacher, z, y, cfg)


def run(
    config: DistillStageConfig,
    store: ArtifactStore | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    allow_changes: Sequence[str] = (),
) -> Artifact | None:
    """Distil the teacher on its own latent cache and return the stored student `diffusion` artifact."""
    store = store or ArtifactStore()
    check_run_writable(store, config.run_dir)  # fails now rather than after training
    if config.model != DiTConfig() or config.diffusion != DiffusionConfig():
        raise ValueError(
            "a distillation config sets no model.* or diffusion.*: the student's network and objective come "
            "from its teacher (distill.* and trainer.* are the settings of this stage)"
        )
    if config.init_from:
        raise ValueError(
            f"init_from ({config.init_from}) continues `ldm train diffusion` runs; a student starts from its "
            f"teacher (--teacher): leave init_from unset"
        )
    teacher_artifact = store.load(config.teacher, stage="diffusion")
    cache = open_own_cache(
        store,
        config,
        teacher_artifact,
        lambda own, named: (
            f"teacher {teacher_artifact.ref} was trained on {own}, but the student would train on "
            f"{named}: a student learns its teacher's velocity on the teacher's own latents. "
            f"Leave latents unset (the teacher's cache) or name a teacher trained on {named}"
        ),
    )
    model, diffusion = student_configs(*dit_configs(teacher_artifact), config.distill)
    config = replace(config, model=model, diffusion=diffusion, latents=cache.artifact.ref)
    check_model_fits_cache(config.model, cache)
    teacher = load_dit(teacher_artifact, precision="float32")
    lineage = {"latents": cache.artifact.ref, "autoencoder": cache.autoencoder_ref, "teacher": teacher_artifact.ref}
    within = (
        ""
        if config.distill.guidance_interval is None
        else " at timesteps {:g}-{:g}".format(*config.distill.guidance_interval)
    )
    print(
        f"distilling {teacher_artifact.ref} (guidance {config.distill.guidance_scale:g}{within} built in) "
        f"into a student of {', '.join(str(round(1 / d)) for d in config.distill.interval_levels)} steps"
    )
    return train_and_store(
        store,
        config,
        cache,
        lambda: DistillModule(config, lineage, teacher),
        resume,
        callbacks,
        allow_changes,
        parents={"latents": cache.artifact.ref, "teacher": teacher_artifact.ref},
        metadata={
            "distillation": {
                "teacher": teacher_artifact.ref,
                "guidance_scale": config.distill.guidance_scale,
                "guidance_interval": config.distill.guidance_interval,
                "finest_steps": config.distill.finest_steps,
                "anchor_share": config.distill.anchor_share,
                "sampler": "meanflow",
                "note": "sample with 1, 2, 4 ... finest_steps steps and guidance 1",
            }
        },
    )
