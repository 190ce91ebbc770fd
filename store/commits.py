"""Exactly-once appends: each writer's commits carry a numbered Delta application transaction.

A writer (one shard of one run) has an application id, e.g. ``run=r1/shard=0of2``. Delta keeps, per table,
the latest transaction number committed under each id (``txn`` actions in the log), and refuses a commit whose
id was also used by a commit that landed since the writer's snapshot ("Concurrent transaction failed").
:class:`FencedAppender` builds on that:

- it remembers the number it last committed (read from the table when it starts);
- before every commit it refreshes its snapshot and checks that the number is still its own: if another
  process committed under the same id (a second ``--resume`` of the same shard, or a writer thought dead),
  this writer stops with :class:`WriterFenced` before writing anything twice;
- a commit whose outcome is unknown (the process got an error after the log entry may have been written,
  e.g. a lost reply from S3) is settled by looking in the log for a second transaction every commit also
  carries, under an id only this writer uses; it is never blindly retried.

A Delta commit is one log file created atomically (rename-if-absent on a local disk, a conditional PUT on
S3), so a SIGKILL at any moment leaves the commit either entirely visible or not at all; Parquet files of a
commit that never landed are unreferenced and ``hookpoints store vacuum`` removes them.
"""

from __future__ import annotations

import random
import time
import uuid

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction
from hookpoints.store import files, tables
from hookpoints.store.location import StoreLocation
from hookpoints.store.schema import TableSpec

from hookpoints.errors import UserError

_RETRIES = 20


class WriterFenced(UserError):
    """Another process committed under this writer's application id: stop before writing anything twice."""


def app_id(run: str, shard: tuple[int, int]) -> str:
    """The application id of one shard of a run (the same for every process that records it)."""
    index, count = shard
    return f"run={run}/shard={index}of{count}"


class FencedAppender:
    """Appends to one table under one application id, exactly once per call (see the module docstring)."""

    def __init__(self, location: StoreLocation, spec: TableSpec, app: str, *, what: str):
        self.spec = spec
        self.app = app
        self.what = what  # for messages: "shard 0/2 of run 'r1'"
        self.own = f"{app}/writer={uuid.uuid4().hex}"  # this process only: tells its own commits apart
        self.table: DeltaTable = tables.open_table(location, spec.name)
        self.table_location = location
        self.version = self.table.transaction_version(app) or 0  # the number this writer last committed

    def dataset(self):
        """The snapshot this appender started from (or last committed), as an Arrow dataset."""
        return self.table.to_pyarrow_dataset()

    def append(self, data: pa.Table, *, merge_schema: bool = False) -> None:
        """Commit ``data`` as transaction ``version + 1`` of this writer, or raise :class:`WriterFenced`."""
        # Files of a fixed-schema append are written once, with page checksums, and only the commit retried.
        actions = None if merge_schema else files.write_files(self.table_location, self.spec, data)
        self._commit(data, actions)

    def _commit(self, data: pa.Table | None, actions: list[AddAction] | None) -> None:
        target = self.version + 1
        for attempt in range(_RETRIES):
            self.table.update_incremental()
            if (self.table.transaction_version(self.app) or 0) != self.version:
                raise WriterFenced(
                    f"another process committed to {self.what} while this one was recording (two recordings of "
                    "the same run or shard at once, or the run deleted?): this one stops so nothing is recorded "
                    "twice; everything committed so far is kept, and --resume continues once only one process is left"
                )
            transactions = [Transaction(self.app, target), Transaction(self.own, target)]
            properties = CommitProperties(app_transactions=transactions)
            try:
                if actions is not None:
                    self.table.create_write_transaction(
                        actions,
                        mode="append",
                        schema=self.table.schema(),
                        partition_by=list(self.spec.partition_by) or None,
                        commit_properties=properties,
                    )
                else:
                    write_deltalake(
                        self.table,
                        data,
                        partition_by=list(self.spec.partition_by) or None,
                        mode="append",
                        schema_mode="merge",
                        writer_properties=tables.writer_properties(self.spec),
                        commit_properties=properties,
                    )
                break
            except CommitFailedError:
                # A concurrent commit conflicted (same id: the next round fences; a schema change by another
                # shard: the next round retries against the new snapshot).
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
            except Exception:
                self.table.update_incremental()
                if (self.table.transaction_version(self.own) or 0) != target:  # it did not land
                    raise
                break
        else:
            raise CommitFailedError(f"could not commit to {self.spec.name} after {_RETRIES} attempts")
        self.version = target


def append_once(location: StoreLocation, spec: TableSpec, app: str, data: pa.Table, *, present) -> bool:
    """Commit ``data`` unless ``present(dataset)`` says a concurrent writer already did; True if this one did.

    Used for rows every writer of a run would write (its hook points): all of them commit under the same id,
    so of two racing writers one commits and the other's commit conflicts, re-reads, and finds the rows.
    """
    table = tables.open_table(location, spec.name)
    for attempt in range(_RETRIES):
        table.update_incremental()
        if present(table.to_pyarrow_dataset()):
            return False
        number = (table.transaction_version(app) or 0) + 1
        try:
            write_deltalake(
                table,
                data,
                partition_by=list(spec.partition_by) or None,
                mode="append",
                writer_properties=tables.writer_properties(spec),
                commit_properties=CommitProperties(app_transactions=[Transaction(app, number)]),
            )
            return True
        except CommitFailedError:
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise CommitFailedError(f"could not commit to {spec.name} after {_RETRIES} attempts")
