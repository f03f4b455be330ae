"""The waveform decoder's objective: multi-resolution mel L1, hinge adversarial terms and feature matching.

HiFi-GAN's generator loss (Kong et al. 2020), with Vocos' hinge form of the adversarial terms (Siuzdak
2023): a mel-spectrogram L1 that pins the content (weight 45, both papers), the sum over sub-discriminators
of mean(relu(1 - D(x_hat))), and feature matching, the L1 between the discriminators' activations on real
and decoded sound (weight 2, HiFi-GAN; MelGAN's, Kumar et al. 2019). The mel term is taken at the three
speech resolutions of the STFT loss, so fine time and fine frequency errors both count.

    loss_g, logs = loss.generator_loss(real, fake)        # the decoder's step
    loss_d, logs = loss.discriminator_loss(real, fake)    # the discriminators' step (fake detached inside)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.audio import SPEECH_STFT_RESOLUTIONS, log_mel
from ldm.models.discriminator import WaveformDiscriminator


@dataclass
class VocoderLossConfig:
    """Weights of the waveform decoder's loss terms (HiFi-GAN's and Vocos' values by default)."""

    mel_weight: float = 45.0
    adversarial_weight: float = 1.0
    feature_weight: float = 2.0
    n_mels: int = 64  # at most; a resolution of n_fft points takes n_fft // 4, so no filter falls between bins
    sample_rate: int = 8000

    def __post_init__(self) -> None:
        if min(self.mel_weight, self.adversarial_weight, self.feature_weight) < 0:
            raise ValueError(f"vocoder loss weights must be >= 0: {self}")


def multi_resolution_mel_l1(real: Tensor, fake: Tensor, sample_rate: int, n_mels: int) -> Tensor:
    """Return the mean |log-mel(real) - log-mel(fake)| (N,) over the speech STFT resolutions, signals (N, 1, L).

    Each resolution of n_fft points takes min(n_mels, n_fft // 4) mel bands (32 at 128 points, where 64 would
    leave filters narrower than a bin empty).
    """
    terms = []
    with torch.autocast(device_type=real.device.type, enabled=False):
        for n_fft, hop, _ in SPEECH_STFT_RESOLUTIONS:
            mels = min(n_mels, n_fft // 4)
            difference = log_mel(real, sample_rate, n_fft, hop, mels) - log_mel(fake, sample_rate, n_fft, hop, mels)
            terms.append(difference.abs().mean(dim=(1, 2)))  # (N,)
    return torch.stack(terms).mean(0)


def feature_matching(real_features: list[list[Tensor]], fake_features: list[list[Tensor]]) -> Tensor:
    """Return the mean over sub-discriminators of the summed layer-wise L1 between real (detached) and fake maps."""
    per_discriminator = [
        sum(F.l1_loss(fake, real.detach()) for real, fake in zip(reals, fakes))
        for reals, fakes in zip(real_features, fake_features)
    ]
    return torch.stack(per_discriminator).mean()


class VocoderLoss(nn.Module):
    """Generator and discriminator losses of a waveform decoder; holds the discriminators."""

    def __init__(self, config: VocoderLossConfig):
        super().__init__()
        self.config = config
        self.discriminator = WaveformDiscriminator()

    def generator_loss(self, real: Tensor, fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the decoder's loss and its terms for real and decoded signals (N, 1, L)."""
        cfg = self.config
        mel = multi_resolution_mel_l1(real, fake, cfg.sample_rate, cfg.n_mels).mean()
        fake_logits, fake_features = self.discriminator(fake)
        with torch.no_grad():
            _, real_features = self.discriminator(real)
        adversarial = torch.stack([F.relu(1 - logits).mean() for logits in fake_logits]).mean()
        features = feature_matching(real_features, fake_features)
        total = cfg.mel_weight * mel + cfg.adversarial_weight * adversarial + cfg.feature_weight * features
        return total, {"total": total.detach(), "mel": mel.detach(), "g": adversarial.detach(), "fm": features.detach()}

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the discriminators' hinge loss and the mean logits on real and decoded signals (N, 1, L)."""
        real_logits, _ = self.discriminator(real)
        fake_logits, _ = self.discriminator(fake.detach())
        loss = torch.stack(
            [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits)]
        ).mean()
        logits_real = torch.stack([r.mean() for r in real_logits]).mean()
        logits_fake = torch.stack([f.mean() for f in fake_logits]).mean()
        return loss, {"d": loss.detach(), "logits_real": logits_real.detach(), "logits_fake": logits_fake.detach()}
