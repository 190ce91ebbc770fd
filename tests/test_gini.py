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
        # numpy's ValueError / TypeError before
        ("abc", "^gini's values must be an array of numbers, not str$"),
        (None, "^gini's values must be an array of numbers, not NoneType$"),
        ({1: 2}, "not dict"),
        ([[1.0, 2.0], [3.0]], "of one shape, not lists of different lengths"),
        ([1j, 2], "must hold real numbers .*not complex128"),
        (np.zeros((3, 0)), "no values"),
    ],
)
def test_bad_values_are_refused(values, message):
    with pytest.raises(UserError, match=message):
        gini(values)


@pytest.mark.parametrize("axis", [2, -3, "a", 1.0, True])
def test_a_bad_axis_is_refused(axis):
    """An AxisError ("source: axis 2 is out of bounds") or TypeError before."""
    with pytest.raises(UserError, match=rf"^gini's axis must be a whole number from -2 to 1 here, not {axis!r}$"):
        gini(np.ones((2, 3)), axis=axis)


def test_good_input_of_any_form_equals_the_mean_absolute_difference_form():
    rows = [[1, 0, 3], [2, 2, 2]]
    np.testing.assert_allclose(gini(rows, axis=np.int64(1)), [gini_mad(np.array(r)) for r in rows], atol=1e-12)
    assert gini([True, False, False]) == pytest.approx(gini_mad(np.array([1.0, 0.0, 0.0])), abs=1e-12)
