"""Evaluation metrics: PSNR, SSIM, Frechet distance, feature statistics, feature extractors."""

import math
import time

import numpy as np
import pytest
import torch

from ldm import metrics
from ldm.metrics import (
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    ClassifierFeatures,
    FeatureExtractor,
    FeatureStats,
    InceptionFeatures,
    InceptionUnavailableError,
    frechet_distance,
    frechet_distance_of,
    inception_available,
    psnr,
    ssim,
    throughput,
    to_inception_input,
)
from ldm.models.classifier import Classifier, ClassifierConfig


def random_images(n=4, c=1, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=generator) * 2 - 1


def random_spd(d, rng, rank=None):
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def reference_frechet(mu1, s1, mu2, s2):
    """The TTUR/torch-fidelity formula: general eig of S1 S2 in float64 numpy."""
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# --------------------------------------------------------------------------- PSNR, SSIM


def test_psnr_matches_float64_formula_on_unit_scaled_pixels():
    x, y = random_images(seed=0), random_images(seed=1)
    x01, y01 = (x.double() + 1) / 2, (y.double() + 1) / 2
    expected = [10 * math.log10(1.0 / ((a - b) ** 2).mean().item()) for a, b in zip(x01, y01)]
    assert psnr(x, y).tolist() == pytest.approx(expected, rel=1e-12)


def test_psnr_is_per_image_and_known_for_a_constant_offset():
    x = torch.zeros(3, 1, 8, 8)
    y = x + 0.2  # 0.1 on [0, 1]: mse 0.01, PSNR 20 dB
    out = psnr(x, y)
    assert out.shape == (3,)
    assert out.tolist() == pytest.approx([20.0] * 3)


def test_psnr_of_identical_images_is_inf():
    x = random_images()
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_of_identical_images_is_one():
    x = random_images(c=3)
    assert ssim(x, x).tolist() == pytest.approx([1.0] * 4, abs=1e-5)


def test_ssim_drops_as_noise_grows():
    x = random_images(seed=3).clamp(-0.8, 0.8)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    small, large = ssim(x, x + 0.05 * noise), ssim(x, x + 0.3 * noise)
    assert small.shape == (4,)
    assert (small < 1.0).all() and (large < small).all()


# --------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), random_spd(16, rng)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    # Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_general_eig_reference_on_random_spd():
    rng = np.random.default_rng(2)
    for d in (3, 10, 32):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(d, rng), random_spd(d, rng)
        expected = reference_frechet(mu1, s1, mu2, s2)
        got = frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2))
        assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    s1, s2 = random_spd(12, rng), random_spd(12, rng)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_frechet_distance_handles_singular_covariances():
    # Fewer samples than dimensions give rank-deficient covariances, as in FID with small N.
    rng = np.random.default_rng(4)
    s1, s2 = random_spd(20, rng, rank=5), random_spd(20, rng, rank=7)
    mu = np.zeros(20)
    got = frechet_distance(mu, s1, mu, s2)
    assert math.isfinite(got) and got >= -1e-9
    assert got == pytest.approx(reference_frechet(mu, s1, mu, s2), rel=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# --------------------------------------------------------------------------- FeatureStats


def test_feature_stats_streaming_equals_one_shot_numpy():
    rng = np.random.default_rng(5)
    # A large mean next to a small spread is where raw sums of squares lose precision.
    features = 1000.0 + rng.standard_normal((103, 6)) * 0.01
    stats = FeatureStats()
    for chunk in np.array_split(features, [1, 40, 41, 90]):
        stats.update(torch.tensor(chunk, dtype=torch.float64))
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean().numpy(), features.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(stats.cov().numpy(), np.cov(features, rowvar=False), rtol=1e-9, atol=1e-15)


def test_feature_stats_from_features_matches_update():
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(6))
    one_shot = FeatureStats.from_features(features)
    assert one_shot.dim == 4 and one_shot.mean().dtype == torch.float64
    expected_cov = np.cov(features.double().numpy(), rowvar=False)
    torch.testing.assert_close(one_shot.cov(), torch.from_numpy(expected_cov))


