"""Vectors of another length than their hook's width (rows appended by another tool, a damaged store) are refused
by every reader of the analyses, not reshaped into wrong rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from hookpoints.analyses.examples import open_runs, select_examples
from hookpoints.analyses.hook_matrix import HookMatrixReader, shared_hooks
from hookpoints.analyses.layers import layer_hooks, read_layer, run_settings
from hookpoints.analyses.subsets import select_subset
from hookpoints.store.catalog import Store
from hookpoints.store.schema import ACTIVATIONS
from hookpoints.store.writer import HookRows, open_run

from hookpoints.errors import UserError

HOOK = {"hook": "h", "module": "h", "io": "output", "component": "c", "layer": 0, "submodule": "s", "width": 4,
        "shape": [4], "neuron_axis": 1, "space": "c", "layer_output": True}  # fmt: skip


def _store(tmp_path, ragged: bool) -> tuple[Store, np.ndarray]:
    """Run r: e0, e1 at a width-4 hook. ``ragged``: its two vectors replaced by one of 3 values and one of 5
    (8 values in all, as two rows of 4 would be)."""
    store = Store.open(tmp_path / "store", create=True)
    x = np.random.default_rng(5).normal(size=(2, 4)).astype(np.float32)
    examples = pa.table({"example_id": ["e0", "e1"]})
    settings = {"model": "m", "task": "forward", "pooling": "mean", "dtype": "float32"}
    writer = open_run(store, "r", settings=settings, config={}, hooks=[HOOK], examples_schema=examples.schema)
    writer.add(examples, {"h": HookRows(["e0", "e1"], x)})
    writer.finish()
    if ragged:
        uri = store.location.table_uri("activations")
        DeltaTable(uri).delete("run = 'r' AND hook = 'h'")
        rows = pa.table(
            {"run": ["r", "r"], "hook": ["h", "h"], "example_id": ["e0", "e1"], "position": pa.nulls(2, pa.int32()),
             "activation": pa.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0, 8.0]], pa.list_(pa.float32())),
             "activation_f16": pa.nulls(2, pa.list_(pa.int16())), "finite": [True, True],
             "activation_f16_bytes": pa.nulls(2, pa.binary())},
            schema=ACTIVATIONS,
        )  # fmt: skip
        write_deltalake(uri, rows, mode="append", partition_by=["run", "hook"])
    return store, x


def _hook_matrix(store: Store) -> np.ndarray:
    with store.query() as session:
        group = open_runs(session, ["r"])
        examples = select_examples(session, group)
        hook = shared_hooks(session, group.runs, layer_outputs=True)[0]
    return HookMatrixReader(store, examples).read(hook)


def _layer(store: Store) -> np.ndarray:
    with store.query() as session:
        subset = select_subset(session, "r", None, [])
        return read_layer(session, subset, layer_hooks(session, "r")[0], run_settings(session, "r"), "mean")


@pytest.mark.parametrize("read", [_hook_matrix, _layer], ids=["hook_matrix", "layers"])
def test_vectors_of_another_length_than_the_hook_are_refused(tmp_path, read):
    healthy, x = _store(tmp_path / "healthy", ragged=False)
    np.testing.assert_array_equal(read(healthy), x)
    damaged, _ = _store(tmp_path / "damaged", ragged=True)
    with pytest.raises(UserError, match=r"^run 'r' stores a vector of 3 values at h, not its width 4: .*verify"):
        read(damaged)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_null_values_inside_vectors_are_refused(tmp_path, dtype):
    """A vector with a null element (rows appended by another tool from a frame holding None). float16: every
    vector of the batch was read as its bit patterns' integers (1.0 as 15360.0) beside a NaN, so ap and
    clusters refused it as "NaN or infinite" (advising float32), neuron_stats crashed with a numpy ValueError,
    and verify passed the store. float32: NaN in numpy but skipped by DuckDB's avg, and verify said "NaN or
    inf". Now every reader names the null values and verify reports the file."""
    from hookpoints.store.verify import verify

    store = Store.open(tmp_path / "store", create=True)
    x = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)  # exact in float16
    examples = pa.table({"example_id": ["e0", "e1"]})
    settings = {"model": "m", "task": "forward", "pooling": "mean", "dtype": dtype}
    writer = open_run(store, "r", settings=settings, config={}, hooks=[HOOK], examples_schema=examples.schema)
    writer.add(examples, {"h": HookRows(["e0", "e1"], x)})
    writer.finish()
    np.testing.assert_array_equal(_hook_matrix(store), x)
    uri = store.location.table_uri("activations")
    DeltaTable(uri).delete("run = 'r' AND hook = 'h'")
    if dtype == "float16":
        bits = x.astype(np.float16).view(np.int16).tolist()
        bits[0][1] = None
        f32, f16 = pa.nulls(2, pa.list_(pa.float32())), pa.array(bits, pa.list_(pa.int16()))
    else:
        f32 = pa.array([[1.0, None, 3.0, 4.0], x[1].tolist()], pa.list_(pa.float32()))
        f16 = pa.nulls(2, pa.list_(pa.int16()))
    rows = pa.table(
        {"run": ["r", "r"], "hook": ["h", "h"], "example_id": ["e0", "e1"], "position": pa.nulls(2, pa.int32()),
         "activation": f32, "activation_f16": f16, "finite": [True, True],
         "activation_f16_bytes": pa.nulls(2, pa.binary())},  # float16: the list layout of stores before schema 3
        schema=ACTIVATIONS,
    )  # fmt: skip
    write_deltalake(uri, rows, mode="append", partition_by=["run", "hook"])
    for read in (_hook_matrix, _layer):
        with pytest.raises(UserError, match=r"^run 'r' stores 1 null value\(s\) inside its vectors at h: .*verify"):
            read(store)
    with store.query() as session:
        with pytest.raises(UserError, match=r"^neuron_stats: run 'r' stores 1 null value\(s\) inside"):
            session.neuron_stats("h", stats="avg")
    errors = [f.message for f in verify(store).findings if f.level == "error"]
    assert len(errors) == 1 and "1 null values inside vectors of 'h'" in errors[0]
