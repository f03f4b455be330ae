"""Stage 2: train a Diffusion Transformer on a latent cache and store it with its latent statistics and lineage."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from ldm.artifacts import Artifact, ArtifactError, ArtifactStore
from ldm.config import TrainerConfig, to_dict
from ldm.data.latents import LatentBatches, LatentCache
from ldm.destinations import check_run_writable
from ldm.diffusion.objectives import dispersive_block_index, training_losses
from ldm.diffusion.schedules import DiffusionConfig, make_schedule
from ldm.ema import (
    SNAPSHOT_FOLDER,
    PowerFunctionEMA,
    check_sigma_rel,
    ema_decay_at,
    list_snapshots,
    remove_snapshots_after,
    update_ema,
)
from ldm.generation import PromptConditioned, SamplingSettings, encode_prompts, sample_latents
from ldm.images import save_captioned_grid, save_grid
from ldm.loading import DIT_WEIGHT_FILES, dit_configs, load_autoencoder
from ldm.models.dit import DiT, DiTConfig
from ldm.models.text import drop_captions
from ldm.training import (
    check_optimizer_settings,
    compiled,
    fit_stage,
    format_seconds,
    lr_factor,
    non_finite_message,
    open_run,
    save_loss_curves,
    seed_step,
)


def _trainer_defaults() -> TrainerConfig:
    return TrainerConfig(max_steps=10_000, batch_size=256, lr=1e-4, warmup_steps=0, grad_clip=0.0)


@dataclass
class PreviewConfig:
    """Sample grids written during training: EMA weights, decoded through the cache's autoencoder."""

    per_class: int = 2
    max_classes: int = 10
    # A text DiT's previews: these prompts, each per_class times; empty: the first 8 captions of the cache.
    prompts: list[str] = field(default_factory=list)
    # How the grids are sampled, as `ldm sample` would (sampler None: the objective's default).
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(num_steps=20, guidance_scale=2.0))

    # Keys of configs written before previews held a SamplingSettings, and their names there.
    LEGACY_KEYS: ClassVar[dict[str, str]] = {
        "sampler": "sampler",
        "steps": "num_steps",
        "guidance_scale": "guidance_scale",
        "seed": "seed",
    }

    @classmethod
    def derive_keys(cls, data: dict) -> dict:
        """A preview written with the sampling keys beside per_class (preview.steps, preview.sampler: "") as one
        with them under `sampling`, so older configs, stored artifacts and `--set preview.steps=N` still load."""
        legacy = {key: data[key] for key in cls.LEGACY_KEYS if key in data}
        if not legacy:
            return data
        sampling = dict(data.get("sampling") or {})
        for key, value in legacy.items():
            sampling[cls.LEGACY_KEYS[key]] = None if key == "sampler" and value == "" else value
        return {**{k: v for k, v in data.items() if k not in legacy}, "sampling": sampling}


