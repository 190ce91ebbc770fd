"""The store: Delta tables under one root (local folder or S3 prefix), shared by a team.

Tables (docs/store.md): ``store_meta`` (schema version, registered tables), ``run_events`` (append-only run
log), ``hooks``, ``examples`` and ``activations``, plus the tables analyses register (``scores`` ...).
Every write is an atomic Delta commit; nothing in a store is executable (Parquet + JSON logs only).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
from hookpoints.store import delta_read
from hookpoints.store.location import StoreLocation, storage_error
from hookpoints.store.names import RUN_NAME, SCHEMA_VERSION, names_run
from hookpoints.store.runs import config_json, next_event_at, runs_sql, shard_states_sql

from hookpoints.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa
    from hookpoints.store.schema import TableSpec

RUN_SETTINGS = ("model", "task", "pooling", "dtype")
#: Tables holding a run's recorded rows (their ``run`` is a run's name, never a key of several runs).
_RUN_TABLES = ("hooks", "examples", "activations")
#: A table of the store is a folder directly under its root: a plain name, never a path.
TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


@dataclass(frozen=True)
class RunInfo:
    """A run's state, from the ``run_events`` log (store/runs.py): settings of its latest event."""

    run: str
    status: str  # recording | complete | failed, over all its shards
    model: str
    task: str
    pooling: str
    dtype: str
    config: dict
    shards: int = 1
    shards_complete: int = 0


