"""analyses.gini against an independent formulation: mean absolute difference / (2 x mean)."""

import numpy as np
import pytest
from hookpoints.analyses import gini

from hookpoints.errors import UserError


def gini_mad(x: np.ndarray) -> float:
    """G = sum_i sum_j |x_i - x_j| / (2 n^2 mean): the relative mean absolute difference over two."""
    x = np.asarray(x, dtype=np.float64)
    if x.sum() == 0:
        return 0.0
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean()))


@pytest.mark.parametrize("n", [1, 2, 7, 100, 313])
def test_matches_mean_absolute_difference_form(n):
    rng = np.random.default_rng(n)
    for x in (
        rng.random(n),
        rng.integers(0, 5, n).astype(float),  # counts with ties and zeros
        rng.pareto(1.5, n),  # heavy tail
        np.where(rng.random(n) < 0.9, 0.0, rng.random(n)),  # mostly zeros
    ):
        assert gini(x) == pytest.approx(gini_mad(x), abs=1e-12)


def test_known_values_and_axis():
    assert gini([3, 3, 3, 3]) == 0.0
    assert gini([0, 0, 0, 5]) == pytest.approx(3 / 4)  # one value holds all: (n - 1) / n
    assert gini([0, 0, 0]) == 0.0  # nothing to be unequal about
    rows = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 9.0], [1.0, 2.0, 3.0]])
    np.testing.assert_allclose(gini(rows, axis=1), [gini_mad(r) for r in rows], atol=1e-12)
    np.testing.assert_allclose(gini(rows.T, axis=0), [gini_mad(r) for r in rows], atol=1e-12)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, -0.5], "non-negative"),
        ([1.0, np.nan], "NaN or infinite"),
        ([1.0, np.inf], "NaN or infinite"),
        ([], "no values"),
        (3.0, "an array"),
    ],
)
def test_bad_values_are_refused(values, message):
    with pytest.raises(UserError, match=message):
        gini(values)
