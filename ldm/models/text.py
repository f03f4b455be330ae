"""Byte-level prompts and a small Transformer text encoder, trained jointly with the DiT from scratch.

The original latent diffusion text-to-image model (Rombach et al. 2022) trained its BERT-like
encoder jointly with the denoiser rather than using a frozen language model; this is that
encoder at the sizes this project trains. Prompts become UTF-8 bytes between a BOS and an EOS
id (`ByteTokenizer`: no vocabulary file, every string encodes), padded to a fixed length with
a mask of the real tokens. The encoder (`TextEncoder`) returns one feature per token, for the
DiT's cross-attention, and their mean over the real tokens, for its adaLN conditioning.

A byte is not a word: a Transformer over bytes has to learn to spell before a prompt means anything,
from the diffusion loss alone. The "/4" presets put a convolution stem in front of it, as CANINE
(Clark et al. 2022) does: residual byte convolutions that see a word at once ("red", "sneaker",
even "red sneaker"), then a strided convolution that keeps one token per four bytes, so the
Transformer and the DiT's cross-attention work on a quarter of the tokens. Padding stays inert:
every convolution reads padded positions as zeros, as it reads the edge of an unpadded prompt.

The empty prompt "" encodes as BOS EOS and is the null condition of classifier-free guidance:
`drop_captions` replaces a fraction of training prompts with it, as label dropout does for classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# Ids 0-255 are the bytes themselves; the special ids follow them.
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes between BOS and EOS, padded with PAD to max_length; longer prompts lose their end."""

    max_length: int = 128  # ids per prompt, BOS and EOS included

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {self.max_length}")

    def truncate(self, prompt: str) -> bytes:
        """Return the UTF-8 bytes of prompt, cut to the whole characters that fit between BOS and EOS."""
        data = prompt.encode("utf-8")
        cut = self.max_length - 2
        if len(data) <= cut:
            return data
        # Back off to a character boundary: UTF-8 continuation bytes are 0b10xxxxxx.
        while cut > 0 and data[cut] & 0xC0 == 0x80:
            cut -= 1
        return data[:cut]

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ids (N, max_length) int64 and mask (N, max_length) bool, True at real tokens (BOS, bytes, EOS)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got one str; pass [prompt]")
        rows = []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"every prompt must be a str, got {type(prompt).__name__}")
            ids = [BOS_ID, *self.truncate(prompt), EOS_ID]
            rows.append(ids + [PAD_ID] * (self.max_length - len(ids)))
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)  # (N, L)
        return ids, ids != PAD_ID

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Return the prompt of each row of ids (N, L): the bytes between BOS and the first EOS, as UTF-8."""
        prompts = []
        for row in ids.tolist():
            body = row[1:] if row and row[0] == BOS_ID else row
            body = body[: body.index(EOS_ID)] if EOS_ID in body else body
            prompts.append(bytes(i for i in body if i < 256).decode("utf-8", errors="replace"))
        return prompts


def drop_captions(prompts: Sequence[str], prob: float, generator: torch.Generator | None = None) -> list[str]:
    """Return prompts with each replaced by the empty prompt "" with probability prob, drawn from generator.

    Caption dropout trains the unconditional model of classifier-free guidance (Ho & Salimans 2022), as
    label dropout does for classes; PixArt-alpha drops 10% of captions. One uniform draw per prompt.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"caption dropout probability must lie in [0, 1], got {prob}")
    drop = torch.rand(len(prompts), generator=generator) < prob  # (N,)
    return ["" if dropped else prompt for prompt, dropped in zip(prompts, drop.tolist())]


@dataclass
class TextEncoderConfig:
    """Architecture of the text encoder; the defaults are Text-S."""

    hidden_size: int = 256  # width D of the token features, the DiT's text_dim
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    max_length: int = 128  # ids per prompt (bytes + BOS + EOS); the learned positions cover this many
    # The convolution stem (CANINE-like): conv_depth residual byte convolutions of width conv_kernel, then a
    # convolution of stride downsample; 0 and 1 leave the Transformer on the bytes themselves.
    conv_depth: int = 0
    conv_kernel: int = 5
    downsample: int = 1

    def __post_init__(self) -> None:
        for name in ("hidden_size", "depth", "num_heads", "downsample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.conv_depth < 0:
            raise ValueError(f"conv_depth must be at least 0, got {self.conv_depth}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (centred on its byte), got {self.conv_kernel}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {self.max_length}")

    @classmethod
    def presets(cls) -> dict[str, TextEncoderConfig]:
        """The named size presets."""
        return TEXT_ENCODER_PRESETS

    @property
    def num_tokens(self) -> int:
        """Token features per prompt of max_length ids: one per downsample ids."""
        return -(-self.max_length // self.downsample)


class TextBlock(nn.Module):
    """Pre-norm Transformer encoder block: masked self-attention and a GELU MLP, each a residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Return the block applied to x (N, L, D); attn_mask (N, 1, 1, L) is True at the keys that may be attended."""
        n, length, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, length, 3, self.num_heads, d // self.num_heads)  # (N, L, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, L, d)
        # Padding keys get no weight; padded queries still see the real keys, so no row is all masked.
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, L, d)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, length, d))
        return x + self.mlp(self.norm2(x))


class ByteConv(nn.Module):
    """Pre-norm residual convolution over byte features: x + GELU(conv(LayerNorm(x))), padding read as zeros."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return the block applied to x (N, L, D); mask (N, L) bool is True at real tokens."""
        h = self.norm(x) * mask.unsqueeze(-1).to(x.dtype)  # (N, L, D), zero at padding
        return x + F.gelu(self.conv(h.transpose(1, 2)).transpose(1, 2))


