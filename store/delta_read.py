"""Reading a store's Delta tables without pyarrow: versions (all tables' as one snapshot), files, small tables' rows.

``hookpoints sql`` and ``store info`` import neither pyarrow nor numpy (about 0.1 s, as long as importing DuckDB
and Delta Lake): the Delta log is read by delta-rs, a small table's rows by delta-rs' own reader
(``deltalake.QueryBuilder``: schema merge and partition columns as in the Arrow dataset), and results are arro3
tables, which DuckDB scans through the Arrow C interface. Example::

    rows = read_small(open_table(store.location, "run_events"))
    rows.num_rows, rows.column("run").to_pylist()
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from urllib.parse import unquote

from deltalake import DeltaTable, QueryBuilder
from deltalake.exceptions import DeltaError, TableNotFoundError
from hookpoints.store.location import StoreLocation, without_backtrace

from hookpoints.errors import UserError


def exists(location: StoreLocation, table: str) -> bool:
    return DeltaTable.is_deltatable(location.table_uri(table), storage_options=location.storage_options)


def open_table(location: StoreLocation, table: str) -> DeltaTable:
    """The table's current version (its Delta log read, no data).

    A version whose log adds a file outside the table's folder (``../../x.parquet``, ``s3://other/...``:
    never written by hookpoints) is refused: delta-rs and Arrow would read that file, anywhere this process
    can read, into the table.
    """
    try:
        delta = DeltaTable(location.table_uri(table), storage_options=location.storage_options)
    except TableNotFoundError as error:
        raise FileNotFoundError(f"table {table!r} is missing from store {location.uri}") from error
    except DeltaError as error:  # a damaged log (delta-rs: "Kernel error: Json error ...")
        raise UserError(
            f"table {table!r} of store {location.uri} cannot be read ({without_backtrace(error)[:200]}): its log "
            f"is damaged; run `hookpoints store verify {location.uri}` to see what"
        ) from None
    outside = outside_files(delta)
    if outside:
        raise UserError(
            f"table {table!r} of store {location.uri} cannot be read: its log adds a file outside the table's "
            f"folder ({outside[0][:200]!r}); run `hookpoints store verify {location.uri}` to see what"
        )
    return delta


#: Events that only add to a run (its start, its end): landing while a session pins its tables, they leave it be.
_PLAIN_EVENTS = ("recording", "resumed", "complete")
_PIN_TRIES = 10


def pin(location: StoreLocation, tables: Sequence[str], *, required: Sequence[str]) -> dict[str, DeltaTable]:
    """Each table's current version, opened in ``tables``' order (one with ``run_events``), as one snapshot.

    An overwrite's swap and a delete change a run's tables one commit each, between two ``run_events``
    commits (the run logged ``failed``, "being overwritten" or "being deleted", first; store/overwrite.py).
    Tables pinned while that happened, after a ``run_events`` pinned before it, would show the run ``complete``
    over the old recording's activations and the new one's examples: when ``run_events`` gained any event but
    a start or end of a run meanwhile, every table is pinned again. A table of ``tables`` that is gone
    is left out, unless ``required``.
    """
    for attempt in range(_PIN_TRIES):
        snapshots = {}
        for table in tables:
            try:
                snapshots[table] = open_table(location, table)
            except FileNotFoundError:
                if table in required:
                    uri = location.uri
                    raise UserError(f"store {uri} has no {table} table: run `hookpoints store verify {uri}`") from None
                # an analysis table registered but gone (its folder deleted): the session reads the others
        if "run_events" not in snapshots or _unchanged(snapshots["run_events"]):
            return snapshots
        time.sleep(0.01 * 2**attempt)  # a swap takes milliseconds
    raise UserError(
        f"store {location.uri} changed {_PIN_TRIES} times while a session read its tables' versions (runs being "
        "overwritten or deleted at this moment): try again"
    )


def _unchanged(events: DeltaTable) -> bool:
    """Whether ``events``' table gained no event but starts and ends of runs since ``events``' version (then
    ``events`` is left at its version; otherwise at the latest).

    The events are counted, not commits read from ``history()``: delta-rs lists the newest commits on
    storage there, numbered from the version loaded, so a run starting just after the log was read hid a swap's
    ``failed`` commit. The log is append-only (a compaction rewrites the same rows): a count that did not grow
    means no swap or delete began or ended since.
    """
    pinned = events.version()
    try:
        events.update_incremental()  # reads only the log's newer commits, if any (under 1 ms)
    except DeltaError:  # a newer commit that cannot be read: pinning again says what (open_table)
        return False
    if events.version() == pinned:
        return True
    latest = _unsettled(events)
    events.load_as_version(pinned)  # a run's end logged since must not show: its last rows may not be pinned
    return _unsettled(events) == latest


def _unsettled(events: DeltaTable) -> int:
    """How many events of ``events``' version are neither a start nor an end of a run (failed, deleted, ...)."""
    plain = ", ".join(f"'{status}'" for status in _PLAIN_EVENTS)
    sql = f"SELECT count(*) AS n FROM t WHERE status IS NULL OR status NOT IN ({plain})"
    return QueryBuilder().register("t", events).execute(sql).read_all().column("n").to_pylist()[0]


def inside(path: str) -> bool:
    """Whether a path from a log entry stays inside its table's folder (relative, no ``..``)."""
    plain = unquote(path)
    return not ("://" in plain or plain.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", plain))


def outside_files(delta: DeltaTable) -> list[str]:
    """The paths of ``delta``'s version's files that lie outside its table's folder (none in a healthy store).

    50,000 files: about 25 ms (only paths holding ``..``, ``:``, ``%``, ``\\`` or a leading ``/`` are parsed).
    """
    paths = delta.get_add_actions(flatten=False).column("path").to_pylist()
    suspect = (path for path in paths if ".." in path or ":" in path or "%" in path or "\\" in path or path[:1] == "/")
    return [path for path in suspect if not inside(path)]


def read_small(delta: DeltaTable):
    """The rows of ``delta``'s version, whole, as an arro3 ``Table`` with the table's columns in its order.

    For the small tables (store_meta, run_events, hooks, examples). Strings come as Arrow ``string_view``
    (DataFusion's choice): DuckDB reads them as VARCHAR, as it does ``string``.
    """
    columns = ", ".join('"' + field.name.replace('"', '""') + '"' for field in delta.schema().fields)
    return QueryBuilder().register("t", delta).execute(f"SELECT {columns} FROM t").read_all()


def file_stats(delta: DeltaTable) -> dict[str, int]:
    """``files``, ``rows`` and ``bytes`` of ``delta``'s version, from its log (no data read)."""
    actions = delta.get_add_actions(flatten=True)  # an arro3 RecordBatch: no pyarrow
    return {
        "files": actions.num_rows,
        "rows": sum(n or 0 for n in actions.column("num_records").to_pylist()),
        "bytes": sum(n or 0 for n in actions.column("size_bytes").to_pylist()),
    }
