"""The KL-autoencoder training loss: reconstruction + LPIPS + KL + an adaptively weighted PatchGAN.

The objective of the latent-diffusion autoencoders (LDM's `LPIPSWithDiscriminator`, after
taming-transformers' VQGAN loss, Esser et al. 2021), written as two explicit calls for a training
step with manual optimisation:

    loss_g, logs = loss.generator_loss(x, x_rec, posterior, step, model.last_layer)  # decoder/encoder step
    loss_d, logs = loss.discriminator_loss(x, x_rec, step)                             # discriminator step

Normalisation (the same as LDM, so LDM's weights such as kl_weight=1e-6 mean the same here):

- rec(x, x_rec) = |x - x_rec| (or squared) per pixel and channel, plus `perceptual.weight *
  LPIPS(x, x_rec)` added to every pixel of that sample (LPIPS is one number per image, broadcast
  over C*H*W terms, so per sample it counts C*H*W times; this is how LDM weighs it).
- nll = rec / exp(logvar) + logvar per element (logvar = 0 unless `learn_logvar`), summed over
  C, H, W and averaged over the batch: a per-image negative log-likelihood up to constants.
- kl = KL(q(z|x) || N(0, I)) summed over latent dimensions and averaged over the batch.

Both the NLL and the KL are sums over their dimensions, so kl_weight trades nats of latent
information against a per-image reconstruction sum, a ratio that stays put when the resolution
and the latent size grow together. The logged `rec` and `lpips` are plain means, for reading.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.audio import MultiResolutionSTFTLoss
from ldm.losses.lpips import PerceptualConfig, PerceptualLoss, build_lpips
from ldm.models.discriminator import DiscriminatorConfig, PatchDiscriminator, SpectrogramDiscriminator


@dataclass
class AutoencoderLossConfig:
    """Weights of the autoencoder loss terms; every field is a plain type so YAML can fill it."""

    rec_loss: str = "l1"  # l1 | l2, per pixel
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    kl_weight: float = 1e-6  # LDM's value for its KL-f8 autoencoder
    learn_logvar: bool = False  # LDM's learned scalar output log-variance in the NLL
    disc_enabled: bool = False
    disc_start: int = 50001  # global step from which the GAN terms count (LDM's KL-f8 config)
    # Steps after disc_start in which only the discriminator learns: the GAN term reaches the
    # autoencoder from disc_start + disc_pretrain_steps on. From a converged autoencoder, an untrained
    # D's near-zero logits scaled by the adaptive weight (up to 1e4) only add noise, and the decoder
    # then keeps D at chance; a D trained first gives the decoder a signal (0: LDM's schedule).
    disc_pretrain_steps: int = 0
    disc_weight: float = 0.5  # multiplies the adaptive weight
    disc_factor: float = 1.0  # multiplies both GAN losses once active
    disc_loss: str = "hinge"  # hinge | vanilla (discriminator side; the generator uses -mean(D))
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self) -> None:
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {self.rec_loss!r}")
        if self.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}")
        if min(self.kl_weight, self.disc_weight, self.disc_factor, self.disc_start, self.disc_pretrain_steps) < 0:
            raise ValueError(f"loss weights, disc_start and disc_pretrain_steps must be >= 0: {self}")


class Posterior(Protocol):
    """What the loss needs from the encoder's output distribution."""

    def kl(self) -> Tensor:
        """KL to the standard normal per batch element, summed over latent dims; shape (N,)."""
        ...


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss (Lim & Ye 2017): mean(relu(1 - D(x)))/2 + mean(relu(1 + D(x_rec)))/2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Original GAN discriminator loss: binary cross-entropy on logits, real=1 and fake=0, halved."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
    """||grad nll|| / (||grad g|| + 1e-4) at the decoder's last layer, clamped to [0, 1e4], detached.

    Esser et al. 2021 (taming-transformers, eq. 7): scaling the GAN loss so that its gradient at the
    last decoder layer has the size of the reconstruction gradient keeps either term from drowning
    the other, whatever their raw magnitudes. The graph is retained for the real backward pass.
    """
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Treat `module`'s parameters as constants in the autograd graph recorded inside the block."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def build_perceptual(config: PerceptualConfig, spatial_dims: int) -> nn.Module | None:
    """The perceptual term: LPIPS for images, the multi-resolution STFT loss for signals (None at weight 0)."""
    if config.weight == 0:
        return None
    if (config.kind == "stft") != (spatial_dims == 1):
        raise ValueError(
            f"perceptual.kind {config.kind!r} does not fit {spatial_dims}-D data: use 'lpips' for "
            f"images and 'stft' for sound (or perceptual.weight 0)"
        )
    return MultiResolutionSTFTLoss() if config.kind == "stft" else build_lpips(config)


