"""A small CNN classifier for 32x32 Fashion-MNIST, and the feature space for a Frechet distance.

Inception-v3 features (what FID uses) are trained on ImageNet photographs and see a 28x28
grayscale garment upsampled to 299x299; a classifier trained on the data itself gives a
feature space that separates Fashion-MNIST classes well and runs on a CPU. Its penultimate
layer plays the role of Inception's pool3: `features(x)` returns it. Distances measured in
it are only comparable to other distances measured with the same weights.

Sound takes the same network behind a front end (`front_end: logmel`): the waveform (N, 1, L) becomes
its log-mel spectrogram (N, 1, n_mels, frames), batch-normalised, and the CNN classifies that picture
of the sound as it would an image.

Layout (width w): a stem at 32x32, then two stages of two conv-BN-ReLU blocks each at 16x16
and 8x8, each stage ending with a 2x2 max pool, a global average pool, one feature layer and
a linear head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.audio import log_mel


@dataclass
class ClassifierConfig:
    """Architecture of `Classifier`; every field is a plain type so YAML can fill it."""

    in_channels: int = 1
    num_classes: int = 10
    width: int = 32  # channels of the stem; the stages use 2w and 4w
    feature_dim: int = 256  # size of the penultimate features used for the Frechet distance
    dropout: float = 0.3  # before the head only, so the features themselves are deterministic in eval
    front_end: str = "none"  # none: images | logmel: waveforms (N, 1, L) through a log-mel spectrogram first
    sample_rate: int = 8000  # logmel: the signal's rate, for the mel scale
    n_fft: int = 256  # logmel: 32 ms windows at 8 kHz
    hop_length: int = 128  # logmel: 16 ms hops (65 frames for an 8192-sample clip)
    n_mels: int = 64

    def __post_init__(self) -> None:
        if self.front_end not in ("none", "logmel"):
            raise ValueError(f"front_end must be 'none' (images) or 'logmel' (sound), got {self.front_end!r}")


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias: BN supplies it), BatchNorm, ReLU; keeps H and W."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Classifier(nn.Module):
    """CNN classifier on images in [-1, 1]; `features` gives its penultimate activations."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        w = config.width
        # A fixed log-mel map has no scale that suits every data set; one BatchNorm learns it.
        self.input_norm = nn.BatchNorm2d(1) if config.front_end == "logmel" else None
        self.body = nn.Sequential(
            # One block at full resolution: with a single input channel it is cheap, and the
            # 2x2 pools below bring the costly wide blocks down to 16x16 and 8x8.
            conv_bn_relu(config.in_channels, w),
            nn.MaxPool2d(2),  # 32 -> 16
            conv_bn_relu(w, 2 * w),
            conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 16 -> 8
            conv_bn_relu(2 * w, 4 * w),
            conv_bn_relu(4 * w, 4 * w),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_layer = nn.Sequential(
            nn.Linear(4 * w, config.feature_dim, bias=False),
            nn.BatchNorm1d(config.feature_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (N, feature_dim) of images x (N, C, H, W) in [-1, 1] (or signals (N, 1, L))."""
        if self.input_norm is not None:
            cfg = self.config
            mel = log_mel(x.flatten(1), cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels)  # (N, n_mels, frames)
            x = self.input_norm(mel.unsqueeze(1))  # (N, 1, n_mels, frames)
        h = self.body(x)  # (N, 4w, H/8, W/8)
        h = self.pool(h).flatten(1)  # (N, 4w)
        return self.feature_layer(h)  # (N, feature_dim), non-negative like Inception's pool3

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, num_classes) of images x (N, C, H, W) in [-1, 1] (or signals (N, 1, L))."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted class indices (N,), computed in eval mode (the caller's mode is restored)."""
        was_training = self.training
        self.eval()
        labels = self(x).argmax(dim=1)
        self.train(was_training)
        return labels
