"""A statement's result as Python rows, through DuckDB's own conversion where it gives what Arrow's gives.

``hookpoints sql`` prints rows; converting them through Arrow imports pyarrow and numpy (about 0.1 s, as much
as DuckDB and Delta Lake together). For the types in :data:`SAME_AS_ARROW` (and lists and structs of them)
DuckDB's ``fetchmany`` gives the same Python values as ``pyarrow``'s ``to_pylist`` (tests/test_query_rows.py
compares both on every type), so those results never touch Arrow. Any other type (TIMESTAMPTZ, MAP, UUID,
INTERVAL, HUGEINT, ARRAY, TIMESTAMP_NS, DATE, TIME, TIMESTAMP, ...) goes through Arrow as before: the values
are always Arrow's. Example::

    names, chunks = session.rows("SELECT run, model FROM runs", timeout=60)
    for chunk in chunks:  # lists of at most 4096 tuples
        ...
"""

from __future__ import annotations

from collections.abc import Iterator

import duckdb

#: DuckDB type ids whose Python values equal pyarrow's ``to_pylist`` of DuckDB's Arrow export (JSON is a VARCHAR).
SAME_AS_ARROW = frozenset(
    {
        "boolean", "tinyint", "smallint", "integer", "bigint", "utinyint", "usmallint", "uinteger", "ubigint",
        "float", "double", "decimal", "varchar", "blob", "enum", "null",
    }
)  # fmt: skip


def same_as_arrow(kind: duckdb.DuckDBPyType) -> bool:
    """Whether DuckDB's Python value of a ``kind`` column is the one Arrow's ``to_pylist`` gives."""
    if kind.id == "list":
        return same_as_arrow(kind.child)
    if kind.id == "struct":
        return all(same_as_arrow(child) for _, child in kind.children)
    return kind.id in SAME_AS_ARROW


def fetched(con: duckdb.DuckDBPyConnection, rows: int) -> Iterator[list[tuple]]:
    """The connection's open (streaming) result, ``rows`` rows at a time. A reader that stops early (a table
    shows 1,000 rows) cancels the rest when it is closed or dropped: the session can run its next statement."""
    try:
        while chunk := con.fetchmany(rows):
            yield chunk
    finally:
        con.abort()


def from_arrow(reader) -> Iterator[list[tuple]]:
    """Rows of an Arrow record batch reader, each value as ``to_pylist`` gives it (duplicate names kept)."""
    for batch in reader:
        yield list(zip(*(column.to_pylist() for column in batch.columns), strict=True))
