"""Summaries of what a store holds (for ``hookpoints store info`` and the demo)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from hookpoints.store import tables
from hookpoints.store.catalog import Store


def run_summary(store: Store) -> list[dict]:
    """One row per run: settings, status, and how many examples and hook points it holds."""
    with store.query() as session:
        return session.sql(
            """
            SELECT r.run, r.model, r.task, r.pooling, r.dtype, r.status, r.shards_complete || '/' || r.shards AS shards,
                   (SELECT count(*) FROM examples e WHERE e.run = r.run) AS examples,
                   (SELECT count(*) FROM hooks h WHERE h.run = r.run) AS hooks,
                   r.created_at,
                   CASE WHEN r.status <> 'complete' THEN r.message END AS message
            FROM runs r ORDER BY r.created_at
            """
        ).to_pylist()


def table_sizes(store: Store) -> list[dict]:
    """Files, rows and bytes of every table's current version."""
    rows = []
    for name in store.table_names():
        actions = pa.table(tables.open_table(store.location, name).get_add_actions(flatten=True))
        rows.append(
            {
                "table": name,
                "files": actions.num_rows,
                "rows": int(pc.sum(actions["num_records"]).as_py() or 0),
                "MiB": round((pc.sum(actions["size_bytes"]).as_py() or 0) / 2**20, 2),
            }
        )
    return rows
