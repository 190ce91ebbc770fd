"""``record --overwrite`` without a moment where the run is lost: record aside, then swap in.

The new recording goes to a staging run, ``<run>~overwrite`` (``~`` is not allowed in run names, so it can
never be a user's run), while the old run stays untouched and readable. Only when the staging run is
complete is it swapped in, table by table, each swap one Delta commit that removes the old run's files and
re-adds the staging run's files under the run's name (the Parquet files do not hold the partition columns,
so nothing is copied). The old run's rows in the analysis tables (``scores``, ``clusters``, ...: computed from
the rows just replaced), those of analyses comparing it with other runs (``run = 'r1+r2'``) too, are deleted,
as ``store delete`` does. Then one ``run_events`` commit logs the old run deleted, the new one complete, and the
staging run deleted.

- The new recording fails (a bad manifest value, a crash, a full disk): the old run is as it was; the
  staging run is logged ``failed`` with the error (``store info`` and ``verify`` show it) and the next
  ``--overwrite`` starts it afresh; ``--resume`` continues it (store/writer.py), killed or failed.
- Killed during the swap (milliseconds): the staging run is complete, so the next ``record`` of that run
  finishes the swap before anything else (:func:`recover`); each table's swap is idempotent. The run is
  logged ``failed`` ("being overwritten") before the first table's swap, so until the swap is finished no
  reader takes the run, its rows then partly old and partly new, for complete.

Example::

    staging = staging_name("r1")        # "r1~overwrite"
    ...record into staging...
    swap(store, "r1", settings, config)
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from urllib.parse import unquote

import pyarrow as pa
from deltalake import CommitProperties, write_deltalake
from deltalake.transaction import AddAction, RemoveAction
from hookpoints.store import tables
from hookpoints.store.catalog import RUN_SETTINGS, Store, _now
from hookpoints.store.commits import app_id
from hookpoints.store.runs import config_json, next_event_at
from hookpoints.store.schema import CORE_TABLES, RUN_EVENTS

from hookpoints.errors import UserError

STAGING_SUFFIX = "~overwrite"
#: Tables holding a run's rows, in the order writers commit them (store/writer.py).
_RUN_TABLES = ("hooks", "examples", "activations")


def staging_name(run: str) -> str:
    """The run an overwrite of ``run`` records into before it is swapped in."""
    return run + STAGING_SUFFIX


def discard(store: Store, run: str) -> None:
    """Delete what an earlier, unfinished overwrite of ``run`` left (its staging run), if anything."""
    if store.run_info(staging_name(run)) is not None:
        store.delete_run(staging_name(run))


def recover(store: Store, run: str) -> bool:
    """Finish an overwrite of ``run`` that was complete but killed during its swap; True if there was one."""
    info = store.run_info(staging_name(run))
    if info is None or info.status != "complete":
        return False
    if store.run_info(run) is None and _deleted_since_complete(store, run):
        # The run was deleted during the swap (or after the staging run was complete): finishing it would log
        # the rest of the new recording complete without the rows the delete took. What is left of it goes.
        store.delete_run(staging_name(run))
        return False
    swap(store, run, {key: getattr(info, key) for key in RUN_SETTINGS}, info.config)
    return True


def _deleted_since_complete(store: Store, run: str) -> bool:
    """Whether ``run`` was last deleted after its staging run was last logged complete. (Deleted before, while
    the overwrite recorded: the swap moves the new recording in under the free name, as it would have.)"""
    import pyarrow.compute as pc

    events = store.dataset("run_events").to_table(
        columns=["run", "status", "event_at"], filter=pc.field("run").isin([run, staging_name(run)])
    )

    def latest(name: str, status: str):
        mask = pc.and_(pc.equal(events["run"], name), pc.equal(events["status"], status))
        return pc.max(pc.filter(events["event_at"], mask)).as_py()

    deleted, complete = latest(run, "deleted"), latest(staging_name(run), "complete")
    return deleted is not None and complete is not None and deleted > complete


def swap(store: Store, run: str, settings: dict, config: dict) -> None:
    """Replace ``run``'s rows with its complete staging run's, then log the change (see the module docstring)."""
    staging = staging_name(run)
    old = store.run_info(run)
    if old is not None:  # first: killed between two tables' moves, the run must not read complete (mixed rows)
        message = (
            f"being overwritten; if it was interrupted, `hookpoints record` of run {run!r} with --resume and the "
            "overwrite's other options finishes it"
        )
        kept = {key: getattr(old, key) for key in RUN_SETTINGS}
        store.log_run_event(run, "failed", kept, old.config, message, shard=(0, old.shards))
        # A process still recording the old run (one thought dead) must not commit into the new one: fenced.
        writers = [app_id(run, (index, old.shards)) for index in range(old.shards)]
        for name in ("examples", "activations"):
            tables.fence_writers(store.location, name, writers)
    deletes = _deletes(store, tables.open_table(store.location, "run_events"), run)
    for name in _RUN_TABLES:
        move_run(store, name, staging, run)
    for name in store.table_names():  # the analyses of the old run (scores, clusters, ...) describe rows now gone
        # (one registered but whose folder is gone holds no rows: skipped, as `store delete` and SQL sessions do)
        if (
            name not in CORE_TABLES
            and tables.exists(store.location, name)
            and "run" in store.dataset(name).schema.names
        ):
            keys = store.run_keys(name, run)  # its own and those of analyses comparing it with others (r1+r2)
            if keys:
                tables.delete(store.location, name, tables.any_of("run", keys))
    now = next_event_at(store.dataset("run_events"), [run, staging], _now())  # after both runs' events
    base = {"config": config_json(config), "writer": "", "shard": None, "shards": None}
    rows = [
        {**base, "run": staging, "status": "deleted", "event_at": now, "message": f"swapped in as run {run!r}"},
        {
            **base,
            "run": run,
            "status": "complete",
            "event_at": now + timedelta(microseconds=1),
            "shard": 0,
            "shards": 1,
            "message": "overwritten",
            **{key: settings.get(key) for key in RUN_SETTINGS},
        },
    ]
    if old is not None:
        deleted = {key: getattr(old, key) for key in RUN_SETTINGS}
        rows.insert(
            0,
            {
                **base,
                "run": run,
                "status": "deleted",
                "event_at": now,
                "message": "overwritten",
                "config": config_json(old.config),
                **deleted,
            },
        )
    events = pa.Table.from_pylist(rows, schema=RUN_EVENTS)

    def commit() -> None:  # onto the version checked: a `store delete` of the run landing meanwhile is seen
        delta = tables.open_table(store.location, "run_events")
        if _deletes(store, delta, run) != deletes:  # it took the run's rows: logged complete, it would hold none
            finished = store.run_info(run)  # (or another process finished this swap: nothing left to do)
            if finished is not None and finished.status == "complete" and store.run_info(staging) is None:
                return
            raise UserError(
                f"run {run!r} was deleted while its overwrite swapped in: the overwrite is dropped with it (run "
                f"`hookpoints store verify {store.location.uri}` to see whether rows are left)"
            )
        writer = tables.writer_properties(CORE_TABLES["run_events"], events.schema)
        options = CommitProperties(max_commit_retries=0)
        write_deltalake(delta, events, mode="append", writer_properties=writer, commit_properties=options)

    tables.retrying(commit)


def _deletes(store: Store, events, run: str) -> int:
    """How many times ``run`` or its staging run was logged deleted in the ``run_events`` version ``events``."""
    import pyarrow.compute as pc

    deleted = pc.field("status") == "deleted"
    return tables.dataset(store.location, "run_events", events).count_rows(
        filter=deleted & pc.field("run").isin([run, staging_name(run)])
    )


def statistics(file: dict) -> str:
    """The Delta statistics of one file of ``get_add_actions(flatten=False)``, as its ``add`` action's JSON.

    Rows, null counts and min/max of the scalar columns (store/files.py), so that readers still skip the
    file by them (``WHERE example_id = 'x'``). A value JSON cannot hold as Delta does (a timestamp, bytes,
    NaN) is left out: a missing bound only stops a reader skipping the file, never makes it skip wrongly.
    """
    stats: dict = {"numRecords": file["num_records"]}
    for key, field in (("nullCount", "null_count"), ("minValues", "min"), ("maxValues", "max")):
        values = _plain(file.get(field))
        if values:
            stats[key] = values
    return json.dumps(stats)


def _plain(values: dict | None) -> dict:
    """A statistics struct's values that JSON holds as they are (nested structs recursively), Nones left out."""
    kept: dict = {}
    for name, value in (values or {}).items():
        if isinstance(value, dict):
            value = _plain(value) or None
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        elif not isinstance(value, str | int | float):  # bool is an int; datetime, bytes, Decimal: left out
            value = None
        if value is not None:
            kept[name] = value
    return kept


