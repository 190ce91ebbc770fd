"""Arrow schemas of the store's tables: the contract teammates query (docs/store.md describes them).

Every table is a Delta Lake table under the store's root, one folder per table. float32 vectors are stored as
``list<float32>``. Delta Lake has no float16: float16 runs store each vector's IEEE half values as one
blob (``activation_f16_bytes``, 2 little-endian bytes a value; schema version 3), which Parquet encodes 4-5x
faster than a list (no per-value levels; docs/benchmarks.md), and the DuckDB views decode it. Rows written
before version 3 hold the bit patterns as ``list<int16>`` in ``activation_f16``; both are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from hookpoints.store.names import RUN_NAME, SCHEMA_VERSION  # noqa: F401 - defined without pyarrow, used via schema


@dataclass(frozen=True)
class TableSpec:
    """A Delta table of the store: its folder name, initial schema and partition columns."""

    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...] = ()
    row_group_rows: int | None = None  # Parquet row group size (None: the store's default, tables.ROW_GROUP_ROWS)


STORE_META = pa.schema([("key", pa.string()), ("value", pa.string())])

#: Append-only log of run state changes; the ``runs`` view keeps each run's latest event.
RUN_EVENTS = pa.schema(
    [
        ("run", pa.string()),
        ("status", pa.string()),  # recording | resumed | complete | failed (per shard) | deleted (whole run)
        ("event_at", pa.timestamp("us", tz="UTC")),
        ("model", pa.string()),
        ("task", pa.string()),
        ("pooling", pa.string()),
        ("dtype", pa.string()),
        ("config", pa.string()),  # JSON
        ("message", pa.string()),
        ("shard", pa.int32()),  # which shard of the run the event is about (null: the whole run)
        ("shards", pa.int32()),  # how many shards the run is recorded in
        ("writer", pa.string()),  # host:pid of the process that logged it
    ]
)

HOOKS = pa.schema(
    [
        ("run", pa.string()),
        ("hook", pa.string()),
        ("module", pa.string()),
        ("io", pa.string()),
        ("component", pa.string()),
        ("layer", pa.int32()),
        ("submodule", pa.string()),
        ("width", pa.int32()),
        ("shape", pa.list_(pa.int32())),
        ("neuron_axis", pa.int32()),
        ("space", pa.string()),
        ("layer_output", pa.bool_()),
    ]
)

#: The examples table starts with these; every manifest column is added (schema merge) as runs arrive.
EXAMPLES_BASE = pa.schema([("run", pa.string()), ("example_id", pa.string())])

ACTIVATIONS = pa.schema(
    [
        ("run", pa.string()),
        ("hook", pa.string()),
        ("example_id", pa.string()),
        ("position", pa.int32()),  # null when pooled; the position in its sequence when pooling is none
        ("activation", pa.list_(pa.float32())),  # [width], float32 runs
        ("activation_f16", pa.list_(pa.int16())),  # [width], float16 rows of schema 1-2: IEEE half bit patterns
        ("finite", pa.bool_()),  # false when the stored vector holds NaN or inf (flagged by the writer)
        ("activation_f16_bytes", pa.binary()),  # [width * 2 bytes], float16 runs: IEEE half, little-endian
    ]
)

CORE_TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec("store_meta", STORE_META),
        TableSpec("run_events", RUN_EVENTS),
        TableSpec("hooks", HOOKS, ("run",)),
        TableSpec("examples", EXAMPLES_BASE, ("run",)),
        TableSpec("activations", ACTIVATIONS, ("run", "hook")),
    )
}

#: Columns the store adds to each example; a manifest may not use these names.
RESERVED_EXAMPLE_COLUMNS = {
    *("run", "example_id", "hook", "position", "activation", "activation_f16", "finite", "activation_f16_bytes")
}
