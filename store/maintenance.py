"""Looking after a shared store: merging small files (compact) and deleting unreferenced ones (vacuum).

Both are safe while others read and record:

- ``compact`` rewrites each partition's small files into larger ones in a new table version. Readers of
  older versions keep reading the old files, which stay on storage; recorders only append, which never
  conflicts with a compaction (delta-rs retries against the new version; an activations merge, written with
  page checksums here, retries its commit alone while the files it replaces are still in the table).
- ``vacuum`` deletes files no version newer than the retention period refers to: files replaced by a
  compaction or a deleted run, and files of writes that never committed (a killed recorder). A reader that
  took its snapshot less than ``retention_hours`` ago keeps working; one holding an older snapshot may find
  its files gone. A recorder's files are uncommitted for seconds (one flush), so any retention of an hour
  or more never touches them.
"""

from __future__ import annotations

import math
import random
import time
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import RemoveAction
from hookpoints.store import files, tables
from hookpoints.store.catalog import Store
from hookpoints.store.schema import CORE_TABLES, TableSpec

from hookpoints.errors import UserError

#: Delta Lake's own default (``delta.deletedFileRetentionDuration``): one week.
DEFAULT_RETENTION_HOURS = 168
#: Below this, vacuum needs ``force``: it could delete files a running SQL session or recorder still needs.
MIN_RETENTION_HOURS = 1
DEFAULT_TARGET_MB = 64
_RETRIES = 10
_MERGE_ATTEMPTS = 100  # a merge's commit is retried alone (milliseconds); its file is written once


def compact(store: Store, *, target_mb: float = DEFAULT_TARGET_MB) -> list[dict]:
    """Merge each table's small files (per partition) and write a log checkpoint; one row per table."""
    if not (isinstance(target_mb, int | float) and math.isfinite(target_mb) and target_mb * 2**20 >= 1):
        raise UserError(f"the target file size must be a positive number of MiB, not {target_mb!r}")
    rows = []
    for name in _present(store):
        before = _files(store, name)
        if name == "activations":  # rewritten with page checksums, as the writer writes them (store/files.py)
            metrics = {"numFilesRemoved": compact_checksummed(store, CORE_TABLES[name], int(target_mb * 2**20))}
        else:
            metrics = _retrying(
                lambda name=name: tables.open_table(store.location, name).optimize.compact(
                    target_size=int(target_mb * 2**20),
                    writer_properties=tables.writer_properties(schema=store.dataset(name).schema),
                )
            )
        table = tables.open_table(store.location, name)
        table.create_checkpoint()
        after = _files(store, name)
        rows.append(
            {
                "table": name,
                "files before": before,
                "files after": after,
                "rewritten": metrics.get("numFilesRemoved", 0),
                "version": table.version(),
            }
        )
    return rows


def compact_checksummed(store: Store, spec: TableSpec, target_bytes: int) -> int:
    """Merge each partition's small files into files of about ``target_bytes``, written with page checksums by
    store/files.py (delta-rs' compaction writes none: flipped bytes in its files read as wrong numbers); a merged
    file holds its files' rows in their order. Each merge is one commit onto the version it read (a concurrent
    commit makes it read again), removing the files it merged. Returns how many files were merged away."""
    logged = pa.table(tables.open_table(store.location, spec.name).get_add_actions(flatten=False)).to_pylist()
    partitions: dict[tuple, list[dict]] = {}
    for file in logged:
        if file["size_bytes"] < target_bytes:
            partitions.setdefault(tuple(sorted(file["partition"].items())), []).append(file)
    merged = 0
    for small in partitions.values():
        bins, size = [[]], 0
        for file in small:  # consecutive files, in the log's order, up to the target size
            if bins[-1] and size + file["size_bytes"] > target_bytes:
                bins, size = [*bins, []], 0
            bins[-1].append(file)
            size += file["size_bytes"]
        for group in bins:
            if len(group) > 1:
                merged += _merge(store, spec, group)
    return merged


