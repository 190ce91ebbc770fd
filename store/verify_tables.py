"""``hookpoints store verify``, checks 5 and 6: the tables against each other, and the runs' states.

Called by :func:`hookpoints.store.verify.verify` after the per-file checks; each adds its findings to the
report. Example::

    report = VerifyReport()
    check_integrity(store, report)   # duplicates, orphans, rows of deleted runs, complete runs with gaps
    check_runs(store, report)        # failed runs, runs left recording, overwrites killed while swapping in
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from hookpoints.store.catalog import Store
from hookpoints.store.overwrite import STAGING_SUFFIX
from hookpoints.store.runs import runs_sql

if TYPE_CHECKING:
    from hookpoints.store.verify import VerifyReport

_INTEGRITY = [
    (
        "examples",
        "SELECT run, example_id, count(*) AS n FROM _examples GROUP BY ALL HAVING n > 1",
        "example {example_id!r} of run {run!r} is stored {n} times",
    ),
    (
        "hooks",
        "SELECT run, hook, count(*) AS n FROM _hooks GROUP BY ALL HAVING n > 1",
        "hook {hook!r} of run {run!r} is stored {n} times",
    ),
    (
        "activations",
        """SELECT run, hook, example_id, position, count(*) AS n FROM _activations
           GROUP BY ALL HAVING n > 1""",
        "example {example_id!r} (position {position}) at hook {hook!r} of run {run!r} is stored {n} times",
    ),
    (
        "activations",
        """SELECT DISTINCT a.run, a.example_id FROM _activations a
           ANTI JOIN _examples e ON a.run = e.run AND a.example_id = e.example_id""",
        "activations of example {example_id!r} in run {run!r}, which is not in examples",
    ),
    (
        "activations",
        """SELECT DISTINCT a.run, a.hook FROM _activations a
           ANTI JOIN _hooks h ON a.run = h.run AND a.hook = h.hook""",
        "activations at hook {hook!r} in run {run!r}, which is not in hooks",
    ),
    (
        "store",
        """SELECT DISTINCT run FROM (SELECT run FROM _examples UNION ALL SELECT run FROM _hooks
           UNION ALL SELECT run FROM _activations) ANTI JOIN runs USING (run)""",
        "rows of run {run!r}, which is deleted or was never started: `hookpoints store delete STORE --run {run}` "
        "removes them",
    ),
    (
        "activations",
        """WITH n_hooks AS (SELECT run, count(*) AS hooks FROM _hooks GROUP BY run),
                recorded AS (SELECT run, example_id, count(DISTINCT hook) AS hooks FROM _activations GROUP BY ALL)
           SELECT e.run, count(*) AS n FROM _examples e JOIN runs r USING (run) JOIN n_hooks h USING (run)
           LEFT JOIN recorded a USING (run, example_id)
           WHERE r.status = 'complete' AND coalesce(a.hooks, 0) <> h.hooks GROUP BY e.run""",
        "run {run!r} is complete but {n} of its examples are not recorded at every hook",
    ),
]


def check_integrity(store: Store, report: VerifyReport) -> None:
    """The tables against each other. A run whose events changed while they were read (a teammate starting,
    deleting or overwriting it now) is left out: its rows were read part before, part after the change."""
    con = duckdb.connect()
    try:
        before = Counter(store.dataset("run_events").to_table(columns=["run"])["run"].to_pylist())
        read = {}
        for name in ("activations", "examples", "hooks"):
            dataset = store.dataset(name)
            columns = [c for c in ("run", "hook", "example_id", "position", "width") if c in dataset.schema.names]
            read[name] = dataset.to_table(columns=columns)
        events = store.dataset("run_events").to_table()
        after = Counter(events["run"].to_pylist())
        moving = pa.array(
            [run for run in before.keys() | after.keys() if before.get(run) != after.get(run)], pa.string()
        )
        for name, rows in {"run_events": events, **read}.items():
            con.register(f"_{name}", rows.filter(pc.invert(pc.is_in(rows["run"], moving))))
        con.execute(f"CREATE VIEW runs AS {runs_sql('_run_events')}")
        for table, sql, message in _INTEGRITY:
            rows = con.sql(sql).to_arrow_table().to_pylist()
            for row in rows[:20]:
                report.add("error", table, message.format(**row))
            if len(rows) > 20:
                report.add("error", table, f"... and {len(rows) - 20} more like that")
    finally:
        con.close()


def check_runs(store: Store, report: VerifyReport) -> None:
    """Runs that failed, or were left recording: not damage, but they need a --resume (or an --overwrite)."""
    con = duckdb.connect()
    try:
        con.register("_run_events", store.dataset("run_events").to_table())
        rows = con.sql(f"SELECT run, status, message FROM ({runs_sql('_run_events')})").to_arrow_table().to_pylist()
        latest = con.sql("SELECT run, status, max(event_at) AS at FROM _run_events GROUP BY ALL").to_arrow_table()
        at = {(row["run"], row["status"]): row["at"] for row in latest.to_pylist()}  # each status' last event
        for row in rows:
            if row["status"] == "complete" and row["run"].endswith(STAGING_SUFFIX):  # killed while swapping in
                run = row["run"].removesuffix(STAGING_SUFFIX)
                finish = (
                    f"`hookpoints record` of run {run!r} with --resume and the overwrite's other options finishes it"
                    if at.get((run, "deleted")) is None or at[run, "deleted"] <= at[row["run"], "complete"]
                    else f"run {run!r} was deleted since: `hookpoints store delete {store.location.uri} --run "
                    f"{row['run']}` removes what is left of the overwrite"
                )
                report.add(
                    "error",
                    "runs",
                    f"the overwrite of run {run!r} was killed while swapping in its new rows (complete as run "
                    f"{row['run']!r}): {finish}",
                )
            if row["status"] == "complete":
                continue
            said = f": {row['message']}" if row["message"] else ""
            what = "failed" if row["status"] == "failed" else "is still recording (or its process was killed)"
            report.add("warning", "runs", f"run {row['run']!r} {what}{said}")
    finally:
        con.close()
