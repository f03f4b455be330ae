"""Frozen pretrained text encoders: tiny random CLIP and T5 folders, encode's contract, fingerprints, refusals."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import needs_fmnist
from ldm.models import pretrained_text
from ldm.models.pretrained_text import (
    TextEncoderError,
    check_same_encoder,
    load_pretrained_text_encoder,
    text_encoder_identity,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.timeout(120)

WORDS = "a photo of cat dog red blue shirt shoe bag dress coat sneaker ankle boot".split()
SPECIAL = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
PROMPTS = ["a red shirt", "photo of a blue ankle boot and a bag", ""]
LENGTH = 16  # tokens per prompt, the tokenizers' model_max_length and CLIP's positions
VOCAB = 64  # embedding rows; as in T5, more than the tokenizers use


def save_tokenizer(folder: Path, template: str) -> None:
    """A word-level tokenizer of WORDS, built offline; template adds the model's start and end tokens."""
    vocab = {**SPECIAL, **{word: len(SPECIAL) + i for i, word in enumerate(WORDS)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=LENGTH
    )
    fast.save_pretrained(folder)


def save_clip(folder: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=LENGTH, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    transformers.CLIPTextModel(config).save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, "<s> $A </s>")
    return folder


def save_t5(folder: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
    )  # fmt: skip
    transformers.T5EncoderModel(config).save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, "$A </s>")  # T5 has no start token
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return save_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(params=["clip", "t5"])
def encoder_dir(request, clip_dir, t5_dir) -> Path:
    return {"clip": clip_dir, "t5": t5_dir}[request.param]


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_encode_returns_fixed_length_tokens_mask_and_pooled(encoder_dir):
    encoder = load_pretrained_text_encoder(encoder_dir)
    tokens, mask, pooled = encoder.encode(PROMPTS)
    assert (encoder.hidden_size, encoder.max_length) == (32, LENGTH)
    assert tokens.shape == (3, LENGTH, 32) and pooled.shape == (3, 32)
    assert mask.dtype == torch.bool and mask.shape == (3, LENGTH)
    starts = 2 if encoder.kind == "clip" else 1  # <s> ... </s> or ... </s>
    assert mask.sum(dim=1).tolist() == [3 + starts, 9 + starts, starts]
    assert mask[:, 0].all() and not mask[0, 3 + starts :].any()  # real tokens first, then padding


def test_kind_auto_reads_model_type(clip_dir, t5_dir):
    assert load_pretrained_text_encoder(clip_dir).kind == "clip"
    assert load_pretrained_text_encoder(t5_dir, kind="t5").kind == "t5"


def test_real_tokens_do_not_depend_on_the_padded_length(encoder_dir):
    short = load_pretrained_text_encoder(encoder_dir, max_length=12)
    long = load_pretrained_text_encoder(encoder_dir, max_length=LENGTH)
    tokens_short, mask_short, pooled_short = short.encode(PROMPTS)
    tokens_long, mask_long, pooled_long = long.encode(PROMPTS)
    assert tokens_short.shape[1] == 12 and torch.equal(mask_short, mask_long[:, :12])
    torch.testing.assert_close(tokens_short[mask_short], tokens_long[mask_long])
    torch.testing.assert_close(pooled_short, pooled_long)


def test_t5_pooled_is_the_mean_over_real_tokens(t5_dir):
    tokens, mask, pooled = load_pretrained_text_encoder(t5_dir).encode(PROMPTS)
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(pooled[i], tokens[i, mask[i]].double().mean(dim=0).float())


def test_clip_pooled_is_the_end_token_feature(clip_dir):
    tokens, mask, pooled = load_pretrained_text_encoder(clip_dir).encode(PROMPTS)
    last_real = mask.sum(dim=1) - 1  # CLIP's </s> closes each prompt
    torch.testing.assert_close(pooled, tokens[torch.arange(len(PROMPTS)), last_real])


def test_long_prompt_is_cut_to_max_length_keeping_its_end_token(clip_dir):
    encoder = load_pretrained_text_encoder(clip_dir, max_length=6)
    ids, mask = encoder.tokenize(["photo of a blue ankle boot and a bag"])
    assert ids.shape == (1, 6) and mask.all() and ids[0, -1].item() == SPECIAL["</s>"]


def test_encoder_is_frozen_and_stays_in_eval_mode(encoder_dir):
    encoder = load_pretrained_text_encoder(encoder_dir)
    parent = torch.nn.ModuleDict({"text": encoder, "head": torch.nn.Linear(32, 1)}).train()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not any(module.training for module in encoder.modules()) and parent["head"].training
    tokens, _, pooled = encoder.encode(PROMPTS)
    assert tokens.grad_fn is None and pooled.grad_fn is None
    assert next(encoder.parameters()).dtype == torch.float32


def test_encode_refuses_a_single_string(clip_dir):
    with pytest.raises(TypeError, match=r"pass \[prompt\]"):
        load_pretrained_text_encoder(clip_dir).encode("a red shirt")


