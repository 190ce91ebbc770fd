"""Parquet files with page checksums, written by pyarrow and committed to a Delta table as file actions.

delta-rs' own writer cannot write Parquet page checksums (CRC32 per page), so three flipped bytes in the
middle of a data file decode to wrong numbers (2.6e37) that nothing notices. The activations are written here
instead: one file per partition, zstd level 1, the table's row group size, a CRC on every page; the writer
then commits the files' :class:`AddAction` s in one Delta transaction (store/commits.py), and
``hookpoints store verify`` reads every page with checksum verification, naming a damaged file.

Example::

    actions = write_files(location, CORE_TABLES["activations"], rows)   # files written, not yet visible
    delta_table.create_write_transaction(actions, mode="append", schema=..., partition_by=[...])
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, wait
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake.transaction import AddAction
from hookpoints.store import tables
from hookpoints.store.location import StoreLocation
from hookpoints.store.schema import TableSpec

#: Column types whose min/max go into the file's Delta statistics (for data skipping).
_STATS_TYPES = (pa.types.is_string, pa.types.is_integer, pa.types.is_boolean, pa.types.is_floating)


def write_files(
    location: StoreLocation, spec: TableSpec, data: pa.Table, *, pool: Executor | None = None
) -> list[AddAction]:
    """Write ``data`` as one checksummed Parquet file per partition; the actions that commit them."""
    keys = list(spec.partition_by)
    parts = _partitions(data, keys) if keys else [((), data)]
    return write_parts(location, spec, [(values, part.drop_columns(keys)) for values, part in parts], pool=pool)


def write_parts(
    location: StoreLocation,
    spec: TableSpec,
    parts: list[tuple[tuple, pa.Table | Callable[[], pa.Table]]],
    *,
    pool: Executor | None = None,
) -> list[AddAction]:
    """Write one checksummed Parquet file per ``(partition values, rows)``; the actions that commit them.

    ``rows`` holds the columns but the partition columns, or is a function that builds them (called in
    the worker, so building runs in parallel too). With a ``pool`` (threads: pyarrow's Parquet writer and
    numpy's casts release the GIL) the files are written side by side; the actions come back in the order
    of ``parts``. Example: ``write_parts(location, spec, [(("r1", "h0"), rows)], pool=threads)``.
    """
    filesystem = _filesystem(location, spec.name)
    keys = list(spec.partition_by)
    rows_per_group = spec.row_group_rows or tables.ROW_GROUP_ROWS
    # schema -> (pq.write_table keywords, the columns whose min/max go into the Delta statistics): the same for
    # every part of one table
    plans: dict = {}

    def write(values: tuple, rows) -> AddAction:
        body = rows() if callable(rows) else rows
        if body.schema not in plans:
            plans[body.schema] = _options(body.schema), [f.name for f in body.schema if _has_min_max(f.type)]
        options, min_max = plans[body.schema]
        folder = "/".join(f"{key}={quote(str(value), safe='')}" for key, value in zip(keys, values, strict=True))
        path = (folder + "/" if folder else "") + f"part-{uuid.uuid4()}.zstd.parquet"
        if folder:
            filesystem.create_dir(folder, recursive=True)
        if location.is_local:  # the whole file in memory first, then one write: a kill leaves no half file
            encoded = pa.BufferOutputStream()
            _encode(body, encoded, rows_per_group, options)
            contents = encoded.getvalue()
            with filesystem.open_output_stream(path) as sink:
                sink.write(contents)
            size = contents.size
        else:  # an object store: the object appears whole when the stream closes
            with filesystem.open_output_stream(path) as sink:
                _encode(body, sink, rows_per_group, options)
            size = filesystem.get_file_info(path).size
        partition = {key: None if value is None else str(value) for key, value in zip(keys, values, strict=True)}
        return AddAction(path, size, partition, int(time.time() * 1000), True, _stats(body, min_max))

    if pool is None or len(parts) < 2:
        return [write(values, rows) for values, rows in parts]
    futures = [pool.submit(write, values, rows) for values, rows in parts]
    try:
        return [future.result() for future in futures]
    finally:
        for future in futures:  # on an error: written files stay unreferenced (vacuum removes them)
            future.cancel()
        wait(futures)


def _options(schema: pa.Schema) -> dict:
    """Encodings (store/tables.py), and Parquet min/max statistics only where a reader can use them: the
    scalar columns (no reader filters on a vector's elements; computing them cost 3-11% of the encoding)."""
    scalars = [field.name for field in schema if not pa.types.is_nested(field.type)]
    return {**tables.pyarrow_encodings(schema), "write_statistics": scalars}


def _encode(body: pa.Table, sink, rows_per_group: int, encodings: dict) -> None:
    """Parquet with a CRC on every page, zstd level 1, the table's row group size and vector encodings."""
    pq.write_table(
        body,
        sink,
        compression="zstd",
        compression_level=1,
        row_group_size=rows_per_group,
        write_page_checksum=True,
        **encodings,
    )


def _partitions(data: pa.Table, keys: list[str]):
    """(partition values, rows) for each distinct combination of ``keys``: zero-copy slices of ``data``
    (sorted by ``keys`` first unless its rows already come grouped, as the run writer's do)."""
    starts = _run_starts(data, keys)
    if len(starts) != data.select(keys).group_by(keys).aggregate([]).num_rows:
        data = data.take(pc.sort_indices(data, [(key, "ascending") for key in keys]))
        starts = _run_starts(data, keys)
    bounds = [*starts.tolist(), data.num_rows]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        part = data.slice(start, stop - start)
        yield tuple(part[key][0].as_py() for key in keys), part


def _run_starts(data: pa.Table, keys: list[str]) -> np.ndarray:
    """Row indices where the combination of ``keys`` changes (0 first)."""
    n = data.num_rows
    change = np.zeros(n, dtype=bool)
    if n:
        change[0] = True
    for key in keys:
        column = data[key].combine_chunks()
        differs = pc.fill_null(pc.not_equal(column.slice(1), column.slice(0, n - 1)), True)
        both_null = pc.and_(column.slice(1).is_null(), column.slice(0, n - 1).is_null())
        change[1:] |= np.asarray(pc.and_(differs, pc.invert(both_null)), dtype=bool)
    return np.flatnonzero(change)


def _filesystem(location: StoreLocation, table: str) -> pafs.FileSystem:
    """Arrow's native file system for a local store (no Python call per write), Delta's object store otherwise."""
    if location.is_local:
        return pafs.SubTreeFileSystem(location.table_uri(table), pafs.LocalFileSystem())
    return tables.filesystem(location, table)


def _has_min_max(kind: pa.DataType) -> bool:
    return any(check(kind) for check in _STATS_TYPES)


def _stats(body: pa.Table, min_max: list[str]) -> str:
    """Delta's per-file statistics: row count, null counts, min/max of the ``min_max`` (scalar) columns."""
    stats: dict = {"numRecords": body.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for name in body.column_names:
        column = body[name]
        stats["nullCount"][name] = column.null_count
        if name in min_max and column.null_count < len(column):
            low, high = (value.as_py() for value in pc.min_max(column).values())
            if isinstance(low, float) and not (math.isfinite(low) and math.isfinite(high)):
                continue
            if isinstance(low, str) and max(len(low), len(high)) > 32:
                continue  # Delta truncates long strings in statistics: leave them out rather than mislead
            stats["minValues"][name], stats["maxValues"][name] = low, high
    return json.dumps(stats)
