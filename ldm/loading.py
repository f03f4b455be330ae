"""Build models from stored artifacts (the only way one stage uses another's result)."""

from __future__ import annotations

import torch

from ldm.artifacts import Artifact, ArtifactError, ArtifactStore
from ldm.config import from_dict
from ldm.diffusion.schedules import DiffusionConfig
from ldm.metrics import ClassifierFeatures, InceptionFeatures, inception_available
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, encoder_fingerprint
from ldm.models.classifier import Classifier, ClassifierConfig
from ldm.models.dit import DiT, DiTConfig
from ldm.models.parser import SceneParser, SceneParserConfig
from ldm.quantize import check_precision, int8_skeleton, quantize_int8

DIT_WEIGHT_FILES = {"ema": "weights.safetensors", "raw": "raw.safetensors"}  # a diffusion artifact's two weight sets


def load_autoencoder(artifact: Artifact, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Return the autoencoder of an `autoencoder` artifact, in eval mode."""
    config = from_dict(AutoencoderConfig, artifact.config()["model"], "model")
    model = AutoencoderKL(config)
    model.load_state_dict(artifact.load_tensors(device="cpu"))
    return model.to(device).eval()


def load_classifier(artifact: Artifact, device: str | torch.device = "cpu") -> Classifier:
    """Return the classifier of a `classifier` artifact, in eval mode."""
    config = from_dict(ClassifierConfig, artifact.config()["model"], "model")
    model = Classifier(config)
    model.load_state_dict(artifact.load_tensors(device="cpu"))
    return model.to(device).eval()


def load_parser(artifact: Artifact, device: str | torch.device = "cpu") -> SceneParser:
    """Return the scene parser of a `parser` artifact, in eval mode."""
    model = SceneParser(from_dict(SceneParserConfig, artifact.config()["model"], "model"))
    model.load_state_dict(artifact.load_tensors(device="cpu"))
    return model.to(device).eval()


def dit_configs(artifact: Artifact) -> tuple[DiTConfig, DiffusionConfig]:
    """The DiT architecture and the diffusion settings a `diffusion` artifact was trained with."""
    config = artifact.config()
    # A text DiT stored before model.text_context_norm existed projects its prompts without that norm.
    model = {"text_context_norm": False, **config["model"]}
    return from_dict(DiTConfig, model, "model"), from_dict(DiffusionConfig, config["diffusion"], "diffusion")


def stored_precision(artifact: Artifact) -> str:
    """ "int8" for a DiT stored quantised (`ldm export diffusion --quantize int8`), else "float32"."""
    return artifact.manifest.get("precision", "float32")


def load_dit(
    artifact: Artifact, weights: str = "ema", device: str | torch.device = "cpu", precision: str | None = None
) -> DiT:
    """Return the DiT of a `diffusion` artifact in eval mode: its EMA weights ("ema", for sampling) or "raw".

    precision "int8" quantises a float artifact's block linears as it loads (`ldm.quantize`); an int8
    artifact loads as int8 (None: the artifact's own precision). "bf16" loads float32 weights: the
    pipeline runs them under bf16 autocast.
    """
    if weights not in DIT_WEIGHT_FILES:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    stored = stored_precision(artifact)
    precision = check_precision(precision or stored)
    model = DiT(dit_configs(artifact)[0])
    if stored == "int8":
        if precision != "int8" or weights != "ema":
            raise ArtifactError(
                f"{artifact.ref} holds int8 sampling weights only; for {precision} {weights} weights load "
                f"the model it was quantised from, {artifact.parents.get('diffusion')}"
            )
        int8_skeleton(model, artifact.manifest["int8_layers"])
    model.load_state_dict(artifact.load_tensors(DIT_WEIGHT_FILES[weights], device="cpu"))
    if precision == "int8" and stored != "int8":
        quantize_int8(model)
    return model.to(device).eval()


def feature_extractor(
    store: ArtifactStore, choice: str, classifier_ref: str, device: torch.device, sound: bool = False
):
    """Return the feature extractor for a Frechet distance: Inception when asked or available, else our classifier.

    Sound always uses the classifier (a spoken-digit classifier trained by `ldm train classifier`):
    Inception sees photographs, not spectrograms.
    """
    if sound and choice == "inception":
        raise ValueError(
            "Inception features are for images; sound is measured with the project's classifier "
            "(--features classifier, or auto)"
        )
    if choice in ("auto", "inception") and not sound:
        available, reason = inception_available()
        if available:
            return InceptionFeatures().to(device)
        if choice == "inception":
            raise FileNotFoundError(reason)
        print(f"Inception FID unavailable ({reason}); using the project's classifier features instead")
    try:
        artifact = store.load(classifier_ref, stage="classifier")
    except ArtifactError as err:
        raise ArtifactError(
            f"{err}\nThe Frechet distance needs a feature classifier: run `ldm train classifier` first"
        ) from None
    classifier = load_classifier(artifact, device)
    if sound != (classifier.config.front_end == "logmel"):
        raise ArtifactError(
            f"{artifact.ref} classifies {'sound' if classifier.config.front_end == 'logmel' else 'images'}, "
            f"but the data is {'sound' if sound else 'images'}: pass --classifier with a classifier of "
            f"the same data (ldm train classifier --config configs/<data>/classifier.yaml)"
        )
    return ClassifierFeatures(classifier, artifact.ref)


def load_decoder(
    store: ArtifactStore,
    artifact: Artifact,
    autoencoder: str | None = None,
    allow_mismatch: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[Artifact, AutoencoderKL, bool]:
    """Return (artifact, model, overridden) of the autoencoder that decodes a `diffusion` artifact's latents.

    By default the one its latent cache was encoded with; `autoencoder` may name another only if it
    makes the same latents: the very same encoder weights (a decoder fine-tuned from it,
    `train_parts: decoder`). Any other is refused unless `allow_mismatch` (then `overridden` is True).
    """
    lineage_ref = artifact.manifest.get("autoencoder")
    if lineage_ref is None:
        raise ArtifactError(
            f"{artifact.ref} does not name the autoencoder its latents came from; it cannot be decoded safely"
        )
    chosen = store.load(autoencoder or lineage_ref, stage="autoencoder")
    decoder = load_autoencoder(chosen, device)
    if chosen.ref == lineage_ref:
        return chosen, decoder, False
    lineage = load_autoencoder(store.load(lineage_ref, stage="autoencoder"))
    overridden = encoder_fingerprint(decoder.state_dict()) != encoder_fingerprint(lineage.state_dict())
    if overridden and not allow_mismatch:
        raise ArtifactError(
            f"{artifact.ref} was trained on latents of {lineage_ref}, and {chosen.ref} has another encoder: "
            f"its samples would decode with the wrong latent space. Use autoencoder={lineage_ref!r} (or leave "
            f"it out), a decoder fine-tuned from it (train_parts: decoder, init_from: {lineage_ref}), or pass "
            f"allow_autoencoder_mismatch=True if you mean it"
        )
    return chosen, decoder, overridden


def check_guide(
    artifact,
    config: DiTConfig,
    diffusion: DiffusionConfig,
    guide,
    guide_config: DiTConfig,
    guide_diffusion: DiffusionConfig,
) -> None:
    """Raise ArtifactError unless `guide` can guide `artifact`: the same latent space and statistics, the
    same latent shape and classes, and a network output that means the same thing at the same timestep."""
    problems = []
    if guide.manifest.get("autoencoder") != artifact.manifest.get("autoencoder"):
        problems.append(
            f"its latents come from {guide.manifest.get('autoencoder')}, not {artifact.manifest.get('autoencoder')}"
        )
    elif guide.manifest.get("latent_stats") != artifact.manifest.get("latent_stats"):
        problems.append("its latents were normalised with other statistics")
    for name in ("in_channels", "input_size", "spatial_dims", "num_classes"):
        if getattr(guide_config, name) != getattr(config, name):
            problems.append(f"model.{name} is {getattr(guide_config, name)}, not {getattr(config, name)}")
    meaning = ("objective",) if diffusion.is_flow else ("objective", "schedule", "num_timesteps", "prediction")
    for name in meaning:
        if getattr(guide_diffusion, name) != getattr(diffusion, name):
            problems.append(f"diffusion.{name} is {getattr(guide_diffusion, name)!r}, not {getattr(diffusion, name)!r}")
    if problems:
        raise ArtifactError(
            f"{guide.ref} cannot guide {artifact.ref}: " + "; ".join(problems) + ". A guide must be trained on the "
            "same latent cache with the same objective (e.g. a smaller DiT, or fewer steps, of the same preset)"
        )


def load_frozen_text_encoder(
    artifact: Artifact, config: DiTConfig, path: str | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module | None:
    """The frozen pretrained text encoder a `diffusion` artifact was trained with, from `path` (default: the folder
    it records), refused when it is another encoder; None for a DiT without one (class-conditional, or joint)."""
    if config.text_encoder != "pretrained":
        if path is not None:
            raise ValueError(
                f"{artifact.ref} has no pretrained text encoder to load (model.text_encoder "
                f"{config.text_encoder!r}): leave text_encoder out"
            )
        return None
    from ldm.models.pretrained_text import check_same_encoder, load_pretrained_text_encoder

    record = artifact.manifest.get("text_encoder", {})
    encoder = load_pretrained_text_encoder(path or record.get("path", ""), max_length=config.text_length, device=device)
    check_same_encoder(record, encoder)
    return encoder