@dataclass
class DiffusionStageConfig:
    """Everything that defines a diffusion run."""

    model: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    trainer: TrainerConfig = field(default_factory=_trainer_defaults)
    latents: str = "latents@latest"  # the latent cache to train on
    autoencoder: str | None = None  # when given, the cache must come from this autoencoder
    ema_decay: float = 0.9999
    lr_schedule: str = "constant"  # constant | cosine
    # AdamW betas: (0.9, 0.999) as DiT and SiT train; LightningDiT trains with (0.9, 0.95).
    betas: tuple[float, float] = (0.9, 0.999)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    run_dir: str = "runs/diffusion"
    # Post-hoc EMA (Karras et al. 2024, EDM2): power-function EMA profiles of these lengths sigma_rel,
    # kept beside the EMA above and snapshotted every posthoc_snapshot_every steps (and at the last) into
    # <run_dir>/ema-snapshots/, from which `ldm ema` reconstructs any EMA length after training.
    # EDM2 keeps [0.05, 0.10]; empty: off.
    posthoc_ema: list[float] = field(default_factory=list)
    posthoc_snapshot_every: int = 0
    # Continue training: start from this diffusion artifact's weights (trained and EMA) instead of a fresh DiT,
    # with a new optimizer and learning-rate schedule (a warm restart). It must have this run's model settings
    # and have been trained on this run's latent cache; the new artifact names it as a parent.
    init_from: str = ""
    # model.text_encoder "pretrained": the local folder of the frozen `transformers` encoder (CLIP text or T5, with
    # its tokenizer) whose features the DiT reads; its identity (a fingerprint of its files) is stored with the model.
    text_encoder_path: str = ""

    @staticmethod
    def derive_keys(data: dict) -> dict:
        """`diffusion.learn_sigma` says whether the variance is learned, so the DiT's output channels follow it:
        a preset sets it once, under `diffusion`, and `model.learn_sigma` is that value unless given too."""
        diffusion, model = data.get("diffusion"), data.get("model")
        if not isinstance(diffusion, dict) or "learn_sigma" not in diffusion:
            return data
        model = {"preset": model} if isinstance(model, str) else {} if model is None else model
        if not isinstance(model, dict) or "learn_sigma" in model:
            return data
        return {**data, "model": {**model, "learn_sigma": diffusion["learn_sigma"]}}

    def __post_init__(self) -> None:
        if self.model.learn_sigma != self.diffusion.learn_sigma:
            raise ValueError(
                f"model.learn_sigma ({self.model.learn_sigma}) and "
                f"diffusion.learn_sigma ({self.diffusion.learn_sigma}) "
                f"must agree: the network's output channels and the loss are two sides of the same choice"
            )
        check_optimizer_settings(self.lr_schedule, self.betas, self.ema_decay)
        if (self.model.text_encoder == "pretrained") != bool(self.text_encoder_path):
            raise ValueError(
                f"model.text_encoder {self.model.text_encoder!r} with text_encoder_path {self.text_encoder_path!r}: "
                f"a pretrained text encoder needs the folder it loads from (text_encoder_path), and only it does"
            )
        dispersive_block_index(self.diffusion, self.model.depth)  # a block the DiT has, checked before any step
        if (self.diffusion.objective == "meanflow") != self.model.interval_embed:
            raise ValueError(
                f"diffusion.objective {self.diffusion.objective!r} with model.interval_embed "
                f"{self.model.interval_embed}: a MeanFlow network takes the interval t - r (set both "
                f"diffusion.objective=meanflow and model.interval_embed=true), and only a MeanFlow network does"
            )
        self.check_meanflow_time_scale()
        for sigma_rel in self.posthoc_ema:
            check_sigma_rel(sigma_rel)
        if len(set(self.posthoc_ema)) != len(self.posthoc_ema):
            raise ValueError(f"posthoc_ema lists a length twice: {self.posthoc_ema}")
        if self.posthoc_ema and self.posthoc_snapshot_every < 1:
            raise ValueError(
                f"posthoc_ema needs posthoc_snapshot_every >= 1 (steps between snapshots), "
                f"got {self.posthoc_snapshot_every}"
            )
        if not self.posthoc_ema and self.posthoc_snapshot_every != 0:
            raise ValueError(
                "posthoc_snapshot_every is set but posthoc_ema is empty: name the profiles to keep, "
                "e.g. posthoc_ema=[0.05,0.10], or leave posthoc_snapshot_every at 0"
            )

    def check_meanflow_time_scale(self) -> None:
        """Refuse the MeanFlow identity's objective at DiT's 0-999 timestep range.

        A distilled student takes no derivative.
        """
        if self.diffusion.objective == "meanflow" and self.model.time_input_scale > 0.01:
            raise ValueError(
                f"model.time_input_scale {self.model.time_input_scale:g} with objective 'meanflow': set it to 0.001 "
                f"(flow time in [0, 1] at the embedder, as MeanFlow and SiT). At 1000 t the target's du/dt is "
                f"1000x larger in the fast embedding channels; a tiny DiT's loss then grew 4x in 100 steps"
            )


