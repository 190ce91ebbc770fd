"""Upgrading a store written by an older hookpoints to the current schema version, in place.

Every migration only adds nullable columns (a metadata-only Delta commit: no data file is rewritten), so
teammates can keep reading while it runs; rows written before read the new columns as null, and the code
reading them treats null as the old meaning (``store/runs.py``: no shard = shard 0 of 1). The version in
``store_meta`` is raised last, in one atomic update, after every step has committed; a migration that is
interrupted is simply run again (each step skips what is already done).
"""

from __future__ import annotations

from deltalake.schema import Field
from hookpoints.store import tables
from hookpoints.store.catalog import Store
from hookpoints.store.schema import CORE_TABLES, SCHEMA_VERSION

from hookpoints.errors import UserError

#: version -> {table: columns that version added} (the columns' types come from store/schema.py)
ADDED_COLUMNS: dict[int, dict[str, list[str]]] = {
    2: {"run_events": ["shard", "shards", "writer"], "activations": ["finite"]},
    3: {"activations": ["activation_f16_bytes"]},
}


def migrate(store: Store) -> list[str]:
    """Bring ``store`` to :data:`SCHEMA_VERSION`; returns what was done, one line per step."""
    version = store.schema_version()
    if version is None:
        raise UserError(f"store {store.location.uri} does not record a valid schema version: it cannot be migrated")
    if version > SCHEMA_VERSION:
        raise UserError(
            f"store {store.location.uri} has schema version {version}, newer than this hookpoints' "
            f"{SCHEMA_VERSION}: upgrade hookpoints instead"
        )
    steps = []
    while version < SCHEMA_VERSION:
        version += 1
        for table, columns in ADDED_COLUMNS[version].items():
            steps += _add_columns(store, table, columns)
        _set_version(store, version)
        steps.append(f"schema version {version}")
    return steps


def _add_columns(store: Store, table: str, columns: list[str]) -> list[str]:
    delta = tables.open_table(store.location, table)
    present = set(delta.schema().to_arrow().names)  # arro3 schema
    spec = CORE_TABLES[table].schema
    missing = [column for column in columns if column not in present]
    if missing:
        delta.alter.add_columns([Field.from_arrow(spec.field(column)) for column in missing])
    return [f"{table}: added {column}" for column in missing]


def _set_version(store: Store, version: int) -> None:
    tables.open_table(store.location, "store_meta").update(
        updates={"value": tables.sql_string(str(version))}, predicate=tables.equals("key", "schema_version")
    )
