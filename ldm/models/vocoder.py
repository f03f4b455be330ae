"""A learned waveform decoder for the sound autoencoder: ConvNeXt over frames, then magnitude and phase, one iSTFT.

The spectrogram autoencoder decodes latents to a log-magnitude spectrogram; Griffin-Lim then guesses a
phase for it in 32 iterations of STFT and inverse STFT, and the guess is what makes its speech metallic.
Vocos (Siuzdak 2023, arXiv 2306.00814) predicts the phase instead: a ConvNeXt backbone (Liu et al. 2022)
over frames and a linear head giving, per frame and frequency bin, a log magnitude and a phase angle,
turned into sound by one inverse STFT. Its frames are the STFT's, so nothing is upsampled in time and
decoding costs one small network pass and one iSTFT. Here it takes the autoencoder's decoded
spectrogram features (`ldm.audio.spectrogram_features`), so a decoder fine-tune adds it without
touching the encoder or the latent space.

    features (N, F, frames) -> conv k7 -> LayerNorm -> depth x ConvNeXt -> LayerNorm
      -> linear (n_fft + 2 per frame) -> |S| = exp(log_mag) (at most 100), angle p -> S = |S| e^{ip}
      -> iSTFT (Hann, centred) -> signal (N, 1, frames * hop)

The decoded features drop the STFT's last frame (`spectrogram_features`), so the head's spectrogram
repeats its last frame before the iSTFT, as `griffin_lim` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Vocos clips the predicted magnitude at 1e2 so that an early, wild exp() cannot blow up the iSTFT.
MAX_MAGNITUDE = 100.0


@dataclass
class VocoderConfig:
    """Architecture of the Vocos-style head; n_fft and hop_length must be the autoencoder's STFT front end's."""

    dim: int = 192  # channels of the ConvNeXt backbone (Vocos: 512 at 24 kHz)
    depth: int = 6  # ConvNeXt blocks (Vocos: 8)
    kernel: int = 7  # depthwise kernel over frames
    mlp_ratio: float = 3.0  # the pointwise expansion (Vocos: 1536 / 512)
    n_fft: int = 256
    hop_length: int = 64

    def __post_init__(self) -> None:
        if min(self.dim, self.depth, self.n_fft, self.hop_length) < 1 or self.hop_length > self.n_fft:
            raise ValueError(f"vocoder dim, depth, n_fft and hop_length must be positive, hop <= n_fft: {self}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"vocoder kernel must be odd (centred on its frame), got {self.kernel}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"vocoder mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def bins(self) -> int:
        """Frequency bins of the STFT: the features' channels and the head's magnitudes per frame."""
        return self.n_fft // 2 + 1


class ConvNeXtBlock(nn.Module):
    """x + gamma * pw2(GELU(pw1(LayerNorm(dwconv(x))))) over frames (N, D, T), ConvNeXt's block in 1-D."""

    def __init__(self, dim: int, kernel: int, mlp_ratio: float, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block applied to x (N, D, T)."""
        h = self.dwconv(x).transpose(1, 2)  # (N, T, D)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


def istft_head(
    log_magnitude: torch.Tensor, phase: torch.Tensor, n_fft: int, hop_length: int, length: int
) -> torch.Tensor:
    """Return signals (N, length) of the spectrogram exp(log_magnitude) e^{i phase}, both (N, F, frames).

    The inverse of a centred STFT with a periodic Hann window, as `torch.stft` computes it: the STFT of a
    signal, given back as its log magnitude and angle, returns the signal (`ldm.audio` floors magnitudes,
    so silent bins come back at the floor's level, far below hearing).
    """
    magnitude = log_magnitude.float().exp().clamp(max=MAX_MAGNITUDE)
    spectrogram = torch.polar(magnitude, phase.float())  # (N, F, frames) complex
    window = torch.hann_window(n_fft, periodic=True, device=magnitude.device)
    return torch.istft(spectrogram, n_fft, hop_length, window=window, center=True, length=length)


class Vocoder(nn.Module):
    """Decoded spectrogram features (N, F, frames) -> signals (N, 1, frames * hop_length)."""

    def __init__(self, config: VocoderConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.embed = nn.Conv1d(config.bins, d, config.kernel, padding=config.kernel // 2)
        self.norm_in = nn.LayerNorm(d, eps=1e-6)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(d, config.kernel, config.mlp_ratio, layer_scale=1.0 / config.depth)
            for _ in range(config.depth)
        )
        self.norm_out = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, 2 * config.bins)  # per frame: F log magnitudes, then F phase angles

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the signals (N, 1, frames * hop_length) of decoded spectrogram features (N, F, frames)."""
        cfg = self.config
        if features.ndim != 3 or features.shape[1] != cfg.bins:
            raise ValueError(
                f"the vocoder takes spectrogram features (N, {cfg.bins}, frames) of n_fft {cfg.n_fft}, "
                f"got {tuple(features.shape)}"
            )
        x = self.norm_in(self.embed(features).transpose(1, 2)).transpose(1, 2)  # (N, D, frames)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.norm_out(x.transpose(1, 2))).transpose(1, 2)  # (N, 2F, frames)
        out = torch.cat([out, out[..., -1:]], dim=-1)  # the features' dropped last frame, repeated
        log_magnitude, phase = out.chunk(2, dim=1)  # (N, F, frames + 1) each
        length = features.shape[-1] * cfg.hop_length
        return istft_head(log_magnitude, phase, cfg.n_fft, cfg.hop_length, length).unsqueeze(1)
