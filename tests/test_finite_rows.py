"""store.buffer.finite_rows against a plain per-row np.isfinite, across block boundaries (issue 16: the flush's
finiteness check runs in reused blocks instead of whole-buffer temporaries)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hookpoints.store import buffer


def reference(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.array([np.isfinite(values[a:b]).all() for a, b in zip(offsets[:-1], offsets[1:], strict=True)])


@pytest.mark.parametrize("float16", [True, False])
@pytest.mark.parametrize("block", [1, 3, 7, 64, 1 << 24])
@pytest.mark.parametrize("threads", [1, 3])
def test_finite_rows_equals_a_per_row_check(monkeypatch, float16, block, threads):
    """Blocks of ``block`` values over ``threads`` threads (a row split across blocks of two threads included)."""
    monkeypatch.setattr(buffer, "FINITE_BLOCK", block * threads)
    monkeypatch.setattr(buffer, "FINITE_THREADS", threads)
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


@pytest.mark.parametrize("float16", [True, False])
@pytest.mark.parametrize("block", [1, 2, 5, 1 << 24])
def test_a_bad_last_value_before_trailing_empty_vectors_is_found(monkeypatch, float16, block):
    """The last vector's last value bad, then empty vectors, int32 offsets (as Buffer.table builds them): the
    reduceat this replaced clamped the empty vectors' starts to the last value and so ended the last vector
    one value early, flagging it finite."""
    monkeypatch.setattr(buffer, "FINITE_BLOCK", block)
    values = np.array([1, 2, 3, 4, 5, np.nan], np.float16 if float16 else np.float32)
    offsets = np.array([0, 0, 3, 3, 6, 6, 6], np.int32)  # widths 0, 3, 0, 3, 0, 0
    flat = values.view(np.uint16) if float16 else values
    found = buffer.finite_rows(flat, offsets, float16=float16)
    np.testing.assert_array_equal(found, reference(values, offsets))
    assert found.tolist() == [True, True, True, False, True, True]


@pytest.mark.parametrize("float16", [True, False])
def test_buffer_table_flags_rows_across_blocks_and_hooks(monkeypatch, float16):
    """Through Buffer.table: hooks of different widths, rows cut by small blocks, float64 rows beyond float16's
    range (inf after the cast) and NaN; each row's flag equals numpy's check of the stored vector."""
    monkeypatch.setattr(buffer, "FINITE_BLOCK", 5)
    rng = np.random.default_rng(3)
    ids = [f"e{i}" for i in range(6)]
    rows = {}
    for h, width in enumerate([3, 7, 1]):
        values = rng.normal(size=(6, width))
        values[rng.integers(0, 6), rng.integers(0, width)] = [1e6, np.nan, -np.inf][h]  # 1e6: inf in float16
        rows[f"h{h}"] = buffer.HookRows(ids, values)
    store = buffer.Buffer()
    store.add(pa.table({"example_id": ids}), rows)
    table = store.table("r", ["h0", "h1", "h2"], float16=float16)
    stored = table["activation_f16_bytes" if float16 else "activation"].to_pylist()
    vectors = [np.frombuffer(v, "<f2") if float16 else np.array(v, np.float32) for v in stored]
    expected = [bool(np.isfinite(v).all()) for v in vectors]
    assert expected.count(False) == (3 if float16 else 2)  # 1e6 overflows float16 only
    assert table["finite"].to_pylist() == expected


def test_a_zero_width_hook_after_a_bad_row_leaves_its_flag_false():
    """Buffer.table with a zero-width hook last: the NaN in the flush's last value is flagged (before 77bf746
    the reduceat read the empty vectors' clamped starts and called that row finite)."""
    ids = ["a", "b"]
    rows = {
        "h0": buffer.HookRows(ids, np.array([[1.0, 2.0], [1.0, np.nan]])),
        "h1": buffer.HookRows(ids, np.zeros((2, 0))),
    }
    store = buffer.Buffer()
    store.add(pa.table({"example_id": ids}), rows)
    assert store.table("r", ["h0", "h1"], float16=True)["finite"].to_pylist() == [True, False, True, True]


@pytest.mark.parametrize("density", [0.5, 1.0])
def test_a_flush_of_mostly_bad_values_is_checked_within_its_scratch_arrays(monkeypatch, density):
    """Every value NaN (a model that overflowed in float16 from some layer on): the rows of each block are flagged
    with one reduceat, in memory of the order of the block's 3 bytes a value. Mapping each bad value to its row
    took 24 bytes a bad value per block (27 MiB here) and 3-4 s for 128 Mi values (0.05-0.17 s now)."""
    import tracemalloc

    monkeypatch.setattr(buffer, "FINITE_BLOCK", 1 << 20)
    rng = np.random.default_rng(5)
    values = rng.normal(size=4 << 20).astype(np.float16)
    values[rng.random(len(values)) < density] = np.nan
    offsets = np.zeros((4 << 20) // 64 + 1, np.int32)
    offsets[1:] = np.cumsum(np.full(len(offsets) - 1, 64))
    tracemalloc.start()
    try:
        found = buffer.finite_rows(values.view(np.uint16), offsets, float16=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(found, ~np.isnan(values.reshape(-1, 64)).any(axis=1))
    assert peak < 8 * 2**20  # scratch 3 MiB (1 Mi values) and a few arrays of the block's rows
