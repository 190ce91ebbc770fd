"""Parquet files with page checksums, written by pyarrow and committed to a Delta table as file actions.

delta-rs' own writer cannot write Parquet page checksums (CRC32 per page), so three flipped bytes in the
middle of a data file decode to wrong numbers (2.6e37) that nothing notices. Fixed-schema appends are written
here instead: one file per partition, zstd level 1, the table's row group size, a CRC on every page; the
writer then commits the files' :class:`AddAction` s in one Delta transaction (store/commits.py), and
``hookpoints store verify`` reads every page with checksum verification, naming a damaged file.

A call's files are written by a few ``pyarrow.dataset.write_dataset`` calls side by side (:data:`WRITE_CALLS`,
each over a share of the partitions, at most half the process' open-file limit open at once), on Arrow's
threads with the GIL released throughout. Writing them one ``pq.write_table`` after the other, even from a
thread pool, gave the GIL back and retook it a few times per file: beside a recorder of torch operations that
cut the recorder to 0.5-0.6 of its speed, and beside pure Python the writer waited out a 5 ms switch interval
at each retaking, 17-25 times slower (docs/benchmarks.md, "The run writer beside a busy recorder"). One call
for all partitions was slower on the H200's host than the thread pool before it (a flush of 566 MB: 2.58 s
against 1.13 s): a dataset writer holds every small partition back until the call ends and then hands them
out one after the other; a few calls side by side share that out (on 2 cores, 1.9-2.1 s of a Llama flush
against 2.5-3.2 s with one call, and less CPU).

Example::

    actions = write_files(location, CORE_TABLES["activations"], rows)   # files written, not yet visible
    delta_table.create_write_transaction(actions, mode="append", schema=..., partition_by=[...])
"""

from __future__ import annotations

import json
import math
import time
import uuid
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from deltalake.transaction import AddAction
from hookpoints.store import tables
from hookpoints.store.location import StoreLocation
from hookpoints.store.schema import TableSpec
from hookpoints.store.threads import side_by_side

#: Column types whose min/max go into the file's Delta statistics (for data skipping).
_STATS_TYPES = (pa.types.is_string, pa.types.is_integer, pa.types.is_boolean, pa.types.is_floating)


