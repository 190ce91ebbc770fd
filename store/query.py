"""Read-only SQL over a store with DuckDB.

A session registers each Delta table's current version as an Arrow dataset (DuckDB scans it with filter
and projection pushdown, so ``WHERE run = 'x' AND hook = 'y'`` reads only that partition) and defines the
views of docs/store.md. Then it turns off DuckDB's file access and locks its configuration, and it accepts
only SELECT statements: nothing run through a session can change the store or read other files.
"""

from __future__ import annotations

import atexit
import math
import re
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import duckdb
from hookpoints.store import delta_read, query_rows
from hookpoints.store.catalog import Store
from hookpoints.store.runs import runs_sql

from hookpoints.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

_CORE = ("run_events", "hooks", "examples", "activations")
#: Writers commit hooks, then examples, then activations, then the run's status; a session takes its
#: snapshots in the reverse order, so whatever it sees refers only to rows it also sees.
_SNAPSHOT_ORDER = ("store_meta", "run_events", "activations", "examples", "hooks")
#: Read whole (a row per event, hook or example); the others are scanned as Arrow datasets.
_SMALL = ("store_meta", "run_events", "hooks", "examples")
_WORD = re.compile(r"[a-z_][a-z0-9_]*")
#: Words of a statement that lists or reads the catalog, or runs SQL given as a string: all tables are defined.
_CATALOG = {"show", "describe", "summarize", "information_schema", "pg_catalog", "sqlite_master"}
_CATALOG |= {"query", "query_table"}

_READ_ONLY_TYPES = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(\(\s*[A-Za-z_ ,]*\)\s*)?(ANALY[SZ]E\s+)?", re.I)

# IEEE 754 half (as the int16 bit pattern) -> FLOAT, for float16 runs.
_F16_MACRO = """
CREATE MACRO f16_to_float(b) AS (
    CASE
        WHEN ((b::INTEGER & 32767) >> 10) = 31 THEN
            CASE WHEN (b::INTEGER & 1023) = 0 THEN 'inf'::FLOAT ELSE 'nan'::FLOAT END
        WHEN ((b::INTEGER & 32767) >> 10) = 0 THEN ((b::INTEGER & 1023) * pow(2, -24))::FLOAT
        ELSE ((1024 + (b::INTEGER & 1023)) * pow(2, ((b::INTEGER & 32767) >> 10) - 25))::FLOAT
    END * CASE WHEN b < 0 THEN -1 ELSE 1 END
)
"""

_VIEWS = {
    "runs": runs_sql("_run_events"),
    "hooks": """
        SELECT run, hook, component, layer, submodule, width, module, io, shape, neuron_axis, space, layer_output
        FROM _hooks
    """,
    "examples": "SELECT run, example_id, * EXCLUDE (run, example_id) FROM _examples",
    "activations": "SELECT run, hook, example_id, position, {activation} AS activation, finite FROM _activations",
    "neurons": """
        SELECT run, hook, example_id, position,
            generate_subscripts(activation, 1) - 1 AS neuron, unnest(activation) AS value
        FROM activations
    """,
}
#: What each view reads, defined first: a store table, or (`neurons`) another view.
_VIEW_TABLE = {"runs": "run_events", "hooks": "hooks", "examples": "examples", "activations": "activations"}
_VIEW_VIEW = {"neurons": "activations"}


