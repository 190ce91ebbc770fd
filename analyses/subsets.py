"""Example subsets: the examples of one run that a SQL predicate over the ``examples`` table picks.

``--where "language IN ('en', 'de') AND modality = 'text'"`` is any DuckDB boolean expression over the
examples view's columns (run, example_id and every manifest column). The predicate is kept inside one pair of
parentheses (checked before DuckDB sees it), so it can only narrow the run's examples, never reach past them.

Predicates see the examples through :func:`examples_source`: a NaN in a float column reads as NULL (a missing
value, as pandas reads it). DuckDB orders NaN above every number and NaN = NaN, so ``score > 0.5`` was true
for a NaN score: the example became a positive (or passed ``--where``) where pandas' ``df.score > 0.5`` says
False.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from hookpoints.analyses.labels import check_predicate, quote_name
from hookpoints.store.query import QuerySession

from hookpoints.errors import UserError


@dataclass(frozen=True)
class Subset:
    """The examples of ``run`` matched by ``where``, sorted by ``example_id``, with the asked label columns."""

    run: str
    where: str  # "" when every example of the run counts
    table: pa.Table  # example_id first, then the label columns; row i is the subset's example i
    source: str = "examples"  # the examples as the predicate reads them (examples_source)

    @property
    def example_ids(self) -> list[str]:
        return self.table["example_id"].to_pylist()

    def __len__(self) -> int:
        return self.table.num_rows

    def sql(self) -> str:
        """A SELECT giving each example of the subset its row (``example_id``, ``row``), for joins."""
        return subset_sql(self.where, "example_id, row_number() OVER (ORDER BY example_id) - 1 AS row", self.source)


def subset_sql(where: str, columns: str, source: str = "examples") -> str:
    """SELECT ``columns`` FROM the run's examples (parameter ``$run``) matching ``where``."""
    predicate = f"({where})" if where else "true"
    return f"SELECT {columns} FROM (SELECT * FROM {source} WHERE run = $run) WHERE {predicate}"


def examples_source(session: QuerySession) -> str:
    """The examples view with NaN read as NULL in its float columns: what predicates are evaluated over."""
    floats = [field.name for field in session.sql("SELECT * FROM examples LIMIT 0").schema
              if pa.types.is_floating(field.type)]  # fmt: skip
    if not floats:
        return "examples"
    names = [quote_name(name) for name in floats]
    replaced = ", ".join(f"CASE WHEN isnan({name}) THEN NULL ELSE {name} END AS {name}" for name in names)
    return f"(SELECT * REPLACE ({replaced}) FROM examples)"


def example_columns(session: QuerySession) -> list[str]:
    """The columns of the examples view (run, example_id, then every manifest column any run brought)."""
    return session.sql("SELECT * FROM examples LIMIT 0").column_names


def select_subset(session: QuerySession, run: str, where: str | None, labels: list[str]) -> Subset:
    """The examples of ``run`` matching ``where``, with the ``labels`` columns; clear errors for bad input."""
    blank = where is None or (isinstance(where, str) and not where.strip())
    where = "" if blank else check_predicate(where, "--where")  # a non-string is refused there
    columns = example_columns(session)
    for label in labels:
        if label not in columns:
            known = ", ".join(c for c in columns if c not in ("run", "example_id"))
            raise UserError(f"label column {label!r} is not in the examples table; it has: {known}")
    selected = ", ".join(["example_id", *(quote_name(label) for label in labels if label != "example_id")])
    source = examples_source(session)
    try:
        table = session.sql(subset_sql(where, selected, source) + " ORDER BY example_id", {"run": run})
    except UserError as error:
        raise UserError(f"--where {where!r} does not work on the examples table: {error}") from None
    if table.num_rows == 0:
        scope = f" matching --where {where!r}" if where else ""
        raise UserError(f"run {run!r} has no examples{scope}: check the run name and the predicate")
    return Subset(run, where, table, source)
