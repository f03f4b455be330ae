"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2).

During training, a few power-function EMA profiles of the weights are kept and snapshotted now and
then; after training, the EMA of any other length at a snapshot's step is reconstructed as the
least-squares combination of the snapshots. The equation numbers are the paper's (arXiv 2312.02696,
Appendix C), as NVlabs/edm2 `training/phema.py` cites them.

Time t counts optimiser steps: the t-th update averages the weights after t steps. (EDM2 counts
training images, t = steps * batch; the profiles and coefficients below do not change with the unit.)
A profile with exponent gamma averages the trajectory theta(tau), tau in (0, t], with the density

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)                               (Eq. 121)

and its relative standard deviation sigma_rel (the density's std divided by t) names its length.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ldm.artifacts import write_atomic

SIGMA_REL_MAX = 12**-0.5  # gamma = 0, the plain average of all of training (the uniform density's std)
SNAPSHOT_FORMAT = "ldm-posthoc-ema-1"
SNAPSHOT_FOLDER = "ema-snapshots"  # inside a training run folder
SNAPSHOT_NAME = re.compile(r"step(\d+)-sigma([0-9.e+-]+)\.safetensors")


def ema_decay_at(step: int, max_decay: float) -> float:
    """Return the EMA decay after `step` updates: (1 + step) / (10 + step), capped at `max_decay`.

    Without the warm-up, a short run's EMA stays close to the initial weights (for a DiT, an adaLN-Zero
    output layer of zeros, whose EMA model then under-predicts the noise and sampling diverges).
    """
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter (buffers are copied)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Return sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) of the profile of exponent gamma (Eq. 123)."""
    if not gamma > -1:
        raise ValueError(f"a power-function EMA needs gamma > -1, got {gamma!r}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Return the exponent gamma >= 0 of the profile of relative width sigma_rel (Eq. 126, Algorithm 2).

    Squaring Eq. 123 and clearing the denominator gives the cubic
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0, whose largest real root it is.
    """
    check_sigma_rel(sigma_rel)
    inverse_square = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inverse_square, 12.0 - inverse_square])
    return max(0.0, float(roots.real.max()))  # at 1/sqrt(12) the root 0 may come out as -1e-16


def check_sigma_rel(sigma_rel: float) -> None:
    """Raise ValueError unless 0 < sigma_rel <= 1/sqrt(12) (the widest profile, the plain average, has 0.2887)."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(
            f"an EMA length sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}] (EDM2 keeps 0.05 and 0.10), got {sigma_rel!r}"
        )


def power_ema_beta(gamma: float, step: int) -> float:
    """Return the decay of the step-th update, beta_t = (1 - 1/t)^(gamma + 1) (Eq. 127); beta_1 = 0.

    Unrolled, the profile after t updates gives step i's weights theta_i the share
    (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1): exactly p_t integrated over (i-1, i].
    """
    if step < 1:
        raise ValueError(f"power-function EMA updates count from step 1, got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(
    t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor, gamma_b: torch.Tensor
) -> torch.Tensor:
    """Return <p_a, p_b> = integral of p_a(tau) p_b(tau) d tau for profiles ending at t_a, t_b (Eq. 151, Algorithm 3).

    For t_a <= t_b it is (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_a / t_b)^gamma_b / t_b,
    and symmetrically. Arguments broadcast; float64.
    """
    t_a, gamma_a, t_b, gamma_b = torch.broadcast_tensors(
        *(torch.as_tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    )
    shorter, longer = torch.minimum(t_a, t_b), torch.maximum(t_a, t_b)
    gamma_longer = torch.where(t_a < t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (shorter / longer) ** gamma_longer / longer


def posthoc_coefficients(
    steps: Sequence[int], gammas: Sequence[float], target_step: int, target_gammas: Sequence[float]
) -> torch.Tensor:
    """Return x (K, J): snapshot k's share in the reconstruction of target profile j at `target_step` (Algorithm 3).

    x minimises the L2 distance between sum_k x_kj p_k and the target profile p_j: the normal equations
    A x = B with A_kl = <p_k, p_l> (K, K) and B_kj = <p_k, p_j> (K, J). Each column is then scaled to sum
    to 1, so that constant weights are reproduced exactly (as EDM2 does).
    """
    steps = torch.as_tensor(steps, dtype=torch.float64)  # (K,)
    gammas = torch.as_tensor(gammas, dtype=torch.float64)  # (K,)
    target_gammas = torch.as_tensor(target_gammas, dtype=torch.float64)  # (J,)
    gram = profile_inner_products(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])  # (K, K)
    cross = profile_inner_products(
        steps[:, None], gammas[:, None], float(target_step), target_gammas[None, :]
    )  # (K, J)
    x = torch.linalg.solve(gram, cross)
    return x / x.sum(0, keepdim=True)


@torch.no_grad()
def combine_snapshots(
    snapshots: Iterable[dict[str, torch.Tensor]], coefficients: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    """Return, for each column j of coefficients (K, J), sum_k coefficients[k, j] * snapshot_k.

    Each snapshot is read once. Sums run in float32 (float64 stays float64) and are returned in the
    snapshots' dtype.
    """
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in range(coefficients.shape[1])]
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for k, snapshot in enumerate(snapshots):
        if k >= len(coefficients):
            raise ValueError(f"more snapshots than the {len(coefficients)} rows of coefficients")
        if k and snapshot.keys() != dtypes.keys():
            raise ValueError(
                f"snapshot {k} holds other tensors than the first: {sorted(snapshot.keys() ^ dtypes.keys())[:5]}"
            )
        for name, tensor in snapshot.items():
            if not tensor.is_floating_point():
                raise ValueError(
                    f"snapshot tensor {name} is {tensor.dtype}; only floating-point weights can be averaged"
                )
            dtypes.setdefault(name, tensor.dtype)
            accumulate = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
            for j, output in enumerate(outputs):
                share = float(coefficients[k, j])
                if k == 0:
                    output[name] = accumulate * share
                else:
                    output[name].add_(accumulate, alpha=share)
        count = k + 1
    if count != len(coefficients):
        raise ValueError(f"{count} snapshots for {len(coefficients)} rows of coefficients")
    return [{name: tensor.to(dtypes[name]) for name, tensor in output.items()} for output in outputs]


class PowerFunctionEMA(torch.nn.Module):
    """Power-function EMA profiles of a model's parameters, one per sigma_rel, updated after every optimiser step.

    The profiles are submodules (copies of the model), so they are part of the owner's state dict and
    of its checkpoints. Buffers are not averaged (EDM2 copies them from the network): snapshots hold
    the parameters alone.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float]):
        super().__init__()
        if not sigma_rels:
            raise ValueError("a PowerFunctionEMA needs at least one sigma_rel")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.profiles = torch.nn.ModuleList(copy.deepcopy(model).requires_grad_(False).eval() for _ in self.sigma_rels)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """profile <- beta_t profile + (1 - beta_t) model for each profile, where `step` = t counts updates from 1."""
        source = [p.detach() for p in model.parameters()]
        for gamma, profile in zip(self.gammas, self.profiles):
            torch._foreach_lerp_(list(profile.parameters()), source, 1.0 - power_ema_beta(gamma, step))

    def profile_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Return the parameters of profile `index` by name (views, not copies)."""
        return {name: p.detach() for name, p in self.profiles[index].named_parameters()}

    def write_snapshots(self, folder: Path, step: int, metadata: dict[str, str] | None = None) -> list[Path]:
        """Write every profile's parameters at `step` into `folder` (one file per profile) and return the paths."""
        return [
            write_snapshot(folder, step, sigma_rel, self.profile_weights(i), metadata)
            for i, sigma_rel in enumerate(self.sigma_rels)
        ]


