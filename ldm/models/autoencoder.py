"""The stage-1 KL autoencoder: images <-> latents with a diagonal Gaussian posterior.

This is the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", the `AutoencoderKL` of CompVis latent-diffusion and
taming-transformers), written out in one file.

Layout for `ch_mult = (m0, ..., mL)` (L downsamplings, f = 2**L), every arrow a GroupNorm-SiLU-conv
ResNet stack:

    encoder: conv_in -> [num_res_blocks ResnetBlocks at ch*mi, then a stride-2 Downsample
             (not after the last level)] for each level -> mid (Resnet, Attention, Resnet)
             -> GroupNorm, SiLU, conv_out to 2*latent_channels (mean, logvar) -> quant_conv (1x1)
    decoder: post_quant_conv (1x1) -> conv_in -> mid (Resnet, Attention, Resnet)
             -> [num_res_blocks + 1 ResnetBlocks, then nearest 2x Upsample + 3x3 conv] per level,
             lowest resolution first -> GroupNorm, SiLU, conv_out

The same module runs on 1-D signals (sound) with `spatial_dims: 1`: every conv is a Conv1d, a level
may downsample by a stride s > 2 (a strided conv of kernel 2s, undone by a transposed conv of kernel
2s, as the strided encoders of SoundStream and Stable Audio's VAE), and the attention runs over time.
With `front_end: stft` the network sees sound as its scaled log-magnitude spectrogram instead,
frequency bins as channels over frames (`ldm.audio.spectrogram_features`), and `decode` turns the
decoded spectrogram back into a waveform by Griffin-Lim: the network then never has to model phase,
which a waveform decoder learns only slowly.

The decoder has one ResnetBlock more per level than the encoder, as in LDM; the module structure
(and so the parameter count) is the same as diffusers' `AutoencoderKL` for the same channels, and
`ldm.interop.autoencoder.state_dict_from_diffusers` maps a diffusers checkpoint onto this module.

Speed notes: every op keeps the input's memory format, so `model.to(memory_format=torch.channels_last)`
with channels_last inputs runs the whole network channels_last (oneDNN's fast path on CPU, the
tensor-core-friendly layout on GPU), and the attention's token view is then free (no transpose copy).
The ResnetBlock's residual add runs in place on the conv output, which conv's backward does not need,
saving one activation-sized buffer per block. (SiLU stays out of place: its backward needs its input,
so an in-place SiLU makes autograd save a copy and costs more than it saves.) Upsample computes
"nearest 2x, then 3x3 conv" exactly, as one transposed conv with 2.25x fewer multiply-adds.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.audio import griffin_lim, spectrogram_features
from ldm.models.vocoder import Vocoder, VocoderConfig


@dataclass
class AutoencoderConfig:
    """Architecture of `AutoencoderKL` (defaults: the "fmnist-f4" preset); plain types for YAML."""

    in_channels: int = 1
    out_channels: int | None = None  # None: same as in_channels
    resolution: int = 32  # training image size (clip length in samples for 1-D); the network runs at any multiple of f
    ch: int = 32  # base channel count; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 2)  # one entry per level; f = 2 ** (len(ch_mult) - 1) unless down_strides
    num_res_blocks: int = 1  # ResnetBlocks per encoder level (the decoder has one more)
    attn_at_lowest: bool = True  # self-attention in the middle block, at the lowest resolution
    latent_channels: int = 4
    dropout: float = 0.0
    norm_groups: int = 8  # lowered to a divisor where a layer has fewer/indivisible channels
    gradient_checkpointing: bool = False  # recompute each level in backward: less memory, more time
    spatial_dims: int = 2  # 2: images (C, H, W); 1: signals (C, L) such as sound
    # Downsampling stride of each level transition (len(ch_mult) - 1 entries); () means 2 everywhere.
    # Strides other than 2 are for 1-D signals, where 8 kHz audio needs f in the tens to hundreds.
    down_strides: tuple[int, ...] = ()
    # Sound only. "none": the network takes the waveform. "stft": it takes the scaled log-magnitude STFT
    # (n_fft // 2 + 1 channels over resolution / hop_length frames), and decode inverts by Griffin-Lim.
    front_end: str = "none"
    n_fft: int = 256
    hop_length: int = 64
    griffin_lim_iters: int = 32
    # With the stft front end: how decoded spectrograms become sound. "griffin-lim" guesses the phase;
    # "vocos" predicts magnitude and phase with a learned head (`ldm.models.vocoder`, vocoder_dim wide,
    # vocoder_depth ConvNeXt blocks), trained as a decoder fine-tune that keeps the latent space.
    decoder_head: str = "griffin-lim"
    vocoder_dim: int = 192
    vocoder_depth: int = 6

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)  # YAML gives lists
        self.down_strides = tuple(int(s) for s in self.down_strides)
        if self.spatial_dims not in (1, 2):
            raise ValueError(f"spatial_dims must be 1 (signals) or 2 (images), got {self.spatial_dims}")
        if self.down_strides and len(self.down_strides) != len(self.ch_mult) - 1:
            raise ValueError(
                f"down_strides needs one stride per level transition ({len(self.ch_mult) - 1}), got {self.down_strides}"
            )
        if self.spatial_dims == 2 and any(s != 2 for s in self.down_strides):
            raise ValueError(f"images downsample by 2 per level; down_strides {self.down_strides} is for 1-D signals")
        if any(s < 2 or s % 2 for s in self.down_strides):
            raise ValueError(f"down_strides must be even numbers >= 2, got {self.down_strides}")
        if self.front_end not in ("none", "stft"):
            raise ValueError(f"front_end must be 'none' or 'stft', got {self.front_end!r}")
        if self.front_end == "stft" and (
            self.spatial_dims != 1 or self.in_channels != 1 or self.image_channels_out != 1
        ):
            raise ValueError("front_end 'stft' is for mono sound: spatial_dims 1 and in_channels 1")
        if self.decoder_head not in ("griffin-lim", "vocos"):
            raise ValueError(f"decoder_head must be 'griffin-lim' or 'vocos', got {self.decoder_head!r}")
        if self.decoder_head == "vocos" and self.front_end != "stft":
            raise ValueError("decoder_head 'vocos' inverts decoded spectrograms: it needs front_end 'stft'")
        if min(self.n_fft, self.hop_length, self.griffin_lim_iters) < 1 or self.hop_length > self.n_fft:
            raise ValueError(
                f"n_fft, hop_length and griffin_lim_iters must be positive with hop_length <= n_fft: {self}"
            )
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if min(self.in_channels, self.ch, self.num_res_blocks, self.latent_channels, self.norm_groups) < 1:
            raise ValueError(f"channel and block counts must be positive: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of f={self.downsample_factor}")

    @classmethod
    def presets(cls) -> dict[str, AutoencoderConfig]:
        """The named presets (YAML may name one: `model: fmnist-f4`)."""
        return AUTOENCODER_PRESETS

    @property
    def vocoder_config(self) -> VocoderConfig | None:
        """The learned waveform head's architecture (None with Griffin-Lim)."""
        if self.decoder_head != "vocos":
            return None
        return VocoderConfig(
            dim=self.vocoder_dim, depth=self.vocoder_depth, n_fft=self.n_fft, hop_length=self.hop_length
        )

    @property
    def strides(self) -> tuple[int, ...]:
        """The downsampling stride of each level transition."""
        return self.down_strides or (2,) * (len(self.ch_mult) - 1)

    @property
    def downsample_factor(self) -> int:
        """Reduction f between data and latent: the product of the level strides.

        With the stft front end, times the STFT hop.
        """
        return math.prod(self.strides) * (self.hop_length if self.front_end == "stft" else 1)

    @property
    def network_channels(self) -> int:
        """Channels the encoder takes: the data's, or the spectrogram's frequency bins with the stft front end."""
        return self.n_fft // 2 + 1 if self.front_end == "stft" else self.in_channels

    @property
    def network_channels_out(self) -> int:
        """Channels the decoder makes: the output data's, or the spectrogram's frequency bins."""
        return self.n_fft // 2 + 1 if self.front_end == "stft" else self.image_channels_out

    @property
    def image_channels_out(self) -> int:
        """Channels of the decoded image."""
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the latent of one `resolution` x `resolution` image; (C, L) for a 1-D signal."""
        side = self.resolution // self.downsample_factor
        return (self.latent_channels, *(side,) * self.spatial_dims)


AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # 32x32 Fashion-MNIST -> 8x8x4 latents (4x fewer numbers than pixels). Sized for two CPU cores:
    # ~0.42 GFLOP forward per image, so tens of thousands of training images (a couple of
    # thousand steps) fit in half an hour; a 64-channel version costs 4x more per step and gets
    # too few steps in that budget to be better. 8 groups keeps LDM's 4 channels per group at
    # the narrowest layer (1 channel per group, i.e. InstanceNorm, trains worse: Wu & He 2018).
    "fmnist-f4": AutoencoderConfig(
        in_channels=1, resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=8
    ),
    # 4x cheaper again (~0.1 GFLOP per image), for a one-to-two-minute end-to-end demo.
    "fmnist-f4-quick": AutoencoderConfig(
        in_channels=1, resolution=32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=4
    ),
    # 8 kHz speech, 8192-sample clips -> (8, 128) latents: f = 64 (strides 4, 4, 4), 8x fewer numbers
    # than samples. Sized for a quarter of an hour on two CPU cores.
    "fsdd-f64": AutoencoderConfig(
        in_channels=1,
        resolution=8192,
        ch=32,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=1,
        latent_channels=8,
        norm_groups=8,
        spatial_dims=1,
        down_strides=(4, 4, 4),
    ),
    # The same clips as spectrograms: 129 frequency bins over 128 frames (n_fft 256, hop 64), strides 2, 2
    # -> (16, 32) latents, f = 256 samples per latent step; decoded by Griffin-Lim. Minutes, not hours, on a CPU.
    "fsdd-spec": AutoencoderConfig(
        in_channels=1,
        resolution=8192,
        ch=64,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        latent_channels=16,
        norm_groups=8,
        spatial_dims=1,
        down_strides=(2, 2),
        front_end="stft",
        n_fft=256,
        hop_length=64,
    ),
    # The LDM KL autoencoders for 256x256 RGB; kl-f8 is the Stable Diffusion v1 VAE's shape
    # (83.7M parameters). LDM's kl-f16 also has attention inside its 16x16 level; ours has the
    # middle-block attention only.
    "kl-f4": AutoencoderConfig(
        in_channels=3,
        resolution=256,
        ch=128,
        ch_mult=(1, 2, 4),
        num_res_blocks=2,
        latent_channels=3,
        attn_at_lowest=True,
        norm_groups=32,
    ),
    "kl-f8": AutoencoderConfig(
        in_channels=3,
        resolution=256,
        ch=128,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        latent_channels=4,
        attn_at_lowest=True,
        norm_groups=32,
    ),
    "kl-f16": AutoencoderConfig(
        in_channels=3,
        resolution=256,
        ch=128,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        latent_channels=16,
        attn_at_lowest=True,
        norm_groups=32,
    ),
}


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels` (LDM's eps)."""
    groups = next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def conv_class(spatial_dims: int) -> type[nn.Module]:
    """nn.Conv2d for images, nn.Conv1d for signals."""
    return nn.Conv2d if spatial_dims == 2 else nn.Conv1d


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) x 2, 1x1 shortcut if C changes."""

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float, norm_groups: int, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        conv = conv_class(spatial_dims)
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.shortcut = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(self.shortcut(x))  # (N, C_out, H, W) or (N, C_out, L)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W (or L) positions, with a residual connection."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)  # one matmul for q, k and v
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        n, c, *size = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C); a view when x is channels_last
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # each (N, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, HW, C), softmax(q k^T / sqrt(C)) v
        out = self.proj(out).transpose(1, 2).reshape(n, c, *size)  # a view with channels_last strides
        return x + out  # (N, C, H, W) in x's memory format


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # LDM's asymmetric padding (right and bottom only): output pixel i sees input rows
        # 2i..2i+2, so the latent grid is aligned with the top-left of the image.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (N, C, H/2, W/2)


class SignalDownsample(nn.Module):
    """Shorten a signal (N, C, L) by an even stride s: a conv of kernel 2s and stride s, padded by s/2 each side."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 2 * stride, stride=stride, padding=stride // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (N, C, L/s): output i sees inputs s*i - s/2 .. s*i + 3s/2 - 1