class QuerySession:
    """A read-only DuckDB connection over one consistent version of a store."""

    def __init__(self, store: Store):
        self.store = store
        self.con = duckdb.connect()
        self.datasets = {}  # table -> the Arrow dataset (or table) this session reads, once a statement names it
        self.neuron_stats_results: dict[str, pa.Table] = {}  # neuron_stats(...) calls computed so far
        self.rewrite_neuron_groups = True  # natural per-neuron GROUP BY -> neuron_stats (store/neuron_rewrite.py)
        # One snapshot: every table's current version is pinned now (its Delta log read, no data), in the
        # order above; a table's data is registered in DuckDB only when a statement names it (_load), so
        # `SELECT 1` or a look at `runs` never builds the activations' Arrow dataset (store/tables.py).
        order = sorted(store.table_names(), key=lambda name: (_SNAPSHOT_ORDER + (name,)).index(name))
        self._snapshots = delta_read.pin(store.location, order, required=_SNAPSHOT_ORDER)
        self._tables: set[str] = set()  # store tables registered in DuckDB so far
        self._views: set[str] = set()  # views of _VIEWS created so far
        self._macro = False  # neuron_stats(...) defined (when a statement names it: its module imports numpy)
        self._f16 = False  # f16_to_float defined (3 ms: for a float16 run's activations, or when named)
        # A join's build side is its right input as written (docs/store.md): the optimizer misjudges the
        # `neurons` long form (an Arrow scan has no row estimate) as one row and would hold all of it.
        self.con.execute("SET disabled_optimizers = 'build_side_probe_side'")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    def snapshots(self) -> dict:
        """Each table this session reads -> its ``DeltaTable`` at the version pinned when the session opened."""
        return dict(self._snapshots)

    def dataset(self, table: str):
        """The session's snapshot of ``table``: an Arrow dataset (activations, analysis tables) or, for the
        small tables, an arro3 table read whole (store/delta_read.py: no pyarrow import)."""
        if table not in self.datasets:
            delta = self._snapshots[table]
            if table in _SMALL:
                # Examples gain columns as runs arrive (schema merge). Filters pushed into an Arrow dataset
                # count rows of files older than a column as valid for `IS NOT NULL` (pyarrow 26), so the small
                # tables (a row per example, hook or event) are read whole and DuckDB filters them.
                self.datasets[table] = delta_read.read_small(delta)
            else:
                from hookpoints.store import tables

                self.datasets[table] = tables.dataset(self.store.location, table, delta)
        return self.datasets[table]

    def _load(self, text: str) -> None:
        """Define every table and view ``text`` may read (each word that names one; a statement that reads
        the catalog or runs SQL from a string gets all). A name missed here is an unknown table: an error."""
        words = set(_WORD.findall(text.lower()))
        if words & _CATALOG or any(word.startswith(("duckdb_", "pragma_")) for word in words):
            self._define_all()
            return
        if words & {"f16_to_float", "f16_bytes_to_float"}:
            self._define_f16()
        for word in sorted(words):
            if word in _VIEWS:
                self._define_view(word)
            elif word.removeprefix("_") in _CORE or word in self._snapshots:
                self._define_table(word.removeprefix("_") if word.removeprefix("_") in _CORE else word)

    def _relation(self, text: str, params: dict | None) -> duckdb.DuckDBPyRelation:
        """``con.sql``; a name this session has not defined yet (a typo, a table name built in SQL) gets every
        table and view defined and one more try, so DuckDB's error and its "Did you mean" see them all."""
        if params is not None and not isinstance(params, dict):  # a list was "Mixing named and positional ..."
            raise UserError(f"SQL params must be a dict of $name -> value, not {type(params).__name__}")
        try:
            return self.con.sql(text, params=params)
        except duckdb.CatalogException:
            missing = {*self._snapshots} - self._tables or {*_VIEWS} - self._views or not (self._macro and self._f16)
            if not missing:
                raise
            self._define_all()
            return self.con.sql(text, params=params)

    def _define_all(self) -> None:
        self._define_f16()
        for table in self._snapshots:
            self._define_table(table)
        for view in _VIEWS:
            self._define_view(view)
        self._define_macro()

    def _define_f16(self) -> None:
        """``f16_to_float`` (a macro: one int16 bit pattern, the rows of schema 1-2) and ``f16_bytes_to_float``
        (our Python function, vectorised over Arrow arrays: a float16 blob of schema 3 as ``FLOAT[]``)."""
        if not self._f16:
            import duckdb.sqltypes as types
            from hookpoints.store import vectors

            self.con.execute(_F16_MACRO)
            floats = duckdb.list_type(types.FLOAT)
            self.con.create_function("f16_bytes_to_float", vectors.float_lists, [types.BLOB], floats, type="arrow")
            _WITH_FUNCTIONS.add(self)  # closed before the interpreter ends (see _close_all)
            self._f16 = True

    def _define_macro(self) -> None:
        if not self._macro:
            from hookpoints.store import neuron_surface

            self.con.execute(neuron_surface.MACRO)
            self._macro = True

    def _prepare(self, text: str, params: dict | None) -> str:
        """neuron_surface.prepare for a statement that names ``neurons`` or ``neuron_stats`` (others import
        neither that module nor numpy); the statement to run (``prepare`` may return a rewritten one)."""
        if "neuron" not in text.lower():
            return text
        from hookpoints.store import neuron_surface

        self._define_macro()
        return neuron_surface.prepare(self, text, params) or text

    def _define_view(self, name: str) -> None:
        if name in self._views:
            return
        if name in _VIEW_VIEW:
            self._define_view(_VIEW_VIEW[name])
        else:
            self._define_table(_VIEW_TABLE[name])
        activation = "activation"
        if name == "activations" and "float16" in self.dataset("run_events").column("dtype").to_pylist():
            self._define_f16()
            halves = ["list_transform(activation_f16, lambda b: f16_to_float(b))"]
            if "activation_f16_bytes" in self.dataset("activations").schema.names:  # schema 3 (verify reads 2)
                halves.insert(0, "f16_bytes_to_float(activation_f16_bytes)")
            activation = f"coalesce(activation, {', '.join(halves)})"
        try:
            self.con.execute(f"CREATE VIEW {name} AS {_VIEWS[name].format(activation=activation)}")
        except duckdb.Error as error:  # a table whose columns are not the store's (a log that changed its schema)
            uri = self.store.location.uri
            raise UserError(
                f"the {name} view cannot be defined over store {uri} ({_first_line(error)[:200]}): its tables do "
                f"not have the store's columns; run `hookpoints store verify {uri}`"
            ) from None
        self._views.add(name)

    def _define_table(self, table: str) -> None:
        if table in self._tables or table not in self._snapshots:
            return
        # Core tables sit behind the views; analysis tables (scores, ...) are shown as they are.
        self.con.register(f"_{table}" if table in _CORE else table, self.dataset(table))
        self._tables.add(table)

    def sql(self, text: str, params: dict | None = None, *, timeout: float | None = None) -> pa.Table:
        """Run one read-only statement and return its result as an Arrow table.

        ``timeout``: seconds after which the query is interrupted (a one-line UserError); None: no limit.
        Example: ``session.sql("SELECT count(*) FROM neurons", timeout=60)``.
        """
        self._check_read_only(text)
        self._load(text)
        with self.deadline(timeout):  # covers the neuron_stats(...) reads prepare computes (checked per batch)
            text = self._prepare(text, params)
            try:
                return self._relation(text, params).to_arrow_table()
            except duckdb.Error as error:
                raise self._failure(error, timeout) from None

    def batches(
        self, text: str, params: dict | None = None, *, rows: int = 4096, timeout: float | None = None
    ) -> pa.RecordBatchReader:
        """Like :meth:`sql`, but stream the result as Arrow record batches of at most ``rows`` rows.

        For results too big to hold (a layer's activations over 100,000 examples, a 2 M-row SELECT printed
        as CSV): the caller handles each batch and drops it. ``timeout`` covers the whole stream (until the
        reader is exhausted or dropped).
        """
        import pyarrow as pa

        def start(text: str):
            reader = self._relation(text, params).to_arrow_reader(rows)
            return reader.schema, reader

        schema, batches = self._streamed(text, params, timeout, start)
        return pa.RecordBatchReader.from_batches(schema, batches)

    def rows(
        self, text: str, params: dict | None = None, *, rows: int = 4096, timeout: float | None = None
    ) -> tuple[list[str], Iterator[list[tuple]]]:
        """Like :meth:`batches`, but the column names and lists of at most ``rows`` Python tuples, the values
        as Arrow's ``to_pylist`` gives them; DuckDB converts them itself where that is the same (no pyarrow
        import: store/query_rows.py). Like a reader of :meth:`batches`, the chunks hold the session until they
        are read out or dropped. Example: ``names, chunks = session.rows("SELECT * FROM hooks")``.
        """

        def start(text: str):
            relation = self._relation(text, params)  # a SELECT is only bound here; an EXPLAIN has run
            if not all(query_rows.same_as_arrow(kind) for kind in relation.types):
                return relation.columns, query_rows.from_arrow(relation.to_arrow_reader(rows))
            if self.con.extract_statements(text)[0].type == duckdb.StatementType.SELECT:
                self.con.execute(text, params)  # streams: fetchmany holds one chunk at a time
                return relation.columns, query_rows.fetched(self.con, rows)
            return relation.columns, iter([relation.fetchall()])  # EXPLAIN [ANALYZE]: held, not run again

        return self._streamed(text, params, timeout, start)

    def _streamed(self, text: str, params: dict | None, timeout: float | None, start) -> tuple:
        """``start(prepared statement)`` -> (head, iterator), run under a deadline that lasts until the
        iterator is read out or dropped; returns the head and a generator over the iterator's items."""
        self._check_read_only(text)
        self._load(text)
        deadline = self.deadline(timeout)
        deadline.__enter__()
        try:
            head, items = start(self._prepare(text, params))
        except duckdb.Error as error:
            deadline.__exit__(None, None, None)
            raise self._failure(error, timeout) from None
        except BaseException:
            deadline.__exit__(None, None, None)
            raise

        def stream() -> Iterator:
            try:
                yield from items
            except (duckdb.Error, OSError) as error:  # OSError: DuckDB's error through Arrow's batch stream
                raise self._failure(error, timeout) from None
            finally:
                deadline.__exit__(None, None, None)

        return head, stream()

    @contextmanager
    def deadline(self, seconds: float | None):
        """Interrupt whatever this session runs once ``seconds`` have passed (DuckDB ``interrupt()``)."""
        self._timed_out = False
        if seconds is None:
            yield
            return
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
            raise UserError(f"timeout {seconds!r} is not a positive number of seconds")

        def stop() -> None:
            self._timed_out = True
            self.con.interrupt()

        timer = threading.Timer(seconds, stop)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _failure(self, error: duckdb.Error | OSError, timeout: float | None) -> UserError:
        interrupted = isinstance(error, duckdb.InterruptException) or str(error).startswith("INTERRUPT Error")
        if interrupted and getattr(self, "_timed_out", False):
            return UserError(
                f"the query ran past its timeout of {timeout:g} s and was stopped: narrow it (WHERE run = ..., "
                "LIMIT) or give a longer --timeout"
            )
        return UserError(f"SQL failed: {_first_line(error)}")

    def neuron_stats(self, hooks: str, **options) -> pa.Table:
        """Per-neuron statistics of the hooks matching ``hooks`` (store/neuron_sql.py; options as there).

        Example: ``session.neuron_stats("text_decoder.layers.0.%", group_by="language", stats="avg, median")``.
        """
        from hookpoints.store import neuron_sql

        return neuron_sql.neuron_stats(self, hooks, **options)

    def _check_read_only(self, text: str) -> None:
        if not isinstance(text, str):  # a TypeError from DuckDB's bindings listing their signatures
            raise UserError(f"SQL must be a string holding one SELECT, not {type(text).__name__}")
        try:
            statements = self.con.extract_statements(text)
        except duckdb.Error as error:
            raise UserError(f"SQL does not parse: {_first_line(error)}") from None
        if len(statements) != 1:
            raise UserError(f"give exactly one SQL statement (got {len(statements)})")
        kind = statements[0].type
        if kind == duckdb.StatementType.MULTI and re.search(r"\bPIVOT\b", statements[0].query, re.IGNORECASE):
            raise UserError(
                "PIVOT without an IN (...) list runs several statements, which the read-only store refuses: name "
                "the values (PIVOT t ON language IN ('de', 'en') USING ...), or use count(*) FILTER (WHERE ...)"
            )
        if kind not in _READ_ONLY_TYPES:
            raise UserError(f"the store is read-only through SQL: {kind.name} statements are refused; use SELECT")
        if kind == duckdb.StatementType.EXPLAIN:  # EXPLAIN ANALYZE runs its statement: check that one too
            inner = _EXPLAIN.sub("", statements[0].query, count=1)
            if inner == statements[0].query:
                raise UserError("EXPLAIN is read as EXPLAIN [ANALYZE] SELECT ...: write it that way")
            self._check_read_only(inner)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> QuerySession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: Sessions that registered a Python function in DuckDB: closed at exit, since a connection still holding one
#: when the interpreter ends makes nanobind print a page of "leaked instance" warnings.
_WITH_FUNCTIONS: weakref.WeakSet[QuerySession] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for session in list(_WITH_FUNCTIONS):
        session.close()


def _first_line(error: Exception) -> str:
    """DuckDB's message without the caret-marked excerpt (keeps a "Did you mean" hint)."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line for line in lines if line and not line.startswith("LINE") and set(line) != {"^"}]
    return " ".join(kept[:2])
