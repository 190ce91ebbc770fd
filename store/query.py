"""Read-only SQL over a store with DuckDB.

A session registers each Delta table's current version as an Arrow dataset (DuckDB scans it with filter
and projection pushdown, so ``WHERE run = 'x' AND hook = 'y'`` reads only that partition) and defines the
views of docs/store.md. Then it turns off DuckDB's file access and locks its configuration, and it accepts
only SELECT statements: nothing run through a session can change the store or read other files.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import pyarrow as pa
from hookpoints.store import neuron_sql, neuron_surface
from hookpoints.store.catalog import Store
from hookpoints.store.runs import runs_sql

from hookpoints.errors import UserError

_CORE = ("run_events", "hooks", "examples", "activations")
#: Writers commit hooks, then examples, then activations, then the run's status; a session takes its
#: snapshots in the reverse order, so whatever it sees refers only to rows it also sees.
_SNAPSHOT_ORDER = ("store_meta", "run_events", "activations", "examples", "hooks")
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


class QuerySession:
    """A read-only DuckDB connection over one consistent version of a store."""

    def __init__(self, store: Store):
        self.store = store
        self.con = duckdb.connect()
        self._f16_runs = False
        self.datasets = {}  # table -> the Arrow dataset (or table) this session reads: one snapshot
        self.neuron_stats_results: dict[str, pa.Table] = {}  # neuron_stats(...) calls computed so far
        names = store.table_names()
        for table in sorted(names, key=lambda name: (_SNAPSHOT_ORDER + (name,)).index(name)):
            dataset = store.dataset(table)
            if table == "run_events":
                self._f16_runs = "float16" in dataset.to_table(columns=["dtype"])["dtype"].to_pylist()
            if table == "examples":
                # Examples gain columns as runs arrive (schema merge). Filters pushed into the Arrow dataset
                # count rows of files older than a column as valid for `IS NOT NULL` (pyarrow 26), so this
                # small table (one row per example and run) is read whole and DuckDB filters it.
                dataset = dataset.to_table()
            self.datasets[table] = dataset
            # Core tables sit behind the views below; analysis tables (scores, ...) are shown as they are.
            self.con.register(f"_{table}" if table in _CORE else table, dataset)
        self.con.execute(_F16_MACRO)
        self.con.execute(neuron_surface.MACRO)
        activation = (
            "coalesce(activation, list_transform(activation_f16, lambda b: f16_to_float(b)))"
            if self._f16_runs
            else "activation"
        )
        for name, sql in _VIEWS.items():
            self.con.execute(f"CREATE VIEW {name} AS {sql.format(activation=activation)}")
        # A join's build side is its right input as written (docs/store.md): the optimizer misjudges the
        # `neurons` long form (an Arrow scan has no row estimate) as one row and would hold all of it.
        self.con.execute("SET disabled_optimizers = 'build_side_probe_side'")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    def sql(self, text: str, params: dict | None = None, *, timeout: float | None = None) -> pa.Table:
        """Run one read-only statement and return its result as an Arrow table.

        ``timeout``: seconds after which the query is interrupted (a one-line UserError); None: no limit.
        Example: ``session.sql("SELECT count(*) FROM neurons", timeout=60)``.
        """
        self._check_read_only(text)
        neuron_surface.prepare(self, text, params)
        with self.deadline(timeout):
            try:
                return self.con.sql(text, params=params).to_arrow_table()
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
        self._check_read_only(text)
        neuron_surface.prepare(self, text, params)
        deadline = self.deadline(timeout)
        deadline.__enter__()
        try:
            reader = self.con.sql(text, params=params).to_arrow_reader(rows)
        except duckdb.Error as error:
            deadline.__exit__(None, None, None)
            raise self._failure(error, timeout) from None
        except BaseException:
            deadline.__exit__(None, None, None)
            raise

        def stream() -> Iterator[pa.RecordBatch]:
            try:
                yield from reader
            except duckdb.Error as error:
                raise self._failure(error, timeout) from None
            finally:
                deadline.__exit__(None, None, None)

        return pa.RecordBatchReader.from_batches(reader.schema, stream())

    @contextmanager
    def deadline(self, seconds: float | None):
        """Interrupt whatever this session runs once ``seconds`` have passed (DuckDB ``interrupt()``)."""
        if seconds is None:
            yield
            return
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
            raise UserError(f"timeout {seconds!r} is not a positive number of seconds")
        self._timed_out = False

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

    def _failure(self, error: duckdb.Error, timeout: float | None) -> UserError:
        if isinstance(error, duckdb.InterruptException) and getattr(self, "_timed_out", False):
            return UserError(
                f"the query ran past its timeout of {timeout:g} s and was stopped: narrow it (WHERE run = ..., "
                "LIMIT) or give a longer --timeout"
            )
        return UserError(f"SQL failed: {_first_line(error)}")

    def neuron_stats(self, hooks: str, **options) -> pa.Table:
        """Per-neuron statistics of the hooks matching ``hooks`` (store/neuron_sql.py; options as there).

        Example: ``session.neuron_stats("text_decoder.layers.0.%", group_by="language", stats="avg, median")``.
        """
        return neuron_sql.neuron_stats(self, hooks, **options)

    def _check_read_only(self, text: str) -> None:
        try:
            statements = self.con.extract_statements(text)
        except duckdb.Error as error:
            raise UserError(f"SQL does not parse: {_first_line(error)}") from None
        if len(statements) != 1:
            raise UserError(f"give exactly one SQL statement (got {len(statements)})")
        kind = statements[0].type
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


def _first_line(error: Exception) -> str:
    """DuckDB's message without the caret-marked excerpt (keeps a "Did you mean" hint)."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line for line in lines if line and not line.startswith("LINE") and set(line) != {"^"}]
    return " ".join(kept[:2])