class Store:
    """An activation store. Open one with :meth:`Store.open`; query it with :meth:`Store.query`."""

    def __init__(self, location: StoreLocation):
        self.location = location
        self._tables: set[str] = set()  # tables known to exist (checked once per Store object)
        self._meta: tuple[int, dict[str, str]] | None = None  # (store_meta's version, its keys and values)
        self._meta_log = None  # store_meta's DeltaTable, brought up to date at each meta() (0.2 ms; an open: 1.5)
        self._meta_lock = threading.Lock()

    # -- opening ---------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        where: str | Path,
        *,
        create: bool = False,
        storage_options: dict[str, str] | None = None,
        check_version: bool = True,
    ) -> Store:
        """Open the store at ``where``; with ``create``, make a new one there if there is none.

        A store of another schema version is refused with what to do (``check_version=False`` is for
        ``hookpoints store migrate`` and ``verify``, which handle old versions themselves).
        """
        location = StoreLocation.parse(where, storage_options)
        store = cls(location)
        if _exists(location, "store_meta", where):
            being_created = create and "schema_version" not in store.meta()  # by a concurrent process
            if not being_created:
                if check_version:
                    store._check_schema_version()
                if create and location.is_local:  # opened to write: delta-rs panics on a read-only folder
                    _check_writable(Path(location.uri))
                return store
        elif not create:
            raise UserError(f"{where} is not a hookpoints store (no store_meta table): check the path")
        elif location.is_local:
            _check_local_folder(Path(location.uri))
        from hookpoints.store.schema import CORE_TABLES

        try:
            for spec in CORE_TABLES.values():
                store.ensure_table(spec)
        except OSError as error:
            raise UserError(f"cannot create a store at {location.uri}: {storage_error(error)}") from None
        if "schema_version" not in store.meta():
            store._append_meta({"schema_version": str(SCHEMA_VERSION), "created_at": _now().isoformat()})
        return store

    @classmethod
    def exists(cls, where: str | Path, storage_options: dict[str, str] | None = None) -> bool:
        """Whether there is a store at ``where`` (one being created by another process counts)."""
        return _exists(StoreLocation.parse(where, storage_options), "store_meta", where)

    def schema_version(self) -> int | None:
        """The schema version the store was written with (None if store_meta does not say)."""
        version = self.meta().get("schema_version")
        try:
            return int(version)
        except (TypeError, ValueError):
            return None

    def _check_schema_version(self) -> None:
        version = self.schema_version()
        if version == SCHEMA_VERSION:
            return
        uri = self.location.uri
        if version is None:
            raise UserError(f"store {uri} does not record a valid schema version: run `hookpoints store verify {uri}`")
        if version < SCHEMA_VERSION:
            raise UserError(
                f"store {uri} has schema version {version}, older than this hookpoints' {SCHEMA_VERSION}: run "
                f"`hookpoints store migrate {uri}` once (it only adds columns; readers can keep reading)"
            )
        raise UserError(
            f"store {uri} has schema version {version}, written by a newer hookpoints (this one reads "
            f"{SCHEMA_VERSION}): upgrade hookpoints to use it"
        )

    # -- tables ----------------------------------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        """store_meta's keys and values (its log brought up to date; the rows read again only when its Delta
        version changed)."""
        with self._meta_lock:
            if self._meta_log is not None:
                try:
                    self._meta_log.update_incremental()  # the latest version, as a fresh open would see it
                except Exception:  # noqa: BLE001 - a log it cannot follow: the fresh open below says what is wrong
                    self._meta_log = None
            if self._meta_log is None:
                self._meta_log = delta_read.open_table(self.location, "store_meta")
            delta = self._meta_log
            if self._meta is None or self._meta[0] != delta.version():
                if self._meta is not None and delta_read.outside_files(delta):  # open_table checked the first
                    self._meta_log = None
                    delta_read.open_table(self.location, "store_meta")  # raises, naming the file
                rows = delta_read.read_small(delta)
                keys, values = rows.column("key").to_pylist(), rows.column("value").to_pylist()
                self._meta = (delta.version(), dict(zip(keys, values, strict=True)))
            return dict(self._meta[1])

    def _append_meta(self, values: dict[str, str]) -> None:
        import pyarrow as pa
        from hookpoints.store.schema import CORE_TABLES

        data = pa.table({"key": list(values), "value": list(values.values())}, schema=CORE_TABLES["store_meta"].schema)
        _table_io().append(self.location, CORE_TABLES["store_meta"], data)

    def ensure_table(self, spec: TableSpec) -> None:
        """Create ``spec``'s table if it is missing and register it so SQL sessions show it."""
        if spec.name in self._tables:
            return
        if not delta_read.exists(self.location, spec.name):
            _table_io().create(self.location, spec)
        # Registered whenever it is not yet, not only by its creator: one killed between the two commits (or a
        # concurrent creator not there yet) would leave the table unregistered, its rows unseen by every reader.
        if spec.name != "store_meta" and f"table:{spec.name}" not in self.meta():
            self._append_meta({f"table:{spec.name}": json.dumps({"partition_by": list(spec.partition_by)})})
        self._tables.add(spec.name)

    def table_names(self) -> list[str]:
        """The tables store_meta registers (a name that is not a plain name is ignored; verify reports it)."""
        names = (key.removeprefix("table:") for key in self.meta() if key.startswith("table:"))
        return sorted(name for name in names if TABLE_NAME.match(name))

    def append(self, spec: TableSpec, data: pa.Table, *, merge_schema: bool = False) -> None:
        """Append rows to a table as one atomic commit (creating the table first if needed)."""
        self.ensure_table(spec)
        _table_io().append(self.location, spec, data, merge_schema=merge_schema)

    def replace(self, spec: TableSpec, data, predicate: str) -> None:
        """Replace the rows matching ``predicate`` with ``data()`` (a table or reader) as one atomic commit."""
        self.ensure_table(spec)
        _table_io().replace(self.location, spec, data, predicate)

    def dataset(self, table: str):
        """The current version of a table as a ``pyarrow.dataset.Dataset``."""
        return _table_io().dataset(self.location, table)

    # -- runs ------------------------------------------------------------------------------------------

    def run_info(self, run: str) -> RunInfo | None:
        """The run's state, or None if there is no such run (or it was deleted)."""
        rows = self._run_events_sql(run, f"SELECT * FROM ({runs_sql('_run_events')})")
        if not rows:
            return None
        row = rows[0]
        return RunInfo(
            run=run,
            status=row["status"],
            config=json.loads(row["config"] or "{}"),
            shards=row["shards"],
            shards_complete=row["shards_complete"],
            **{key: row[key] for key in RUN_SETTINGS},
        )

    def shard_states(self, run: str) -> dict[int, str]:
        """Each shard of the run that has started: its latest status (recording, resumed, complete, failed)."""
        rows = self._run_events_sql(run, shard_states_sql("_run_events"))
        return {row["shard_index"]: row["status"] for row in rows}

    def _run_events_sql(self, run: str, sql: str) -> list[dict]:
        import pyarrow.compute as pc  # 40 ms to import: not on the path of `sql` and `store info`

        events = self.dataset("run_events").to_table(filter=pc.field("run") == run)
        con = duckdb.connect()
        try:
            con.register("_run_events", events)
            return con.sql(sql).to_arrow_table().to_pylist()
        finally:
            con.close()

    def log_run_event(
        self,
        run: str,
        status: str,
        settings: dict,
        config: dict,
        message: str = "",
        *,
        shard: tuple[int, int] | None = (0, 1),
    ) -> None:
        """Append one event to the run log (``shard=None``: about the whole run, e.g. its deletion)."""
        row = {
            "run": run,
            "status": status,
            "event_at": next_event_at(self.dataset("run_events"), [run], _now()),
            "config": config_json(config),
            "message": message,
            "shard": None if shard is None else shard[0],
            "shards": None if shard is None else shard[1],
            "writer": f"{socket.gethostname()}:{os.getpid()}",
            **{key: settings.get(key) for key in RUN_SETTINGS},
        }
        import pyarrow as pa
        from hookpoints.store.schema import CORE_TABLES, RUN_EVENTS

        _table_io().append(self.location, CORE_TABLES["run_events"], pa.Table.from_pylist([row], schema=RUN_EVENTS))

    def run_hooks(self, run: str) -> pa.Table:
        import pyarrow.compute as pc

        return self.dataset("hooks").to_table(filter=pc.field("run") == run)

    def delete_run(self, run: str) -> None:
        """Remove a run's rows from every run-partitioned table, then log it as deleted.

        The run is logged ``failed`` ("being deleted") before its first rows go, so a delete killed half-way
        leaves a run that no reader takes for complete; running the delete again finishes it.
        Rows left of a run already deleted (or never started), which ``store verify`` reports, are removed too,
        and so is an overwrite of the run killed while swapping in (store/overwrite.py): the next ``record``
        would have finished its swap, bringing the run back without the rows deleted here.
        """
        import pyarrow.compute as pc

        if not isinstance(run, str):  # an Arrow kernel error (None, 5, ["r1"])
            raise UserError(f"delete_run takes one run name, not {run!r:.60}")
        info = self.run_info(run)
        names = [
            name
            for name in dict.fromkeys(["activations", "examples", "hooks", *self.table_names()])
            if name not in ("store_meta", "run_events")
            and delta_read.exists(self.location, name)
            and "run" in self.dataset(name).schema.names
        ]
        keys = {name: [run] if name in _RUN_TABLES else self.run_keys(name, run) for name in names}
        if info is None and not any(
            keys[name] and self.dataset(name).count_rows(filter=pc.field("run").isin(keys[name])) for name in names
        ):
            raise UserError(f"there is no run {run!r} in store {self.location.uri}")
        # A writer still recording the run (another machine, a process thought dead) is fenced: its next commit
        # stops it (store/commits.py) instead of bringing back part of a deleted run, logged complete.
        from hookpoints.store.commits import app_id

        settings = {key: getattr(info, key) for key in RUN_SETTINGS} if info is not None else {}
        if info is not None:  # first: a delete killed between its tables must not leave the run `complete`
            message = "being deleted; if `hookpoints store delete` was interrupted, run it again"
            self.log_run_event(run, "failed", settings, info.config, message, shard=(0, info.shards))
        writers = [app_id(run, (index, info.shards)) for index in range(info.shards)] if info is not None else []
        for name in names:
            fence = writers if name in ("activations", "examples") else ()
            if keys[name] or fence:
                _table_io().delete(self.location, name, _table_io().any_of("run", keys[name]), fence=fence)
        if info is not None:
            self.log_run_event(run, "deleted", settings, info.config, shard=None)
        from hookpoints.store.overwrite import staging_name  # it imports this module

        staged = self.run_info(staging_name(run))
        if staged is not None and staged.status == "complete":  # an overwrite killed while swapping in: deleted too
            self.delete_run(staging_name(run))

    def run_keys(self, table: str, run: str) -> list[str]:
        """The ``run`` keys of an analysis table that hold ``run``: its own, and those of the analyses that
        compared it with other runs (``r1+r2``), which describe its rows too."""
        import pyarrow.compute as pc

        found = self.dataset(table).to_table(columns=["run"], filter=pc.match_substring(pc.field("run"), run))
        return sorted(key for key in pc.unique(found.column("run")).to_pylist() if key and names_run(key, run))

    def recorded_example_ids(self, run: str, n_hooks: int, activations=None) -> set[str]:
        """Ids of the examples whose activations are committed at all ``n_hooks`` hooks of the run.

        ``activations``: the snapshot to look in (a dataset; default: the table's current version).
        """
        con = duckdb.connect()
        try:
            con.register("activations", self.dataset("activations") if activations is None else activations)
            rows = con.execute(
                "SELECT example_id FROM activations WHERE run = $run "
                "GROUP BY example_id HAVING count(DISTINCT hook) = $n",
                {"run": run, "n": n_hooks},
            ).fetchall()
        finally:
            con.close()
        return {row[0] for row in rows}

    # -- queries ---------------------------------------------------------------------------------------

    def query(self):
        """A read-only DuckDB session over this store's current version (see store.query)."""
        from hookpoints.store.query import QuerySession

        return QuerySession(self)


