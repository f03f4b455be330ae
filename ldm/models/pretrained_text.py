"""Frozen pretrained text encoders (CLIP's text model, T5's encoder) with TextEncoder's `encode` contract.

Stable Diffusion conditions on CLIP ViT-L/14's text model and PixArt-alpha (Chen et al. 2023) on a T5-XXL
encoder, both frozen: the DiT learns to read features it cannot change. `load_pretrained_text_encoder` reads
one from a local folder laid out as Hugging Face writes it (`save_pretrained`, or `huggingface-cli download
REPO --local-dir DIR`): config.json, the weights as safetensors and the tokenizer's files side by side.
Nothing is downloaded and no pickle is read. A diffusers pipeline keeps text_encoder/ and tokenizer/ apart;
copy both into one folder.

A DiT trained on one encoder's features is noise on another's, so each encoder carries a `fingerprint` (a
sha256 over its weight and tokenizer files) that a model records with `text_encoder_identity` and checks
with `check_same_encoder` before it is used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

# config.json's model_type for each kind: "clip" is a whole CLIP model, whose text tower is read alone.
MODEL_TYPES: dict[str, tuple[str, ...]] = {"clip": ("clip", "clip_text_model"), "t5": ("t5",)}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
)
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "spiece.model")  # one of them makes a tokenizer
LONGEST_SENSIBLE_LENGTH = 100_000  # a tokenizer without a length limit reports int(1e30)
INSTALL_HINT = "pip install -e '.[text]' in the ldm checkout (transformers and sentencepiece)"
DOWNLOAD_HINT = (
    "download it with `huggingface-cli download REPO --local-dir DIR` on a machine with internet "
    "(REPO e.g. openai/clip-vit-large-patch14 or google/t5-v1_1-xl) and copy DIR here"
)


class TextEncoderError(ValueError):
    """A pretrained text encoder that cannot be loaded as it is, or is not the one a model was trained with."""


class PretrainedTextEncoder(nn.Module):
    """A frozen CLIP text model or T5 encoder with its tokenizer: prompts -> the DiT's text conditioning."""

    def __init__(self, model: nn.Module, tokenizer: Any, kind: str, max_length: int, fingerprint: str):
        super().__init__()
        self.model = model.float().requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.kind = kind
        self.model_type = model.config.model_type
        self.hidden_size = model.config.hidden_size
        self.max_length = max_length
        self.fingerprint = fingerprint

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        """Stay in eval mode whatever a parent asks: the encoder is frozen, and T5's dropout would change it."""
        return super().train(False)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ids (N, max_length) int64 and mask (N, max_length) bool, True at real tokens; long prompts are cut."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got one str; pass [prompt]")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"every prompt must be a str, got {type(prompt).__name__}")
        batch = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return batch["input_ids"].long(), batch["attention_mask"].bool()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return token features (N, L, D) and pooled vector (N, D) of ids (N, L); mask (N, L) marks real tokens."""
        output = self.model(input_ids=ids, attention_mask=mask.long())
        tokens = output.last_hidden_state  # (N, L, D), after the final layer norm
        if self.kind == "clip":
            return tokens, output.pooler_output  # (N, D): the EOS token's feature, as CLIP's own pooling
        # T5 has no pooled output; PixArt-alpha feeds none, so the mean over real tokens stands in, as TextEncoder's.
        weights = mask.to(tokens.dtype).unsqueeze(-1)  # (N, L, 1)
        return tokens, (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the DiT's text_tokens (N, L, D), text_mask (N, L) and text_pooled (N, D) for prompts."""
        device = next(self.model.parameters()).device
        ids, mask = (part.to(device) for part in self.tokenize(prompts))
        tokens, pooled = self(ids, mask)
        return tokens, mask, pooled