class DiffusionModule(L.LightningModule):
    """DiT training: AdamW, warm-up, EMA (and post-hoc EMA profiles), label dropout (inside the DiT), NaN/inf guard."""

    def __init__(self, config: DiffusionStageConfig, lineage: dict[str, str]):
        super().__init__()
        self.config = config
        self.model = DiT(config.model)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        # Post-hoc EMA profiles: submodules, so checkpoints hold them and a resume continues them exactly.
        self.power_ema = PowerFunctionEMA(self.model, config.posthoc_ema) if config.posthoc_ema else None
        self.__dict__["train_forward"] = compiled(self.model, config.trainer.compile)  # not a submodule
        self.schedule = (
            None
            if config.diffusion.is_flow
            else make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
        )
        self.lineage = lineage  # {"latents": ref, "autoencoder": ref}; checked again on resume
        self.run_dir: Path | None = None
        self.batches: LatentBatches | None = None
        self.decoder = None  # (autoencoder, stats) for preview grids, set by run()
        # A frozen pretrained text encoder (model.text_encoder "pretrained"), set by run(); not a submodule, so
        # checkpoints leave out its weights (the artifact records its identity instead).
        self.__dict__["text_encoder"] = None
        self.start_step = 0

    def configure_optimizers(self):
        cfg = self.config.trainer
        params = list(self.model.parameters())
        # The fused AdamW updates every parameter in one kernel per step instead of a dozen small
        # ops per tensor: ~6% of a DiT-F/2 step on the CPU (bench/dit.py --optimizer), more on GPUs.
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=self.config.betas, weight_decay=cfg.weight_decay, fused=fused
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, cfg.warmup_steps, cfg.max_steps, self.config.lr_schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.schedule is not None:
            self.schedule = self.schedule.to(self.device)
        self.start_step = self.global_step
        if self.power_ema is not None and self.trainer.is_global_zero and self.run_dir is not None:
            # Snapshots past the step this run starts from belong to a run that crashed after its last
            # checkpoint (or to an abandoned run in this folder): this run writes its own.
            stale = remove_snapshots_after(self.run_dir / SNAPSHOT_FOLDER, self.global_step)
            if stale:
                print(
                    f"removed {len(stale)} post-hoc EMA snapshots after step {self.global_step} "
                    f"from {self.run_dir / SNAPSHOT_FOLDER}"
                )

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        z, y, *indices = batch  # z (B, C, h, w) normalised latents, y (B,); a text DiT: the items' indices (B,)
        # Timesteps, noise and label (or caption) dropout depend on (seed, step, rank) alone, so a resumed run
        # draws exactly what the uninterrupted run would have drawn.
        seed_step(self.config.trainer.seed, self.global_step, self.global_rank, self.trainer.world_size)
        if self.config.model.text_dim:
            model, y = self.prompt_model(self.train_forward, indices[0]), torch.arange(len(z), device=z.device)
            losses = self.batch_losses(z, y, model)
            if (self.global_step + 1) % self.config.trainer.log_every == 0:  # the steps Lightning writes logs at
                self.log("train/prompt_gain", self.prompt_gain(z, indices[0]), on_step=True)
        else:
            losses = self.batch_losses(z, y)
        loss = losses["loss"].mean()
        if not torch.isfinite(loss):
            self._stop_non_finite(f"loss is {loss.item()}")
        # train/loss, train/mse and whichever terms the config turns on: vb, cos, disp
        logs = {f"train/{k}": v.float().mean() for k, v in losses.items() if k != "t"}
        self.log_dict(logs, on_step=True, prog_bar=False)
        self.log("loss", loss, prog_bar=True, on_step=True, logger=False)
        return loss

    def batch_losses(self, z: torch.Tensor, y: torch.Tensor, model=None) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,) of a batch: dict(loss, mse, t, and the terms the config turns on)."""
        return training_losses(
            model or self.train_forward, z, y, self.config.diffusion, self.schedule, depth=self.config.model.depth
        )

    def prompt_model(self, forward, indices: torch.Tensor) -> PromptConditioned:
        """`forward` conditioned on the captions of cache items `indices` (B,), each dropped to the empty prompt
        with caption_dropout_prob (from the global RNG, seeded per step); label i selects row i."""
        captions = self.batches.cache.captions
        prompts = drop_captions([captions[i] for i in indices.tolist()], self.config.model.caption_dropout_prob)
        encoded = encode_prompts(self.model, prompts, self.text_encoder)  # the joint encoder learns through this
        return PromptConditioned(forward, *encoded)

    @torch.no_grad()
    def prompt_gain(self, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The batch's loss with every caption moved to the next item over its loss with the right captions, at
        the same t and noise: 1 while the DiT ignores its prompts, above 1 as it learns to read them (the scenes
        DiT at t = 0.8: 1.000 after 450 steps while its text path was stuck, 1.21 after 4,000 once it was not)."""
        captions = [self.batches.cache.captions[i] for i in indices.tolist()]
        rows = torch.arange(len(z), device=z.device)
        losses = []
        for prompts in (captions, captions[1:] + captions[:1]):
            model = PromptConditioned(self.model, *encode_prompts(self.model, prompts, self.text_encoder))
            generator = torch.Generator(z.device).manual_seed(self.config.trainer.seed + self.global_step)
            draws = training_losses(model, z, rows, self.config.diffusion, self.schedule, generator=generator)
            losses.append(draws["mse"].mean())
        return losses[1] / losses[0]

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else [torch.zeros(())]  # one call, not one per tensor
        grad_norm = torch.linalg.vector_norm(torch.stack(norms))
        if not torch.isfinite(grad_norm):
            self._stop_non_finite(f"gradient norm is {grad_norm.item()}")
        self.log("train/grad_norm", grad_norm, on_step=True)

    def _stop_non_finite(self, what: str) -> None:
        raise FloatingPointError(non_finite_message(what, self.global_step, self.run_dir))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: Lightning runs the checkpoint callback before the module's
        # own batch-end hook, so an EMA updated there would be saved one step behind the weights.
        self.update_ema()
        if self.power_ema is not None:
            self.update_posthoc_ema(self.global_step + 1)  # global_step still counts the steps before this one

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = self.config.trainer.image_every
        if every > 0 and self.global_step % every == 0 and self.trainer.is_global_zero:
            self.save_preview(f"samples-step{self.global_step:07d}.png")

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * model, the decay warmed up by ema_decay_at."""
        update_ema(self.ema, self.model, ema_decay_at(self.global_step, self.config.ema_decay))

    @torch.no_grad()
    def update_posthoc_ema(self, step: int) -> None:
        """Advance the power-function EMA profiles to `step`; rank 0 snapshots them every posthoc_snapshot_every
        steps and at the last one. Before the checkpoint of this step is saved, so a resume never skips a snapshot."""
        self.power_ema.update(self.model, step)
        every = self.config.posthoc_snapshot_every
        if (
            (step % every == 0 or step == self.trainer.max_steps)
            and self.trainer.is_global_zero
            and self.run_dir is not None
        ):
            self.power_ema.write_snapshots(self.run_dir / SNAPSHOT_FOLDER, step, {"latents": self.lineage["latents"]})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lineage"] = dict(self.lineage)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("lineage", {})
        if saved and saved != self.lineage:
            differ = [key for key in self.lineage if saved.get(key) != self.lineage[key]]
            raise ArtifactError(
                "this run was trained with "
                + ", ".join(f"{key} {saved.get(key)}" for key in differ)
                + ", but "
                + ", ".join(f"{self.lineage[key]}" for key in differ)
                + " was given; resume with the same inputs (a reference like @latest may have moved: name the "
                "versions), or start a new run"
            )

    @torch.no_grad()
    def save_preview(self, name: str) -> Path | None:
        """Write a grid of EMA samples (rows: classes) decoded through the autoencoder into the run folder."""
        if self.run_dir is None or self.decoder is None:
            return None
        autoencoder, stats = self.decoder
        cfg = self.config.preview
        if self.config.model.text_dim:
            prompts = [p for p in self.preview_prompts() for _ in range(cfg.per_class)]
            labels = torch.zeros(len(prompts), dtype=torch.long)
            z = sample_latents(
                self.ema, self.config.diffusion, labels, cfg.sampling, prompts=prompts, text_encoder=self.text_encoder
            )
            images = autoencoder.to(z.device).decode(stats.denormalize(z))
            return save_captioned_grid(images, prompts, self.run_dir / "images" / name, ncol=2 * cfg.per_class)
        classes = min(cfg.max_classes, self.config.model.num_classes)
        labels = torch.arange(classes).repeat_interleave(cfg.per_class)
        z = sample_latents(self.ema, self.config.diffusion, labels, cfg.sampling)
        images = autoencoder.to(z.device).decode(stats.denormalize(z))
        return save_grid(
            images, self.run_dir / "images" / name, nrow=cfg.per_class * 2 if classes > 5 else cfg.per_class, scale=2
        )

    def preview_prompts(self) -> list[str]:
        """The prompts of a text DiT's preview grids: preview.prompts, or the cache's first 8 captions."""
        if self.config.preview.prompts:
            return list(self.config.preview.prompts)
        return list(self.batches.cache.captions[:8]) if self.batches is not None else []


def frozen_text_encoder(config: DiffusionStageConfig) -> torch.nn.Module | None:
    """The frozen pretrained text encoder of a DiT with model.text_encoder "pretrained" (None for any other)."""
    if config.model.text_encoder != "pretrained":
        return None
    from ldm.models.pretrained_text import load_pretrained_text_encoder

    encoder = load_pretrained_text_encoder(config.text_encoder_path, max_length=config.model.text_length)
    if encoder.hidden_size != config.model.text_dim:
        raise ValueError(
            f"the text encoder in {config.text_encoder_path} gives {encoder.hidden_size}-wide features, "
            f"model.text_dim is {config.model.text_dim}: set model.text_dim={encoder.hidden_size}"
        )
    return encoder


def check_model_fits_cache(model: DiTConfig, cache: LatentCache) -> None:
    """Raise ValueError when the DiT's input does not match the cache's latents or classes."""
    shape = tuple(cache.latent_shape)  # (C, H, W) or (C, L)
    if model.latent_shape != shape:
        raise ValueError(
            f"the latent cache holds {'x'.join(map(str, shape))} latents but the model expects "
            f"{'x'.join(map(str, model.latent_shape))}; set model.in_channels={shape[0]} "
            f"model.input_size={shape[1]} model.spatial_dims={len(shape) - 1}"
        )
    if model.text_dim:
        if cache.captions is None:
            raise ValueError(
                f"{cache.artifact.ref} holds no captions, and a text DiT (model.text_encoder) trains on captioned "
                f"data: encode a captioned data set (ldm encode --data scenes)"
            )
    elif cache.num_classes > model.num_classes:
        raise ValueError(f"the cache has {cache.num_classes} classes but model.num_classes is {model.num_classes}")


def open_cache(store: ArtifactStore, config: DiffusionStageConfig) -> LatentCache:
    """Load the latent cache the config names and check it comes from the expected autoencoder."""
    artifact = store.load(config.latents, stage="latents")
    cache = LatentCache(artifact)
    if config.autoencoder is not None:
        expected = store.load(config.autoencoder, stage="autoencoder", verify=False)
        if expected.ref != cache.autoencoder_ref:
            raise ArtifactError(
                f"latent cache {artifact.ref} was encoded by {cache.autoencoder_ref}, not by {expected.ref}: "
                f"encode the data with that autoencoder (ldm encode --autoencoder {expected.ref}) "
                "or drop the autoencoder setting"
            )
    return cache


def open_own_cache(
    store: ArtifactStore, config: DiffusionStageConfig, source: Artifact, refusal: Callable[[str, str], str]
) -> LatentCache:
    """The latent cache the stored DiT `source` was trained on, for a stage that learns from that DiT's output
    (distillation, pruning): config.latents, when set, must name it, else ArtifactError(refusal(own, named))."""
    own = source.parents.get("latents")
    cache = open_cache(store, replace(config, latents=config.latents or own))
    if cache.artifact.ref != own:
        raise ArtifactError(refusal(own, cache.artifact.ref))
    return cache


def run(
    config: DiffusionStageConfig,
    store: ArtifactStore | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    allow_changes: Sequence[str] = (),
) -> Artifact | None:
    """Train the DiT on the latent cache and return the stored `diffusion` artifact."""
    store = store or ArtifactStore()
    check_run_writable(store, config.run_dir)  # fails now rather than after training
    cache = open_cache(store, config)
    check_model_fits_cache(config.model, cache)
    lineage = {"latents": cache.artifact.ref, "autoencoder": cache.autoencoder_ref}
    start = starting_point(store, config, cache.artifact.ref) if config.init_from else None

    def make_module() -> DiffusionModule:
        module = DiffusionModule(config, lineage)
        if start is not None:
            module.model.load_state_dict(start.load_tensors(DIT_WEIGHT_FILES["raw"]))
            module.ema.load_state_dict(start.load_tensors(DIT_WEIGHT_FILES["ema"]))
        return module

    parents = None
    if start is not None:
        print(f"starting from {start.ref} ({start.manifest.get('training', {}).get('steps', '?')} steps)")
        parents = {"latents": cache.artifact.ref, "diffusion": start.ref}
    return train_and_store(store, config, cache, make_module, resume, callbacks, allow_changes, parents=parents)


def starting_point(store: ArtifactStore, config: DiffusionStageConfig, latents_ref: str) -> Artifact:
    """The artifact `init_from` names, checked: a DiT of this run's model settings trained on this run's cache."""
    start = store.load(config.init_from, stage="diffusion")
    # Read through the dataclass, so that settings added since the start was stored take their defaults there.
    theirs, ours = to_dict(dit_configs(start)[0]), to_dict(config)["model"]
    if theirs != ours:
        raise ValueError(
            f"init_from {start.ref} has model settings {theirs}, this run {ours}: continue with the same model "
            "settings (the same preset and options)"
        )
    if start.parents.get("latents") != latents_ref:
        raise ArtifactError(
            f"init_from {start.ref} was trained on {start.parents.get('latents')}, this run trains on "
            f"{latents_ref}: another cache is another latent space. Pass --latents "
            f"{start.parents.get('latents')} or start from a DiT trained on {latents_ref}"
        )
    if DIT_WEIGHT_FILES["raw"] not in start.manifest.get("files", {}):
        raise ArtifactError(
            f"init_from {start.ref} holds no {DIT_WEIGHT_FILES['raw']} (trained weights), only EMA ones: "
            f"it cannot be continued; start from a diffusion artifact that `ldm train diffusion` wrote"
        )
    return start


def train_and_store(
    store: ArtifactStore,
    config: DiffusionStageConfig,
    cache: LatentCache,
    make_module: Callable[[], DiffusionModule],
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    allow_changes: Sequence[str] = (),
    parents: dict[str, str] | None = None,
    metadata: dict | None = None,
) -> Artifact | None:
    """Open the run, train the module `make_module` builds (after the run seeded every RNG) on the cache and
    store its EMA and raw weights as a `diffusion` artifact with `parents` (default: the cache) and `metadata` added."""
    with open_run(config, resume, allow_changes) as (run_dir, checkpoint):
        module = make_module()
        module.run_dir = run_dir
        text = bool(config.model.text_dim)
        module.batches = LatentBatches(cache, config.trainer.batch_size, seed=config.trainer.seed, with_indices=text)
        module.__dict__["text_encoder"] = frozen_text_encoder(config)
        autoencoder = load_autoencoder(store.load(cache.autoencoder_ref, stage="autoencoder"))
        module.decoder = (autoencoder, cache.stats)
        loader = DataLoader(module.batches, batch_size=None, num_workers=0)
        params = sum(p.numel() for p in module.model.parameters())
        print(
            f"DiT: {params / 1e6:.2f}M parameters, {config.model.num_patches} tokens, "
            f"objective {config.diffusion.objective} "
            f"({config.diffusion.prediction if config.diffusion.objective == 'ddpm' else 'velocity'}), "
            f"{len(cache)} cached images from {cache.artifact.ref}"
        )
        trained = fit_stage(
            config.trainer,
            run_dir,
            checkpoint,
            module,
            loader,
            module.batches,
            callbacks,
            gradient_clip_val=config.trainer.grad_clip or None,
        )
        if trained is None:
            return None
        trainer, seconds = trained
        steps_this_run = trainer.global_step - module.start_step
        final = {
            k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")
        }
        grid = module.save_preview("samples-final.png")
        curves = save_loss_curves(run_dir, ["train/loss", "train/mse"], run_dir / "loss.png", "diffusion loss")
        # None when a resume found the run finished: it trained nothing, and has no throughput.
        images_per_s = round(steps_this_run * config.trainer.batch_size / seconds, 1) if steps_this_run else None
        artifact = store.save(
            "diffusion",
            tensors={"weights.safetensors": module.ema.state_dict(), "raw.safetensors": module.model.state_dict()},
            config=to_dict(config),
            parents=parents or {"latents": cache.artifact.ref},
            data_fingerprint=cache.artifact.manifest.get("data_fingerprint"),
            metadata={
                "autoencoder": cache.autoencoder_ref,
                "latent_stats": cache.stats.to_dict(),
                "latent_shape": list(cache.latent_shape),
                "num_classes": config.model.num_classes,
                "weights": "weights.safetensors holds the EMA weights (for sampling); raw.safetensors the trained ones",
                "training": {
                    "steps": trainer.global_step,
                    "batch_size": config.trainer.batch_size,
                    "seconds_this_run": round(seconds, 1),
                    "latent_images_per_s": images_per_s,
                    "final": final,
                    "run_dir": str(run_dir),
                    **({"posthoc_ema": posthoc_ema_record(config, run_dir)} if config.posthoc_ema else {}),
                },
                **({"text_encoder": text_encoder_record(module)} if config.model.text_dim else {}),
                **(metadata or {}),
            },
        )
        print(f"\nwrote {artifact.ref}  ({artifact.path})")
        this_run = (
            f", {format_seconds(seconds)} this run, {images_per_s:.0f} latents/s, final loss {final['loss']:.4f}"
            if images_per_s is not None and "loss" in final
            else ""
        )
        print(f"  {trainer.global_step} steps{this_run}")
        print(f"  samples: {grid}   loss curve: {curves}")
        if config.posthoc_ema:
            record = artifact.manifest["training"]["posthoc_ema"]
            print(
                f"  post-hoc EMA: {len(record['snapshot_steps'])} snapshots of sigma_rel {config.posthoc_ema} in "
                f"{record['snapshots']} ({record['bytes'] / 2**20:.1f} MiB, kept there, not in the artifact); "
                f"ldm ema --model {artifact.ref} --sigma-rel ... reconstructs and measures other EMA lengths"
            )
        return artifact


def text_encoder_record(module: DiffusionModule) -> dict:
    """What a text DiT's artifact records of its text encoder: the joint one's preset (its weights are the model's),
    or the frozen one's identity, which loading checks (`ldm.models.pretrained_text.check_same_encoder`)."""
    if module.text_encoder is None:
        return {"source": "joint", "preset": module.config.model.text_encoder, "weights": "in this artifact"}
    from ldm.models.pretrained_text import text_encoder_identity

    identity = text_encoder_identity(module.text_encoder)
    return {"source": "pretrained", "path": module.config.text_encoder_path, **identity}


def posthoc_ema_record(config: DiffusionStageConfig, run_dir: Path) -> dict:
    """What a diffusion artifact records of its run's post-hoc EMA snapshots, which stay in the run folder."""
    folder = run_dir / SNAPSHOT_FOLDER
    snapshots = list_snapshots(folder)
    return {
        "sigma_rel": list(config.posthoc_ema),
        "snapshots": str(folder.resolve()),
        "snapshot_steps": sorted({s.step for s in snapshots}),
        "bytes": sum(s.path.stat().st_size for s in snapshots),
        "note": "the snapshots stay in the run folder (one copy of the weights per profile and step: too big for the "
        "artifact); `ldm ema --model <this artifact> --sigma-rel ...` reconstructs other EMA lengths from them",
    }
