"""Diffusion Transformer (DiT) with adaLN-Zero conditioning.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv:2212.09748).
A latent (N, C, H, W) is cut into p x p patches (a sequence (N, C, L), as sound's latents are, into
runs of p steps), each patch becomes a token, the tokens pass
through `depth` transformer blocks whose LayerNorms are modulated by the timestep + class
embedding (adaptive LayerNorm with zero-initialised gates), and a final layer maps each token
back to its patch of `out_channels` (the noise prediction, plus the variance interpolation
when `learn_sigma`).

Recipe options, each a `DiTConfig` field that is off by default: RMSNorm, SwiGLU and 2-D RoPE as in
LightningDiT (Yao et al. 2025), and TREAD token routing in training (Krause et al. 2025).

Text conditioning (`text_dim` > 0, off by default) follows PixArt-alpha (Chen et al. 2023): each block
cross-attends from the image tokens to the prompt's token features after its self-attention, masked
keys (padding) excluded, and the prompt's pooled vector joins the adaLN conditioning. Both text paths
start at zero output, so a fresh text DiT computes the class DiT. The features come from
`ldm.models.text.TextEncoder`.

The whole model lives in this file, together with its size presets (`DIT_PRESETS`) and an
analytic FLOP count (`dit_forward_flops`) that the benchmark and training logs use for MFU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed, build_rotary_pos_embed
from torch.utils.checkpoint import checkpoint

from ldm.models.text import TEXT_ENCODER_PRESETS, TextEncoder, text_encoder_config

# Width of the sinusoidal timestep features fed to the timestep MLP (as in DiT and ADM).
TIMESTEP_FREQUENCY_DIM = 256


@dataclass
class DiTConfig:
    """Architecture of a DiT; the defaults are DiT-XL/2 on 32x32x4 latents of 256 px ImageNet."""

    input_size: int = 32  # latent height = width (spatial_dims 2), or sequence length (spatial_dims 1)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    num_classes: int = 1000
    learn_sigma: bool = True  # also predict the variance interpolation (Nichol & Dhariwal 2021)
    qk_norm: bool = False  # RMSNorm on queries and keys per head
    # Timestep frequencies max_period^(-i / (half - shift)), half = 128: 0 is DiT's and ADM's,
    # 1 is diffusers' DiTTransformer2DModel (Timesteps with downscale_freq_shift=1), for imports.
    timestep_freq_shift: int = 0
    # eps of the norm before each block's MLP: 1e-6 in DiT; diffusers' DiT uses its norm_eps
    # (default 1e-5) there, so a diffusers import sets it to compute exactly diffusers' function.
    mlp_norm_eps: float = 1e-6
    grad_checkpointing: bool = False  # recompute block activations in backward (training only)
    # Recipe options, all off by default. LightningDiT: Yao et al. 2025, arXiv 2501.01423 (hustvl/LightningDiT).
    norm: str = "layernorm"  # "rmsnorm": affine-free RMSNorm as every pre-norm (LightningDiT use_rmsnorm)
    mlp: str = "gelu"  # "swiglu": SwiGLU MLP of 2/3 the width (Shazeer 2020; LightningDiT use_swiglu)
    pos_embed: str = "sincos"  # "rope": sin-cos plus 2-D RoPE on q and k (LightningDiT use_rope, from EVA-02)
    route_ratio: float = 0.0  # tokens that skip blocks, training only (TREAD, Krause et al. 2025, arXiv 2501.04765)
    route_start: int = 1  # first block the routed tokens skip (TREAD's start_layer_idx)
    route_end: int = -1  # block where they rejoin, -1: depth - 1 (TREAD's end_layer_idx + 1)
    # A second timestep embedder for the interval t - r, added to the conditioning: the average-velocity
    # network u(x, r, t) of MeanFlow (Geng et al. 2025 embed t and t - r). r defaults to t (interval 0).
    interval_embed: bool = False
    # Multiplies the timesteps (and r) before the sinusoidal embedding. 1: DiT's 0-999 range. A MeanFlow
    # network wants 0.001 (flow time t in [0, 1], as SiT and MeanFlow embed it): its target contains the
    # derivative du/dt, and at 1000 t the fastest embedding channels turn 1000x faster in t.
    time_input_scale: float = 1.0
    # 2: latents are (C, H, W) grids cut into p x p patches (images); 1: (C, L) sequences cut into runs of
    # p steps (sound); 3: (C, frames, H, W) clips cut into time_patch_size x p x p patches (video, as Latte
    # and W.A.L.T patchify space-time latents). Everything else (blocks, conditioning, samplers) is the
    # same code for all three.
    spatial_dims: int = 2
    frames: int = 0  # latent frames of a clip (spatial_dims 3 only)
    time_patch_size: int = 1  # frames per token (spatial_dims 3 only)
    # Self-attention over all tokens ("full"), or, for clips, Latte's factorised variant (Ma et al. 2024,
    # arXiv 2401.03048, its model 1): even blocks attend within each frame, odd blocks across frames at each
    # spatial position, a cost of T (H W)^2 + H W T^2 instead of (T H W)^2.
    attention: str = "full"
    # Text conditioning, PixArt-alpha (Chen et al. 2023, arXiv 2310.00426); off at 0. text_dim: width of the
    # text encoder's token features; text_length: the longest prompt in tokens the DiT takes (the encoder's
    # max_length), which the FLOP count assumes. Set both or neither.
    text_dim: int = 0
    text_length: int = 0
    # Where the token features come from: "" (none, or given by the caller), a preset of
    # `ldm.models.text.TEXT_ENCODER_PRESETS` ("Text-S"): a byte-level encoder trained jointly, held by the
    # DiT as `text_encoder` (its weights are the model's; text_dim is its width, text_length its max_length,
    # the preset's unless set), or "pretrained": a frozen `transformers` encoder the diffusion stage loads.
    text_encoder: str = ""
    # Share of training prompts replaced by the empty prompt "" (the null condition of guidance), applied by
    # the diffusion stage before encoding; PixArt-alpha drops 10%.
    caption_dropout_prob: float = 0.1
    # LayerNorm the projected text tokens. Without it the keys and values start at the scale of the two 0.02-std
    # projections (~0.01): every image token attends evenly to every text token, and a jointly trained encoder
    # got no signal from its prompts for hundreds of steps (scenes: the loss with shuffled captions equalled
    # the loss with the right ones to 4 digits after 450 steps; with the norm it was 1-1.5% higher).
    text_context_norm: bool = True

    def __post_init__(self) -> None:
        if self.spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1 (sequences), 2 (grids) or 3 (clips), got {self.spatial_dims}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if (self.spatial_dims == 3) != (self.frames > 0):
            raise ValueError(f"frames (latent frames of a clip) is for spatial_dims 3 alone, got {self.frames}")
        if self.time_patch_size < 1 or (self.spatial_dims == 3 and self.frames % self.time_patch_size):
            raise ValueError(f"frames {self.frames} is not divisible by time_patch_size {self.time_patch_size}")
        if self.attention not in ("full", "factorised"):
            raise ValueError(f"attention must be 'full' or 'factorised', got {self.attention!r}")
        if self.attention == "factorised" and (
            self.spatial_dims != 3 or self.pos_embed == "rope" or self.route_ratio > 0
        ):
            raise ValueError(
                "attention 'factorised' splits clips into frames and positions: it needs spatial_dims 3, "
                "pos_embed sincos and route_ratio 0"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % (2 * self.spatial_dims):
            # The sin-cos position embedding splits the width into a sin and a cos part per axis.
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of {2 * self.spatial_dims}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must lie in [0, 1), got {self.class_dropout_prob}")
        if self.timestep_freq_shift not in (0, 1):
            raise ValueError(f"timestep_freq_shift must be 0 (DiT) or 1 (diffusers), got {self.timestep_freq_shift}")
        if not self.time_input_scale > 0:
            raise ValueError(f"time_input_scale must be positive, got {self.time_input_scale}")
        if not self.mlp_norm_eps > 0:
            raise ValueError(f"mlp_norm_eps must be positive, got {self.mlp_norm_eps}")
        choices = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"), "pos_embed": ("sincos", "rope")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        head_dim = self.hidden_size // self.num_heads
        if self.pos_embed == "rope" and head_dim % (2 * self.spatial_dims):
            # Each head's channels split into one part per axis of (cos, sin) pairs.
            raise ValueError(
                f"pos_embed 'rope' needs a head width divisible by {2 * self.spatial_dims}, got {head_dim}"
            )
        self.fill_text_encoder()
        if not 0.0 <= self.caption_dropout_prob < 1.0:
            raise ValueError(f"caption_dropout_prob must lie in [0, 1), got {self.caption_dropout_prob}")
        if self.text_dim < 0 or self.text_length < 0 or (self.text_dim > 0) != (self.text_length > 0):
            raise ValueError(
                f"text_dim and text_length must both be positive (text conditioning) or both 0, "
                f"got {self.text_dim} and {self.text_length}"
            )
        if not 0.0 <= self.route_ratio < 1.0:
            raise ValueError(f"route_ratio must lie in [0, 1), got {self.route_ratio}")
        if self.route_ratio > 0:
            start, end = self.route_blocks
            if not 0 <= start < end <= self.depth:
                raise ValueError(
                    f"route_start {self.route_start} and route_end {self.route_end} (-1: depth - 1) must give "
                    f"0 <= route_start < route_end <= depth = {self.depth}, got blocks [{start}, {end})"
                )

    def fill_text_encoder(self) -> None:
        """Take text_dim (and text_length, unless set) from a jointly trained encoder's preset; check them."""
        if not self.text_encoder or self.text_encoder == "pretrained":
            return
        if self.text_encoder not in TEXT_ENCODER_PRESETS:
            raise ValueError(
                f"model.text_encoder must be '', 'pretrained' or one of {sorted(TEXT_ENCODER_PRESETS)}, "
                f"got {self.text_encoder!r}"
            )
        preset = TEXT_ENCODER_PRESETS[self.text_encoder]
        if self.text_dim not in (0, preset.hidden_size):
            raise ValueError(
                f"model.text_dim {self.text_dim} differs from {self.text_encoder}'s width {preset.hidden_size}: "
                f"leave text_dim out (0) with a text_encoder preset"
            )
        self.text_dim = preset.hidden_size
        self.text_length = self.text_length or preset.max_length

    @property
    def text_encoder_config(self):
        """The TextEncoderConfig of the jointly trained encoder (None unless text_encoder names a preset)."""
        if not self.text_encoder or self.text_encoder == "pretrained":
            return None
        return text_encoder_config(self.text_encoder, max_length=self.text_length)

    @property
    def out_channels(self) -> int:
        """Channels of the output: the mean prediction, doubled when the variance is learned too."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden_size(self) -> int:
        """Width of each block's feed-forward hidden layer: mlp_ratio * D, or 2/3 of it with SwiGLU."""
        width = int(self.hidden_size * self.mlp_ratio)
        # SwiGLU has three matrices instead of two; 2/3 keeps the parameters, truncated as LightningDiT does.
        return int(2 / 3 * width) if self.mlp == "swiglu" else width

    @property
    def route_blocks(self) -> tuple[int, int]:
        """The blocks [start, end) that routed tokens skip, with route_end -1 resolved to depth - 1."""
        return self.route_start, self.depth - 1 if self.route_end == -1 else self.route_end

    @property
    def grid_size(self) -> int:
        """Tokens per side of the latent."""
        return self.input_size // self.patch_size

    @property
    def input_sizes(self) -> tuple[int, ...]:
        """Latent extent along each axis: (H, W) for grids, (L,) for sequences, (frames, H, W) for clips."""
        if self.spatial_dims == 3:
            return (self.frames, self.input_size, self.input_size)
        return (self.input_size,) * self.spatial_dims

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        """Patch extent along each axis: (p, p), (p,), or (time_patch_size, p, p) for clips."""
        p = self.patch_size
        return (self.time_patch_size, p, p) if self.spatial_dims == 3 else (p,) * self.spatial_dims

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Tokens along each latent axis: (h, w) for grids, (l,) for sequences, (t, h, w) for clips."""
        return tuple(size // patch for size, patch in zip(self.input_sizes, self.patch_sizes))

    @property
    def num_patches(self) -> int:
        """Sequence length T."""
        return math.prod(self.grid_shape)

    @property
    def patch_volume(self) -> int:
        """Latent positions per token: p*p for grids, p for sequences, time_patch_size*p*p for clips."""
        return math.prod(self.patch_sizes)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent the model takes: (C, H, W), (C, L) for sequences, (C, frames, H, W) for clips."""
        return (self.in_channels, *self.input_sizes)

    @property
    def null_class(self) -> int:
        """Label index of the learned 'no class' embedding used for classifier-free guidance."""
        return self.num_classes

    @classmethod
    def presets(cls) -> dict[str, DiTConfig]:
        """The named size presets (YAML may name one: `model: DiT-S/2`)."""
        return DIT_PRESETS