def test_fingerprint_is_stable_across_loads(encoder_dir):
    first, second = load_pretrained_text_encoder(encoder_dir), load_pretrained_text_encoder(encoder_dir)
    assert first.fingerprint == second.fingerprint and len(first.fingerprint) == 64


def test_fingerprint_changes_when_one_weight_changes(clip_dir, tmp_path):
    folder = copy_of(clip_dir, tmp_path)
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert load_pretrained_text_encoder(folder).fingerprint != load_pretrained_text_encoder(clip_dir).fingerprint


def test_fingerprint_changes_when_the_tokenizer_changes(clip_dir, tmp_path):
    folder = copy_of(clip_dir, tmp_path)
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text().replace('"coat"', '"hat"'))
    assert load_pretrained_text_encoder(folder).fingerprint != load_pretrained_text_encoder(clip_dir).fingerprint


def test_identity_records_the_encoder(t5_dir):
    identity = text_encoder_identity(load_pretrained_text_encoder(t5_dir, max_length=8))
    assert {k: v for k, v in identity.items() if k != "fingerprint"} == {
        "kind": "t5",
        "model_type": "t5",
        "hidden_size": 32,
        "max_length": 8,
    }


def test_check_same_encoder_accepts_the_recorded_encoder(clip_dir):
    encoder = load_pretrained_text_encoder(clip_dir)
    check_same_encoder(text_encoder_identity(load_pretrained_text_encoder(clip_dir)), encoder)


def test_check_same_encoder_refuses_another_encoder(clip_dir, t5_dir):
    recorded, other = load_pretrained_text_encoder(clip_dir), load_pretrained_text_encoder(t5_dir)
    with pytest.raises(TextEncoderError) as caught:
        check_same_encoder(text_encoder_identity(recorded), other)
    message = str(caught.value)
    assert recorded.fingerprint in message and other.fingerprint in message
    assert "load the folder the model was trained with" in message and "\n" not in message


def test_check_same_encoder_refuses_another_max_length(clip_dir):
    recorded = text_encoder_identity(load_pretrained_text_encoder(clip_dir, max_length=8))
    with pytest.raises(TextEncoderError, match="load it with max_length=8"):
        check_same_encoder(recorded, load_pretrained_text_encoder(clip_dir))


def test_whole_clip_folder_loads_its_text_tower(tmp_path):
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=LENGTH, eos_token_id=3)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)  # fmt: skip
    whole = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    whole.save_pretrained(tmp_path, safe_serialization=True)
    save_tokenizer(tmp_path, "<s> $A </s>")
    encoder = load_pretrained_text_encoder(tmp_path, kind="clip")
    ids, mask = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        expected = whole.eval().text_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(encoder.encode(PROMPTS)[0], expected)


def test_whole_t5_folder_loads_its_encoder(tmp_path):
    # Untied embeddings, as T5 v1.1, whose encoder PixArt-alpha uses.
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        pad_token_id=0, eos_token_id=3, decoder_start_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    whole = transformers.T5ForConditionalGeneration(config).eval()
    whole.save_pretrained(tmp_path, safe_serialization=True)
    save_tokenizer(tmp_path, "$A </s>")
    encoder = load_pretrained_text_encoder(tmp_path, kind="t5")
    ids, mask = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        expected = whole.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(encoder.encode(PROMPTS)[0], expected)