# ---- snapshots on disk ------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One stored snapshot: the parameters of the profile sigma_rel after `step` optimiser steps."""

    path: Path
    step: int
    sigma_rel: float
    metadata: dict[str, str]

    @property
    def gamma(self) -> float:
        return sigma_rel_to_gamma(self.sigma_rel)

    def load(self) -> dict[str, torch.Tensor]:
        """Return the snapshot's tensors (safetensors, no pickle) on the CPU."""
        return load_file(self.path)


def snapshot_name(step: int, sigma_rel: float) -> str:
    """`step000001000-sigma0.05.safetensors`: the file of one profile's snapshot."""
    return f"step{step:09d}-sigma{sigma_rel:g}.safetensors"


def write_snapshot(
    folder: Path, step: int, sigma_rel: float, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write one profile's tensors at `step` atomically (safetensors with its step and sigma_rel); return the path."""
    header = {**(metadata or {}), "format": SNAPSHOT_FORMAT, "step": str(step), "sigma_rel": repr(float(sigma_rel))}
    data = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, metadata=header)
    path = Path(folder) / snapshot_name(step, sigma_rel)
    write_atomic(path, data)
    return path


def list_snapshots(folder: Path) -> list[Snapshot]:
    """Return the snapshots in `folder`, ordered by (step, sigma_rel), both read from each file's header."""
    found = []
    for path in sorted(Path(folder).glob("step*-sigma*.safetensors")):
        if not SNAPSHOT_NAME.fullmatch(path.name):
            continue
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
        if header.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a post-hoc EMA snapshot ({SNAPSHOT_FORMAT}); move it out of {folder}")
        found.append(Snapshot(path, int(header["step"]), float(header["sigma_rel"]), header))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def remove_snapshots_after(folder: Path, step: int) -> list[Path]:
    """Delete the snapshots of steps after `step` (left by a run that crashed past its last checkpoint); return them."""
    stale = [s.path for s in list_snapshots(folder) if s.step > step] if Path(folder).is_dir() else []
    for path in stale:
        path.unlink()
    return stale


def reconstruct(
    snapshots: Sequence[Snapshot], sigma_rels: Sequence[float], step: int | None = None
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Return the weights of the power-function EMA of each sigma_rel after `step` steps, and the coefficients (K, J).

    `step` (default: the latest snapshot's) must be a snapshot's step: the snapshots taken up to it
    (K of them) are combined with `posthoc_coefficients`, reading each file once.
    """
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots to reconstruct from")
    step = max(s.step for s in snapshots) if step is None else step
    if not any(s.step == step for s in snapshots):
        steps = sorted({s.step for s in snapshots})
        raise ValueError(
            f"no snapshot at step {step}: the EMA can only be reconstructed at a snapshot's step "
            f"({steps[0]} ... {steps[-1]})"
        )
    used = [s for s in snapshots if 0 < s.step <= step]
    if len({(s.step, s.sigma_rel) for s in used}) != len(used):
        raise ValueError("two snapshots share a step and sigma_rel; keep one of each")
    for sigma_rel in sigma_rels:
        check_sigma_rel(sigma_rel)
    coefficients = posthoc_coefficients(
        [s.step for s in used], [s.gamma for s in used], step, [sigma_rel_to_gamma(s) for s in sigma_rels]
    )
    return combine_snapshots((s.load() for s in used), coefficients), coefficients
