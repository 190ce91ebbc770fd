"""Thin, retrying wrappers around the Delta Lake tables of a store (one folder per table)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import ColumnProperties, CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.fs import DeltaStorageHandler
from hookpoints.store.delta_read import exists, open_table  # noqa: F401 - pyarrow-free, used via tables
from hookpoints.store.location import StoreLocation
from hookpoints.store.quoting import any_of, equals, sql_string  # noqa: F401 - the one quoting helper, used via tables
from hookpoints.store.schema import TableSpec

#: About 1,000 rows per row group lets DuckDB parallelise scans and skip row groups by statistics.
ROW_GROUP_ROWS = 1024
_COMMIT_RETRIES = 20


def writer_properties(spec: TableSpec | None = None, schema: pa.Schema | None = None) -> WriterProperties:
    """Parquet settings for a table: zstd level 1, the spec's row group size (or the store's default).

    Vector columns (``list<float32>``, ``list<int16>``: activations) are written without a dictionary, in
    BYTE_STREAM_SPLIT encoding: distinct floats gain nothing from a dictionary (float32 cost 4.0-5.4 bytes
    per value with one, 3.2-3.3 now; float16 2.0, now 1.7; about 15% more decode CPU; docs/store.md).
    delta-rs addresses only top-level columns by name, so the vectors get the default column settings and
    every other column its own (plain encoding: BYTE_STREAM_SPLIT is not defined for strings or booleans).
    """
    rows = (spec.row_group_rows if spec is not None else None) or ROW_GROUP_ROWS
    settings = {"max_row_group_size": rows, "compression": "ZSTD", "compression_level": 1}
    schema = schema if schema is not None else (spec.schema if spec is not None else None)
    if schema is None or not any(_is_vector(field.type) for field in schema):
        return WriterProperties(**settings)
    plain = ColumnProperties(dictionary_enabled=False, encoding="PLAIN")
    if any(_is_nested(field.type) and not _is_vector(field.type) for field in schema):
        # another nested column (list<string>, ...) would get the default too: BYTE_STREAM_SPLIT is undefined there
        return WriterProperties(**settings, default_column_properties=plain)
    return WriterProperties(
        **settings,
        default_column_properties=ColumnProperties(dictionary_enabled=False, encoding="BYTE_STREAM_SPLIT"),
        column_properties={field.name: plain for field in schema if not _is_vector(field.type)},
    )


def pyarrow_encodings(schema: pa.Schema) -> dict:
    """The same choice as :func:`writer_properties` for pyarrow's own writer (store/files.py): keyword
    arguments of ``pq.write_table`` (vectors BYTE_STREAM_SPLIT, everything else plain, no dictionary)."""
    if any(_is_nested(field.type) and not _is_vector(field.type) for field in schema) or not any(
        _is_vector(field.type) for field in schema
    ):
        return {}
    encodings = {
        f"{field.name}.list.element" if _is_vector(field.type) else field.name: (
            "BYTE_STREAM_SPLIT" if _is_vector(field.type) else "PLAIN"
        )
        for field in schema
    }
    return {"use_dictionary": False, "column_encoding": encodings}


def _is_nested(kind: pa.DataType) -> bool:
    return pa.types.is_nested(kind)


def _is_vector(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) and (pa.types.is_floating(kind.value_type) or pa.types.is_int16(kind.value_type))


def create(location: StoreLocation, spec: TableSpec) -> None:
    """Create an empty table with its schema and partitioning; a table that exists is left alone.

    Two processes creating the same table at once both try to commit its version 0; the one that loses
    finds the table there and goes on.
    """
    try:
        DeltaTable.create(
            location.table_uri(spec.name),
            spec.schema,
            partition_by=list(spec.partition_by) or None,
            mode="ignore",
            storage_options=location.storage_options,
        )
    except Exception:
        if not exists(location, spec.name):
            raise


def dataset(location: StoreLocation, table: str, delta: DeltaTable | None = None):
    """The table's current version (or ``delta``'s) as a ``pyarrow.dataset.Dataset`` (DuckDB scans it with
    filter/projection pushdown). Building one imports ``pyarrow.dataset``, which imports pandas (0.2-0.9 s):
    small tables are read with ``delta_read.read_small`` instead.

    Local tables are read through Arrow's native file system. Delta's default (a Python file system handler
    that Arrow's I/O threads call back into) costs the GIL on every read, and a scan abandoned half-way
    (``LIMIT``) left those threads calling into a finalising interpreter at exit: the process crashed or hung.
    """
    delta = delta if delta is not None else open_table(location, table)
    if location.is_local:
        filesystem = pafs.SubTreeFileSystem(location.table_uri(table), pafs.LocalFileSystem())
        return delta.to_pyarrow_dataset(filesystem=filesystem)
    return delta.to_pyarrow_dataset()


def retrying(commit: Callable[[], object]) -> None:
    """Run a commit, retrying with jittered backoff when a concurrent writer committed first."""
    for attempt in range(_COMMIT_RETRIES):
        try:
            commit()
            return
        except CommitFailedError:
            if attempt == _COMMIT_RETRIES - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))


def append(location: StoreLocation, spec: TableSpec, data: pa.Table, *, merge_schema: bool = False) -> None:
    """Append ``data`` as one atomic commit: readers see all of it or none of it."""
    retrying(
        lambda: write_deltalake(
            location.table_uri(spec.name),
            data,
            partition_by=list(spec.partition_by) or None,
            mode="append",
            schema_mode="merge" if merge_schema else None,
            storage_options=location.storage_options,
            writer_properties=writer_properties(spec, data.schema),
        )
    )


def replace(
    location: StoreLocation,
    spec: TableSpec,
    data: Callable[[], pa.RecordBatchReader | pa.Table],
    predicate: str,
) -> None:
    """Replace the rows matching a Delta ``predicate`` with ``data()`` in one atomic commit.

    Readers see the old rows or the new ones, never a mix, and a failed write changes nothing. Every new row
    must match ``predicate``. ``data`` is called again when a concurrent commit forces a retry (a reader can be
    consumed only once).
    """
    retrying(
        lambda: write_deltalake(
            location.table_uri(spec.name),
            data(),
            partition_by=list(spec.partition_by) or None,
            mode="overwrite",
            predicate=predicate,
            storage_options=location.storage_options,
            writer_properties=writer_properties(spec),
        )
    )


def add_columns(location: StoreLocation, spec: TableSpec) -> list[str]:
    """Give an existing analysis table the (nullable) columns of ``spec`` it lacks; returns their names.

    Its rows are rewritten with them null, in one atomic commit (readers see the old version or the new one),
    so that every file holds every column: a metadata-only add (store/migrate.py) leaves old files without it,
    and pyarrow 26 filters such a column wrongly in SQL (``IS NULL`` skips those rows, ``IS NOT NULL`` keeps
    them). For small analysis tables (intervention results); the core tables are migrated (store/migrate.py).
    """
    present = set(open_table(location, spec.name).schema().to_arrow().names)  # arro3 schema
    missing = [field for field in spec.schema if field.name not in present]
    if not missing:
        return []

    def commit() -> None:
        delta = open_table(location, spec.name)  # again at each try: a concurrent append's rows are kept
        rows = dataset(location, spec.name, delta).to_table()
        for field in missing:
            if field.name not in rows.column_names:
                rows = rows.append_column(field, pa.nulls(rows.num_rows, field.type))
        known = [field.name for field in spec.schema]
        extra = [name for name in rows.column_names if name not in known]  # kept, after the spec's
        rows = rows.select(known + extra).cast(pa.schema([*spec.schema, *(rows.schema.field(n) for n in extra)]))
        write_deltalake(
            delta,
            rows,
            partition_by=list(spec.partition_by) or None,
            mode="overwrite",
            schema_mode="overwrite",
            writer_properties=writer_properties(spec, rows.schema),
        )

    retrying(commit)
    return [field.name for field in missing]


def delete(location: StoreLocation, table: str, predicate: str, *, fence: Sequence[str] = ()) -> None:
    """Delete the rows matching a Delta predicate (partition predicates only drop whole files).

    ``fence``: application ids (store/commits.py) whose transaction number is raised first, in a commit of its
    own (a delete that matches nothing commits nothing), so a writer still committing under one of them stops
    (``WriterFenced``) instead of adding rows of a deleted run after the delete.
    """
    if fence:
        fence_writers(location, table, fence)
    retrying(lambda: open_table(location, table).delete(predicate))


def fence_writers(location: StoreLocation, table: str, apps: Sequence[str]) -> None:
    """Raise the transaction number of each application id in ``apps`` (store/commits.py) in one commit that
    adds nothing: a writer still committing under one of them stops at its next commit (``WriterFenced``)."""

    def commit() -> None:
        delta = open_table(location, table)
        raised = [Transaction(app, (delta.transaction_version(app) or 0) + 1) for app in apps]
        delta.create_write_transaction(
            [],
            mode="append",
            schema=delta.schema(),
            partition_by=delta.metadata().partition_columns or None,
            commit_properties=CommitProperties(app_transactions=raised),
        )

    retrying(commit)


def filesystem(location: StoreLocation, table: str | None = None) -> pafs.FileSystem:
    """A pyarrow filesystem rooted at the table's folder (or the store's root), through Delta's object store.

    Paths are relative (``_delta_log/00000000000000000000.json``, ``run=r1/hook=h/part-....parquet``); the
    same credentials and endpoint as the tables', local folder or S3 alike.
    """
    uri = location.uri if table is None else location.table_uri(table)
    return pafs.PyFileSystem(DeltaStorageHandler(uri, location.storage_options))


def list_files(location: StoreLocation, table: str | None = None) -> dict[str, int]:
    """Every file under the table's folder (or the store's root), recursively: relative path -> size."""
    try:
        handler = filesystem(location, table)
    except TableNotFoundError:  # a local folder that is not there (a registered table whose folder was deleted)
        return {}
    infos = handler.get_file_info(pafs.FileSelector("", recursive=True, allow_not_found=True))
    return {info.path: info.size for info in infos if info.type == pafs.FileType.File}
