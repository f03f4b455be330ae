"""Precision, recall, density, coverage and the memorisation test, against slow references and planted copies."""

import pytest
import torch

from ldm import metrics
from ldm.metrics import copy_threshold, manifold_metrics, nearest_distances


def features(n, d=6, seed=0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator) + shift


def slow_kth_radius(points, k):
    """The distance of each point to its k-th nearest other point, one point at a time."""
    radii = []
    for i, p in enumerate(points):
        others = [float(torch.dist(p.double(), q.double())) for j, q in enumerate(points) if j != i]
        radii.append(sorted(others)[k - 1])
    return radii


def slow_manifold_metrics(real, fake, k):
    """Kynkaanniemi et al. 2019 and Naeem et al. 2020 written as their definitions read, in Python loops."""
    real_radii, fake_radii = slow_kth_radius(real, k), slow_kth_radius(fake, k)

    def inside(x, centre, radius):
        return float(torch.dist(x.double(), centre.double())) <= radius

    precision = sum(any(inside(f, r, rr) for r, rr in zip(real, real_radii)) for f in fake) / len(fake)
    recall = sum(any(inside(r, f, fr) for f, fr in zip(fake, fake_radii)) for r in real) / len(real)
    density = sum(inside(f, r, rr) for f in fake for r, rr in zip(real, real_radii)) / (k * len(fake))
    coverage = sum(any(inside(f, r, rr) for f in fake) for r, rr in zip(real, real_radii)) / len(real)
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("chunk", [1000, 7])
def test_nearest_distances_match_sorted_pairwise_distances(monkeypatch, chunk):
    monkeypatch.setattr(metrics, "DISTANCE_CHUNK", chunk)  # 7: the chunks split the queries unevenly
    points, queries = features(30), features(12, seed=1)
    distances, indices = nearest_distances(queries, points, k=3)
    full = torch.cdist(queries.double(), points.double())
    torch.testing.assert_close(distances, full.sort(1).values[:, :3])
    torch.testing.assert_close(full.gather(1, indices), distances)


@pytest.mark.parametrize("chunk", [1000, 7])
def test_nearest_distances_excluding_self_skip_each_points_own_row(monkeypatch, chunk):
    monkeypatch.setattr(metrics, "DISTANCE_CHUNK", chunk)
    points = features(20)
    distances, indices = nearest_distances(points[:15], points, k=2, exclude_self=True)
    assert (indices != torch.arange(15)[:, None]).all()
    full = torch.cdist(points[:15].double(), points.double())
    full[torch.arange(15), torch.arange(15)] = float("inf")
    torch.testing.assert_close(distances, full.sort(1).values[:, :2])


def test_nearest_distances_refuse_too_few_points_and_mismatched_widths():
    with pytest.raises(ValueError, match="need at least 4 points"):
        nearest_distances(features(3), features(3), k=3, exclude_self=True)
    with pytest.raises(ValueError, match=r"\(M, D\) and \(N, D\)"):
        nearest_distances(features(3, d=4), features(3, d=5))


@pytest.mark.parametrize("chunk", [1000, 9])
def test_manifold_metrics_match_a_slow_reference_on_random_features(monkeypatch, chunk):
    monkeypatch.setattr(metrics, "DISTANCE_CHUNK", chunk)
    real, fake = features(40, seed=0), features(35, seed=1, shift=0.4)
    fast = manifold_metrics(real, fake, k=3)
    slow = slow_manifold_metrics(real, fake, k=3)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_a_collapsed_generator_keeps_precision_and_loses_recall_and_coverage():
    real = features(400, d=2)
    one_mode = real[real[:, 0] > 1.0][:40]  # 40 of the ~16% of the data on one side
    collapsed = one_mode + 0.01 * features(len(one_mode), d=2, seed=5)
    spread = features(400, d=2, seed=6)  # a fresh draw from the same distribution
    lost, kept = manifold_metrics(real, collapsed, k=5), manifold_metrics(real, spread, k=5)
    assert lost["precision"] > 0.9 and kept["precision"] > 0.8
    assert lost["recall"] < 0.5 < kept["recall"]
    assert lost["coverage"] < 0.3 < kept["coverage"]


def test_memorisation_threshold_flags_planted_copies_and_few_fresh_samples():
    train = features(2000, d=4)
    threshold = copy_threshold(train, quantile=0.01)
    copies = train[:25] + 1e-4  # planted: 25 training images, a hair off
    fresh = features(475, d=4, seed=9)  # new draws of the same distribution
    nearest = nearest_distances(torch.cat([copies, fresh]), train)[0][:, 0]
    flagged = nearest < threshold
    assert flagged[:25].all()
    assert flagged[25:].double().mean() < 0.05  # fresh samples are flagged at about the quantile


def test_copy_threshold_refuses_a_quantile_outside_the_unit_interval():
    with pytest.raises(ValueError, match="quantile must lie in"):
        copy_threshold(features(10), quantile=1.0)