def validate_run_name(run: str) -> str:
    if not RUN_NAME.match(run or ""):
        raise UserError(
            f"run name {run!r} is not allowed: use letters, digits, '_', '-' and '.', starting with a "
            "letter or digit (at most 128 characters)"
        )
    return run


def _table_io():
    """store/tables.py, for the methods that write or scan (it imports pyarrow: 0.1 s that `hookpoints sql`
    and `store info` do without)."""
    from hookpoints.store import tables

    return tables


_WRITE_PROBE = ".write-test-"


def _check_local_folder(root: Path) -> None:
    from hookpoints.store.schema import CORE_TABLES

    if root.exists() and not root.is_dir():
        raise UserError(f"store path {root} is a file: give a folder")
    # a concurrent creator's tables and write probe are not foreign files
    if root.is_dir() and any(e.name not in CORE_TABLES and not e.name.startswith(_WRITE_PROBE) for e in root.iterdir()):
        raise UserError(f"{root} is a folder that is not a hookpoints store and is not empty: pick an empty folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f"{_WRITE_PROBE}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"cannot write to store folder {root}: {error.strerror or error}; pick a folder you can write"
        ) from None


def _check_writable(root: Path) -> None:
    """Refuse a local store whose tables this process cannot write (instead of a Rust panic at the first commit)."""
    from hookpoints.store.schema import CORE_TABLES

    for name in CORE_TABLES:
        log = root / name / "_delta_log"
        if log.is_dir() and not os.access(log, os.W_OK | os.X_OK):
            raise UserError(
                f"store {root} is read-only for this user ({log} cannot be written): record into a store you can "
                "write, or ask its owner for write access"
            )


def _exists(location: StoreLocation, table: str, where) -> bool:
    try:
        return delta_read.exists(location, table)
    except OSError as error:
        raise UserError(
            f"cannot reach store {where}: {storage_error(error)} (check the URI, AWS_ENDPOINT_URL and credentials)"
        ) from None


def _now() -> datetime:
    return datetime.now(UTC)
