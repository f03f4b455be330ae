"""LPIPS perceptual distance (Zhang et al. 2018) through the `lpips` package, loaded offline.

LPIPS has two sets of weights:

- the linear heads calibrated on human judgements, shipped inside the `lpips` package
  (`lpips/weights/v0.1/<net>.pth`), so they are always on disk;
- the ImageNet backbone (VGG16, AlexNet or SqueezeNet 1.1) from torchvision, which the package
  downloads at construction time. That download is what breaks offline runs.

`build_lpips` therefore never lets the package download anything: it constructs the network with a
random backbone (`pnet_rand=True`) and untrained heads, loads the heads from the package itself,
and loads the backbone from a torchvision file that must already be on disk (the torch hub cache,
where torchvision itself would have put it, or `weights_path`). A missing file is an error that
says which file, where to put it, where it comes from, and what the alternatives are. With
`backbone: random` the backbone stays random (seeded): a usable training signal on an offline
machine, but not the LPIPS metric, and `describe()` / `is_standard` say so.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import lpips
import torch
from torch import Tensor, nn
from torchvision import models as tv_models

from ldm.artifacts import sha256_file


@dataclass
class PerceptualConfig:
    """Which perceptual term to build: LPIPS or, for sound, the STFT loss.

    For LPIPS, also its network and where its backbone weights come from.
    """

    # lpips: images; stft: 1-D signals, the multi-resolution STFT loss (Yamamoto et al. 2020), which needs no weights.
    kind: str = "lpips"
    net: str = "vgg"  # vgg | alex | squeeze (LDM and taming use vgg)
    backbone: str = "pretrained"  # pretrained: torchvision ImageNet weights | random: seeded random init
    weights_path: str | None = None  # torchvision backbone file; None: look in the torch hub cache
    download: bool = False  # let torch.hub fetch a missing backbone file (needs internet)
    weight: float = 1.0  # multiplier of LPIPS in the autoencoder loss; 0 skips building it
    random_seed: int = 0  # seed of the random backbone, so runs with `backbone: random` are repeatable

    def __post_init__(self) -> None:
        if self.kind not in ("lpips", "stft"):
            raise ValueError(f"perceptual.kind must be 'lpips' (images) or 'stft' (sound), got {self.kind!r}")
        if self.net not in BACKBONES:
            raise ValueError(f"perceptual.net must be one of {sorted(BACKBONES)}, got {self.net!r}")
        if self.backbone not in ("pretrained", "random"):
            raise ValueError(f"perceptual.backbone must be 'pretrained' or 'random', got {self.backbone!r}")
        if self.weight < 0:
            raise ValueError(f"perceptual.weight must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class Backbone:
    """The torchvision network behind one LPIPS variant."""

    torchvision_name: str  # constructor in torchvision.models
    weights: tv_models.WeightsEnum  # the ImageNet weights lpips' `pretrained=True` would download
    min_size: int  # smallest H = W the feature pyramid survives (below it a pooling layer gets 0x0)

    @property
    def url(self) -> str:
        """Where torchvision downloads the weights from."""
        return self.weights.url

    @property
    def filename(self) -> str:
        """The file name torchvision gives the weights in its cache, e.g. vgg16-397923af.pth."""
        return os.path.basename(self.url)

    @property
    def sha256_prefix(self) -> str:
        """The leading hex digits of the file's sha256, which torchvision puts in the file name."""
        match = re.search(r"-([a-f0-9]+)\.", self.filename)
        assert match is not None, self.filename
        return match.group(1)


# Minimum sizes from the layer arithmetic: VGG halves 4 times before relu5_3 (16); AlexNet's
# stride-4 11x11 conv and two 3x3/2 max-pools need 31; SqueezeNet's three ceil-mode pools need 17.
BACKBONES: dict[str, Backbone] = {
    "vgg": Backbone("vgg16", tv_models.VGG16_Weights.IMAGENET1K_V1, min_size=16),
    "alex": Backbone("alexnet", tv_models.AlexNet_Weights.IMAGENET1K_V1, min_size=31),
    "squeeze": Backbone("squeezenet1_1", tv_models.SqueezeNet1_1_Weights.IMAGENET1K_V1, min_size=17),
}


