"""Prompts through the stages: captions in the latent cache, a text DiT trained with its encoder, guidance by
the empty and a negative prompt, `pipe.sample(prompts=...)` and `ldm sample --prompt`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_failure, cli, needs_fmnist
from ldm.artifacts import ArtifactStore
from ldm.config import from_dict, load_config, to_dict
from ldm.data import DataConfig
from ldm.data.latents import LatentBatches, LatentCache
from ldm.data.scenes import ScenesDataset
from ldm.diffusion.samplers import cfg_denoiser
from ldm.diffusion.schedules import DiffusionConfig
from ldm.generation import PromptConditioned, SamplingSettings, encode_prompts, sample_latents
from ldm.images import save_captioned_grid
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.dit import DiT, DiTConfig
from ldm.training import read_metrics
from pipeline import LatentDiffusionPipeline
from stages import diffusion
from stages.encode import EncodeConfig, encode

ROOT = Path(__file__).resolve().parent.parent
FLOW = DiffusionConfig(objective="flow", learn_sigma=False)
TEXT_DIT = DiTConfig(
    input_size=16,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=2,
    num_heads=2,
    num_classes=1,
    learn_sigma=False,
    text_encoder="Text-T",
)


def perturbed_text_dit(seed: int = 0) -> DiT:
    """A text DiT whose zero-initialised paths are perturbed, so that its output depends on the prompt."""
    torch.manual_seed(seed)
    model = DiT(TEXT_DIT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_a_text_encoder_preset_sets_the_dits_text_width_and_length_and_the_dit_holds_the_encoder():
    config = DiTConfig(**{**to_dict(TEXT_DIT), "text_encoder": "Text-S", "text_dim": 0, "text_length": 80})
    assert (config.text_dim, config.text_length) == (256, 80)
    model = DiT(config)
    assert model.text_encoder.config.max_length == 80
    assert any(name.startswith("text_encoder.") for name in model.state_dict())  # versioned with the DiT's weights
    with pytest.raises(ValueError, match="differs from Text-S's width 256"):
        DiTConfig(**{**to_dict(TEXT_DIT), "text_encoder": "Text-S", "text_dim": 64, "text_length": 80})
    with pytest.raises(ValueError, match="model.text_encoder must be"):
        DiTConfig(**{**to_dict(TEXT_DIT), "text_encoder": "Text-Z", "text_dim": 0, "text_length": 0})


def test_guidance_against_a_negative_prompt_is_cfg_with_the_negative_prompt_as_the_unconditional_branch():
    model = perturbed_text_dit()
    prompts, negatives = ["a red bag", "two blue tops"], ["a green bag", ""]
    tokens, mask, pooled = encode_prompts(model, prompts + negatives)
    x, t, null = torch.randn(2, 4, 16, 16), torch.tensor([300.0, 700.0]), torch.zeros(2, dtype=torch.long) + 1
    guided = cfg_denoiser(PromptConditioned(model, tokens, mask, pooled), torch.arange(2), torch.arange(2, 4), 3.0)
    with torch.no_grad():
        cond = model(x, t, null, text_tokens=tokens[:2], text_mask=mask[:2], text_pooled=pooled[:2])
        uncond = model(x, t, null, text_tokens=tokens[2:], text_mask=mask[2:], text_pooled=pooled[2:])
        torch.testing.assert_close(guided(x, t), uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_prompted_sampling_depends_on_the_prompt_and_the_negative_prompt_but_not_on_the_batch():
    model = perturbed_text_dit()
    settings = SamplingSettings(num_steps=3, guidance_scale=2.0, seed=5)
    labels = torch.zeros(2, dtype=torch.long)
    prompts = ["a red bag", "a blue sneaker"]
    both = sample_latents(model, FLOW, labels, settings, prompts=prompts)
    second = sample_latents(
        model, FLOW, labels[:1], SamplingSettings(num_steps=3, guidance_scale=2.0, seed=6), prompts=prompts[1:]
    )
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)  # image i: seed + i, whatever the batch
    empty_negative = sample_latents(model, FLOW, labels, settings, prompts=prompts, negative_prompts=["", ""])
    torch.testing.assert_close(empty_negative, both)  # the default negative is the empty prompt
    negative = sample_latents(model, FLOW, labels, settings, prompts=prompts, negative_prompts=["a green top"] * 2)
    other = sample_latents(model, FLOW, labels, settings, prompts=["a white trouser", "a blue sneaker"])
    assert (negative - both).abs().max() > 1e-3 and (other[0] - both[0]).abs().max() > 1e-3
    torch.testing.assert_close(other[1], both[1])  # one image's prompt leaves the others alone


def test_prompts_and_labels_are_each_refused_by_the_model_that_does_not_take_them():
    labels = torch.zeros(2, dtype=torch.long)
    settings = SamplingSettings(num_steps=2)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        sample_latents(perturbed_text_dit(), FLOW, labels, settings, prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match="prompts must be a list of strings"):
        sample_latents(perturbed_text_dit(), FLOW, labels, settings)
    class_dit = DiT(DiTConfig(**{**to_dict(TEXT_DIT), "text_encoder": "", "text_dim": 0, "text_length": 0}))
    with pytest.raises(ValueError, match="class-conditional"):
        sample_latents(class_dit, FLOW, labels, settings, prompts=["a", "b"])


# ----------------------------------------------------------------------------- through the stages


@pytest.fixture(scope="module")
def scenes_store(tmp_path_factory):
    """A store with a random scenes autoencoder, a 96-scene latent cache of it and a text DiT trained 3 steps."""
    root = tmp_path_factory.mktemp("text-stages")
    store = ArtifactStore(root / "store")
    torch.manual_seed(0)
    ae_config = AutoencoderConfig(in_channels=3, resolution=64, ch=8, ch_mult=(1, 2, 2), latent_channels=8)
    ae = store.save(
        "autoencoder",
        tensors={"weights.safetensors": AutoencoderKL(ae_config).state_dict()},
        config={"model": to_dict(ae_config), "data": to_dict(DataConfig(name="scenes", channels=3, resolution=64))},
    )
    cache = encode(store, ae.ref, EncodeConfig(limit=96, batch_size=48))
    config = load_config(
        diffusion.DiffusionStageConfig,
        ROOT / "configs/scenes/diffusion.yaml",
        [
            "model.preset=DiT-T/2",
            "model.depth=2",
            "model.hidden_size=32",
            "model.num_heads=2",
            "model.text_encoder=Text-T",
            "model.text_length=0",
            "trainer.max_steps=3",
            "trainer.batch_size=8",
            "trainer.log_every=1",
            "trainer.image_every=0",
            "trainer.progress=false",
            "preview.sampling.num_steps=2",
            f"latents={cache.ref}",
            f"run_dir={root / 'run'}",
        ],
    )
    model = diffusion.run(config, store)
    return store, cache, model, root


@needs_fmnist
def test_the_latent_cache_of_scenes_holds_each_items_caption_in_order(scenes_store):
    _, artifact, _, _ = scenes_store
    cache = LatentCache(artifact)
    scenes = ScenesDataset("train", size=96)
    assert cache.captions == [scenes[i][1] for i in range(96)]
    z, y, indices = LatentBatches(cache, batch_size=8, seed=1, with_indices=True).batch(2)
    assert z.shape == (8, 8, 16, 16) and indices.shape == (8,) and y.tolist() == cache.labels[indices].tolist()


@needs_fmnist
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_text_dit_trains_with_its_encoder_and_samples_from_prompts_through_the_pipeline(scenes_store):
    store, cache, model, root = scenes_store
    assert model.manifest["text_encoder"] == {"source": "joint", "preset": "Text-T", "weights": "in this artifact"}
    weights = model.load_tensors("weights.safetensors")
    assert any(key.startswith("text_encoder.") for key in weights)
    fresh = DiT(DiTConfig(**model.config()["model"])).text_encoder.state_dict()
    assert any(not torch.equal(weights[f"text_encoder.{k}"], v) for k, v in fresh.items())  # it trained, with the DiT
    pipe = LatentDiffusionPipeline.from_artifacts(model.ref, store=store)
    assert pipe.takes_prompts
    images = pipe.sample(prompts=["a red bag", "two tops"], num_steps=2, guidance_scale=2.0)
    assert images.shape == (2, 3, 64, 64) and bool(images.abs().le(1).all())
    one = pipe.sample(prompts=["two tops"], num_steps=2, guidance_scale=2.0, seed=1)
    torch.testing.assert_close(one[0], images[1])
    with pytest.raises(ValueError, match="takes text prompts, not class labels"):
        pipe.sample([0, 1])
    edited = pipe.img2img(images, 0.5, prompts=["a blue bag"], num_steps=2)
    assert edited.shape == images.shape


@needs_fmnist
def test_the_prompt_gain_is_one_while_the_dit_ignores_its_prompts_and_is_logged(scenes_store):
    store, cache, model, root = scenes_store
    module = diffusion.DiffusionModule(from_dict(diffusion.DiffusionStageConfig, model.config()), {})
    module.batches = LatentBatches(LatentCache(cache), batch_size=8, seed=1, with_indices=True)
    z, _, indices = module.batches.batch(0)
    assert module.prompt_gain(z, indices).item() == 1.0  # a fresh DiT: zero-initialised text paths
    with torch.no_grad():  # open the text paths and the output layer, as training does
        for name, parameter in module.model.named_parameters():
            if "cross_attn.proj" in name or "final_layer" in name or "adaLN" in name:
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    assert module.prompt_gain(z, indices).item() != 1.0
    logged = read_metrics(root / "run")["train/prompt_gain"]
    assert logged and all(np.isfinite(value) and value > 0 for _, value in logged)


@needs_fmnist
def test_ldm_sample_writes_images_named_by_prompt_and_a_captioned_grid(scenes_store, tmp_path):
    store, _, model, _ = scenes_store
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# scenes\na red bag\n\ntwo blue tops\n")
    out = tmp_path / "out"
    result = cli(
        store.root,
        "sample",
        "--model",
        model.ref,
        "--prompts",
        str(prompts),
        "--prompt",
        "a sandal",
        "--n",
        "6",
        "--steps",
        "2",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{i:06d}-prompt{i // 2}.png" for i in range(6)]
    report = json.loads((out / "samples.json").read_text())
    assert report["prompts"] == ["a sandal", "a red bag", "two blue tops"] and report["complete"]
    assert (out / "grid.png").stat().st_size > 0
    refused = cli(
        store.root, "sample", "--model", model.ref, "--classes", "1", "--n", "2", "--out", str(tmp_path / "c")
    )
    assert_one_line_failure(refused, "takes text prompts, not --classes")
    empty = cli(store.root, "sample", "--model", model.ref, "--n", "2", "--out", str(tmp_path / "e"))
    assert_one_line_failure(empty, "needs prompts")


@needs_fmnist
def test_a_text_dit_refuses_a_latent_cache_without_captions(scenes_store):
    store = scenes_store[0]
    ae_config = AutoencoderConfig(in_channels=1, resolution=32, ch=8, ch_mult=(1, 2), latent_channels=4)
    ae = store.save(
        "autoencoder",
        tensors={"weights.safetensors": AutoencoderKL(ae_config).state_dict()},
        config={"model": to_dict(ae_config), "data": to_dict(DataConfig())},
    )
    fmnist = encode(store, ae.ref, EncodeConfig(limit=16))  # f2: 16x16x4 latents, as TEXT_DIT takes
    with pytest.raises(ValueError, match="holds no captions"):
        diffusion.check_model_fits_cache(TEXT_DIT, LatentCache(fmnist))


def inked_columns(path: Path) -> int:
    """The width in px from the first to the last dark column of a one-image captioned grid's caption strip."""
    from PIL import Image

    pixels = torch.from_numpy(np.array(Image.open(path).convert("L")))  # (H, W) uint8, a writable copy
    caption = pixels[4 + 64 + 2 :]  # below the 64 px tile (32 px at scale 2) and its padding
    dark = (caption < 128).any(0).nonzero().flatten()
    return int(dark.max() - dark.min() + 1)


def test_a_captioned_grid_keeps_the_spaces_between_words(tmp_path):
    image = torch.zeros(1, 3, 32, 32)
    joined = inked_columns(save_captioned_grid(image, ["aaaa"], tmp_path / "joined.png"))
    spaced = inked_columns(save_captioned_grid(image, ["aa aa"], tmp_path / "spaced.png"))
    assert spaced - joined >= 5  # a space as wide as a letter; the FreeType default drew it 2 px wide
