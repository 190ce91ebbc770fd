"""How well labelled points cluster: silhouette, Davies-Bouldin, centroids and mean distances (Euclidean).

Labels are integer codes per point (``-1`` = no label: the point is left out of that label's measures), so
several labels can be measured over one matrix without copying it. Both run in float64 (float32 points from the store
are converted a block of rows at a time).

- silhouette (Rousseeuw 1987, as ``sklearn.metrics.silhouette_score``): for point i in class A,
  a(i) = mean distance to the other points of A, b(i) = min over classes C != A of the mean distance to C,
  s(i) = (b - a) / max(a, b), and 0 for a point alone in its class; the score is the mean of s(i).
- Davies-Bouldin (1979, as ``sklearn.metrics.davies_bouldin_score``): S_k = mean distance of class k's points
  to its centroid c_k, M_kl = ||c_k - c_l||, DB = mean_k max_{l != k} (S_k + S_l) / M_kl. Lower is better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.spatial.distance import cdist

#: Rows per block when distances or differences are formed (bounds memory: block x points float64).
BLOCK_ROWS = 1024


@dataclass(frozen=True)
class PairStats:
    """One label's silhouette over a point set, with mean pairwise distances within and between its classes."""

    silhouette: float
    within: float  # mean distance over pairs of distinct points of the same class
    between: float  # mean distance over pairs of points of different classes
    points: int  # labelled points measured


def silhouettes(x: np.ndarray, labels: list[np.ndarray]) -> list[PairStats]:
    """Silhouette (and mean within/between distances) of each labelling of the points ``x`` ``[n, d]``.

    One pass of blocked pairwise distances serves every labelling: each block's distance rows are multiplied
    by a one-hot matrix of all labellings' classes, giving every point's distance sum to every class.
    O(n^2 d) time, O(BLOCK_ROWS x n) memory.
    """
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    onehots, offsets = [], [0]
    for codes in labels:
        k = int(codes.max()) + 1
        keep = codes >= 0
        onehots.append(sparse.csr_matrix((np.ones(keep.sum()), (np.flatnonzero(keep), codes[keep])), shape=(n, k)))
        offsets.append(offsets[-1] + k)
    onehot = sparse.hstack(onehots, format="csr")  # [n, all classes]
    squares = np.einsum("ij,ij->i", x, x)
    sums = np.empty((n, offsets[-1]))  # [n, all classes]: each point's summed distance to each class
    for start in range(0, n, BLOCK_ROWS):
        block = slice(start, min(start + BLOCK_ROWS, n))
        distances = _euclidean(x[block], x, squares[block], squares)  # [block, n]
        distances[np.arange(block.stop - block.start), np.arange(block.start, block.stop)] = 0.0
        sums[block] = (onehot.T @ distances.T).T
    stats = []
    for codes, first, last in zip(labels, offsets[:-1], offsets[1:], strict=True):
        keep = codes >= 0
        own = codes[keep]
        class_sums = sums[keep, first:last]  # [labelled points, classes]
        sizes = np.bincount(own, minlength=last - first).astype(np.float64)
        rows = np.arange(len(own))
        intra = class_sums[rows, own]
        a = intra / np.maximum(sizes[own] - 1, 1)
        means = class_sums / np.where(sizes > 0, sizes, np.nan)
        means[rows, own] = np.inf
        means[:, sizes == 0] = np.inf
        b = means.min(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.nan_to_num((b - a) / np.maximum(a, b))
        s[sizes[own] == 1] = 0.0
        within_pairs = float((sizes * (sizes - 1)).sum())
        all_pairs = float(len(own) * (len(own) - 1))
        within_sum, total_sum = float(intra.sum()), float(class_sums.sum())
        stats.append(
            PairStats(
                silhouette=float(s.mean()),
                within=within_sum / within_pairs if within_pairs else float("nan"),
                between=(total_sum - within_sum) / (all_pairs - within_pairs) if all_pairs > within_pairs else 0.0,
                points=len(own),
            )
        )
    return stats


@dataclass(frozen=True)
class CentroidStats:
    """One label's Davies-Bouldin index, with its class centroids and their pairwise distances."""

    davies_bouldin: float
    centroids: np.ndarray  # [classes, d] float64
    distances: np.ndarray  # [classes, classes]
    sizes: np.ndarray  # [classes] points per class


def centroid_stats(x: np.ndarray, codes: np.ndarray) -> CentroidStats:
    """Davies-Bouldin index of the labelling ``codes`` of ``x`` ``[n, d]`` (points with code -1 left out).

    Classes without points (a sample may miss some) get NaN centroids and take no part in the index.
    Two passes over ``x`` in float64 blocks of ``BLOCK_ROWS`` rows: ``x`` is never copied whole (it may be
    100,000 x 4,096). float32 sums drifted from the float64 centroids by 1e-4 on a layer with a large offset.
    """
    k = int(codes.max()) + 1
    sums = np.zeros((k, x.shape[1]))
    for block, block_codes in _blocks(x, codes):
        sums += _onehot(block_codes, k).T @ block
    sizes = np.bincount(codes[codes >= 0], minlength=k)
    present = sizes > 0
    centroids = np.full_like(sums, np.nan)
    centroids[present] = sums[present] / sizes[present, None]
    spread = np.zeros(k)  # summed distance of each class's points to its centroid
    for block, block_codes in _blocks(x, codes):
        diff = block - centroids[block_codes]  # [block, d]
        spread += np.bincount(block_codes, np.sqrt(np.einsum("ij,ij->i", diff, diff)), minlength=k)
    spread = spread[present] / sizes[present]
    inner = centroids[present]
    distances = np.full((k, k), np.nan)
    distances[np.ix_(present, present)] = cdist(inner, inner)  # direct differences: centroids sit close together
    np.fill_diagonal(distances, 0.0)
    between = distances[np.ix_(present, present)]
    if np.allclose(spread, 0) or np.allclose(between, 0):
        return CentroidStats(0.0, centroids, distances, sizes)
    ratios = (spread[:, None] + spread[None, :]) / np.where(between == 0, np.inf, between)
    return CentroidStats(float(ratios.max(1).mean()), centroids, distances, sizes)


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` ``[m, d]`` and ``b`` ``[n, d]`` (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return _euclidean(a, b, np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b))


def _euclidean(a: np.ndarray, b: np.ndarray, a2: np.ndarray, b2: np.ndarray | None = None) -> np.ndarray:
    """||a_i - b_j|| from squared norms and one matrix product (float64, clipped at 0 before the root)."""
    b2 = a2 if b2 is None else b2
    squared = a2[:, None] + b2[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(squared, 0.0, out=squared), out=squared)


def _blocks(x: np.ndarray, codes: np.ndarray, rows: int = BLOCK_ROWS):
    """(labelled rows of a block as float64, their codes)."""
    for start in range(0, x.shape[0], rows):
        block_codes = codes[start : start + rows]
        keep = block_codes >= 0
        block = x[start : start + rows]
        if not keep.all():
            block, block_codes = block[keep], block_codes[keep]
        yield block.astype(np.float64, copy=False), block_codes


def _onehot(codes: np.ndarray, k: int, dtype=np.float64) -> sparse.csr_matrix:
    ones = np.ones(len(codes), dtype)
    return sparse.csr_matrix((ones, (np.arange(len(codes)), codes)), shape=(len(codes), k))