class MissingWeightsError(FileNotFoundError):
    """A weights file that the model needs is not on disk and may not be downloaded."""


def hub_checkpoint_dir() -> Path:
    """The folder torchvision downloads weights into: `torch.hub.get_dir()/checkpoints`."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def lpips_heads_path(net: str) -> Path:
    """The linear-head weights the `lpips` package ships for `net` (version 0.1)."""
    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


def _missing_backbone_message(config: PerceptualConfig, backbone: Backbone, looked_at: Path) -> str:
    hub_dir = hub_checkpoint_dir()
    return (
        f"LPIPS-{config.net} needs torchvision's ImageNet {backbone.torchvision_name} weights, file "
        f"'{backbone.filename}', and it is not at {looked_at}.\n"
        f"Fix it in one of these ways:\n"
        f"  - download {backbone.url}\n"
        f"    into {hub_dir}/ (torchvision's cache; TORCH_HOME moves it), or anywhere and set\n"
        f"    perceptual.weights_path to the file;\n"
        f"  - set perceptual.download: true on a machine with internet access;\n"
        f"  - set perceptual.backbone: random to train with a random backbone (not the standard\n"
        f"    LPIPS: its numbers are not comparable with published LPIPS values)."
    )


def resolve_backbone_file(config: PerceptualConfig) -> Path:
    """Path of the torchvision backbone file for `config`, downloading it only if `download` is set."""
    backbone = BACKBONES[config.net]
    path = Path(config.weights_path).expanduser() if config.weights_path else hub_checkpoint_dir() / backbone.filename
    if path.is_file():
        return path
    if config.download and config.weights_path is None:
        # torch.hub writes to the same cache path and checks the sha256 prefix in the file name.
        try:
            torch.hub.load_state_dict_from_url(backbone.url, map_location="cpu", check_hash=True, weights_only=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; a hash mismatch a RuntimeError
            raise MissingWeightsError(
                f"downloading {backbone.url} failed ({error}).\n" + _missing_backbone_message(config, backbone, path)
            ) from error
        return path
    raise MissingWeightsError(_missing_backbone_message(config, backbone, path))


def backbone_state_dict_for_lpips(torchvision_state: dict[str, Tensor], net: nn.Module) -> dict[str, Tensor]:
    """Rename torchvision's `features.<i>.*` keys to the lpips backbone's `slice<k>.<i>.*` keys.

    lpips splits torchvision's `features` Sequential into slices that keep each layer's index as its
    name (`slice2` holds `features[4..8]` of VGG16 as children "4".."8"), so the index alone says
    which slice a key goes to. Keys outside `features` (the ImageNet classifier) are not used by LPIPS.
    """
    slice_of_index = {
        int(child_name): slice_name
        for slice_name, slice_module in net.named_children()
        for child_name, _ in slice_module.named_children()
    }
    renamed: dict[str, Tensor] = {}
    for key, tensor in torchvision_state.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        index = int(parts[1])
        if index in slice_of_index:
            renamed[".".join([slice_of_index[index], *parts[1:]])] = tensor
    return renamed


class PerceptualLoss(nn.Module):
    """LPIPS distance per sample between two image batches in [-1, 1]; frozen, always in eval mode."""

    def __init__(self, config: PerceptualConfig, model: lpips.LPIPS, backbone_source: Path | None) -> None:
        super().__init__()
        self.config = config
        self.lpips = model
        self.backbone_source = backbone_source  # None for a random backbone
        self.backbone_verified = False
        if backbone_source is not None:
            self.backbone_verified = sha256_file(backbone_source).startswith(BACKBONES[config.net].sha256_prefix)
            if not self.backbone_verified:
                warnings.warn(
                    f"{backbone_source} is not torchvision's {BACKBONES[config.net].filename} (sha256 differs): "
                    "LPIPS values from it are not the standard metric.",
                    stacklevel=3,
                )
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.train(False)

    @property
    def is_standard(self) -> bool:
        """True only for the published LPIPS: package heads on torchvision's exact ImageNet backbone."""
        return self.backbone_verified

    def describe(self) -> str:
        """A label for logs and reports that says whether these are standard LPIPS numbers."""
        name = f"LPIPS-{self.config.net}"
        if self.backbone_source is None:
            return (
                f"{name} with a RANDOM backbone (seed {self.config.random_seed}; "
                "not the standard LPIPS, numbers not comparable)"
            )
        if self.backbone_verified:
            return f"{name} (pretrained torchvision backbone {self.backbone_source.name})"
        return (
            f"{name} with backbone weights from {self.backbone_source} that are not torchvision's "
            f"{BACKBONES[self.config.net].filename} (not the standard LPIPS, numbers not comparable)"
        )

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Stay in eval mode whatever a parent module asks.

        The lpips heads contain Dropout; a LightningModule's `.train()` would otherwise switch it on
        and make the loss noisy (taming-transformers' LPIPS loss has this problem).
        """
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS(x, y) for x, y of shape (N, C, H, W) with C in {1, 3}, values in [-1, 1]; returns (N,)."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes (N, 1 or 3, H, W) images, got {tuple(x.shape)}")
        min_size = BACKBONES[self.config.net].min_size
        if min(x.shape[-2:]) < min_size:
            raise ValueError(
                f"LPIPS-{self.config.net} needs images of at least {min_size}x{min_size}, got {tuple(x.shape)}"
            )
        if x.shape[1] == 1:  # grayscale: the ImageNet backbone expects RGB, so use the same value thrice
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.lpips(x, y).flatten()  # (N, 1, 1, 1) -> (N,)


def _construct_lpips(net: str) -> lpips.LPIPS:
    """lpips.LPIPS with a random backbone and untrained heads: a constructor that never downloads."""
    with warnings.catch_warnings():
        # lpips calls torchvision with the deprecated `pretrained=` argument; not ours to fix.
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        return lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)


def _load_heads(model: lpips.LPIPS, net: str) -> None:
    path = lpips_heads_path(net)
    if not path.is_file():
        raise MissingWeightsError(f"the lpips package's linear-head weights are missing at {path}; reinstall lpips")
    heads = torch.load(path, map_location="cpu", weights_only=True)
    expected = {key for key in model.state_dict() if re.fullmatch(r"lin\d+\..*", key)}
    if set(heads) != expected:
        raise RuntimeError(f"{path} holds keys {sorted(heads)}, expected {sorted(expected)}")
    model.load_state_dict(heads, strict=False)  # strict=False: the backbone is loaded separately


def _load_backbone(model: lpips.LPIPS, path: Path, net: str) -> None:
    torchvision_state = torch.load(path, map_location="cpu", weights_only=True)
    state = backbone_state_dict_for_lpips(torchvision_state, model.net)
    try:
        model.net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"{path} does not fit the LPIPS-{net} backbone (torchvision {BACKBONES[net].torchvision_name}): {error}"
        ) from error


def build_lpips(config: PerceptualConfig | None = None) -> PerceptualLoss:
    """A frozen LPIPS module per `config`; raises MissingWeightsError if a pretrained backbone is not on disk."""
    config = config or PerceptualConfig()
    # Find the file first, so a missing one fails before the (seconds-long) construction.
    source = resolve_backbone_file(config) if config.backbone == "pretrained" else None
    # The random backbone gets its own seed; forking the RNG keeps the caller's random stream as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.random_seed)
        model = _construct_lpips(config.net)
    _load_heads(model, config.net)
    if source is not None:
        _load_backbone(model, source, config.net)
    return PerceptualLoss(config, model, source)
