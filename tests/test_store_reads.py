"""Reading the store: a scan that DuckDB abandons half-way (LIMIT) must not crash or hang the process at exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from selectivity_helpers import DECODER, examples_table, hook_rows, write_run

from store.catalog import Store

ROOT = Path(__file__).resolve().parents[1]
QUERY = """
import sys
from store.catalog import Store
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