class Downsample(nn.Module):
    """A strided convolution from L byte features to ceil(L / stride) tokens; a token is real if any of its bytes is."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, stride, stride=stride)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return tokens (N, ceil(L / stride), D) and their mask for x (N, L, D) and mask (N, L)."""
        pad = -x.shape[1] % self.stride
        h = self.norm(x) * mask.unsqueeze(-1).to(x.dtype)  # (N, L, D), zero at padding
        h = F.pad(h.transpose(1, 2), (0, pad))  # (N, D, L + pad): the tail reads as padding
        tokens = self.conv(h).transpose(1, 2)  # (N, L', D)
        mask = F.pad(mask, (0, pad)).view(mask.shape[0], -1, self.stride).any(-1)  # (N, L')
        return tokens, mask


class TextEncoder(nn.Module):
    """Byte ids (N, L) -> token features (N, L / downsample, D) and their mean over the real tokens (N, D)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.token_embed = nn.Embedding(VOCAB_SIZE, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_length, d))  # (1, L_max, D), learned as BERT's
        self.convs = nn.ModuleList(ByteConv(d, config.conv_kernel) for _ in range(config.conv_depth))
        self.downsample = Downsample(d, config.downsample) if config.downsample > 1 else None
        self.blocks = nn.ModuleList(TextBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d)
        self.initialize_weights()

    @property
    def tokenizer(self) -> ByteTokenizer:
        """The tokenizer whose ids this encoder takes, padding to the encoder's max_length."""
        return ByteTokenizer(self.config.max_length)

    def initialize_weights(self) -> None:
        """Initialise as BERT (Devlin et al. 2019): N(0, 0.02) linears and embeddings, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return token features (N, L', D), their mask (N, L') and pooled vector (N, D) of ids (N, L).

        mask (N, L) is True at real ids; L' = ceil(L / downsample) (L without a downsampling stem). Features at
        padding positions are computed but carry nothing: no real token attends to them, the pooled vector
        leaves them out, and the DiT's cross-attention masks them.
        """
        if ids.ndim != 2 or mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"expected ids (N, L) and a bool mask of the same shape, got {tuple(ids.shape)} and "
                f"{tuple(mask.shape)} {mask.dtype}"
            )
        if ids.shape[1] > self.config.max_length:
            raise ValueError(f"{ids.shape[1]} ids per prompt exceed the encoder's max_length {self.config.max_length}")
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]  # (N, L, D)
        for conv in self.convs:
            x = conv(x, mask)
        if self.downsample is not None:
            x, mask = self.downsample(x, mask)  # (N, L', D), (N, L')
        attn_mask = mask[:, None, None, :]  # (N, 1, 1, L), broadcast over heads and queries
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.norm(x)
        weights = mask.to(x.dtype).unsqueeze(-1)  # (N, L, 1)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)  # (N, D)
        return x, mask, pooled

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the DiT's text_tokens (N, L, D), text_mask (N, L) and text_pooled (N, D) for prompts.

        L is the longest prompt's length in ids, not max_length: the padding beyond it would change nothing
        (no real token attends to it, the DiT masks it) and would cost as much as real tokens.
        """
        ids, mask = self.tokenizer.encode(prompts)
        length = int(mask.sum(1).max()) if len(prompts) else 2
        ids, mask = (part[:, :length].to(self.pos_embed.device) for part in (ids, mask))
        return self(ids, mask)


# An English BPE token is about four bytes, so 128 ids hold a caption of ~30 BPE tokens.
TEXT_ENCODER_PRESETS: dict[str, TextEncoderConfig] = {
    "Text-T": TextEncoderConfig(hidden_size=32, depth=1, num_heads=2, max_length=32),  # tests and smoke runs
    # A fifth of Text-S's cost per token: beside a DiT of a few dozen tokens on a CPU, as on the scenes chain.
    "Text-XS": TextEncoderConfig(hidden_size=128, depth=2, num_heads=4, max_length=128),
    "Text-S": TextEncoderConfig(hidden_size=256, depth=4, num_heads=4, max_length=128),
    "Text-B": TextEncoderConfig(hidden_size=512, depth=8, num_heads=8, max_length=256),
    # Convolution stems, one token per four bytes (see the module docstring): about half Text-XS's cost in a
    # DiT-F/4 step on the scenes chain, since the DiT's cross-attention reads a quarter of the keys.
    "Text-T/4": TextEncoderConfig(hidden_size=32, depth=1, num_heads=2, max_length=32, conv_depth=1, downsample=4),
    "Text-XS/4": TextEncoderConfig(hidden_size=128, depth=2, num_heads=4, max_length=128, conv_depth=2, downsample=4),
}


def text_encoder_config(name: str, **overrides) -> TextEncoderConfig:
    """Return the TextEncoderConfig of preset `name` (a key of TEXT_ENCODER_PRESETS), fields replaced by overrides."""
    if name not in TEXT_ENCODER_PRESETS:
        raise KeyError(f"unknown text encoder preset {name!r}; choose one of {sorted(TEXT_ENCODER_PRESETS)}")
    valid = {f.name for f in fields(TextEncoderConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise TypeError(f"unknown TextEncoderConfig fields {sorted(unknown)}; valid fields are {sorted(valid)}")
    return replace(TEXT_ENCODER_PRESETS[name], **overrides)
