"""Looking after a shared store: merging small files (compact) and deleting unreferenced ones (vacuum).

Both are safe while others read and record:

- ``compact`` rewrites each partition's small files into larger ones in a new table version. Readers of
  older versions keep reading the old files, which stay on storage; recorders only append, which never
  conflicts with a compaction (delta-rs retries against the new version).
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

from deltalake.exceptions import CommitFailedError
from hookpoints.store import tables
from hookpoints.store.catalog import Store

from hookpoints.errors import UserError

#: Delta Lake's own default (``delta.deletedFileRetentionDuration``): one week.
DEFAULT_RETENTION_HOURS = 168
#: Below this, vacuum needs ``force``: it could delete files a running SQL session or recorder still needs.
MIN_RETENTION_HOURS = 1
DEFAULT_TARGET_MB = 64
_RETRIES = 10


def compact(store: Store, *, target_mb: float = DEFAULT_TARGET_MB) -> list[dict]:
    """Merge each table's small files (per partition) and write a log checkpoint; one row per table."""
    if not (isinstance(target_mb, int | float) and math.isfinite(target_mb) and target_mb * 2**20 >= 1):
        raise UserError(f"the target file size must be a positive number of MiB, not {target_mb!r}")
    rows = []
    for name in ["store_meta", *store.table_names()]:
        before = _files(store, name)
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


def vacuum(
    store: Store, *, retention_hours: int = DEFAULT_RETENTION_HOURS, dry_run: bool = False, force: bool = False
) -> list[dict]:
    """Delete files that no table version of the last ``retention_hours`` uses; one row per table."""
    if retention_hours < 0 or int(retention_hours) != retention_hours:
        raise UserError(f"retention must be a whole number of hours, 0 or more, not {retention_hours}")
    if retention_hours < MIN_RETENTION_HOURS and not force:
        raise UserError(
            f"a retention of {retention_hours} hours can delete files that running SQL sessions or recorders "
            f"still use: give at least {MIN_RETENTION_HOURS} hour, or --force if nobody else uses the store now"
        )
    rows = []
    for name in ["store_meta", *store.table_names()]:
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
