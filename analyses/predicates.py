"""User predicates (``--where``, ``--positive``, ``--among``) checked by DuckDB's own parser.

A predicate is parsed as ``SELECT <predicate>`` with ``json_serialize_sql``, so every quoting form DuckDB
knows (``'...'``, ``E'...'``, ``$$...$$``, ``"..."``) is read exactly as DuckDB will read it. It is accepted
only when it is one expression (no FROM, WHERE, alias, second statement) built from column names, constants,
operators and scalar functions: no subquery, aggregate, window, table function, parameter, ``*`` or
qualified name (``examples.run``), so it can only test one example's own columns. The checked expression is
kept as written when ``(<predicate>)`` parses to the very same expression, and re-rendered by DuckDB
(``json_deserialize_sql``) otherwise (a trailing ``--`` comment would swallow what follows it); callers
evaluate it over the runs they name only (``FROM (SELECT * FROM examples WHERE <runs>) WHERE <predicate>``).

Example::

    check_predicate("language = 'de' AND modality = 'speech'", "--positive")  # returned as given
    check_predicate("language = 'de' -- German", "--positive")  # -> '(("language" = \\'de\\'))'
"""

from __future__ import annotations

import json
from functools import cache

import duckdb

from hookpoints.errors import UserError

_ALLOWED = {"COLUMN_REF", "CONSTANT", "COMPARISON", "CONJUNCTION", "OPERATOR", "FUNCTION", "CAST", "CASE"}
_ALLOWED |= {"BETWEEN", "COLLATE"}
# the type a CAST names (DuckDB 2 parses it as an expression node of class TYPE): without it every cast,
# ``score::DOUBLE > 0.5``, was refused as "type is not allowed in a predicate"
_ALLOWED |= {"TYPE"}
_CLAUSES = ("where_clause", "having", "sample", "qualify")


def check_predicate(text: str | None, option: str, columns: list[str] | None = None) -> str:
    """``text`` as DuckDB's normalised SQL of one safe boolean expression, or a one-line UserError.

    ``columns``: when given, the only column names it may use (compared case-insensitively, like DuckDB).
    """
    if text is not None and not isinstance(text, str):  # 5 or ["a = 1"] was an AttributeError on .strip
        raise UserError(f"{option} must be a SQL boolean expression (a string), not {type(text).__name__}")
    text = (text or "").strip()
    if not text:
        raise UserError(f"{option} is empty: give a boolean SQL expression, e.g. \"language = 'de'\"")
    node = _parse(text, option)
    select = node["select_list"]
    plain = (
        node.get("type") == "SELECT_NODE"
        and len(select) == 1
        and node["from_table"].get("type") == "EMPTY"
        and not node["modifiers"]
        and not node["cte_map"]["map"]
        and not node["group_expressions"]
        and all(node.get(clause) is None for clause in _CLAUSES)
        and not select[0].get("alias")
    )
    if not plain:
        raise UserError(f"{option} {text!r}: give one boolean expression over the examples' columns, nothing more")
    _check_expression(select[0], text, option, {c.lower() for c in columns} if columns is not None else None)
    if _same_in_parentheses(text, select[0]):
        return text  # as the user wrote it: shown in tables and messages as given
    tree = json.dumps({"error": False, "statements": [{"node": node, "named_param_map": []}]})
    sql = _cursor().execute("SELECT json_deserialize_sql($q)", {"q": tree}).fetchone()[0]
    return f"({sql.removeprefix('SELECT ').strip()})"


def _same_in_parentheses(text: str, expression: dict) -> bool:
    """Whether ``(text)`` parses to the very same expression (false for e.g. a trailing ``--`` comment, which
    would swallow the closing parenthesis and what follows it in the query it is put into)."""
    result = json.loads(_cursor().execute("SELECT json_serialize_sql($q)", {"q": f"SELECT ({text})"}).fetchone()[0])
    if result.get("error") or len(result["statements"]) != 1:
        return False
    wrapped = result["statements"][0]["node"]["select_list"]
    return len(wrapped) == 1 and _without_locations(wrapped[0]) == _without_locations(expression)


def _without_locations(node):
    if isinstance(node, dict):
        return {k: _without_locations(v) for k, v in node.items() if not k.startswith("query_location")}
    if isinstance(node, list):
        return [_without_locations(item) for item in node]
    return node


def _parse(text: str, option: str) -> dict:
    try:
        several = len(_cursor().extract_statements("SELECT " + text)) > 1
    except duckdb.Error:
        several = False  # the parse error is reported below
    if several:
        raise UserError(f"{option} {text!r}: give one boolean expression, without ';'")
    try:
        result = json.loads(_cursor().execute("SELECT json_serialize_sql($q)", {"q": "SELECT " + text}).fetchone()[0])
    except (duckdb.Error, RecursionError, ValueError) as error:
        raise UserError(f"{option} {text!r} cannot be read: {str(error).splitlines()[0][:200]}") from None
    if result.get("error"):
        message = " ".join(str(result.get("error_message", "")).split())[:200]
        raise UserError(f"{option} {text!r} does not parse as SQL ({message}): give one boolean expression")
    statements = result["statements"]
    if len(statements) != 1:
        raise UserError(f"{option} {text!r}: give one boolean expression, without ';'")
    return statements[0]["node"]


def _check_expression(node, text: str, option: str, columns: set[str] | None) -> None:
    """Walk the parsed expression; refuse anything that is not per-row and local to the example."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        kind = item.get("class")
        if kind is not None:
            if kind not in _ALLOWED:
                what = {"SUBQUERY": "a subquery", "WINDOW": "a window function", "STAR": "*"}.get(kind, kind.lower())
                raise UserError(f"{option} {text!r}: {what} is not allowed in a predicate; test the row's own columns")
            if kind == "COLUMN_REF":
                names = item["column_names"]
                if len(names) != 1:
                    raise UserError(f"{option} {text!r}: write the column {names[-1]!r} without a table name")
                if columns is not None and names[0].lower() not in columns:
                    known = ", ".join(sorted(columns))
                    raise UserError(f"{option} {text!r}: there is no column {names[0]!r} (columns: {known})")
            if kind == "FUNCTION" and item["function_name"].lower() in _not_scalar():
                raise UserError(
                    f"{option} {text!r}: {item['function_name']}() is not a per-example function; "
                    "a predicate tests each example on its own"
                )
        stack.extend(value for value in item.values() if isinstance(value, (dict, list)))


@cache
def _connection() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET enable_external_access = false")
    return con


def _cursor() -> duckdb.DuckDBPyConnection:
    """A cursor of the shared in-memory connection (one per call: connections are not thread-safe)."""
    return _connection().cursor()


@cache
def _not_scalar() -> frozenset[str]:
    rows = (
        _cursor()
        .execute(
            "SELECT DISTINCT lower(function_name) FROM duckdb_functions() "
            "WHERE function_type NOT IN ('scalar', 'macro')"
        )
        .fetchall()
    )
    return frozenset(row[0] for row in rows)
