"""Gini coefficient of non-negative values (docs/gini.md).

Sorted form, for x_(1) <= ... <= x_(n) (e.g. Damgaard & Weiner 2000; the form used by the paper's Gini of
selected-neuron distributions, seeds/seamless-m4t-v2-neurons.txt, section 5.2)::

    G = sum_i (2i - n - 1) x_(i) / (n sum_i x_i)

0 when every value is equal, (n - 1) / n when one value holds everything. All-zero values give 0 (nothing is
unequal).
"""

from __future__ import annotations

import numpy as np
from hookpoints.analyses.arguments import number_array

from hookpoints.errors import UserError

__all__ = ["gini"]


def gini(values, axis: int = -1) -> np.ndarray | float:
    """Gini coefficient of non-negative ``values`` along ``axis`` (a float for 1-D input).

    NaN, infinite or negative values are refused: the coefficient is defined for amounts, so take ``abs``
    of signed activations first (docs/gini.md).

    >>> gini([1.0, 1.0, 1.0, 1.0]), gini([0.0, 0.0, 0.0, 4.0])
    (0.0, 0.75)
    """
    x = np.asarray(number_array(values, "gini's values"), dtype=np.float64)
    if x.ndim == 0:
        raise UserError("gini needs an array of values, not a single number")
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or not -x.ndim <= axis < x.ndim:
        raise UserError(f"gini's axis must be a whole number from {-x.ndim} to {x.ndim - 1} here, not {axis!r}")
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    if n == 0:
        raise UserError("gini of no values is undefined: give at least one value")
    if not np.isfinite(x).all():
        raise UserError("gini got NaN or infinite values: drop or impute them first")
    if (x < 0).any():
        raise UserError("gini is defined for non-negative values: take abs() of signed values (e.g. activations)")
    x = np.sort(x, axis=-1)
    weights = 2.0 * np.arange(1, n + 1) - n - 1  # [n]
    total = x.sum(axis=-1)
    numerator = x @ weights
    with np.errstate(invalid="ignore", divide="ignore"):
        g = np.where(total > 0, numerator / (n * np.where(total > 0, total, 1.0)), 0.0)
    return float(g) if g.ndim == 0 else g
