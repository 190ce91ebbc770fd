"""Store additions: a scan abandoned half-way (LIMIT) exits cleanly; atomic replace; per-table row groups."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hookpoints.store.catalog import Store
from hookpoints.store.schema import TableSpec
from selectivity_helpers import DECODER, examples_table, hook_rows, write_run

ROOT = Path(__file__).resolve().parents[1]
QUERY = """
import sys
from hookpoints.store.catalog import Store
with Store.open(sys.argv[1]).query() as session:
    print(session.sql("SELECT hook, activation FROM activations LIMIT 2").num_rows)
"""


def test_limit_over_many_files_exits_cleanly(tmp_path):
    store = Store.open(tmp_path / "store", create=True)
    write_run(store, "r", examples_table(3, "text"), hook_rows("text_decoder", 6, DECODER))  # 72 files
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(3):  # with Delta's Python file system this crashed or hung most of the time
        done = subprocess.run(
            [sys.executable, "-c", QUERY, str(tmp_path / "store")], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "2"


def test_replace_is_atomic_and_tables_choose_their_row_groups(tmp_path):
    store = Store.open(tmp_path / "store", create=True)
    spec = TableSpec("t", pa.schema([("key", pa.string()), ("v", pa.int64())]), ("key",), row_group_rows=4096)
    store.append(spec, pa.table({"key": ["a"] * 5000 + ["b"] * 3, "v": range(5003)}, schema=spec.schema))
    files = list((tmp_path / "store" / "t").rglob("*.parquet"))
    assert sorted(pq.ParquetFile(f).metadata.row_group(0).num_rows for f in files) == [3, 4096]

    def rows() -> dict:
        table = store.dataset("t").to_table()
        pairs = list(zip(table["key"].to_pylist(), table["v"].to_pylist(), strict=True))
        return {key: sorted(v for k, v in pairs if k == key) for key in "ab"}

    store.replace(spec, lambda: pa.table({"key": ["b"], "v": [-1]}, schema=spec.schema), "key = 'b'")
    assert rows() == {"a": list(range(5000)), "b": [-1]}
    with pytest.raises(Exception, match="failed validation"):  # a new row outside the predicate: nothing changes
        store.replace(spec, lambda: pa.table({"key": ["a", "b"], "v": [7, 7]}, schema=spec.schema), "key = 'b'")
    assert rows() == {"a": list(range(5000)), "b": [-1]}