def _partitions_per_call() -> int:
    """Partitions one ``write_dataset`` call writes: each keeps a file open until the call ends, so half the
    process' open-file limit (macOS' default 256 -> 128; 1,024 on Linux -> 512), between 64 and 512. Fewer
    calls give the GIL back fewer times: in two runs of bench/writer_throughput.py a torch-operation recorder
    beside a Llama flush kept 0.90 of its speed with 256 partitions per call, 0.71 with 100.

    >>> 64 <= _partitions_per_call() <= 512
    True
    """
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # not POSIX
        return 128
    soft = 2**20 if soft == resource.RLIM_INFINITY else soft
    return max(64, min(512, soft // 2))


#: Files open at once across a call's ``write_dataset`` calls (each keeps its files open until it ends).
PARTITIONS_PER_CALL = _partitions_per_call()
#: ``write_dataset`` calls run side by side; None: Arrow's I/O threads at the time of the call (they encode the
#: files; 8 by default, ``pyarrow.set_io_thread_count(n)`` to change).
WRITE_CALLS: int | None = None
_FOLDER = "__folder"  # the column that names each row's partition folder while writing (not stored)


def write_files(location: StoreLocation, spec: TableSpec, data: pa.Table) -> list[AddAction]:
    """Write ``data`` as one checksummed Parquet file per partition; the actions that commit them.

    ``data`` holds the table's columns, partition columns included (plain or dictionary-encoded: the run
    writer passes ``run`` and ``hook`` as dictionaries); a partition's rows keep their order in its file.
    Example: ``write_files(location, CORE_TABLES["hooks"], rows)`` -> one ``AddAction`` per run.
    """
    if data.num_rows == 0:
        return []
    keys = list(spec.partition_by)
    body = data.drop_columns(keys)
    folders, values, group = _partitions(data, keys)  # [partitions] folder, values; [rows] partition index
    if np.any(np.diff(group) < 0):  # each partition's rows together, so that a call covers a range of them
        order = np.argsort(group, kind="stable")
        body, group = body.take(pa.array(order)), group[order]
    folder_of_row = pa.DictionaryArray.from_arrays(pa.array(group, pa.int32()), pa.array(folders, pa.string()))
    table = body.append_column(_FOLDER, folder_of_row)
    firsts = np.flatnonzero(np.r_[True, np.diff(group) != 0])  # [partitions] each one's first row
    # side by side, together at most PARTITIONS_PER_CALL files open
    calls = max(1, min(WRITE_CALLS or pa.io_thread_count(), len(firsts), PARTITIONS_PER_CALL))
    per_call = max(1, min(-(-len(firsts) // calls), PARTITIONS_PER_CALL // calls))
    if len({folder.casefold() for folder in folders}) < len(folders):  # hooks H0 and h0: one folder on macOS
        per_call = 1  # each partition its own call and file name, so a case-insensitive file system keeps both
    bounds = [*firsts[::per_call].tolist(), len(group)]
    filesystem = _filesystem(location, spec.name)
    slices = [table.slice(start, stop - start) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
    # a file name per call; {i}: Arrow numbers the files of a folder from 0
    names = [f"part-{uuid.uuid4().hex}-{{i}}.zstd.parquet" for _ in slices]
    work = list(zip(slices, names, strict=True))

    def write(item: tuple[pa.Table, str]) -> None:  # (rows, file name)
        _write(filesystem, *item, spec.row_group_rows, keyed=bool(keys))

    side_by_side(write, work, calls, name="hookpoints-files")
    files = [names[p // per_call].format(i=0) for p in range(len(folders))]  # [partitions] (rows: in order)
    paths = [f"{folder}/{file}" if folder else file for folder, file in zip(folders, files, strict=True)]
    infos = filesystem.get_file_info(paths)  # one call for all: sizes
    stats = _partition_stats(table, folders)
    now = int(time.time() * 1000)
    actions = []
    for info, partition, stat in zip(infos, values, stats, strict=True):
        if info.type != pafs.FileType.File:  # a partition split over files or lost would commit wrong rows
            raise RuntimeError(f"writing {spec.name} left no file at {info.path}: nothing was committed")
        actions.append(AddAction(info.path, info.size, partition, now, True, stat))
    return actions


def _partitions(data: pa.Table, keys: list[str]) -> tuple[list[str], list[dict], np.ndarray]:
    """The distinct partitions' folders (``run=r1/hook=h0``, values URL-quoted) and values (``{"run": "r1",
    "hook": "h0"}``: strings or None), ordered by first dictionary code, and each row's partition index."""
    if not keys:
        return [""], [{}], np.zeros(data.num_rows, np.int64)
    codes, labels = [], []
    for key in keys:
        column = data[key].combine_chunks()
        if not pa.types.is_dictionary(column.type):
            column = pc.dictionary_encode(column, null_encoding="encode")
        code = pc.fill_null(column.indices.cast(pa.int64()), -1).to_numpy()  # [rows] (indices may be unsigned)
        names = [None if value is None else str(value) for value in column.dictionary.to_pylist()]
        if None in names or len(set(names)) < len(names):  # a value twice (or null) in the dictionary: one code
            # each, or two partitions would share a folder and a file name, one file overwriting the other's rows
            first: dict[str, int] = {}
            remap = [-1 if name is None else first.setdefault(name, len(first)) for name in names]
            code, names = np.array([*remap, -1], np.int64)[code], list(first)  # code -1 (null) stays -1
        codes.append(code)
        labels.append(names)
    # the partitions key by key: (partition so far, this key's code) as one int64, made dense again by a 1-D
    # unique, so it never overflows and keeps the order (code of key 0, code of key 1, ...); np.unique over rows
    # (axis=0) took 0.12 s for a Seamless flush of 184,320 rows, on the flush's serial path
    group = np.zeros(data.num_rows, np.int64)  # [rows] partition index
    combos = np.zeros((1, 0), np.int64)  # [partitions, keys so far] codes
    for code, names in zip(codes, labels, strict=True):
        size = len(names) + 1  # codes -1 (null) .. len - 1
        unique, group = np.unique(group * size + (code + 1), return_inverse=True)
        combos = np.column_stack([combos[unique // size], unique % size - 1])
    values = [
        {key: None if code < 0 else labels[k][code] for k, (key, code) in enumerate(zip(keys, combo, strict=True))}
        for combo in combos.tolist()
    ]
    folders = ["/".join(f"{key}={quote(str(value), safe='')}" for key, value in part.items()) for part in values]
    return folders, values, group.reshape(-1)


def _write(filesystem: pafs.FileSystem, rows: pa.Table, name: str, row_group_rows: int | None, *, keyed: bool):
    """One ``write_dataset`` call: a file per partition (the ``__folder`` column names each row's folder), zstd
    level 1, a CRC on every page, the vector encodings of store/tables.py; Arrow's threads, no GIL."""
    rows_per_group = row_group_rows or tables.ROW_GROUP_ROWS
    body = rows.drop_columns([_FOLDER])
    ds.write_dataset(
        rows if keyed else body,
        "",
        filesystem=filesystem,
        format="parquet",
        file_options=ds.ParquetFileFormat().make_write_options(**_options(body.schema)),
        partitioning=ds.DirectoryPartitioning(pa.schema([rows.schema.field(_FOLDER)]), segment_encoding="none")
        if keyed
        else None,
        basename_template=name,
        existing_data_behavior="overwrite_or_ignore",  # the file names are new; only folders exist already
        max_open_files=PARTITIONS_PER_CALL + 1,  # no partition's file is closed early: one file each
        max_rows_per_group=rows_per_group,
        min_rows_per_group=rows_per_group,
        preserve_order=True,
    )


def _options(schema: pa.Schema) -> dict:
    """zstd level 1, page CRCs, the encodings of store/tables.py, and Parquet min/max statistics only where a
    reader can use them: the scalar columns (no reader filters on a vector's elements; computing them cost
    3-11% of the encoding), not the float16 blobs (a vector's bytes as its min or max)."""
    scalars = [field.name for field in schema if _has_min_max(field.type)]
    return {
        "compression": "zstd",
        "compression_level": 1,
        "write_page_checksum": True,
        "write_statistics": scalars,
        **tables.pyarrow_encodings(schema),
    }


def _partition_stats(table: pa.Table, folders: list[str]) -> list[str]:
    """Delta's statistics of each partition's file (in ``folders`` order): rows, null counts, min/max of the
    scalar columns; one grouped aggregation for all partitions."""
    columns = [name for name in table.column_names if name != _FOLDER]
    min_max = [name for name in columns if _has_min_max(table.schema.field(name).type)]
    aggregations = [("__rows", "count", pc.CountOptions("all"))]
    aggregations += [(name, "count", pc.CountOptions("only_null")) for name in columns]
    aggregations += [(name, "min_max") for name in min_max]
    grouped = table.append_column("__rows", pa.nulls(table.num_rows, pa.int8())).group_by(_FOLDER)
    result = grouped.aggregate(aggregations)
    result = {name: result.column(name).to_pylist() for name in result.column_names}
    by_folder = {}
    for i, folder in enumerate(result[_FOLDER]):
        nulls = {name: result[f"{name}_count"][i] for name in columns}
        ranges = [result[f"{name}_min_max"][i] for name in min_max]
        stats: dict = {"numRecords": result["__rows_count"][i], "minValues": {}, "maxValues": {}, "nullCount": nulls}
        for name, span in zip(min_max, ranges, strict=True):
            low, high = span["min"], span["max"]
            if low is None or (isinstance(low, float) and not (math.isfinite(low) and math.isfinite(high))):
                continue
            if isinstance(low, str) and max(len(low), len(high)) > 32:
                continue  # Delta truncates long strings in statistics: leave them out rather than mislead
            stats["minValues"][name], stats["maxValues"][name] = low, high
        by_folder[folder] = json.dumps(stats)
    return [by_folder[folder] for folder in folders]


def _filesystem(location: StoreLocation, table: str) -> pafs.FileSystem:
    """Arrow's native file system for a local store (no Python call per write), Delta's object store otherwise."""
    if location.is_local:
        return pafs.SubTreeFileSystem(location.table_uri(table), pafs.LocalFileSystem())
    return tables.filesystem(location, table)


def _has_min_max(kind: pa.DataType) -> bool:
    return any(check(kind) for check in _STATS_TYPES)