def move_run(store: Store, table: str, source: str, target: str) -> None:
    """One commit: ``target``'s files removed, ``source``'s files re-added as ``target``'s (no copy).

    Nothing to move (already moved by an interrupted swap): the table is left alone.
    """
    spec = CORE_TABLES[table]

    def commit() -> None:
        delta = tables.open_table(store.location, table)
        files = pa.table(delta.get_add_actions(flatten=False)).to_pylist()
        moved = [file for file in files if file["partition"]["run"] == source]
        if not moved:
            return
        stamp = int(_now().timestamp() * 1000)
        actions: list = [
            AddAction(
                unquote(file["path"]),  # the log holds paths URL-encoded; the action encodes them again
                file["size_bytes"],
                {**file["partition"], "run": target},
                int(file["modification_time"]),
                True,
                statistics(file),
            )
            for file in moved
        ]
        actions += [
            RemoveAction(unquote(file["path"]), True, stamp, file["size_bytes"], file["partition"])
            for file in files
            if file["partition"]["run"] == target
        ]
        # Only onto the version read: a commit that landed since (a compaction rewriting the old run's files
        # into new ones, which the removes above do not name) fails this one, retried against it below.
        delta.create_write_transaction(
            actions,
            mode="append",
            schema=delta.schema(),
            partition_by=list(spec.partition_by),
            commit_properties=CommitProperties(max_commit_retries=0),
        )

    tables.retrying(commit)