def encoder_fingerprint(folder: str | Path) -> str:
    """Return the sha256 of the lines `name NUL sha256(file)` of the folder's weight and tokenizer files, by name."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and _is_fingerprinted(p.name))
    combined = hashlib.sha256()
    for name in names:
        digest = hashlib.sha256()
        with open(folder / name, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
        combined.update(f"{name}\0{digest.hexdigest()}\n".encode())
    return combined.hexdigest()


def _is_fingerprinted(name: str) -> bool:
    return name.endswith(".safetensors") or name in TOKENIZER_FILES


def _import_transformers():
    if importlib.util.find_spec("transformers") is None:
        raise TextEncoderError(f"pretrained text encoders need the transformers package: {INSTALL_HINT}")
    import transformers

    return transformers


def _read_model_type(folder: Path) -> str:
    if not folder.is_dir():
        raise TextEncoderError(f"text encoder folder {folder} does not exist: {DOWNLOAD_HINT}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise TextEncoderError(f"text encoder folder {folder} has no config.json: {DOWNLOAD_HINT}")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise TextEncoderError(f"{config_path} is not a JSON object ({err}): {DOWNLOAD_HINT}") from None
    supported = [t for types in MODEL_TYPES.values() for t in types]
    if model_type not in supported:
        raise TextEncoderError(
            f"{config_path} has model_type {model_type!r}; supported text encoders are {supported} "
            "(CLIP's text model or T5's encoder)"
        )
    return model_type


def _check_files(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")):
            raise TextEncoderError(
                f"text encoder folder {folder} holds its weights only as pickle .bin files, which this project "
                "does not load; put model.safetensors there (the model's repository usually has one, or convert "
                "the .bin with save_pretrained(DIR, safe_serialization=True) on a machine you trust)"
            )
        raise TextEncoderError(f"text encoder folder {folder} has no model.safetensors: {DOWNLOAD_HINT}")
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        raise TextEncoderError(
            f"text encoder folder {folder} has no tokenizer file (one of {', '.join(VOCABULARY_FILES)}): copy the "
            "tokenizer files of the same model there (a diffusers pipeline keeps them in tokenizer/)"
        )
    needs_sentencepiece = (folder / "spiece.model").is_file() and not (folder / "tokenizer.json").is_file()
    if needs_sentencepiece and importlib.util.find_spec("sentencepiece") is None:
        raise TextEncoderError(
            f"the tokenizer in {folder} is a spiece.model, which needs sentencepiece: {INSTALL_HINT}"
        )


def _resolve_max_length(max_length: int | None, tokenizer: Any, config: Any, kind: str, folder: Path) -> int:
    limit = config.max_position_embeddings if kind == "clip" else None  # T5's relative positions have no limit
    if max_length is None:
        if tokenizer.model_max_length < LONGEST_SENSIBLE_LENGTH:
            max_length = tokenizer.model_max_length
        elif limit is not None:
            max_length = limit
        else:
            raise TextEncoderError(
                f"the tokenizer in {folder} sets no length limit: pass max_length (PixArt-alpha uses 120 T5 tokens)"
            )
    if max_length < 2:
        raise TextEncoderError(f"max_length must be at least 2 (a start or end token and one more), got {max_length}")
    if limit is not None and max_length > limit:
        raise TextEncoderError(
            f"max_length {max_length} exceeds the {limit} positions of the CLIP text model in {folder}"
        )
    return max_length


def load_pretrained_text_encoder(
    path: str | Path,
    kind: Literal["auto", "clip", "t5"] = "auto",
    max_length: int | None = None,
    device: torch.device | str = "cpu",
) -> PretrainedTextEncoder:
    """Return the frozen float32 text encoder and tokenizer in folder `path`, on `device`.

    kind "auto" takes it from config.json's model_type; max_length None takes the tokenizer's limit.
    """
    if kind not in ("auto", *MODEL_TYPES):
        raise TextEncoderError(f"unknown text encoder kind {kind!r}; choose auto, {', '.join(MODEL_TYPES)}")
    folder = Path(path).expanduser()
    model_type = _read_model_type(folder)
    found = next(name for name, types in MODEL_TYPES.items() if model_type in types)
    if kind not in ("auto", found):
        raise TextEncoderError(
            f"{folder} holds a {found} encoder (model_type {model_type!r}), not the {kind} asked for"
        )
    _check_files(folder)
    transformers = _import_transformers()
    model_class = transformers.CLIPTextModel if found == "clip" else transformers.T5EncoderModel
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report would list a whole CLIP's unused vision weights
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model, info = model_class.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, ImportError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TextEncoderError(f"could not load the text encoder in {folder}: {first_line}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        # transformers fills missing weights with random ones and goes on; an encoder must be whole.
        mismatched = (key[0] if isinstance(key, tuple) else key for key in info["mismatched_keys"])
        wrong = sorted(info["missing_keys"]) + sorted(mismatched)
        raise TextEncoderError(
            f"the weights in {folder} do not fit its config.json ({len(wrong)} tensors missing or of another shape, "
            f"e.g. {wrong[0]}): {DOWNLOAD_HINT}"
        )
    max_length = _resolve_max_length(max_length, tokenizer, model.config, found, folder)
    encoder = PretrainedTextEncoder(model, tokenizer, found, max_length, encoder_fingerprint(folder))
    return encoder.to(device)


def text_encoder_identity(encoder: PretrainedTextEncoder) -> dict[str, Any]:
    """Return what identifies the encoder a model is trained with, for its config and manifest."""
    return {
        "kind": encoder.kind,
        "model_type": encoder.model_type,
        "hidden_size": encoder.hidden_size,
        "max_length": encoder.max_length,
        "fingerprint": encoder.fingerprint,
    }


def check_same_encoder(recorded: dict[str, Any], encoder: PretrainedTextEncoder) -> None:
    """Raise TextEncoderError unless encoder is the one whose identity a model recorded."""
    loaded = text_encoder_identity(encoder)
    if recorded.get("fingerprint") != loaded["fingerprint"]:
        raise TextEncoderError(
            f"the model was trained with text encoder {recorded.get('fingerprint')} "
            f"({recorded.get('model_type')}, hidden size {recorded.get('hidden_size')}) but the loaded one is "
            f"{loaded['fingerprint']} ({loaded['model_type']}, hidden size {loaded['hidden_size']}): "
            "load the folder the model was trained with"
        )
    if recorded.get("max_length") != loaded["max_length"]:
        raise TextEncoderError(
            f"the model was trained with text encoder prompts of {recorded.get('max_length')} tokens but the encoder "
            f"was loaded with max_length {loaded['max_length']}: load it with max_length={recorded.get('max_length')}"
        )
