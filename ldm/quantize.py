"""Reduced-precision DiT inference: int8 linear layers on the CPU, bf16 autocast anywhere.

int8 (W8A8 dynamic, as PTQ4DiT and Q-DiT measure DiTs): each quantised `nn.Linear` keeps its weight
as int8 with one float32 scale per output channel (symmetric, max-abs) and multiplies through
fbgemm's dynamic-quantised linear kernel, which quantises the input per tensor at every call
(7-bit unsigned, `reduce_range`: x86 without VNNI accumulates pairs in int16, which 8 bits would
overflow), accumulates in int32 and rescales to float32. The packed weight is the only copy held,
so the memory saved is real; `state_dict` unpacks it into three plain tensors (int8 weight, scales,
bias) that safetensors stores without pickle.

Which layers: every linear map inside the transformer blocks (attention, MLP, adaLN modulation) by
default; `keep` names those that stay float32 (fnmatch patterns over module names). The patch,
timestep and label embeddings and the final layer always stay float32: together under 4% of a
DiT-F/2's weights, and the final layer maps straight to the prediction (PTQ4DiT, Q-DiT report the
output side as the most sensitive).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn

from ldm.models.dit import DiT

PRECISIONS = ("float32", "bf16", "int8")
INT8_SCOPE = "blocks.*"  # the modules int8 may replace; embeddings and final layer are outside


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (int8 (out, in), float32 scales (out,)), weight ~ int8 * scale[:, None], symmetric per output channel."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # a zero row keeps a finite scale
    return torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 per output channel, through fbgemm's dynamic int8 GEMM (CPU only)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._pack(
            torch.zeros(out_features, in_features, dtype=torch.int8),
            torch.ones(out_features),
            torch.zeros(out_features),
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(linear.out_features)
        module._pack(*quantize_weight(linear.weight), bias)
        return module

    def _pack(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> None:
        with warnings.catch_warnings():  # torch marks quantised tensors deprecated; fbgemm's kernels still take them
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch._make_per_channel_quantized_tensor(
                weight_int8.cpu(), scale.cpu().double(), torch.zeros(len(scale), dtype=torch.long), 0
            )
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias.cpu().float().contiguous())

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int8 weight (out, in), float32 scales (out,), float32 bias (out,)): what the module holds, unpacked."""
        qweight, bias = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.int_repr(), qweight.q_per_channel_scales().float(), bias

    def dequantized_weight(self) -> torch.Tensor:
        weight, scale, _ = self.unpacked()
        return weight.float() * scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(
                f"int8 inference runs on the CPU (fbgemm), got input on {x.device}; "
                f"use precision='bf16' on {x.device.type}"
            )
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed, True)
        return y.reshape(*shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, tensor in zip(("weight_int8", "weight_scale", "bias"), self.unpacked()):
            destination[prefix + name] = tensor

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        names = [prefix + name for name in ("weight_int8", "weight_scale", "bias")]
        missing = [name for name in names if name not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        weight, scale, bias = (state_dict[name] for name in names)
        expected = ((self.out_features, self.in_features), (self.out_features,), (self.out_features,))
        if (
            weight.dtype != torch.int8
            or tuple(weight.shape) != expected[0]
            or tuple(scale.shape) != expected[1]
            or tuple(bias.shape) != expected[2]
        ):
            error_msgs.append(
                f"{prefix}: expected int8 weight {expected[0]}, scales and bias {expected[1]}, got "
                f"{weight.dtype} {tuple(weight.shape)}, {tuple(scale.shape)}, {tuple(bias.shape)}"
            )
            return
        self._pack(weight, scale.float(), bias.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, dynamic int8 input"


def int8_layer_names(model: nn.Module, keep: Iterable[str] = ()) -> list[str]:
    """Names of the nn.Linear modules `quantize_int8` replaces: those inside the blocks, less any matching `keep`."""
    keep = tuple(keep)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and fnmatch.fnmatch(name, INT8_SCOPE)
        and not any(fnmatch.fnmatch(name, pattern) for pattern in keep)
    ]


def quantize_int8(model: DiT, keep: Iterable[str] = ()) -> DiT:
    """Replace, in place, the DiT's block linears (less `keep`) by Int8Linear; return the model in eval mode."""
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"  # fbgemm on x86; the default elsewhere
    for name in int8_layer_names(model, keep):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Int8Linear.from_linear(getattr(parent, child)))
    return model.eval().requires_grad_(False)


def int8_skeleton(model: DiT, layer_names: Iterable[str]) -> DiT:
    """Replace the named linears by empty Int8Linear modules, ready for `load_state_dict` of a stored int8 model."""
    for name in layer_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not a linear layer, in this DiT")
        setattr(parent, child, Int8Linear(linear.in_features, linear.out_features))
    return model.eval().requires_grad_(False)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a model holds: its state dict (int8 layers as int8 weight, scales and bias)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
