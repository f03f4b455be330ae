"""Stage 1: train the KL autoencoder (reconstruction + LPIPS + KL, optional PatchGAN) and store it.

Sound takes the same stage with `model.spatial_dims: 1`: the perceptual term is then the
multi-resolution STFT loss, the discriminator judges spectrograms, and `train_crop` trains the
convolutional network on random crops of the clips (it encodes whole clips afterwards).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from ldm.artifacts import Artifact, ArtifactStore
from ldm.audio import take_windows
from ldm.config import TrainerConfig, from_dict, to_dict
from ldm.data import DataConfig, build_dataset, data_fingerprint
from ldm.destinations import check_run_writable
from ldm.ema import ema_decay_at, update_ema
from ldm.images import save_side_by_side
from ldm.losses.autoencoder import AutoencoderLoss, AutoencoderLossConfig
from ldm.losses.vocoder import VocoderLoss, VocoderLossConfig
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, encoder_fingerprint
from ldm.training import (
    check_optimizer_settings,
    compiled,
    fit_stage,
    format_seconds,
    lr_factor,
    make_loader,
    non_finite_message,
    open_run,
    save_loss_curves,
    seed_step,
)


@dataclass
class AutoencoderStageConfig:
    """Everything that defines an autoencoder run; saved into the run folder and the artifact."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas of both optimisers, as in the LDM autoencoders
    # The discriminator's learning rate is trainer.lr times this. A faster discriminator is the two time-scale
    # update rule (TTUR; Heusel et al. 2017, who train D at 4x G's rate): it keeps D ahead of a decoder that
    # would otherwise hold it at chance, where the adaptive GAN weight only amplifies noise.
    disc_lr_scale: float = 1.0
    # > 0: keep an EMA of the autoencoder's weights (decay warmed up as the DiT's) and store it instead of the
    # last iterate; the run folder's checkpoints hold both. A GAN-trained generator's running average is
    # smoother than its final step (Karras et al. 2018, ProGAN; StyleGAN's G_ema). 0: off.
    ema_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine (after trainer.warmup_steps of linear warm-up)
    train_subset: int = 0  # train on the first N images only (0: all); for smoke runs
    preview_images: int = 16
    # Fine-tuning: start from the weights of this autoencoder artifact (its model config must match).
    init_from: str = ""
    # "all", or "decoder": encoder and quant_conv stay frozen, so the new artifact makes exactly the
    # latents of `init_from` and decodes them for any DiT trained on those (a decoder-only fine-tune,
    # e.g. a GAN-sharpened decoder for an existing latent space).
    train_parts: str = "all"
    # Scale equivariance (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders"; EQ-VAE,
    # Kouzelis et al. 2025, with scalings and rotations): + w * |D(down2(z)) - down2(x)|_1, z a posterior
    # sample and down2 a 2x2 average. Latents whose half-size version decodes to the half-size image
    # carry less high-frequency detail, which a DiT learns sooner. Costs a decode at a quarter of the pixels.
    equivariance_weight: float = 0.0
    # 1-D signals: train on a random crop of this many samples of each clip (0: whole clips). The network is
    # convolutional, so it learns the same map from shorter windows at a fraction of the cost (as audio codecs
    # train on short segments); crops start inside the recording, not in the zero padding after it.
    train_crop: int = 0
    # With model.decoder_head "vocos": the learned waveform head's objective (mel L1, hinge GAN with HiFi-GAN's
    # and UnivNet's discriminators, feature matching), trained with train_parts "decoder" from init_from.
    vocoder_loss: VocoderLossConfig = field(default_factory=VocoderLossConfig)
    run_dir: str = "runs/autoencoder"

    def __post_init__(self) -> None:
        check_optimizer_settings(self.lr_schedule, self.betas, self.ema_decay)
        if not self.disc_lr_scale > 0:
            raise ValueError(
                f"disc_lr_scale must be > 0 (the discriminator's lr over trainer.lr), got {self.disc_lr_scale}"
            )
        if self.train_parts not in ("all", "decoder"):
            raise ValueError(f"train_parts must be 'all' or 'decoder', got {self.train_parts!r}")
        if self.equivariance_weight < 0:
            raise ValueError(f"equivariance_weight must be >= 0, got {self.equivariance_weight}")
        if self.train_crop and (
            self.model.spatial_dims != 1
            or self.train_crop % self.model.downsample_factor
            or not 0 < self.train_crop <= self.data.length
        ):
            raise ValueError(
                f"train_crop {self.train_crop} must be a multiple of f={self.model.downsample_factor} "
                f"in (0, data.length={self.data.length}], and only 1-D signals are cropped"
            )
        if self.model.front_end == "stft" and (self.loss.perceptual.weight > 0 or self.loss.disc_enabled):
            raise ValueError(
                "with model.front_end stft the network reconstructs log-magnitude spectrograms, whose L1 "
                "loss is the spectral term already: set loss.perceptual.weight 0 and loss.disc_enabled false "
                "(a spectrogram discriminator for this front end is not built yet)"
            )
        disc_channels, image_channels = self.loss.discriminator.in_channels, self.model.image_channels_out
        if self.loss.disc_enabled and self.model.spatial_dims == 2 and disc_channels != image_channels:
            raise ValueError(
                f"loss.discriminator.in_channels is {disc_channels}, but the autoencoder's images have "
                f"{image_channels} channel(s): set loss.discriminator.in_channels={image_channels} (or a preset made "
                f"for them, e.g. loss.discriminator.preset=patchgan-34-small for 1 channel)"
            )
        if self.model.spatial_dims == 1 and not self.data.is_sound:
            raise ValueError(f"model.spatial_dims 1 is for sound, but data.name is {self.data.name!r} (images)")
        if self.model.spatial_dims == 1 and self.model.resolution != self.data.length:
            raise ValueError(
                f"model.resolution {self.model.resolution} must equal data.length {self.data.length}: the "
                "clip length the latents are made for (set both)"
            )
        if self.model.spatial_dims == 2 and self.data.is_sound:
            raise ValueError(f"data.name {self.data.name!r} is sound: set model.spatial_dims: 1 (e.g. model: fsdd-f64)")
        if self.model.decoder_head == "vocos" and self.train_parts != "decoder":
            raise ValueError(
                "model.decoder_head vocos trains as a decoder fine-tune of a spectrogram autoencoder: set "
                "train_parts: decoder and init_from to it (the encoder and so the latent space stay as they are)"
            )
        if self.train_parts == "decoder" and not self.init_from:
            raise ValueError(
                "train_parts: decoder keeps the encoder frozen, which only makes sense from trained weights: "
                "set init_from to an autoencoder reference (e.g. --set init_from=autoencoder@latest)"
            )


