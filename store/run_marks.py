"""Did a run change between an analysis' reading of it and the analysis' writing? (a store shared by a team)

An analysis reads its runs in one pinned snapshot (store/query.py) and writes its results minutes later. If a
teammate overwrites, deletes or resumes one of those runs meanwhile, the results would be stored under the
run's name but computed from rows that are gone. Every such change logs an event of the run (store/catalog.py,
store/overwrite.py), so :class:`RunMarks` counts each run's events in the snapshot read, and
:meth:`RunMarks.check` counts them again just before the write and refuses it if any count moved.

The check and the commit after it are not one transaction: a change landing in the milliseconds between them
is not seen (the analysis' minutes of reading are).

Example::

    with store.query() as session:
        marks = RunMarks.read(session, ["r1"])
        ...read and compute...
    marks.check(store, "ap")      # UserError if r1 changed since; then write
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.compute as pc
from hookpoints.store.catalog import Store
from hookpoints.store.query import QuerySession

from hookpoints.errors import UserError


@dataclass(frozen=True)
class RunMarks:
    """Each run's number of events in the snapshot an analysis read."""

    events: dict[str, int]  # run -> its run_events rows then

    @classmethod
    def read(cls, session: QuerySession, runs) -> RunMarks:
        """The marks of ``runs`` in ``session``'s pinned snapshot."""
        names = sorted(set(runs))
        rows = session.sql(
            "SELECT run, count(*) AS n FROM _run_events WHERE list_contains($runs, run) GROUP BY run",
            {"runs": names},
        ).to_pylist()
        found = {row["run"]: row["n"] for row in rows}
        return cls({run: found.get(run, 0) for run in names})

    def changed(self, store: Store) -> str | None:
        """The first run whose events changed since :meth:`read` (by the store's current version), or None."""
        if not self.events:
            return None
        runs = list(self.events)
        table = store.dataset("run_events").to_table(columns=["run"], filter=pc.field("run").isin(runs))
        now = dict.fromkeys(runs, 0)
        for run in table["run"].to_pylist():
            now[run] += 1
        return next((run for run in runs if now[run] != self.events[run]), None)

    def check(self, store: Store, what: str) -> None:
        """Raise a UserError naming the first run that changed since :meth:`read`: call it before writing."""
        run = self.changed(store)
        if run is not None:
            raise UserError(
                f"run {run!r} changed while the {what} read it (a teammate overwrote, deleted or resumed it): "
                f"nothing of the {what} was written; run it again on the run as it is now"
            )