def _merge(store: Store, spec: TableSpec, group: list[dict]) -> int:
    """One merged file written once, committed onto the latest version as long as every file it replaces is
    still in it (each attempt only onto the version just read: delta-rs does not check that a concurrent commit
    removed them, so a merge racing a delete or a swap would bring their rows back)."""
    delta = tables.open_table(store.location, spec.name)
    paths = [unquote(file["path"]) for file in group]
    if not _all_live(delta, paths):
        return 0
    filesystem = tables.filesystem(store.location, spec.name)
    body = pa.schema([field for field in spec.schema if field.name not in spec.partition_by])
    data = pa.concat_tables([pq.read_table(path, filesystem=filesystem, schema=body) for path in paths])
    for key, value in group[0]["partition"].items():
        data = data.append_column(key, pa.array([value] * data.num_rows, spec.schema.field(key).type))
    stamp = int(time.time() * 1000)
    removes = [
        RemoveAction(path, True, stamp, file["size_bytes"], file["partition"])
        for path, file in zip(paths, group, strict=True)
    ]
    actions = [*files.write_files(store.location, spec, data), *removes]
    for attempt in range(_MERGE_ATTEMPTS):
        try:
            delta.create_write_transaction(
                actions,
                mode="append",
                schema=delta.schema(),
                partition_by=list(spec.partition_by) or None,
                commit_properties=CommitProperties(max_commit_retries=0),
            )
            return len(group)
        except CommitFailedError:  # another commit landed first (a recorder's append): read again, try again
            time.sleep(min(1.0, 0.01 * 2 ** min(attempt, 7)) * random.random())
            delta.update_incremental()
            if not _all_live(delta, paths):
                return 0  # merged or removed by someone else meanwhile: the written file is left to vacuum
    raise CommitFailedError(f"could not commit a merge of {len(group)} {spec.name} files: the table changes too often")


def _all_live(delta, paths: list[str]) -> bool:
    live = {unquote(path) for path in delta.get_add_actions(flatten=True).column("path").to_pylist()}
    return set(paths) <= live


MAX_RETENTION_HOURS = 100 * 366 * 24


def vacuum(
    store: Store, *, retention_hours: int = DEFAULT_RETENTION_HOURS, dry_run: bool = False, force: bool = False
) -> list[dict]:
    """Delete files that no table version of the last ``retention_hours`` uses; one row per table."""
    if retention_hours < 0 or int(retention_hours) != retention_hours:
        raise UserError(f"retention must be a whole number of hours, 0 or more, not {retention_hours}")
    if retention_hours > MAX_RETENTION_HOURS:  # past chrono's range: a Rust panic with a backtrace
        raise UserError(f"retention {retention_hours} hours is more than 100 years: give at most {MAX_RETENTION_HOURS}")
    if retention_hours < MIN_RETENTION_HOURS and not force:
        raise UserError(
            f"a retention of {retention_hours} hours can delete files that running SQL sessions or recorders "
            f"still use: give at least {MIN_RETENTION_HOURS} hour, or --force if nobody else uses the store now"
        )
    rows = []
    for name in _present(store):
        table = tables.open_table(store.location, name)
        sizes = _file_sizes(store, name)
        deleted = _retrying(
            lambda table=table: table.vacuum(
                retention_hours=int(retention_hours),
                dry_run=dry_run,
                enforce_retention_duration=False,
                full=True,
            )
        )
        rows.append(
            {
                "table": name,
                "files deleted" if not dry_run else "files to delete": len(deleted),
                "MiB": round(sum(sizes.get(path, 0) for path in deleted) / 2**20, 2),
            }
        )
    return rows


def _present(store: Store) -> list[str]:
    """store_meta and the registered tables, less an analysis table whose folder is gone (`store verify` names
    it; SQL sessions and `store delete` skip it too): it held no files to merge or delete, and stopped the rest."""
    names = ["store_meta", *store.table_names()]
    return [name for name in names if name in CORE_TABLES or tables.exists(store.location, name)]


def _retrying(operation):
    for attempt in range(_RETRIES):
        try:
            return operation()
        except CommitFailedError:
            if attempt == _RETRIES - 1:
                raise
            time.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + random.random()))
    return None


def _files(store: Store, name: str) -> int:
    return tables.open_table(store.location, name).get_add_actions(flatten=True).num_rows


def _file_sizes(store: Store, name: str) -> dict[str, int]:
    """Every data file under the table's folder (referenced or not) -> its size in bytes (paths as vacuum's)."""
    listing = tables.list_files(store.location, name)
    return {path: size for path, size in listing.items() if not path.startswith("_delta_log/")}