class AutoencoderModule(L.LightningModule):
    """The autoencoder and its loss; generator and discriminator steps side by side (manual optimisation)."""

    def __init__(self, config: AutoencoderStageConfig):
        super().__init__()
        self.config = config
        self.automatic_optimization = False
        self.autoencoder = AutoencoderKL(config.model)
        if config.train_parts == "decoder":
            self.autoencoder.encoder.requires_grad_(False)
            self.autoencoder.quant_conv.requires_grad_(False)
        # The stored weights' running average (its copy of the start is made in `run`, after any init_from).
        self.ema = copy.deepcopy(self.autoencoder).requires_grad_(False).eval() if config.ema_decay > 0 else None
        self.loss = AutoencoderLoss(config.loss, config.model.spatial_dims)
        self.vocoder_loss = VocoderLoss(config.vocoder_loss) if config.model.decoder_head == "vocos" else None
        self.__dict__["train_forward"] = compiled(self.autoencoder, config.trainer.compile)  # not a submodule
        self.steps_per_batch = optimizer_steps_per_batch(config)
        self.register_buffer("preview", torch.empty(0), persistent=False)
        self.run_dir: Path | None = None

    @property
    def step(self) -> int:
        """Batches trained so far (Lightning's global_step counts each optimiser's steps)."""
        return self.global_step // self.steps_per_batch

    def configure_optimizers(self):
        cfg = self.config
        trainable = [p for p in self.autoencoder.parameters() if p.requires_grad]
        generator_params = trainable + [p for p in self.loss.generator_parameters()]
        opt_ae = torch.optim.Adam(
            generator_params, lr=cfg.trainer.lr, betas=cfg.betas, weight_decay=cfg.trainer.weight_decay
        )
        optimizers = [opt_ae]
        if len(self.lr_scales) > 1:
            disc_lr = cfg.trainer.lr * self.lr_scales[1]
            critics = (
                self.vocoder_loss.discriminator.parameters()
                if self.vocoder_loss is not None
                else self.loss.discriminator_parameters()
            )
            optimizers.append(torch.optim.Adam(critics, lr=disc_lr, betas=cfg.betas))
        schedule = lambda step: lr_factor(step, cfg.trainer.warmup_steps, cfg.trainer.max_steps, cfg.lr_schedule)  # noqa: E731
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in optimizers]
        return optimizers, schedulers

    @property
    def stored(self) -> AutoencoderKL:
        """The autoencoder the artifact stores and the previews show: the EMA if kept, else the trained weights."""
        return self.ema if self.ema is not None else self.autoencoder

    @property
    def lr_scales(self) -> tuple[float, ...]:
        """Each optimiser's learning rate over trainer.lr: the autoencoder's, then the discriminator's if any."""
        return (1.0, self.config.disc_lr_scale) if optimizer_steps_per_batch(self.config) == 2 else (1.0,)

    @property
    def channels_last(self) -> bool:
        """Whether to run channels_last: a layout of 4-D tensors, so images only."""
        return self.config.trainer.channels_last and self.config.model.spatial_dims == 2

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, _ = batch
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        step = self.step
        seed_step(self.config.trainer.seed, step, self.global_rank, self.trainer.world_size)  # posterior noise, crops
        if self.config.train_crop:
            images = random_crop(images, self.config.train_crop, self.config.model.downsample_factor)
        if self.vocoder_loss is not None:
            self.vocoder_step(images, optimizers, schedulers, step)
            return
        images = self.autoencoder.analysis(
            images
        )  # what the network sees and rebuilds: the data, or its spectrogram features
        recon, posterior = self.train_forward(images)

        # Generator (autoencoder) step.
        g_loss, logs = self.loss.generator_loss(images, recon, posterior, step, self.autoencoder.last_layer)
        if self.config.equivariance_weight > 0:
            equivariance = scale_equivariance_loss(self.autoencoder, images, posterior.sample())
            g_loss = g_loss + self.config.equivariance_weight * equivariance
            logs.update(equivariance=equivariance.detach(), total=g_loss.detach())
        self._check_finite(g_loss, "autoencoder loss")
        self.generator_update(optimizers[0], g_loss, step)

        # Discriminator step, on detached reconstructions (inside discriminator_loss).
        if self.config.loss.disc_enabled:
            d_loss, d_logs = self.loss.discriminator_loss(images, recon, step)
            self.critic_update(optimizers[1], d_loss)
            logs.update(d_logs)
        self.finish_step(schedulers, optimizers[0], logs, "rec")

    def generator_update(self, optimizer, loss: torch.Tensor, step: int) -> None:
        """Backward, clip and step the autoencoder's optimiser on loss, then update the EMA."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=self.config.trainer.grad_clip or None)
        optimizer.step()
        if self.ema is not None:
            update_ema(self.ema, self.autoencoder, ema_decay_at(step, self.config.ema_decay))

    def critic_update(self, optimizer, loss: torch.Tensor) -> None:
        """Backward and step the discriminator's optimiser on loss."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()

    def finish_step(self, schedulers: list, optimizer, logs: dict[str, torch.Tensor], shown: str) -> None:
        """Step the schedules and log the batch's terms (train/...), the total and `shown` on the progress bar."""
        for scheduler in schedulers:
            scheduler.step()
        logs = {f"train/{k}": v.detach().float().mean() for k, v in logs.items()}
        logs["train/lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
        self.log_dict(logs, prog_bar=False, on_step=True, sync_dist=False)
        self.log("loss", logs["train/total"], prog_bar=True, on_step=True, logger=False)
        self.log(shown, logs[f"train/{shown}"], prog_bar=True, on_step=True, logger=False)

    def vocoder_step(self, signals: torch.Tensor, optimizers: list, schedulers: list, step: int) -> None:
        """One step of the learned waveform head (and the decoder under it) on signals (N, 1, L), then of its critics.

        The encoder is frozen (train_parts decoder), so the latents are those the cache holds; the decoder
        and vocoder are judged on the waveform they make, against the clip itself.
        """
        with torch.no_grad():
            z = self.autoencoder.encode(signals).sample()
        fake = self.autoencoder.vocoder(self.autoencoder.decode_features(z))  # (N, 1, L)
        g_loss, logs = self.vocoder_loss.generator_loss(signals, fake)
        self._check_finite(g_loss, "waveform decoder loss")
        self.generator_update(optimizers[0], g_loss, step)
        d_loss, d_logs = self.vocoder_loss.discriminator_loss(signals, fake)
        self.critic_update(optimizers[1], d_loss)
        self.finish_step(schedulers, optimizers[0], {**logs, **d_logs, "rec": logs["mel"]}, "mel")

    def _check_finite(self, loss: torch.Tensor, what: str) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(non_finite_message(f"{what} became {loss.item()}", self.step, self.run_dir))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = self.config.trainer.image_every
        if every > 0 and self.step % every == 0 and self.trainer.is_global_zero:
            self.save_preview(f"recon-step{self.step:07d}.png")

    @torch.no_grad()
    def save_preview(self, name: str) -> Path | None:
        """Write an input | reconstruction PNG of the fixed preview images (posterior mode) into the run folder."""
        if self.run_dir is None or self.preview.numel() == 0:
            return None
        model = self.stored
        was_training = model.training
        model.eval()
        recon = model.decode(model.encode(self.preview).mode())
        model.train(was_training)
        return save_side_by_side(self.preview, recon, self.run_dir / "images" / name)


def scale_equivariance_loss(autoencoder: AutoencoderKL, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """|D(down2(z)) - down2(x)| summed over an image's pixels, averaged over the batch (the reconstruction term's form).

    The half-size latent must decode to the half-size image (for signals: the half-length latent, the half-rate signal).
    """
    pool = F.avg_pool2d if images.ndim == 4 else F.avg_pool1d
    return (autoencoder.decode_features(pool(z, 2)) - pool(images, 2)).abs().sum() / len(images)


def random_crop(signals: torch.Tensor, length: int, multiple: int) -> torch.Tensor:
    """Return a random window (N, C, length) of each signal (N, C, L), starting at a multiple of `multiple`.

    A window starts no later than half a window before the recording's end (its last non-zero sample), so
    it is never all padding; starts on the latent grid keep the crop's latents those of the whole clip.
    """
    n, _, total = signals.shape
    voiced = signals.abs().amax(dim=1) > 0  # (N, L)
    end = torch.where(voiced.any(1), total - voiced.flip(1).int().argmax(1), total)  # (N,) one past the last sound
    latest = ((end - length // 2).clamp(0, total - length) // multiple).to(torch.float64)  # (N,) in grid units
    start = (torch.rand(n, dtype=torch.float64, device=signals.device) * (latest + 1)).floor().long() * multiple
    return take_windows(signals, start, length)


def preview_images(config: AutoencoderStageConfig) -> torch.Tensor:
    """Return a fixed batch of held-out images to reconstruct during training."""
    split = "test" if config.data.name in ("fmnist", "fsdd") else "train"
    dataset = build_dataset(replace(config.data, hflip=False), split)
    count = min(config.preview_images, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)])


def run(
    config: AutoencoderStageConfig,
    store: ArtifactStore | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    allow_changes: Sequence[str] = (),
) -> Artifact | None:
    """Train the autoencoder and return its stored artifact (None on the non-zero ranks or when interrupted)."""
    store = store or ArtifactStore()
    check_run_writable(store, config.run_dir)  # fails now rather than after training
    with open_run(config, resume, allow_changes, optimizer_steps_per_batch(config)) as (run_dir, checkpoint):
        return train_and_store(config, store, run_dir, checkpoint, callbacks)


# Model settings a fine-tune may add to its init_from's: a learned waveform head on a Griffin-Lim autoencoder.
HEAD_KEYS = ("decoder_head", "vocoder_dim", "vocoder_depth")


def load_start(autoencoder: AutoencoderKL, start: Artifact, config: AutoencoderStageConfig) -> None:
    """Load init_from's weights into autoencoder; a new vocoder head (absent from a Griffin-Lim start) starts fresh."""
    # Read through the dataclass, so that settings added since the start was stored take their defaults there.
    theirs = to_dict(from_dict(AutoencoderConfig, start.config()["model"], "init_from model"))
    ours = to_dict(config)["model"]
    adds_head = ours["decoder_head"] == "vocos" and theirs["decoder_head"] == "griffin-lim"
    ignored = HEAD_KEYS if adds_head else ()
    if {k: v for k, v in theirs.items() if k not in ignored} != {k: v for k, v in ours.items() if k not in ignored}:
        raise ValueError(
            f"init_from {start.ref} has model config {theirs}, this run {ours}: fine-tune with the same model "
            "settings (a Griffin-Lim autoencoder may gain decoder_head: vocos)"
        )
    missing, unexpected = autoencoder.load_state_dict(start.load_tensors(device="cpu"), strict=not adds_head)
    if unexpected or any(not name.startswith("vocoder.") for name in missing):
        raise ValueError(f"init_from {start.ref}: weights do not fit, missing {missing}, unexpected {unexpected}")


def optimizer_steps_per_batch(config: AutoencoderStageConfig) -> int:
    """Optimiser steps one batch takes: the autoencoder's, then the discriminator's if there is one."""
    return 2 if config.loss.disc_enabled or config.model.decoder_head == "vocos" else 1


def train_and_store(
    config: AutoencoderStageConfig,
    store: ArtifactStore,
    run_dir: Path,
    checkpoint: Path | None,
    callbacks: Sequence[Callback] = (),
) -> Artifact | None:
    """Train in the opened run folder (from `checkpoint` if any) and return the stored artifact (None off rank zero)."""
    loader, batches = make_loader(config.data, config.trainer, config.train_subset)
    fingerprint = data_fingerprint(config.data, "train")
    module = AutoencoderModule(config)
    parents = {}
    if config.init_from:
        start = store.load(config.init_from, stage="autoencoder")
        load_start(module.autoencoder, start, config)
        parents["autoencoder"] = start.ref
        print(f"starting from {start.ref} (training {config.train_parts})")
    if module.ema is not None:
        module.ema.load_state_dict(module.autoencoder.state_dict())  # the average starts at the start
    module.run_dir = run_dir
    module.preview = preview_images(config)
    perceptual = module.loss.perceptual_description()
    print(
        f"autoencoder: {sum(p.numel() for p in module.autoencoder.parameters()) / 1e6:.2f}M parameters, "
        f"f={config.model.downsample_factor}, latent channels {config.model.latent_channels}"
    )
    print(f"perceptual loss: {perceptual}")
    trained = fit_stage(
        config.trainer,
        run_dir,
        checkpoint,
        module,
        loader,
        batches,
        callbacks,
        module.steps_per_batch,
        lr_scales=module.lr_scales,
    )
    if trained is None:
        return None
    trainer, seconds = trained
    final = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    preview = module.save_preview("recon-final.png")
    curves = save_loss_curves(
        run_dir,
        ["train/rec", "train/nll", "train/kl", "train/total"],
        run_dir / "loss.png",
        "autoencoder losses",
        step_divisor=module.steps_per_batch,
    )
    state = module.stored.state_dict()
    artifact = store.save(
        "autoencoder",
        tensors={"weights.safetensors": state},
        config=to_dict(config),
        parents=parents,
        data_fingerprint=fingerprint,
        metadata={
            "encoder_sha256": encoder_fingerprint(state),
            "latent_shape": list(config.model.latent_shape),
            "image_shape": [config.model.in_channels, *(config.model.resolution,) * config.model.spatial_dims],
            "perceptual": perceptual,
            "training": {
                "steps": module.step,
                "batch_size": config.trainer.batch_size,
                "seconds_this_run": round(seconds, 1),
                "resumed": checkpoint is not None,
                "final": final,
                "run_dir": str(run_dir),
            },
        },
    )
    print(f"\nwrote {artifact.ref}  ({artifact.path})")
    # No loss when a resume found the run finished: it trained nothing.
    this_run = f", {format_seconds(seconds)} this run, final rec loss {final['rec']:.4f}" if "rec" in final else ""
    print(f"  steps {module.step}{this_run}")
    print(f"  perceptual loss: {perceptual}")
    print(f"  reconstructions: {preview}   loss curves: {curves}")
    return artifact