# --------------------------------------------------------------------------------------------
# Pure tensor functions: patches, position and timestep embeddings, modulation
# --------------------------------------------------------------------------------------------


def _patch_sizes(patch_size: int | Sequence[int], d: int) -> tuple[int, ...]:
    return (patch_size,) * d if isinstance(patch_size, int) else tuple(patch_size)


def patchify(x: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """Return the non-overlapping patches of x (N, C, *S) as tokens (N, T, P * C), row-major; d = len(S) is 1-3.

    patch_size is one extent for every axis or one per axis; P is their product. A grid (N, C, H, W) gives
    p x p patches, a sequence (N, C, L) runs of p steps, a clip (N, C, F, H, W) pt x p x p blocks; one code path.
    """
    n, c, *sizes = x.shape
    d = len(sizes)
    patches = _patch_sizes(patch_size, d)
    volume = math.prod(patches)
    x = x.reshape(n, c, *(part for size, p in zip(sizes, patches) for part in (size // p, p)))  # (N, C, h, p, w, q)
    # Token axes first (h, w), then the offsets within a patch (p, q), then the channels.
    x = x.permute(0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1)  # (N, h, w, p, q, C) or (N, l, p, C)
    return x.reshape(n, math.prod(sizes) // volume, volume * c)  # (N, T, P * C)


def unpatchify(x: torch.Tensor, patch_size: int | Sequence[int], grid: tuple[int, ...]) -> torch.Tensor:
    """Return the latent (N, C, *(g*p for g, p in zip(grid, patch sizes))) whose patches are the tokens x (N, T, P * C).

    The inverse of `patchify`.
    """
    n, t, dim = x.shape
    d = len(grid)
    patches = _patch_sizes(patch_size, d)
    volume = math.prod(patches)
    c = dim // volume
    assert t == math.prod(grid) and dim == volume * c, f"tokens {tuple(x.shape)} do not tile {grid} of {patches}"
    x = x.reshape(n, *grid, *patches, c)  # (N, h, w, p, q, C) or (N, l, p, C)
    # Channels first, then each token axis followed by its offset axis.
    x = x.permute(0, 2 * d + 1, *(axis for i in range(d) for axis in (1 + i, 1 + d + i)))  # (N, C, h, p, w, q)
    return x.reshape(n, c, *(g * p for g, p in zip(grid, patches)))


def sincos_pos_embed(embed_dim: int, grid_shape: tuple[int, ...]) -> torch.Tensor:
    """Return the fixed sin-cos position embedding (prod(grid_shape), embed_dim), tokens in row-major order.

    The channels split into one part per axis, the last axis first: for a grid the first half encodes
    the column (x) coordinate and the second half the row (y) coordinate, each as
    [sin(pos * omega), cos(pos * omega)] with omega_i = 10000^(-i / (embed_dim / 4)), the MAE / DiT
    convention; a sequence uses all channels for its one axis (omega over embed_dim / 2). Computed in
    float64 so that the large arguments keep their precision, then cast to float32.
    """
    axes = len(grid_shape)
    assert embed_dim % (2 * axes) == 0, f"embed_dim must be a multiple of {2 * axes}"
    part = embed_dim // (2 * axes)
    omega = 1.0 / 10000.0 ** (torch.arange(part, dtype=torch.float64) / part)  # (D/(2 axes),)
    coords = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid_shape), indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (T, D/(2 axes))
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (T, D/axes)

    return torch.cat([embed_1d(axis) for axis in reversed(coords)], dim=1).float()  # (T, D)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> torch.Tensor:
    """Return sinusoidal features (N, dim) of (possibly fractional) timesteps t (N,), always in float32.

    Frequencies are f_i = max_period^(-i / (dim/2 - freq_shift)) for i < dim/2; the features are
    [cos(t f), sin(t f)] (the ADM / DiT layout). freq_shift 0 is DiT's spacing; 1 is diffusers'
    (its Timesteps with downscale_freq_shift=1 and flip_sin_to_cos=True, the same cos-first order).
    float32 even under autocast: t * f reaches 1000 radians and bf16 would keep only ~3
    significant digits of it.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    )  # (dim/2,)
    args = t.to(torch.float32)[:, None] * freqs[None]  # (N, dim/2)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*(dim/2))
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def rope_tables(head_dim: int, grid_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (sin, cos) tables (prod(grid_shape), head_dim) of the rotary embedding, tokens in row-major order.

    EVA-02's VisionRotaryEmbeddingFast, as LightningDiT builds it for use_rope, here from timm: on a grid,
    channel pair (2i, 2i+1) of the first half of a head turns by row * omega_i, of the second half by
    col * omega_i, omega_i = 10000^(-i / (head_dim/4)); on a sequence every pair turns by its position,
    omega_i = 10000^(-i / (head_dim/2)) (the 1-D RoPE of Su et al. 2021). Apply with timm's
    `apply_rot_embed(x, sin, cos)`.
    """
    # timm's tables have dim / 2 channels per axis: a grid fills a head with dim = head_dim,
    # a sequence with 2 * head_dim.
    dim = 2 * head_dim // len(grid_shape)
    return build_rotary_pos_embed(list(grid_shape), dim=dim, in_pixels=False, temperature=10000.0)


def route_keep_indices(n: int, num_tokens: int, route_ratio: float, device: torch.device) -> torch.Tensor:
    """Return indices (N, T - int(route_ratio T)) of each sample's tokens that go through the routed blocks, at random.

    As TREAD's Router.get_mask (CompVis/tread routing_module.py): a permutation per sample drawn from the
    global RNG, of which the first T - int(route_ratio T) tokens are kept and the rest are routed past.
    """
    num_keep = num_tokens - int(num_tokens * route_ratio)
    return torch.rand(n, num_tokens, device=device).argsort(dim=1)[:, :num_keep]


def take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Return the tokens (N, K, D) of x (N, T, D) at per-sample positions index (N, K)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def put_tokens(x: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Return a copy of x (N, T, D) whose tokens at positions index (N, K) are replaced by tokens (N, K, D)."""
    return x.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), tokens)


# The helpers below take `inplace`, which a module's forward sets to `not torch.is_grad_enabled()`:
# without autograd nothing keeps activations for a backward pass, so a buffer that nothing reads
# again can be overwritten instead of allocating and streaming through a new one. The arithmetic
# is the same either way, so training and inference share one forward.


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Return x * (1 + scale) + shift for tokens x (N, T, D), per-sample shift, scale (N, 1, D); into x if inplace."""
    # One fused kernel instead of a multiply and an add over the (N, T, D) activations.
    return torch.addcmul(shift, x, 1 + scale, out=x if inplace else None)


def normalize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return norm(x) for the residual stream x (N, T, D), in the autocast dtype when autocast is on.

    The stream stays float32 under bf16 autocast (each residual add promotes), but what a block
    normalises feeds a bf16 linear anyway: normalising a bf16 copy keeps autograd's saved inputs of
    the norm and the modulation in bf16 (on a CPU, 3 MiB instead of 5 per sublayer of DiT-F/2 at
    batch 128) and leaves the float32 stream unsaved. On a GPU autocast runs LayerNorm in float32
    whatever its input; its output is still taken back to bf16 here.
    """
    if not torch.is_autocast_enabled(x.device.type):
        return norm(x)
    dtype = torch.get_autocast_dtype(x.device.type)
    return norm(x.to(dtype)).to(dtype)


def gelu_tanh(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Return GELU with the tanh approximation (as DiT's MLP) of x; into x if inplace."""
    return torch.ops.aten.gelu_(x, approximate="tanh") if inplace else F.gelu(x, approximate="tanh")


def add_gated(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Return the gated residual x + gate * update (gate (N, 1, D), x and update (N, T, D)); into x if inplace."""
    # One addcmul kernel instead of a multiply and an add.
    return x.addcmul_(gate, update) if inplace else torch.addcmul(x, gate, update)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Linear embedding of patches (p x p, runs of p steps, pt x p x p), a convolution with kernel = stride = patch."""

    def __init__(self, patch_size: int | Sequence[int], in_channels: int, hidden_size: int, spatial_dims: int = 2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        patches = _patch_sizes(patch_size, spatial_dims)
        self.proj = conv(in_channels, hidden_size, kernel_size=patches, stride=patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return tokens (N, T, D) for latents x (N, C, H, W), (N, C, L) or (N, C, F, H, W)."""
        x = self.proj(x)  # (N, D, H/p, W/p), (N, D, L/p) or (N, D, F/pt, H/p, W/p)
        # One copy to token-major memory here; left as a transposed view, every LayerNorm of
        # every block would copy the residual stream again and elementwise ops would run strided.
        return x.flatten(2).transpose(1, 2).contiguous()  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Timestep -> sinusoidal features -> 2-layer SiLU MLP -> (N, hidden_size)."""

    def __init__(self, hidden_size: int, frequency_dim: int = TIMESTEP_FREQUENCY_DIM, freq_shift: int = 0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Return the embedding (N, D) of timesteps t (N,)."""
        return self.mlp(timestep_embedding(t, self.frequency_dim, freq_shift=self.freq_shift))


class LabelEmbedder(nn.Module):
    """Class label -> learned embedding, with an extra 'null' row (index num_classes) for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        # Row num_classes is the unconditional embedding; it exists even without dropout so
        # that every checkpoint has the same shape and samplers can always name the null class.
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop_labels(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Return labels with the null class put where force_drop_ids == 1, or at random with dropout_prob."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(device=labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Return embeddings (N, D) of labels (N,); labels are dropped only in training (or when forced)."""
        # Label dropout trains the unconditional model used by classifier-free guidance (Ho & Salimans 2022).
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop_labels(labels, force_drop_ids)
        return self.embedding_table(labels)


def pre_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """Return an affine-free LayerNorm, or RMSNorm for kind "rmsnorm" (LightningDiT use_rmsnorm), over the last dim."""
    # No affine parameters: the per-sample shift and scale from adaLN take their place. (LightningDiT's
    # RMSNorm has a weight, initialised to 1, which the adaLN scale that follows can absorb.)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=False)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # QK-norm bounds the attention logits, which keeps large models and bf16 runs from
        # saturating the softmax (Dehghani et al. 2023; used by SD3 and LightningDiT).
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Return softmax(q k^T / sqrt(d)) v for tokens x (N, T, D), projected back to (N, T, D).

        rope: (sin, cos) tables (T, d) or per sample (N, 1, T, d) of `rope_tables`, applied to q and k (after QK-norm).
        """
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, d), views of one buffer
        if self.qk_norm:
            # In (at least) float32, so that under bf16 autocast the norm keeps its precision and
            # its fused kernel (bf16 q against a float32 weight would take the unfused path).
            norm_dtype = torch.promote_types(q.dtype, torch.float32)
            q = self.q_norm(q.to(norm_dtype)).to(v.dtype)
            k = self.k_norm(k.to(norm_dtype)).to(v.dtype)
        if rope is not None:
            # Rotary embedding (Su et al. 2021) after QK-norm, as LightningDiT: q.k then depends on relative position.
            q, k = apply_rot_embed(q, *rope), apply_rot_embed(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, d)
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, H*d)
        return self.proj(x)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to text tokens, padding keys masked (PixArt-alpha's cross-attention)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Return attention of tokens x (N, T, D) over text tokens context (N, L, D), projected to (N, T, D).

        attn_mask (N, 1, 1, L) bool is True at the text tokens that may be attended; masked keys get weight 0.
        """
        n, t, d = x.shape
        q = self.q(x).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, T, d)
        kv = self.kv(context).view(n, context.shape[1], 2, self.num_heads, self.head_dim)  # (N, L, 2, H, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (N, H, L, d)
        if self.qk_norm:
            norm_dtype = torch.promote_types(q.dtype, torch.float32)
            q = self.q_norm(q.to(norm_dtype)).to(v.dtype)
            k = self.k_norm(k.to(norm_dtype)).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, T, d)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the MLP applied to every token of x (N, T, D)."""
        hidden = self.fc1(x)  # (N, T, hidden_dim), this forward's own buffer
        return self.fc2(gelu_tanh(hidden, inplace=not torch.is_grad_enabled()))


class SwiGLU(nn.Module):
    """Gated feed-forward network W2(SiLU(W1 x) * W3 x) (Shazeer 2020), W1, W3 stacked as LightningDiT's SwiGLUFFN."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden_dim)  # output rows [W1; W3]
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the gated MLP applied to every token of x (N, T, D)."""
        # timm's SwiGLUPacked computes the same from the same weights, but allocates a new buffer for
        # SiLU(gate); without autograd SiLU overwrites the gate here (3-6% of a DiT-F/2 CPU sampling forward).
        gate, value = self.fc1(x).chunk(2, dim=-1)  # 2 x (N, T, hidden_dim), views of this forward's own buffer
        return self.fc2(F.silu(gate, inplace=not torch.is_grad_enabled()) * value)


def attention_axis(config: DiTConfig, index: int) -> str:
    """What block `index` attends over: "all" tokens, or with factorised attention "space" (even) or "time" (odd)."""
    if config.attention == "full":
        return "all"
    return "space" if index % 2 == 0 else "time"


def split_axis(x: torch.Tensor, axis: str, frames: int) -> torch.Tensor:
    """Tokens (N, F * S, D) of a clip as independent sequences: (N F, S, D) per frame ("space"), (N S, F, D) per
    spatial position ("time"); "all" leaves x as it is. Tokens run frame by frame (row-major over (f, h, w))."""
    if axis == "all":
        return x
    n, t, d = x.shape
    if axis == "space":
        return x.reshape(n * frames, t // frames, d)
    return x.reshape(n, frames, t // frames, d).transpose(1, 2).reshape(n * (t // frames), frames, d)


def merge_axis(x: torch.Tensor, axis: str, frames: int, n: int) -> torch.Tensor:
    """The inverse of `split_axis`: (N, F * S, D) from the sequences of n clips."""
    if axis == "all":
        return x
    d = x.shape[-1]
    if axis == "space":
        return x.reshape(n, -1, d)
    return x.reshape(n, -1, frames, d).transpose(1, 2).reshape(n, -1, d)


class DiTBlock(nn.Module):
    """Transformer block whose pre-norms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, config: DiTConfig, axis: str = "all"):
        super().__init__()
        d = config.hidden_size
        # Self-attention over all tokens, or over one frame's ("space") or one position's ("time"): `attention_axis`.
        self.axis = axis
        self.frames = config.grid_shape[0] if config.spatial_dims == 3 else 1
        self.norm1 = pre_norm(config.norm, d, eps=1e-6)
        self.attn = Attention(d, config.num_heads, qk_norm=config.qk_norm)
        if config.text_dim:
            # Unmodulated and ungated, as PixArt-alpha's, but behind a pre-norm like every other sublayer
            # here (PixArt feeds it the raw residual stream).
            self.norm_cross = pre_norm(config.norm, d, eps=1e-6)
            self.cross_attn = CrossAttention(d, config.num_heads, qk_norm=config.qk_norm)
        self.norm2 = pre_norm(config.norm, d, eps=config.mlp_norm_eps)
        self.mlp = (SwiGLU if config.mlp == "swiglu" else Mlp)(d, config.mlp_hidden_size)
        # Applied to SiLU(c), which the DiT computes once for all blocks.
        self.adaLN_modulation = nn.Linear(d, 6 * d)

    def modulations(self, c_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift, scale, gate of the attention and of the MLP: six (N, 1, D) views of one matmul's output."""
        return self.adaLN_modulation(c_act).unsqueeze(1).chunk(6, dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        c_act: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the block applied to tokens x (N, T, D) under activated conditioning c_act = SiLU(c) (N, D).

        rope: the tokens' rotary (sin, cos) tables for the attention, when the DiT uses RoPE.
        context (N, L, D), context_mask (N, 1, 1, L) bool: the embedded text tokens and which of them are
        real, for the cross-attention of a text DiT (None in a class DiT).

        Without autograd (sampling) the residual stream x is updated in place and returned, and the
        normalised tokens are modulated in place: pass a tensor the caller may lose (`DiT.forward`
        passes its own). With autograd nothing is written in place.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulations(c_act)
        inplace = not torch.is_grad_enabled()
        modulated = modulate(normalize(self.norm1, x), shift_msa, scale_msa, inplace)  # (N, T, D)
        attended = self.attn(split_axis(modulated, self.axis, self.frames), rope)  # (N', T', D) per the axis
        x = add_gated(x, gate_msa, merge_axis(attended, self.axis, self.frames, len(x)), inplace)  # (N, T, D)
        if context is not None:
            update = self.cross_attn(normalize(self.norm_cross, x), context, context_mask)  # (N, T, D)
            x = x.add_(update) if inplace else x + update
        x = add_gated(x, gate_mlp, self.mlp(modulate(normalize(self.norm2, x), shift_mlp, scale_mlp, inplace)), inplace)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated pre-norm and a linear map from each token to its patch of C_out channels."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = pre_norm(norm, hidden_size, eps=1e-6)
        self.adaLN_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """Return per-token patches (N, T, p**d * C_out) for tokens x (N, T, D) and c_act = SiLU(c) (N, D)."""
        shift, scale = self.adaLN_modulation(c_act).unsqueeze(1).chunk(2, dim=-1)  # 2 x (N, 1, D)
        return self.linear(modulate(normalize(self.norm_final, x), shift, scale, inplace=not torch.is_grad_enabled()))


class DiT(nn.Module):
    """Class- (and optionally text-) conditional Diffusion Transformer: (x_t, t, y) -> output (N, C_out, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_sizes, config.in_channels, d, config.spatial_dims)
        self.t_embedder = TimestepEmbedder(d, freq_shift=config.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        if config.interval_embed:
            self.r_embedder = TimestepEmbedder(d, freq_shift=config.timestep_freq_shift)
        if config.text_dim:
            # PixArt-alpha's caption projection: the encoder's token features to the DiT's width, once per forward.
            self.text_embedder = nn.Sequential(
                nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
            )  # (N, L, D_text) -> (N, L, D)
            if config.text_context_norm:
                self.text_embedder.append(nn.LayerNorm(d))
            # The pooled prompt joins the timestep embedding in c, as SD3's pooled text vector (Esser et al. 2024).
            self.pooled_text_embedder = nn.Sequential(nn.Linear(config.text_dim, d), nn.SiLU(), nn.Linear(d, d))
        # Fixed, not learned (as in DiT); not saved either, since the config determines it.
        self.register_buffer(
            "pos_embed", sincos_pos_embed(d, config.grid_shape).unsqueeze(0), persistent=False
        )  # (1, T, D)
        if config.pos_embed == "rope":
            rope_sin, rope_cos = rope_tables(d // config.num_heads, config.grid_shape)  # 2 x (T, D / heads)
            self.register_buffer("rope_sin", rope_sin, persistent=False)
            self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(config, attention_axis(config, i)) for i in range(config.depth))
        self.final_layer = FinalLayer(d, config.patch_volume, config.out_channels, config.norm)
        self.initialize_weights()
        if config.text_encoder_config is not None:  # after initialize_weights: the encoder has its own (BERT's)
            self.text_encoder = TextEncoder(config.text_encoder_config)
        # Step caching in sampling (ldm.caching.BlockCache): reuses block residuals between network calls.
        self.block_cache = None

    @property
    def null_class(self) -> int:
        """Label that selects the unconditional embedding (classifier-free guidance)."""
        return self.config.null_class

    def initialize_weights(self) -> None:
        """Initialise as DiT: xavier linears, N(0, 0.02) embedders, zeroed modulations and output layer."""

        def init_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(init_linear)
        # The patch embedding is a linear map of flattened patches, so it is initialised like one.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.config.interval_embed:
            nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.r_embedder.mlp[2].weight, std=0.02)
        if self.config.text_dim:
            nn.init.normal_(self.text_embedder[0].weight, std=0.02)
            nn.init.normal_(self.text_embedder[2].weight, std=0.02)
            nn.init.normal_(self.pooled_text_embedder[0].weight, std=0.02)
            # Zero, so that the prompt leaves a fresh DiT's conditioning c as the class DiT's.
            nn.init.zeros_(self.pooled_text_embedder[2].weight)
        for block in self.blocks:
            # adaLN-Zero, Peebles & Xie 2023: zero gates make every block start as the identity.
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
            if self.config.text_dim:
                # Zero cross-attention output, PixArt-alpha (Chen et al. 2023): a fresh text DiT is the class DiT.
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        # Zero output layer: a fresh model predicts exactly 0 (adaLN-Zero, Peebles & Xie 2023).
        nn.init.zeros_(self.final_layer.adaLN_modulation.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed_text(
        self,
        n: int,
        tokens: torch.Tensor | None,
        mask: torch.Tensor | None,
        pooled: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Return the checked text inputs embedded: context (N, L, D), attention mask (N, 1, 1, L), pooled (N, D).

        All three are None for a class DiT, which refuses text inputs.
        """
        cfg = self.config
        if not cfg.text_dim:
            if tokens is not None or mask is not None or pooled is not None:
                raise ValueError(
                    "this DiT has no text conditioning (model.text_dim = 0) and cannot take text_tokens, "
                    "text_mask or text_pooled"
                )
            return None, None, None
        if tokens is None or mask is None or pooled is None:
            raise ValueError(
                "this DiT conditions on text (model.text_dim > 0): pass text_tokens, text_mask and text_pooled"
            )
        if tokens.ndim != 3 or tokens.shape[::2] != (n, cfg.text_dim) or tokens.shape[1] > cfg.text_length:
            raise ValueError(
                f"expected text_tokens of shape (N={n}, L <= text_length {cfg.text_length}, text_dim {cfg.text_dim}), "
                f"got {tuple(tokens.shape)}"
            )
        if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"expected text_mask as a bool tensor of shape {tuple(tokens.shape[:2])}, got {mask.dtype} "
                f"of shape {tuple(mask.shape)}"
            )
        if pooled.shape != (n, cfg.text_dim):
            raise ValueError(f"expected text_pooled of shape ({n}, {cfg.text_dim}), got {tuple(pooled.shape)}")
        # Masked keys get no attention weight: SDPA's boolean mask, True where a query may attend.
        return self.text_embedder(tokens), mask[:, None, None, :], self.pooled_text_embedder(pooled)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        return_block: int | None = None,
        r: torch.Tensor | None = None,
        *,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_pooled: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return the prediction (N, C_out, *S) for noisy latents x (N, C, *S), timesteps t (N,), labels y (N,).

        S is (H, W) for a grid model, (L,) for a sequence model and (F, H, W) for a clip model (`spatial_dims`).

        With learn_sigma the first C output channels are the mean prediction (e.g. eps) and the
        last C the variance interpolation v. Label index `null_class` requests the unconditional
        prediction; in training mode labels are also dropped at random with class_dropout_prob.
        With return_block k, return (prediction, tokens): tokens (N, T, D) is the residual stream
        right after block k (0-based), for a representation loss on it.
        In training (train mode, autograd on) with route_ratio > 0, a random route_ratio of each
        sample's tokens skips blocks [route_start, route_end) unchanged (TREAD, Krause et al. 2025).
        With interval_embed, r (N,) is the start time of the averaging interval (network units, r <= t;
        None: r = t) and the interval t - r enters the conditioning; a DiT without it refuses r.
        A text DiT (text_dim > 0) needs the prompt as `TextEncoder` gives it: text_tokens (N, L, text_dim)
        with L <= text_length, text_mask (N, L) bool, True at real tokens (each row needs one; the empty
        prompt has two), and text_pooled (N, text_dim); a class DiT refuses them. Labels still enter c:
        a text-only model passes the null class.
        """
        cfg = self.config
        if tuple(x.shape[1:]) != cfg.latent_shape:
            raise ValueError(
                f"expected latents of shape (N, {', '.join(map(str, cfg.latent_shape))}), got {tuple(x.shape)}"
            )
        if return_block is not None and not 0 <= return_block < cfg.depth:
            raise ValueError(f"return_block {return_block} is not a block index 0..{cfg.depth - 1}")
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        if cfg.time_input_scale != 1.0:
            t, r = t * cfg.time_input_scale, None if r is None else r * cfg.time_input_scale
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        if cfg.interval_embed:
            c = c + self.r_embedder(t - r if r is not None else torch.zeros_like(t))
        elif r is not None:
            raise ValueError("this DiT has no interval embedding (model.interval_embed) and cannot take r")
        context, context_mask, pooled = self.embed_text(x.shape[0], text_tokens, text_mask, text_pooled)
        if pooled is not None:
            c = c + pooled
        # Every consumer of c (each block's and the final layer's adaLN) applies SiLU first; do it once.
        c_act = F.silu(c)
        use_checkpoint = cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        rope = (self.rope_sin, self.rope_cos) if cfg.pos_embed == "rope" else None  # 2 x (T, D / heads)
        # TREAD routes only in training; sampling runs every token through every block.
        route = cfg.route_ratio > 0 and self.training and torch.is_grad_enabled()
        route_start, route_end = cfg.route_blocks
        block_rope, tokens = rope, None
        cache = None if torch.is_grad_enabled() else self.block_cache
        if cache is not None:
            cache.begin(x.shape[0], t)
        for index, block in enumerate(self.blocks):
            if route and index == route_start:
                keep = route_keep_indices(x.shape[0], x.shape[1], cfg.route_ratio, x.device)  # (N, K)
                # The routed tokens wait in `stream` as they are; the kept ones carry their positions' RoPE.
                stream, x = x, take_tokens(x, keep)  # (N, T, D), (N, K, D)
                block_rope = None if rope is None else tuple(table[keep].unsqueeze(1) for table in rope)  # (N, 1, K, d)
            if use_checkpoint:
                x = checkpoint(block, x, c_act, block_rope, context, context_mask, use_reentrant=False)
            elif cache is not None:
                x = cache.run(index, block, x, c_act, block_rope, context, context_mask)
            else:
                # Without autograd, the block updates x (this forward's own tensor) in place.
                x = block(x, c_act, block_rope, context, context_mask)
            if route and index == route_end - 1:
                x, block_rope = put_tokens(stream, keep, x), rope  # (N, T, D): the routed tokens rejoin unchanged
            if index == return_block:
                if route and route_start <= index < route_end - 1:
                    tokens = put_tokens(stream, keep, x)  # (N, T, D), the routed tokens as they wait
                else:
                    tokens = x.clone()  # a copy: without autograd the later blocks update x in place
        x = self.final_layer(x, c_act)  # (N, T, p**d * C_out)
        out = unpatchify(x, cfg.patch_sizes, cfg.grid_shape)  # (N, C_out, *S)
        return out if return_block is None else (out, tokens)


# --------------------------------------------------------------------------------------------
# Presets and cost model
# --------------------------------------------------------------------------------------------

# Paper sizes (Peebles & Xie 2023, Table 1): S 12/384/6, B 12/768/12, L 24/1024/16, XL 28/1152/16,
# each with patch 2, 4, 8, on 32x32x4 latents (256 px ImageNet, 1000 classes). The small sizes
# are for 8x8x4 Fashion-MNIST latents (16 tokens at patch 2, 10 classes) on a 2-core CPU:
#   DiT-T/2 (tiny, 4.2M parameters, 0.27 GFLOP per training image): smoke runs and demos.
#   DiT-F/2 (7.4M, 0.47 GFLOP): the quality preset, sized for a ~1 h run: 40-100 training
#     images/s on one core (busy to quiet machine), so an hour sees 150k-350k images (3-6 epochs).
# Small presets predict only the mean (learn_sigma=False); their training objective fixes the variance.
_PAPER_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
_FMNIST_LATENTS = dict(input_size=8, in_channels=4, num_classes=10, learn_sigma=False)

DIT_PRESETS: dict[str, DiTConfig] = {
    **{
        f"DiT-{size}/{patch}": DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
        for size, (depth, hidden, heads) in _PAPER_SIZES.items()
        for patch in (2, 4, 8)
    },
    "DiT-T/2": DiTConfig(depth=6, hidden_size=192, num_heads=4, patch_size=2, **_FMNIST_LATENTS),
    "DiT-F/2": DiTConfig(depth=6, hidden_size=256, num_heads=4, patch_size=2, **_FMNIST_LATENTS),
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """Return the DiTConfig of preset `name` (a key of DIT_PRESETS) with fields replaced by overrides."""
    if name not in DIT_PRESETS:
        raise KeyError(f"unknown DiT preset {name!r}; choose one of {sorted(DIT_PRESETS)}")
    valid = {f.name for f in fields(DiTConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise TypeError(f"unknown DiTConfig fields {sorted(unknown)}; valid fields are {sorted(valid)}")
    return replace(DIT_PRESETS[name], **overrides)


def dit_forward_flops(config: DiTConfig, training: bool = False) -> int:
    """Return the matmul FLOPs (2 per multiply-add) of one forward pass for one image.

    Counts the patch embedding, timestep MLP, per-block adaLN, qkv and output projections,
    attention scores q k^T and the weighted sum A v, the MLP (three matrices with SwiGLU), and the
    final layer; elementwise work (norms, softmax, GELU/SiLU, RoPE) is left out as in the paper's
    count. A text DiT adds its cross-attention over text_length keys (padding included: the masked
    kernel computes them too; a downsampling text encoder gives a quarter of them) and its two text
    embedders. Half of this number is the paper's
    "Gflops" (which counts multiply-adds), e.g. 118.6 G for DiT-XL/2. A training step costs about
    3x the forward (backward = 2x). training=True counts the training forward, in which TREAD
    routing (route_ratio > 0) leaves the routed blocks T - int(route_ratio T) tokens; the default
    counts the inference forward, all T tokens everywhere.
    """
    d, t = config.hidden_size, config.num_patches
    p2 = config.patch_volume
    mlp_matrices = 3 if config.mlp == "swiglu" else 2
    encoder = config.text_encoder_config
    text, text_dim = (encoder.num_tokens if encoder else config.text_length), config.text_dim

    def macs_cross_attention(tokens: int) -> int:
        return (
            tokens * d * d  # q
            + text * d * 2 * d  # kv of the text tokens
            + 2 * tokens * text * d  # q k^T and A v over all heads
            + tokens * d * d  # output projection
        )

    def macs_per_block(tokens: int) -> int:
        return (
            d * 6 * d  # adaLN modulation, once per image
            + tokens * d * 3 * d  # qkv
            + tokens * tokens * d  # q k^T over all heads
            + tokens * tokens * d  # A v
            + tokens * d * d  # attention output projection
            + mlp_matrices * tokens * d * config.mlp_hidden_size  # MLP
            + (macs_cross_attention(tokens) if text_dim else 0)
        )

    route_start, route_end = config.route_blocks
    routed = route_end - route_start if training and config.route_ratio > 0 else 0
    kept = t - int(t * config.route_ratio)
    macs = (
        t * p2 * config.in_channels * d  # patch embedding
        + (TIMESTEP_FREQUENCY_DIM * d + d * d) * (2 if config.interval_embed else 1)  # timestep (and interval) MLP
        + (config.depth - routed) * macs_per_block(t)
        + routed * macs_per_block(kept)
        + d * 2 * d  # final adaLN
        + t * d * p2 * config.out_channels  # final linear
        + ((text + 1) * (text_dim * d + d * d) if text_dim else 0)  # text token and pooled-vector embedders
    )
    return 2 * macs
