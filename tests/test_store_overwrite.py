"""`record --overwrite`'s swap (store/overwrite.py): the swapped-in files keep what a normal write gives them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from hookpoints.store import tables
from hookpoints.store.writer import HookRows, open_run

from tests.hostile_helpers import SETTINGS, hooks

_STATS = ("num_records", "null_count", "min", "max", "partition")


def record(store, run: str, if_exists: str = "error") -> None:
    """Three commits of three examples each (ids e00..e22) at h0 and h1: three files per partition."""
    schema = pa.table({"example_id": ["a"], "text": ["x"]}).schema
    writer = open_run(
        store, run, settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists=if_exists
    )
    rng = np.random.default_rng(0)
    for part in range(3):
        ids = [f"e{part}{i}" for i in range(3)]
        rows = {h["hook"]: HookRows(ids, rng.normal(size=(3, 4)).astype(np.float32)) for h in hooks()}
        writer.add(pa.table({"example_id": ids, "text": [f"t{i}" for i in ids]}), rows)
        writer.flush()
    writer.finish()


def file_stats(store, table: str) -> list[dict]:
    """Each file's Delta statistics as delta-rs reads them from the log (no path, no time)."""
    actions = pa.table(tables.open_table(store.location, table).get_add_actions(flatten=False)).to_pylist()
    return sorted(({key: action[key] for key in _STATS} for action in actions), key=repr)


def test_an_overwrite_keeps_the_files_statistics_of_a_normal_write(store):
    """The swap re-added the staging run's files with `numRecords` alone: no null counts, no min/max, so a reader
    filtering on example_id read every file of the run. They now carry the statistics a fresh write gives."""
    record(store, "r1")
    fresh = {table: file_stats(store, table) for table in ("hooks", "examples", "activations")}
    assert fresh["activations"][0]["min"]["example_id"] is not None  # a fresh write has them (store/files.py)
    record(store, "r1", if_exists="overwrite")  # the same rows, recorded aside and swapped in
    assert {table: file_stats(store, table) for table in fresh} == fresh
    with store.query() as session:
        assert session.sql("SELECT count(*) AS n FROM activations WHERE run = 'r1'")["n"][0].as_py() == 18


def test_data_skipping_still_prunes_the_files_of_an_overwritten_run(store):
    record(store, "r1", if_exists="error")
    record(store, "r1", if_exists="overwrite")
    dataset = tables.dataset(store.location, "activations")
    assert len(list(dataset.get_fragments())) == 6  # three files for each of h0 and h1
    kept = list(dataset.get_fragments(filter=ds.field("example_id") == "e11"))
    assert len(kept) == 2  # only the file of each hook holding e10..e12
    assert dataset.to_table(filter=ds.field("example_id") == "e11").num_rows == 2