def test_feature_stats_needs_two_vectors_for_a_covariance():
    stats = FeatureStats.from_features(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        stats.cov()


# --------------------------------------------------------------------------- extractors


def tiny_classifier():
    torch.manual_seed(0)
    return Classifier(ClassifierConfig(width=8, feature_dim=16))


def test_classifier_gives_logits_and_penultimate_features():
    model = tiny_classifier().eval()
    x = random_images(n=5)
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, 16)
    assert model.predict(x).shape == (5,)


def test_classifier_features_are_honestly_named_and_deterministic():
    model = tiny_classifier().train()
    extractor = ClassifierFeatures(model, "classifier@abc123")
    assert isinstance(extractor, FeatureExtractor)
    assert not extractor.is_standard
    assert "classifier@abc123" in extractor.name and "not comparable to published FID" in extractor.name
    x = random_images(n=6)
    torch.testing.assert_close(extractor(x), extractor(x))  # eval mode: no dropout, running BN stats
    assert extractor(x).shape == (6, 16)
    assert model.training  # the caller's mode is left as it was


def test_frechet_distance_of_streams_equals_distance_of_all_features_at_once():
    extractor = ClassifierFeatures(tiny_classifier(), "classifier@test")
    real = [random_images(n=20, seed=s) for s in range(3)]
    fake = [random_images(n=15, seed=10 + s) * 0.5 + 0.4 for s in range(2)]
    reference = metrics.feature_stats(extractor, ((x, torch.zeros(len(x))) for x in real))  # (images, labels)
    assert reference.count == 60

    real_features = extractor(torch.cat(real)).double().numpy()
    fake_features = extractor(torch.cat(fake)).double().numpy()
    expected = reference_frechet(
        fake_features.mean(0),
        np.cov(fake_features, rowvar=False),
        real_features.mean(0),
        np.cov(real_features, rowvar=False),
    )
    assert expected > 0
    assert frechet_distance_of(extractor, fake, reference) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_of(extractor, real, reference) == pytest.approx(0.0, abs=1e-9)


def test_inception_input_is_uint8_rgb_quantised_like_a_png():
    images = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5]).view(1, 1, 1, 5)
    pixels = to_inception_input(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 1, 5)
    assert pixels[0, 0, 0].tolist() == [0, 0, 128, 255, 255]
    assert torch.equal(pixels[:, 0], pixels[:, 2])


def test_inception_unavailable_names_the_file_the_directory_and_the_url(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    available, reason = inception_available()
    assert not available
    assert INCEPTION_WEIGHTS_FILENAME in reason
    assert str(tmp_path / "checkpoints") in reason
    assert INCEPTION_WEIGHTS_URL in reason
    with pytest.raises(InceptionUnavailableError, match=INCEPTION_WEIGHTS_FILENAME):
        InceptionFeatures()


def test_inception_unavailable_names_a_missing_explicit_path(tmp_path):
    missing = tmp_path / "inception.pth"
    available, reason = inception_available(missing)
    assert not available and str(missing) in reason


def test_inception_unavailable_names_the_missing_package(monkeypatch):
    real_find_spec = metrics.importlib.util.find_spec

    def find_spec_without_torch_fidelity(name):
        return None if name == "torch_fidelity" else real_find_spec(name)

    monkeypatch.setattr(metrics.importlib.util, "find_spec", find_spec_without_torch_fidelity)
    available, reason = inception_available()
    assert not available and "torch-fidelity is not installed" in reason


def test_throughput_counts_items_per_second():
    rate = throughput(lambda: time.sleep(0.02), items_per_call=10, repeats=3, warmup=0)
    assert 100 < rate <= 500  # 10 items per >= 20 ms


def test_curve_panels_draw_ten_lines_in_ten_distinct_colours(tmp_path):
    from PIL import Image

    from ldm.images import CURVE_COLORS, CurvePanel, save_curve_panels

    curves = {f"line{i}": [(0.0, 1.0 + i), (1.0, 2.0 + i)] for i in range(11)}
    path = save_curve_panels([CurvePanel(curves, "eleven lines")], tmp_path / "curves.png")
    pixels = Image.open(path).convert("RGB")
    colours = {pixels.getpixel((x, y)) for x in range(pixels.width) for y in range(pixels.height)}
    assert len(set(CURVE_COLORS)) == 10
    assert all(tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) in colours for c in CURVE_COLORS)
