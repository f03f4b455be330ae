"""The latent sampling API over artifacts: lineage checks, seeds, img2img, inpainting, the sample command."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import AE, DIFFUSION, DIT, STATS, needs_fmnist, save_dit
from ldm.artifacts import ArtifactError, ArtifactStore
from ldm.config import to_dict
from ldm.data import DataConfig, build_dataset, iterate_images
from ldm.data.latents import LatentStats
from ldm.diffusion.schedules import DiffusionConfig
from ldm.generation import SamplingSettings
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.classifier import Classifier, ClassifierConfig
from ldm.models.dit import DiT
from pipeline import LatentDiffusionPipeline
from stages.cli import main


def test_from_artifacts_loads_the_lineage_autoencoder_and_its_statistics(store, pipe):
    first = store.list("autoencoder")[0]
    assert pipe.provenance.autoencoder == first.ref and not pipe.provenance.autoencoder_override
    assert pipe.stats == STATS
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(pipe.encode(pipe.decode(z)), pipe.encode(pipe.decode(z)))
    raw = AutoencoderKL(AE)
    raw.load_state_dict(first.load_tensors())
    # decode applies the stored statistics before the decoder: the scale lives in one place
    expected = raw.eval().decode(
        z * torch.tensor(STATS.std).view(1, 4, 1, 1) + torch.tensor(STATS.mean).view(1, 4, 1, 1)
    )
    assert torch.allclose(pipe.decode(z), expected.clamp(-1, 1), atol=1e-6)


def test_from_artifacts_refuses_an_autoencoder_other_than_the_lineage(store):
    other = store.list("autoencoder")[1]
    with pytest.raises(ArtifactError, match="trained on latents of autoencoder@"):
        LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=store, autoencoder=other.ref)
    forced = LatentDiffusionPipeline.from_artifacts(
        "diffusion@latest", store=store, autoencoder=other.ref, allow_autoencoder_mismatch=True
    )
    assert forced.provenance.autoencoder == other.ref and forced.provenance.autoencoder_override


def test_a_decoder_fine_tune_of_the_lineage_autoencoder_is_accepted_and_any_encoder_change_refused(tmp_path, store):
    import shutil

    copy = ArtifactStore(tmp_path / "copy")
    shutil.copytree(store.root, copy.root)
    lineage = LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=copy)
    weights = copy.load(lineage.provenance.autoencoder).load_tensors()
    config = {"model": to_dict(AE), "data": to_dict(DataConfig())}
    tuned_weights = {k: v + 0.01 if k.startswith("decoder.") else v for k, v in weights.items()}
    tuned = copy.save("autoencoder", tensors={"weights.safetensors": tuned_weights}, config=config)
    pipe = LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=copy, autoencoder=tuned.ref)
    assert pipe.provenance.autoencoder == tuned.ref and not pipe.provenance.autoencoder_override
    assert pipe.provenance.lineage_autoencoder == lineage.provenance.autoencoder
    images, z = torch.rand(2, 1, 32, 32) * 2 - 1, torch.randn(2, 4, 8, 8)
    assert torch.equal(pipe.encode(images), lineage.encode(images))  # the same latents ...
    assert not torch.allclose(pipe.decode(z), lineage.decode(z), atol=1e-3)  # ... through the new decoder

    result = CliRunner().invoke(
        main,
        [
            "--store",
            str(copy.root),
            "sample",
            "--n",
            "2",
            "--steps",
            "2",
            "--no-images",
            "--autoencoder",
            tuned.ref,
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "samples.json").read_text())["autoencoder"] == tuned.ref

    for name in ("encoder.conv_in.bias", "quant_conv.bias"):  # one changed encoder-side tensor is enough to refuse
        moved = {**tuned_weights, name: tuned_weights[name] + 1e-4}
        other = copy.save("autoencoder", tensors={"weights.safetensors": moved}, config=config)
        with pytest.raises(ArtifactError, match="has another encoder"):
            LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=copy, autoencoder=other.ref)


def test_autoguidance_by_a_weaker_dit_of_the_same_latents_and_refusal_of_any_other(tmp_path, store):
    import shutil
    from dataclasses import replace

    copy = ArtifactStore(tmp_path / "copy")
    shutil.copytree(store.root, copy.root)
    model = copy.load("diffusion@latest")
    lineage = model.manifest["autoencoder"]
    small = save_dit(copy, replace(DIT, hidden_size=16, depth=1), replace(DIFFUSION, learn_sigma=False), 5, lineage)
    plain = LatentDiffusionPipeline.from_artifacts(model.ref, store=copy)
    guided = LatentDiffusionPipeline.from_artifacts(model.ref, store=copy, guide=small.ref)
    assert guided.provenance.guide == small.ref and plain.provenance.guide is None
    labels = [0, 3, 7]
    assert torch.equal(
        guided.sample(labels, num_steps=3, guidance_scale=2.0), plain.sample(labels, num_steps=3, guidance_scale=2.0)
    )
    by_guide = guided.sample(labels, num_steps=3, guide_scale=2.0)
    assert not torch.allclose(by_guide, plain.sample(labels, num_steps=3, guidance_scale=2.0), atol=1e-3)  # not CFG
    assert not torch.allclose(by_guide, plain.sample(labels, num_steps=3), atol=1e-3)
    with pytest.raises(ValueError, match="needs a guide DiT"):
        plain.sample(labels, num_steps=3, guide_scale=2.0)
    # A model guiding itself cancels: cond + (s - 1) (cond - guide) is the conditional model at any scale.
    itself = LatentDiffusionPipeline.from_artifacts(model.ref, store=copy, guide=model.ref)
    torch.testing.assert_close(
        itself.sample(labels, num_steps=3, guide_scale=3.0), plain.sample(labels, num_steps=3), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        itself.sample(labels, num_steps=3, guidance_scale=2.0, guide_scale=3.0),
        plain.sample(labels, num_steps=3, guidance_scale=2.0),
        atol=1e-5,
        rtol=0,
    )

    other_autoencoder = copy.list("autoencoder")[1].ref
    refused = {
        "latents come from": save_dit(copy, DIT, DIFFUSION, 6, other_autoencoder),
        "other statistics": save_dit(copy, DIT, DIFFUSION, 7, lineage, LatentStats(mean=[0.0] * 4, std=[1.0] * 4)),
        "objective is 'flow'": save_dit(copy, DIT, DiffusionConfig(objective="flow", learn_sigma=False), 8, lineage),
        "prediction is 'v'": save_dit(copy, DIT, replace(DIFFUSION, prediction="v"), 9, lineage),
        "num_classes is 5": save_dit(copy, replace(DIT, num_classes=5), DIFFUSION, 10, lineage),
    }
    with pytest.raises(ValueError, match=r"guide DiT takes .*\(\(4, 8, 8\), 5\)"):  # built by hand, not from artifacts
        LatentDiffusionPipeline(
            plain.model, plain.autoencoder, plain.diffusion, plain.stats, guide=DiT(replace(DIT, num_classes=5))
        )
    for reason, artifact in refused.items():
        with pytest.raises(ArtifactError, match=f"cannot guide {model.ref}.*{reason}"):
            LatentDiffusionPipeline.from_artifacts(model.ref, store=copy, guide=artifact.ref)

    result = CliRunner().invoke(
        main,
        [
            "--store",
            str(copy.root),
            "sample",
            "--model",
            model.ref,
            "--n",
            "2",
            "--steps",
            "2",
            "--no-images",
            "--cfg",
            "1",
            "--guide",
            small.ref,
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0 and f"cfg 1.0 + autoguidance 2.0 by {small.ref}" in result.output, result.output
    written = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert written["guide"] == small.ref and written["guide_scale"] == 2.0 and written["guidance_scale"] == 1.0
    result = CliRunner().invoke(
        main,
        [
            "--store",
            str(copy.root),
            "sample",
            "--model",
            model.ref,
            "--guide",
            refused["objective is 'flow'"].ref,
            "--out",
            str(tmp_path / "out2"),
        ],
    )
    assert result.exit_code != 0 and "cannot guide" in result.output


def test_from_artifacts_refuses_a_corrupted_weights_file(tmp_path, store):
    import shutil

    copy = ArtifactStore(tmp_path / "copy")
    shutil.copytree(store.root, copy.root)
    weights = copy.resolve("diffusion@latest") / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256|checksum"):
        LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=copy)


def test_sample_is_seeded_per_image_whatever_the_batch_size(pipe):
    images = pipe.sample([0, 1, 2, 3, 4], num_steps=4, guidance_scale=2.0, seed=11, batch_size=5)
    assert images.shape == (5, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    split = pipe.sample([0, 1, 2, 3, 4], num_steps=4, guidance_scale=2.0, seed=11, batch_size=2)
    assert torch.allclose(images, split, atol=1e-5)
    later = pipe.sample([2, 3, 4], num_steps=4, guidance_scale=2.0, seed=13, batch_size=3)
    assert torch.allclose(images[2:], later, atol=1e-5)  # image i depends on seed + i alone
    other = pipe.sample([0, 1, 2, 3, 4], num_steps=4, guidance_scale=2.0, seed=12, batch_size=5)
    assert not torch.allclose(images, other, atol=1e-3)
    pils = pipe.sample([1, 2], num_steps=2, output="pil")
    assert len(pils) == 2 and isinstance(pils[0], Image.Image) and pils[0].size == (32, 32)


def test_sample_rejects_bad_labels(pipe):
    with pytest.raises(ValueError, match="0..9"):
        pipe.sample([10], num_steps=2)
    with pytest.raises(ValueError, match="no class labels"):
        pipe.sample([], num_steps=2)


def test_img2img_strength_zero_is_the_reconstruction_and_one_is_a_fresh_sample(pipe):
    torch.manual_seed(3)
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    reconstruction = pipe.decode(pipe.encode(images))
    assert torch.equal(pipe.img2img(images, strength=0.0, class_labels=[1, 2, 3], num_steps=10), reconstruction)
    fresh = pipe.sample([1, 2, 3], num_steps=10, guidance_scale=1.5, seed=5)
    assert torch.allclose(
        pipe.img2img(images, 1.0, [1, 2, 3], num_steps=10, guidance_scale=1.5, seed=5), fresh, atol=1e-6
    )
    halfway = pipe.img2img(images, 0.5, 4, num_steps=10, seed=5)  # one label for all images
    assert halfway.shape == images.shape
    assert not torch.allclose(halfway, reconstruction, atol=1e-3) and not torch.allclose(halfway, fresh, atol=1e-3)


def test_inpaint_keeps_the_unmasked_region(pipe):
    torch.manual_seed(4)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1  # repaint the right half
    out = pipe.inpaint(images, mask, [5, 6], num_steps=6, seed=1, keep_known_pixels=False)
    reconstruction = pipe.decode(pipe.encode(images))
    assert not torch.allclose(out[..., 20:], reconstruction[..., 20:], atol=1e-2)  # new content on the right
    kept = pipe.inpaint(images, mask, [5, 6], num_steps=6, seed=1)
    assert torch.equal(kept[..., :16], images[..., :16]) and torch.equal(kept[..., 16:], out[..., 16:])
    nothing = pipe.inpaint(images, torch.zeros(1, 1, 32, 32), [5, 6], num_steps=6, seed=1, keep_known_pixels=False)
    assert torch.allclose(nothing, reconstruction, atol=1e-5)  # no mask: the known latents come back exactly
    everything = pipe.inpaint(images, torch.ones(1, 1, 32, 32), [5, 6], num_steps=6, seed=1, keep_known_pixels=False)
    assert torch.allclose(everything, pipe.sample([5, 6], num_steps=6, seed=1), atol=1e-5)
    with pytest.raises(ValueError, match="mask must be"):
        pipe.inpaint(images, torch.ones(1, 1, 16, 16), [5, 6])
    with pytest.raises(ValueError, match="x0 estimate"):
        pipe.inpaint(images, mask, [5, 6], sampler="ddpm")


def test_sample_command_writes_a_grid_and_the_single_images(tmp_path, store):
    out = tmp_path / "samples"
    result = CliRunner().invoke(
        main,
        [
            "--store",
            str(store.root),
            "sample",
            "--n",
            "6",
            "--classes",
            "1,7",
            "--steps",
            "3",
            "--cfg",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "samples.json").read_text())
    assert report["labels"] == [1, 7, 1, 7, 1, 7] and report["sampler"] == "dpm++2m" and report["steps"] == 3
    assert sorted(p.name for p in (out / "images").iterdir())[:2] == ["000000-class1.png", "000001-class7.png"]
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * (3 * 34 + 2), 2 * (2 * 34 + 2))  # 2 rows (classes) of 3, 2x upscaled
    bad = CliRunner().invoke(main, ["--store", str(store.root), "sample", "--classes", "12", "--out", str(out)])
    assert bad.exit_code != 0 and "0..9" in bad.output


def test_sample_command_guidance_interval_and_spacing(tmp_path, store):
    def grid(*args):
        out = tmp_path / "-".join(args).replace(" ", "")
        result = CliRunner().invoke(
            main,
            ["--store", str(store.root), "sample", "--n", "4", "--steps", "3", "--no-images", "--out", str(out), *args],
        )
        assert result.exit_code == 0, result.output
        return (out / "grid.png").read_bytes(), json.loads((out / "samples.json").read_text())

    guided, _ = grid("--cfg", "3")
    everywhere, report = grid("--cfg", "3", "--cfg-interval", "0", "999")  # every step is inside: plain guidance
    nowhere, _ = grid("--cfg", "3", "--cfg-interval", "2000", "3000")  # no step is inside: the conditional model
    conditional, _ = grid("--cfg", "1")
    leading, leading_report = grid("--cfg", "3", "--spacing", "leading")
    assert everywhere == guided and nowhere == conditional and guided != conditional and leading != guided
    assert report["guidance_interval"] == [0.0, 999.0] and report["spacing"] == "trailing"
    assert leading_report["spacing"] == "leading"
    bad = CliRunner().invoke(
        main, ["--store", str(store.root), "sample", "--cfg-interval", "500", "100", "--out", str(tmp_path)]
    )
    assert bad.exit_code != 0 and "--cfg-interval 100 500" in bad.output


@needs_fmnist
def test_sample_evaluation_reports_distance_floors_accuracy_and_records_them(tmp_path, store):
    from stages.sample import SamplingModel, evaluate_samples

    torch.manual_seed(3)
    classifier = Classifier(ClassifierConfig(width=8, feature_dim=16))
    store.save(
        "classifier",
        tensors={"weights.safetensors": classifier.eval().state_dict()},
        config={"model": to_dict(ClassifierConfig(width=8, feature_dim=16))},
    )
    settings = SamplingSettings(num_steps=2, guidance_scale=1.5, batch_size=20, guidance_interval=(100, 800))
    report = evaluate_samples(
        store, "diffusion@latest", settings, n=40, features="classifier", out_dir=tmp_path / "eval"
    )
    assert report["n"] == 40 and report["features"].startswith("classifier@") and not report["is_standard_fid"]
    assert 0.0 <= report["class_accuracy"] <= 1.0 and report["seconds_per_image"] > 0
    # The random autoencoder's reconstructions are far from real images; two real sets are close.
    assert 0 < report["real_reference_distance"] < report["autoencoder_reference_distance"]
    assert report["autoencoder_reference"].startswith(
        f"40 train images encoded and decoded by {store.list('autoencoder')[0].ref}"
    )
    assert report["ratio_to_reference"] == pytest.approx(report["frechet_distance"] / report["real_reference_distance"])
    # The accuracy ceiling: the classifier on the same 40 train images, as they are and through the autoencoder.
    pipe = LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=store)
    images, labels = next(iterate_images(build_dataset(DataConfig(hflip=False), "train"), 40, 40))
    with torch.no_grad():
        real = (classifier(images).argmax(1) == labels).float().mean().item()
        rebuilt = (classifier(pipe.decode(pipe.encode(images))).argmax(1) == labels).float().mean().item()
    assert report["real_class_accuracy"] == pytest.approx(real) and report[
        "autoencoder_class_accuracy"
    ] == pytest.approx(rebuilt)
    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == report
    assert report["guidance_interval"] == [100.0, 800.0] and report["spacing"] == "trailing"
    # Fidelity, diversity and copies beside FD: the samples' class histogram counts each sample once.
    assert report["class_histogram"]["requested"] == [4] * 10 and sum(report["class_histogram"]["predicted"]) == 40
    for key in ("precision", "recall", "coverage"):
        assert 0.0 <= report["manifold"][key] <= 1.0 and 0.0 <= report["real_manifold"][key] <= 1.0
    assert report["manifold"]["density"] >= 0.0 and report["manifold"]["k"] == 5
    assert 0.0 <= report["memorisation_rate"] <= 1.0 and 0.0 <= report["real_memorisation_rate"] <= 1.0
    assert report["precision"] == "float32"  # the DiT's arithmetic, not the samples' precision
    with Image.open(tmp_path / "eval" / "nearest-train.png") as pairs:  # 8 samples above their nearest train images
        assert pairs.size[0] > pairs.size[1] > 2 * 28
    recorded = store.load("diffusion@latest").manifest["metrics"]["samples-dpm++2m-2-cfg1.5-t100-800-n40"]
    assert recorded["autoencoder_reference_distance"] == report["autoencoder_reference_distance"]
    model = store.load("diffusion@latest")  # autoguided evaluations are recorded under their own name
    guided = evaluate_samples(
        store,
        SamplingModel(model.ref, guide=model.ref),
        SamplingSettings(num_steps=2, guide_scale=2.0, batch_size=20),
        n=20,
        features="classifier",
        out_dir=tmp_path / "guided",
    )
    assert guided["guide"] == model.ref and guided["guide_scale"] == 2.0 and guided["guidance_scale"] == 1.0
    assert f"samples-dpm++2m-2-cfg1-guide2-{model.version}-n20" in store.load(model.ref).manifest["metrics"]