def save_sentencepiece_t5(folder: Path, t5_dir: Path) -> Path:
    """The T5 weights of t5_dir beside a spiece.model alone, as T5's own repositories ship its tokenizer."""
    sentencepiece = pytest.importorskip("sentencepiece")
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(t5_dir / name, folder / name)
    sentences = iter([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20)
    # Ids 0-2 are T5's pad, </s> and <unk>.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_prefix=str(folder / "spiece"), vocab_size=32,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    return folder


def test_t5_folder_with_a_sentencepiece_tokenizer_loads(t5_dir, tmp_path):
    folder = save_sentencepiece_t5(tmp_path / "t5", t5_dir)
    tokens, mask, _ = load_pretrained_text_encoder(folder, max_length=8).encode(PROMPTS)
    assert tokens.shape == (3, 8, 32) and mask[:, 0].all()


def without_package(monkeypatch, package: str) -> None:
    find_spec = pretrained_text.importlib.util.find_spec
    monkeypatch.setattr(
        pretrained_text.importlib.util, "find_spec", lambda name: None if name == package else find_spec(name)
    )


# --------------------------------------------------------------------------------------------
# Refusals: one line each, naming the folder or file and the fix
# --------------------------------------------------------------------------------------------


def assert_refused(match: str, *args, **kwargs) -> str:
    with pytest.raises(TextEncoderError, match=match) as caught:
        load_pretrained_text_encoder(*args, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_missing_folder_is_refused_with_how_to_get_it(tmp_path):
    message = assert_refused("does not exist", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "huggingface-cli download" in message


def test_folder_without_config_is_refused(clip_dir, tmp_path):
    folder = copy_of(clip_dir, tmp_path)
    (folder / "config.json").unlink()
    assert str(folder) in assert_refused("has no config.json.*huggingface-cli download", folder)


def test_folder_with_only_pickle_weights_is_refused(clip_dir, tmp_path):
    folder = copy_of(clip_dir, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert_refused(r"only as pickle \.bin files.*put model\.safetensors there", folder)


def test_folder_without_weights_is_refused(clip_dir, tmp_path):
    folder = copy_of(clip_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    assert_refused("has no model.safetensors", folder)


def test_folder_without_tokenizer_is_refused(clip_dir, tmp_path):
    folder = copy_of(clip_dir, tmp_path)
    (folder / "tokenizer.json").unlink()
    assert_refused("has no tokenizer file.*tokenizer/", folder)


def test_unsupported_model_type_is_refused(clip_dir, tmp_path):
    folder = copy_of(clip_dir, tmp_path)
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"clip_text_model"', '"bert"'))
    message = assert_refused("model_type 'bert'; supported text encoders are", folder)
    assert "'clip_text_model'" in message and "'t5'" in message


def test_kind_that_disagrees_with_the_folder_is_refused(clip_dir):
    assert_refused("holds a clip encoder.*not the t5 asked for", clip_dir, kind="t5")


def test_weights_that_do_not_fit_the_config_are_refused(clip_dir, t5_dir, tmp_path):
    folder = copy_of(t5_dir, tmp_path)
    shutil.copy(clip_dir / "config.json", folder / "config.json")  # T5 weights under a CLIP config
    assert_refused("do not fit its config.json", folder)


def test_max_length_beyond_clip_positions_is_refused(clip_dir):
    assert_refused(f"max_length 77 exceeds the {LENGTH} positions", clip_dir, max_length=77)


def test_missing_transformers_names_the_extra(clip_dir, monkeypatch):
    without_package(monkeypatch, "transformers")
    assert_refused(r"need the transformers package: pip install -e '\.\[text\]'", clip_dir)


def test_sentencepiece_tokenizer_without_sentencepiece_names_the_extra(t5_dir, tmp_path, monkeypatch):
    folder = save_sentencepiece_t5(tmp_path / "t5", t5_dir)
    without_package(monkeypatch, "sentencepiece")
    assert_refused(r"spiece\.model, which needs sentencepiece: pip install -e '\.\[text\]'", folder)


# ----------------------------------------------------------------------------- a DiT on a frozen encoder's features


@needs_fmnist
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_dit_trains_on_a_frozen_encoder_records_it_and_refuses_another(clip_dir, t5_dir, tmp_path):
    from ldm.artifacts import ArtifactStore
    from ldm.config import load_config, to_dict
    from ldm.data import DataConfig
    from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from pipeline import LatentDiffusionPipeline
    from stages import diffusion
    from stages.encode import EncodeConfig, encode

    store = ArtifactStore(tmp_path / "store")
    ae_config = AutoencoderConfig(in_channels=3, resolution=64, ch=8, ch_mult=(1, 2, 2), latent_channels=8)
    ae = store.save(
        "autoencoder",
        tensors={"weights.safetensors": AutoencoderKL(ae_config).state_dict()},
        config={"model": to_dict(ae_config), "data": to_dict(DataConfig(name="scenes", channels=3, resolution=64))},
    )
    cache = encode(store, ae.ref, EncodeConfig(limit=32))
    overrides = ["model.preset=DiT-T/2", "model.depth=1", "model.hidden_size=32", "model.num_heads=2"]
    overrides += ["model.text_encoder=pretrained", "model.text_dim=32", f"model.text_length={LENGTH}"]
    overrides += [f"text_encoder_path={clip_dir}", "trainer.max_steps=2", "trainer.batch_size=4"]
    overrides += [
        "trainer.image_every=0",
        "trainer.progress=false",
        f"latents={cache.ref}",
        f"run_dir={tmp_path / 'run'}",
    ]
    config = load_config(
        diffusion.DiffusionStageConfig, Path(__file__).parent.parent / "configs/scenes/diffusion.yaml", overrides
    )
    model = diffusion.run(config, store)
    record = model.manifest["text_encoder"]
    assert (record["source"], record["kind"], record["path"]) == ("pretrained", "clip", str(clip_dir))
    assert record["fingerprint"] == load_pretrained_text_encoder(clip_dir).fingerprint
    assert not any(k.startswith("text_encoder.") for k in model.load_tensors())  # frozen weights are not the model's
    pipe = LatentDiffusionPipeline.from_artifacts(model.ref, store=store)
    assert pipe.sample(prompts=["a red bag"], num_steps=2, guidance_scale=2.0).shape == (1, 3, 64, 64)
    with pytest.raises(TextEncoderError, match="load the folder the model was trained with"):
        LatentDiffusionPipeline.from_artifacts(model.ref, store=store, text_encoder=str(t5_dir))
