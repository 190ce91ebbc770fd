"""The one way a value enters SQL text: Delta predicates of every writer, and DuckDB literals.

No heavy imports here (the CLI imports it at start-up).

Example::

    f"run = {sql_string(run)}"      # one comparison even for a run named x' OR '1'='1
    equals("run", run)              # the same, with the column checked to be a plain name
"""

from __future__ import annotations


def sql_string(value: str) -> str:
    """``value`` as a single-quoted SQL string literal: the one way a value enters a Delta predicate.

    Example: ``f"run = {sql_string(run)}"`` stays one comparison even for a run named ``x' OR '1'='1``.
    """
    if not isinstance(value, str):
        raise TypeError(f"sql_string quotes strings, not {type(value).__name__}")
    return "'" + value.replace("'", "''") + "'"


def equals(column: str, value: str) -> str:
    """A Delta predicate ``column = 'value'`` with the value quoted (``column`` is one of ours, never input)."""
    if not column.isidentifier():
        raise ValueError(f"not a plain column name: {column!r}")
    return f"{column} = {sql_string(value)}"


def any_of(column: str, values: list[str]) -> str:
    """A Delta predicate true where ``column`` equals one of ``values`` (each quoted)."""
    return " OR ".join(equals(column, value) for value in values)