class SignalUpsample(nn.Module):
    """Lengthen a signal (N, C, L) by an even stride s: the transposed conv of kernel 2s.

    Each input is spread over 2s outputs.
    """

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        # Kernel 2s = twice the stride: every output sums two overlapping input frames, which avoids the
        # periodic artifacts of a kernel equal to the stride (Odena et al. 2016).
        self.conv = nn.ConvTranspose1d(channels, channels, 2 * stride, stride=stride, padding=stride // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (N, C, L*s)


def downsample(channels: int, stride: int, spatial_dims: int) -> nn.Module:
    """The level transition of the encoder: LDM's stride-2 conv for images, a strided conv for signals."""
    return Downsample(channels) if spatial_dims == 2 else SignalDownsample(channels, stride)


def upsample(channels: int, stride: int, spatial_dims: int) -> nn.Module:
    """The level transition of the decoder: LDM's upsample-then-conv for images, a transposed conv for signals."""
    return Upsample(channels) if spatial_dims == 2 else SignalUpsample(channels, stride)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 conv (no checkerboard artifacts)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)  # the 3x3 conv on the upsampled grid
        # Along one axis, output pixel 2i sees inputs (i-1, i, i) through taps (w0, w1, w2) and
        # pixel 2i+1 sees (i, i, i+1): upsample-then-conv is a stride-2 transposed conv whose
        # 4-tap kernel is [w2, w1 + w2, w0 + w1, w0] = fold @ w. That is 16 instead of 36
        # multiply-adds per input pixel and channel pair, and no 4x-sized upsampled tensor.
        fold = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        self.register_buffer("fold", fold, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # (C_out, C_in, 3, 3) -> (C_in, C_out, 4, 4), the layout conv_transpose2d wants.
        weight = torch.einsum("yp,xq,oipq->ioyx", self.fold, self.fold, self.conv.weight)
        return F.conv_transpose2d(x, weight, self.conv.bias, stride=2, padding=1)  # (N, C, 2H, 2W)


def middle_block(channels: int, config: AutoencoderConfig) -> nn.Sequential:
    """Resnet, (Attention), Resnet at the lowest resolution: the only place with a global view."""
    layers = [ResnetBlock(channels, channels, config.dropout, config.norm_groups, config.spatial_dims)]
    if config.attn_at_lowest:
        layers.append(AttentionBlock(channels, config.norm_groups))
    layers.append(ResnetBlock(channels, channels, config.dropout, config.norm_groups, config.spatial_dims))
    return nn.Sequential(*layers)


def run_stages(stages: list[nn.Module], h: Tensor, gradient_checkpointing: bool) -> Tensor:
    """Apply `stages` in order, recomputing each in backward when checkpointing is on."""
    for stage in stages:
        if gradient_checkpointing and torch.is_grad_enabled():
            h = checkpoint(stage, h, use_reentrant=False)
        else:
            h = stage(h)
    return h


class Encoder(nn.Module):
    """Image (N, C_in, H, W) -> posterior moments (N, 2 * latent_channels, H/f, W/f); signals (N, C_in, L) alike."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.gradient_checkpointing = config.gradient_checkpointing
        widths = [config.ch * m for m in config.ch_mult]
        conv, dims = conv_class(config.spatial_dims), config.spatial_dims
        self.conv_in = conv(config.network_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()  # one nn.Sequential per level, highest resolution first
        in_width = widths[0]
        for level, width in enumerate(widths):
            layers: list[nn.Module] = []
            for _ in range(config.num_res_blocks):
                layers.append(ResnetBlock(in_width, width, config.dropout, config.norm_groups, dims))
                in_width = width
            if level < len(widths) - 1:
                layers.append(downsample(width, config.strides[level], dims))
            self.down.append(nn.Sequential(*layers))
        self.mid = middle_block(widths[-1], config)
        self.norm_out = group_norm(widths[-1], config.norm_groups)
        self.conv_out = conv(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (N, ch, H, W)
        h = run_stages([*self.down, self.mid], h, self.gradient_checkpointing)  # (N, ch*m[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 2 * latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (N, latent_channels, h, w) -> image (N, C_out, h*f, w*f); signals (N, latent_channels, l) alike."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.gradient_checkpointing = config.gradient_checkpointing
        widths = [config.ch * m for m in config.ch_mult]
        conv, dims = conv_class(config.spatial_dims), config.spatial_dims
        self.conv_in = conv(config.latent_channels, widths[-1], 3, padding=1)
        self.mid = middle_block(widths[-1], config)
        self.up = nn.ModuleList()  # one nn.Sequential per level, lowest resolution first
        in_width = widths[-1]
        for level in reversed(range(len(widths))):
            layers: list[nn.Module] = []
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResnetBlock(in_width, widths[level], config.dropout, config.norm_groups, dims))
                in_width = widths[level]
            if level > 0:
                layers.append(upsample(in_width, config.strides[level - 1], dims))
            self.up.append(nn.Sequential(*layers))
        self.norm_out = group_norm(widths[0], config.norm_groups)
        self.conv_out = conv(widths[0], config.network_channels_out, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (N, ch*m[-1], h, w)
        h = run_stages([self.mid, *self.up], h, self.gradient_checkpointing)  # (N, ch*m[0], h*f, w*f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C_out, h*f, w*f)


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))), one per batch element."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        # Bounds from LDM: exp(-30) ~ 1e-13 keeps log/division finite, exp(20) stops overflow early in training.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split (N, 2C, h, w) encoder moments into mean and log-variance along channels."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised draw mean + std * eps (differentiable in mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The most likely latent, i.e. the mean."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per batch element, summed over latent dims; shape (N,)."""
        # Summed in float32: under bf16 autocast a sum of thousands of terms would lose precision.
        mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
        return 0.5 * (mean.square() + var - 1.0 - logvar).sum(dim=tuple(range(1, mean.ndim)))

    def nll(self, sample: Tensor) -> Tensor:
        """-log q(sample) per batch element, summed over latent dims; shape (N,)."""
        mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
        log_two_pi = 1.8378770664093453  # log(2 * pi)
        terms = log_two_pi + logvar + (sample.float() - mean).square() / var
        return 0.5 * terms.sum(dim=tuple(range(1, mean.ndim)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: `encode` images to a posterior, `decode` latents to images."""

    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AutoencoderConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convs between the networks and the latent, kept from LDM so its (and diffusers')
        # checkpoints map one to one onto this module.
        conv = conv_class(config.spatial_dims)
        self.quant_conv = conv(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = conv(config.latent_channels, config.latent_channels, 1)
        vocoder = config.vocoder_config
        self.vocoder = Vocoder(vocoder) if vocoder is not None else None

    def analysis(self, x: Tensor) -> Tensor:
        """What the network sees of x: x itself, or its spectrogram features (N, F, frames) with the stft front end."""
        cfg = self.config
        return spectrogram_features(x, cfg.n_fft, cfg.hop_length) if cfg.front_end == "stft" else x

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Posterior over latents (N, latent_channels, H/f, W/f) for images x (N, C, H, W) in [-1, 1].

        Or for signals x (N, 1, L).
        """
        return self.encode_features(self.analysis(x))

    def encode_features(self, features: Tensor) -> DiagonalGaussian:
        """Posterior over latents for `analysis(x)`: the data itself, or its spectrogram features."""
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(features)))

    def decode_features(self, z: Tensor) -> Tensor:
        """The decoder's output for latents z: images, signals, or spectrogram features with the stft front end."""
        return self.decoder(self.post_quant_conv(z))

    def decode(self, z: Tensor) -> Tensor:
        """Images (N, C_out, h*f, w*f), roughly in [-1, 1], for latents z (N, latent_channels, h, w); signals alike.

        With the stft front end the decoded spectrogram is inverted by the learned vocoder head if there is one,
        else by Griffin-Lim (no gradient flows through it).
        """
        cfg = self.config
        features = self.decode_features(z)
        if self.vocoder is not None:
            return self.vocoder(features).clamp(-1, 1)
        if cfg.front_end == "stft":
            return griffin_lim(features, cfg.n_fft, cfg.hop_length, cfg.griffin_lim_iters).clamp(-1, 1)
        return features

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction of features = `analysis(data)` (the data itself, or its spectrogram features)
        through a posterior sample (or its mean), and the posterior. The training step computes `analysis`
        once, for input and target."""
        posterior = self.encode_features(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode_features(z), posterior

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the decoder's output conv: the adaptive GAN weight compares gradients here."""
        return self.decoder.conv_out.weight


ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # everything that maps images to the latent posterior


def encoder_fingerprint(state_dict: dict[str, Tensor]) -> str:
    """Return a sha256 over the encoder side's tensors (names, dtypes, shapes, bytes).

    Two autoencoders with the same fingerprint make the same latents, whatever their decoders: a
    DiT trained on one's latents decodes with either.
    """
    digest = hashlib.sha256()
    for name in sorted(k for k in state_dict if k.startswith(ENCODER_PREFIXES)):
        tensor = state_dict[name].detach().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        # bytes in logical order, whatever the memory format (channels_last weights included)
        flat = tensor.clone(memory_format=torch.contiguous_format).reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
