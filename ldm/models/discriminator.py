"""PatchGAN discriminator for the autoencoder's adversarial loss.

The N-layer PatchGAN of pix2pix (Isola et al. 2017), as taming-transformers and latent-diffusion
use it: a fully convolutional network whose output is a grid of real/fake logits, one per
overlapping image patch, so the GAN loss judges local texture and leaves global structure to the
reconstruction and perceptual losses.

    conv 4x4/2 -> LeakyReLU(0.2)                                  ch
    (n_layers - 1) x [conv 4x4/2 -> norm -> LeakyReLU(0.2)]       ch * min(2**i, 8)
    conv 4x4/1 -> norm -> LeakyReLU(0.2)                          ch * min(2**n_layers, 8)
    conv 4x4/1                                                    1 logit per patch

Output size: each stride-2 conv halves (floor) the side, each stride-1 4x4 conv with padding 1
shrinks it by one, so an input side S gives floor(S / 2**n_layers) - 2 (iterated floor). For
32x32 images: n_layers=3 -> 2x2 logits on 70x70 receptive fields (wider than the image, so each
logit sees it all), n_layers=2 -> 6x6 on 34x34, n_layers=1 -> 14x14 on 16x16. n_layers=4 needs
S >= 48. `patch_grid_size` and `receptive_field` compute these; `forward` refuses too-small inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ldm.audio import SPEECH_STFT_RESOLUTIONS, stft_magnitude


@dataclass
class DiscriminatorConfig:
    """Architecture of `PatchDiscriminator`; every field is a plain type so YAML can fill it."""

    in_channels: int = 3  # image channels (1 for Fashion-MNIST)
    ch: int = 64
    n_layers: int = 3  # stride-2 convs; 3 is pix2pix's 70x70 PatchGAN
    norm: str = "batch"  # batch (pix2pix, taming) | group | none

    @classmethod
    def presets(cls) -> dict[str, DiscriminatorConfig]:
        """The named presets (YAML may name one: `discriminator: patchgan-70`)."""
        return DISCRIMINATOR_PRESETS

    def __post_init__(self) -> None:
        if min(self.in_channels, self.ch, self.n_layers) < 1:
            raise ValueError(f"in_channels, ch and n_layers must be positive: {self}")
        if self.norm not in ("batch", "group", "none"):
            raise ValueError(f"discriminator norm must be 'batch', 'group' or 'none', got {self.norm!r}")


DISCRIMINATOR_PRESETS: dict[str, DiscriminatorConfig] = {
    "patchgan-70": DiscriminatorConfig(ch=64, n_layers=3),  # pix2pix / LDM default
    "patchgan-34": DiscriminatorConfig(ch=64, n_layers=2),
    "patchgan-34-small": DiscriminatorConfig(in_channels=1, ch=32, n_layers=2),  # 32x32 grayscale on CPU
}


def patch_grid_size(size: int, n_layers: int) -> int:
    """Side of the logit grid for an input of side `size` (<= 0 means the input is too small)."""
    for _ in range(n_layers):
        size = (size + 2 - 4) // 2 + 1  # 4x4 conv, stride 2, padding 1
    return size - 2  # two 4x4 convs, stride 1, padding 1


def receptive_field(n_layers: int) -> int:
    """Side of the image patch that one output logit sees."""
    field = 1
    for stride in [1, 1] + [2] * n_layers:  # walk back from the output to the input
        field = (field - 1) * stride + 4
    return field


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class SpectrogramDiscriminator(nn.Module):
    """Multi-resolution discriminator for signals: one PatchGAN per STFT resolution on the log magnitude.

    Signals (N, 1, L) -> logits (N, K), all patches of all resolutions. A spectrogram is an image of
    frequency against time, so the image PatchGAN judges it as is; several resolutions trade time for
    frequency detail, as the multi-resolution discriminator of UnivNet (Jang et al. 2021).
    """

    def __init__(
        self, config: DiscriminatorConfig, resolutions: tuple[tuple[int, int, int], ...] = SPEECH_STFT_RESOLUTIONS
    ):
        super().__init__()
        self.config = config
        self.resolutions = resolutions  # (n_fft, hop, window), the STFT loss's
        self.discriminators = nn.ModuleList(PatchDiscriminator(replace(config, in_channels=1)) for _ in resolutions)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, K) for signals x (N, 1, L); positive means "real"."""
        logits = []
        for (n_fft, hop, window), discriminator in zip(self.resolutions, self.discriminators):
            spectrogram = stft_magnitude(x.float(), n_fft, hop, window).log().unsqueeze(1)  # (N, 1, F, frames)
            logits.append(discriminator(spectrogram).flatten(1))
        return torch.cat(logits, dim=1)


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN: images (N, C, H, W) -> real/fake logits (N, 1, h, w), one per patch."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        use_bias = config.norm == "none"  # a bias right before a normalisation is cancelled by it
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, config.ch, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),  # no norm on the first layer, as pix2pix
        ]
        channels = config.ch
        for i in range(1, config.n_layers + 1):
            out_channels = config.ch * min(2**i, 8)
            stride = 2 if i < config.n_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=use_bias),
                _norm(config.norm, out_channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """pix2pix's init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, 1, h, w) for images x (N, C, H, W); positive means "real"."""
        h, w = (patch_grid_size(side, self.config.n_layers) for side in x.shape[-2:])
        if h < 1 or w < 1:
            raise ValueError(
                f"PatchGAN with n_layers={self.config.n_layers} needs a larger input than "
                f"{tuple(x.shape[-2:])} (it would give a {h}x{w} logit grid); lower n_layers"
            )
        return self.main(x)


# ----------------------------------------------------------------------------- waveform discriminators
#
# A learned waveform decoder is judged on the waveform, by two families of discriminators that each give
# logits and the feature maps the feature-matching loss compares (Kumar et al. 2019, MelGAN): HiFi-GAN's
# multi-period discriminator (Kong et al. 2020), which reads every p-th sample as a 2-D grid and so sees
# periodic structure (pitch), and UnivNet's multi-resolution discriminator (Jang et al. 2021), which reads
# magnitude spectrograms and so sees over-smoothed frequencies. Channels are a quarter of the papers': 8 kHz
# digits on a CPU, not 22 kHz speech on GPUs.

HIFIGAN_PERIODS: tuple[int, ...] = (2, 3, 5, 7, 11)


def _conv_stack(convs: nn.ModuleList, post: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Run x through convs, each followed by LeakyReLU(0.1) (HiFi-GAN's slope); return post's logits (N, K) and
    every activation, for feature matching."""
    features = []
    for conv in convs:
        x = nn.functional.leaky_relu(conv(x), 0.1)
        features.append(x)
    return post(x).flatten(1), features


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's sub-discriminator of period p: signals (N, 1, L) as (N, 1, L / p, p), 2-D convs along time."""

    def __init__(self, period: int, channels: tuple[int, ...] = (16, 64, 128, 256)):
        super().__init__()
        self.period = period
        layers, previous = [], 1
        for out in channels:
            layers.append(nn.Conv2d(previous, out, (5, 1), stride=(3, 1), padding=(2, 0)))
            previous = out
        layers.append(nn.Conv2d(previous, previous, (5, 1), padding=(2, 0)))
        self.convs = nn.ModuleList(layers)
        self.post = nn.Conv2d(previous, 1, (3, 1), padding=(1, 0))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return logits (N, K) and each layer's activations for signals x (N, 1, L)."""
        n, _, length = x.shape
        x = nn.functional.pad(x, (0, -length % self.period), mode="reflect" if length > self.period else "constant")
        return _conv_stack(self.convs, self.post, x.view(n, 1, -1, self.period))  # (N, 1, L / p, p) in


class ResolutionDiscriminator(nn.Module):
    """UnivNet's sub-discriminator at one STFT resolution: the magnitude spectrogram as a (N, 1, frames, F) image."""

    def __init__(self, resolution: tuple[int, int, int], channels: int = 16):
        super().__init__()
        self.resolution = resolution  # (n_fft, hop, window)
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(1, channels, (3, 9), padding=(1, 4)),
                nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4)),
                nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4)),
                nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4)),
                nn.Conv2d(channels, channels, (3, 3), padding=(1, 1)),
            ]
        )
        self.post = nn.Conv2d(channels, 1, (3, 3), padding=(1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return logits (N, K) and each layer's activations for signals x (N, 1, L)."""
        magnitude = stft_magnitude(x.float(), *self.resolution)  # (N, F, frames)
        return _conv_stack(self.convs, self.post, magnitude.transpose(1, 2).unsqueeze(1))  # (N, 1, frames, F) in


class WaveformDiscriminator(nn.Module):
    """HiFi-GAN's multi-period and UnivNet's multi-resolution discriminators side by side, for a waveform decoder."""

    def __init__(
        self,
        periods: tuple[int, ...] = HIFIGAN_PERIODS,
        resolutions: tuple[tuple[int, int, int], ...] = SPEECH_STFT_RESOLUTIONS,
    ):
        super().__init__()
        self.discriminators = nn.ModuleList(
            [*(PeriodDiscriminator(p) for p in periods), *(ResolutionDiscriminator(r) for r in resolutions)]
        )

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        """Return each sub-discriminator's logits (N, K_i) and activations for signals x (N, 1, L)."""
        logits, features = [], []
        for discriminator in self.discriminators:
            one, maps = discriminator(x)
            logits.append(one)
            features.append(maps)
        return logits, features
