"""Smoke test of bench/convergence.py: a tiny recipe and the diffusers peer, a few steps, on a tiny store."""

import csv
import json
from pathlib import Path

import pytest
import torch

from bench import convergence
from conftest import needs_fmnist
from ldm.artifacts import ArtifactStore
from ldm.config import to_dict
from ldm.data import DataConfig
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.classifier import Classifier, ClassifierConfig
from stages.encode import EncodeConfig, encode

ROOT = Path(__file__).resolve().parent.parent

TINY_RECIPE = (
    "tiny=configs/fmnist/diffusion-quick.yaml:model.in_channels=4,model.depth=1,model.hidden_size=32,model.num_heads=2,"
    "trainer.batch_size=16,trainer.log_every=1"
)


@pytest.mark.slow
@needs_fmnist
def test_convergence_bench_writes_rows_of_both_lines_at_the_evaluation_points_and_the_plot(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    torch.manual_seed(0)
    autoencoder_config = AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), latent_channels=4)  # 32x32 images -> 4x8x8 latents
    autoencoder = store.save(
        "autoencoder",
        tensors={"weights.safetensors": AutoencoderKL(autoencoder_config).state_dict()},
        config={"model": to_dict(autoencoder_config), "data": to_dict(DataConfig())},
    )
    cache = encode(store, autoencoder.ref, EncodeConfig(limit=300, batch_size=150))
    classifier_config = ClassifierConfig(width=8, feature_dim=16)
    classifier = store.save(
        "classifier",
        tensors={"weights.safetensors": Classifier(classifier_config).eval().state_dict()},
        config={"model": to_dict(classifier_config)},
    )

    out = tmp_path / "out"
    convergence.main(
        [
            "--store",
            str(store.root),
            "--latents",
            cache.ref,
            "--classifier",
            classifier.ref,
            "--recipe",
            TINY_RECIPE,
            "--budget-steps",
            "4",
            "--eval-every",
            "2",
            "--n",
            "20",
            "--calls",
            "2",
            "--batch",
            "10",
            "--peer",
            "--out",
            str(out),
        ]
    )

    with open(out / "convergence.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == convergence.CSV_COLUMNS
    assert [(r["recipe"], int(r["step"]), int(r["images_seen"])) for r in rows] == [
        ("tiny", 2, 32),
        ("tiny", 4, 64),
        ("diffusers", 2, 32),
        ("diffusers", 4, 64),
    ]
    assert all(float(r["fd"]) > 0 and 0 <= float(r["class_accuracy"]) <= 1 for r in rows)
    assert (out / "convergence.png").stat().st_size > 0
    setup = json.loads((out / "convergence.json").read_text())
    assert (
        setup["real_floor"]["fd"] > 0 and setup["recipes"]["tiny"]["sampler"] == "flow-euler"
    )  # the quick preset is a flow


def test_recipe_overrides_split_at_commas_outside_list_values():
    recipe = convergence.Recipe.parse(
        "b=configs/fmnist/diffusion-fast.yaml:trainer.lr=1e-3,betas=[0.9,0.95],posthoc_ema=[0.05,0.1]"
    )
    assert recipe.overrides == ("trainer.lr=1e-3", "betas=[0.9,0.95]", "posthoc_ema=[0.05,0.1]")
    assert recipe.preset.resolve() == ROOT / "configs/fmnist/diffusion-fast.yaml"