class AutoencoderLoss(nn.Module):
    """Holds the frozen perceptual network, the discriminator and (optionally) the learned logvar.

    spatial_dims 2 (images): LPIPS and a PatchGAN; 1 (signals): the multi-resolution STFT loss and a
    PatchGAN per STFT resolution. The weighting, adaptive GAN weight and warm-up are the same for both.
    """

    def __init__(self, config: AutoencoderLossConfig | None = None, spatial_dims: int = 2) -> None:
        super().__init__()
        self.config = config = config or AutoencoderLossConfig()
        self.perceptual: PerceptualLoss | MultiResolutionSTFTLoss | None = build_perceptual(
            config.perceptual, spatial_dims
        )
        discriminator = PatchDiscriminator if spatial_dims == 2 else SpectrogramDiscriminator
        self.discriminator: nn.Module | None = discriminator(config.discriminator) if config.disc_enabled else None
        self.logvar: nn.Parameter | None = nn.Parameter(torch.zeros(())) if config.learn_logvar else None

    def perceptual_description(self) -> str:
        """What the perceptual term is, honestly: standard LPIPS, a random-backbone variant, or none."""
        return self.perceptual.describe() if self.perceptual is not None else "none (perceptual.weight is 0)"

    def generator_parameters(self) -> list[nn.Parameter]:
        """Loss parameters that the autoencoder's optimiser must also update (the learned logvar)."""
        return [self.logvar] if self.logvar is not None else []

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """Parameters for the discriminator's optimiser (empty when the GAN is disabled)."""
        return list(self.discriminator.parameters()) if self.discriminator is not None else []

    def disc_active(self, global_step: int) -> bool:
        """Whether the GAN terms count at this step; a training step can skip the D update otherwise."""
        return self.discriminator is not None and global_step >= self.config.disc_start

    def disc_factor(self, global_step: int) -> float:
        """`disc_factor` from `disc_start` on, 0 before (and when the GAN is disabled): the discriminator's weight."""
        return self.config.disc_factor if self.disc_active(global_step) else 0.0

    def gan_factor(self, global_step: int) -> float:
        """The GAN term's weight in the autoencoder's loss: `disc_factor` once the discriminator has pretrained."""
        return self.disc_factor(global_step - self.config.disc_pretrain_steps)

    def pixel_loss(self, inputs: Tensor, recon: Tensor) -> Tensor:
        """Per-element L1 or L2 reconstruction error, shape (N, C, H, W) or (N, C, L)."""
        diff = inputs.float() - recon.float()  # float32: under bf16 autocast the sums below would lose digits
        return diff.abs() if self.config.rec_loss == "l1" else diff.square()

    def generator_loss(
        self,
        inputs: Tensor,
        recon: Tensor,
        posterior: Posterior,
        global_step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for the autoencoder's update, and detached scalar logs.

        inputs, recon: (N, C, H, W) in [-1, 1]. `last_layer` is the decoder's output weight, needed
        once the GAN is active. Before `disc_start` the discriminator is not run at all. Without
        autograd (validation) the adaptive weight cannot be computed and the GAN term is left out.
        """
        n = inputs.shape[0]
        pixel = self.pixel_loss(inputs, recon)  # (N, C, H, W)
        rec = pixel
        p_loss = torch.zeros(n, device=inputs.device)
        if self.perceptual is not None:
            p_loss = self.perceptual(inputs, recon).float()  # (N,)
            rec = pixel + self.config.perceptual.weight * p_loss.view(n, *(1,) * (pixel.ndim - 1))
        nll = rec / torch.exp(self.logvar) + self.logvar if self.logvar is not None else rec
        nll_loss = nll.sum() / n

        kl = posterior.kl()
        if kl.shape != (n,):
            raise ValueError(f"posterior.kl() must give one KL per sample, shape ({n},), got {tuple(kl.shape)}")
        kl_loss = kl.sum() / n

        loss = nll_loss + self.config.kl_weight * kl_loss
        g_loss = torch.zeros((), device=inputs.device)
        d_weight = torch.zeros((), device=inputs.device)
        factor = self.gan_factor(global_step)
        if factor > 0:
            assert self.discriminator is not None
            # D's weights are constants here: this loss trains the autoencoder only, and D's grads
            # stay clean for its own step (what Lightning's toggle_optimizer does, built in).
            with _frozen(self.discriminator):
                g_loss = -self.discriminator(recon).mean()
            if torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError(
                        "generator_loss needs last_layer (the decoder's output weight) once the GAN is active"
                    )
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer) * self.config.disc_weight
            loss = loss + d_weight * factor * g_loss

        logs = {
            "total": loss,
            "rec": pixel.mean(),
            "lpips": p_loss.mean(),
            "nll": nll_loss,
            "kl": kl_loss,
            "g": g_loss,
            "d_weight": d_weight,
            "disc_factor": torch.tensor(factor, device=inputs.device),
        }
        if self.logvar is not None:
            logs["logvar"] = self.logvar
        return loss, {key: value.detach().float() for key, value in logs.items()}

    def discriminator_loss(self, inputs: Tensor, recon: Tensor, global_step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for the discriminator's update (zero-weighted before `disc_start`), and detached logs.

        Both batches are detached here, so this loss never reaches the autoencoder's graph.
        """
        if self.discriminator is None:
            raise RuntimeError("discriminator_loss called but the GAN is disabled (disc_enabled: false)")
        logits_real = self.discriminator(inputs.detach())  # (N, 1, h, w)
        logits_fake = self.discriminator(recon.detach())
        factor = self.disc_factor(global_step)
        d_loss = factor * D_LOSSES[self.config.disc_loss](logits_real, logits_fake)
        logs = {
            "d": d_loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
            "disc_factor": torch.tensor(factor, device=inputs.device),
        }
        return d_loss, {key: value.detach().float() for key, value in logs.items()}
