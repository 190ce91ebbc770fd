"""The clustering measures against independent computations: scikit-learn's silhouette and Davies-Bouldin,
scipy's pairwise distances and plain numpy centroids."""

from __future__ import annotations

import numpy as np
import pytest
from hookpoints.analyses.cluster_measures import centroid_stats, pairwise_distances, silhouettes
from hookpoints.analyses.clusters import sample_rows
from scipy.spatial.distance import cdist, pdist, squareform
from sklearn.metrics import davies_bouldin_score, silhouette_samples, silhouette_score


@pytest.fixture
def points():
    rng = np.random.default_rng(7)
    n = 700
    x = rng.normal(size=(n, 48)).astype(np.float32)  # float32 like the store; sklearn gets it as float64
    five = rng.integers(0, 5, n)
    x[five == 2] += 1.5  # one class apart from the rest
    many = rng.integers(0, 60, n)
    many[:3] = [60, 61, 61]  # a class with one member, one with two
    partial = five.copy()
    partial[::5] = -1  # unlabelled points leave the measure
    return x, five, many, partial


def test_silhouette_equals_sklearn_for_several_labellings_in_one_pass(points):
    x, five, many, partial = points
    stats = silhouettes(x, [five, many, partial])
    keep, x64 = partial >= 0, x.astype(np.float64)
    assert stats[0].silhouette == pytest.approx(silhouette_score(x64, five), abs=1e-9)
    assert stats[1].silhouette == pytest.approx(silhouette_score(x64, many), abs=1e-9)  # singleton: s = 0
    assert stats[2].silhouette == pytest.approx(silhouette_score(x64[keep], partial[keep]), abs=1e-9)
    assert [s.points for s in stats] == [len(x), len(x), int(keep.sum())]
    assert stats[0].silhouette > 0.02  # the shifted class is visible


def test_silhouette_of_a_lone_point_is_zero_like_sklearn():
    x = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0], [5.0, 6.0], [9.0, 0.0]])
    labels = np.array([0, 0, 1, 1, 2])
    assert silhouette_samples(x, labels)[4] == 0
    assert silhouettes(x, [labels])[0].silhouette == pytest.approx(silhouette_score(x, labels), abs=1e-12)


def test_within_and_between_distances_equal_scipy(points):
    x, five, _, partial = points
    for labels in (five, partial):
        keep = labels >= 0
        distances = squareform(pdist(x[keep].astype(np.float64)))
        same = labels[keep][:, None] == labels[keep][None, :]
        off_diagonal = ~np.eye(keep.sum(), dtype=bool)
        stats = silhouettes(x, [labels])[0]
        assert stats.within == pytest.approx(distances[same & off_diagonal].mean(), rel=1e-9)
        assert stats.between == pytest.approx(distances[~same].mean(), rel=1e-9)


def test_davies_bouldin_and_centroids_equal_sklearn_and_numpy(points):
    x, five, many, partial = points
    x64 = x.astype(np.float64)
    for labels in (five, many, partial):
        keep = labels >= 0
        stats = centroid_stats(x64, labels)
        assert stats.davies_bouldin == pytest.approx(davies_bouldin_score(x64[keep], labels[keep]), rel=1e-9)
        centroids = np.stack([x64[labels == c].mean(0) for c in range(labels.max() + 1)])
        np.testing.assert_allclose(stats.centroids, centroids, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats.distances, cdist(centroids, centroids), rtol=1e-7, atol=1e-9)
        # float32 points (as read from the store) are measured in float64
        assert centroid_stats(x, labels).davies_bouldin == pytest.approx(stats.davies_bouldin, rel=1e-5)


def test_davies_bouldin_skips_classes_without_points(points):
    x, five, _, _ = points
    x64 = x.astype(np.float64)
    gappy = np.where(five == 3, 7, five)  # codes 3, 5 and 6 have no points
    stats = centroid_stats(x64, gappy)
    assert stats.davies_bouldin == pytest.approx(davies_bouldin_score(x64, gappy), rel=1e-9)
    assert np.isnan(stats.centroids[3]).all() and stats.sizes[3] == 0


def test_davies_bouldin_of_identical_points_is_zero_like_sklearn():
    x = np.ones((6, 3))
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert centroid_stats(x, labels).davies_bouldin == davies_bouldin_score(x, labels) == 0.0


def test_pairwise_distances_equal_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(9, 300)) * 50, rng.normal(size=(4, 300)) * 50
    np.testing.assert_allclose(pairwise_distances(a, b), cdist(a, b), rtol=1e-9)


def test_sample_is_seeded_sorted_and_whole_when_small():
    first, again, other = sample_rows(10_000, 500, 3), sample_rows(10_000, 500, 3), sample_rows(10_000, 500, 4)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert len(np.unique(first)) == 500 and np.all(np.diff(first) > 0)
    assert np.array_equal(sample_rows(40, 500, 3), np.arange(40))
