"""store.buffer.finite_rows against a plain per-row np.isfinite, across block boundaries (issue 16: the flush's
finiteness check runs in reused blocks instead of whole-buffer temporaries)."""

from __future__ import annotations

import numpy as np
import pytest
from hookpoints.store import buffer


def reference(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.array([np.isfinite(values[a:b]).all() for a, b in zip(offsets[:-1], offsets[1:], strict=True)])


@pytest.mark.parametrize("float16", [True, False])
@pytest.mark.parametrize("block", [1, 3, 7, 64, 1 << 24])
def test_finite_rows_equals_a_per_row_check(monkeypatch, float16, block):
    monkeypatch.setattr(buffer, "FINITE_BLOCK", block)
    rng = np.random.default_rng(block)
    widths = rng.integers(0, 9, size=40)  # empty vectors included
    widths[[0, -1]] = 0  # first and last empty too
    offsets = np.zeros(len(widths) + 1, np.int64)
    np.cumsum(widths, out=offsets[1:])
    values = rng.normal(size=int(offsets[-1])).astype(np.float16 if float16 else np.float32)
    bad = rng.choice(len(values), size=6, replace=False)
    values[bad] = np.array([np.inf, -np.inf, np.nan, np.inf, np.nan, -np.inf], values.dtype)
    flat = values.view(np.uint16) if float16 else values
    found = buffer.finite_rows(flat, offsets, float16=float16)
    expected = reference(values, offsets)
    assert (~expected).sum() >= 3  # the check sees bad rows (six bad values, some rows may share them)
    np.testing.assert_array_equal(found, expected)


def test_finite_rows_of_nothing():
    assert buffer.finite_rows(np.zeros(0, np.uint16), np.array([0, 0, 0]), float16=True).tolist() == [True, True]
    assert buffer.finite_rows(np.zeros(0, np.float32), np.array([0]), float16=False).tolist() == []
