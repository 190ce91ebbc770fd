"""The SQL surface of ``neuron_stats`` (store/neuron_sql.py) and the session's guard on the ``neurons`` view.

Every session defines the table macro :data:`MACRO`; before a statement runs, :func:`prepare` finds each
``neuron_stats(...)`` call in DuckDB's own parse tree (``json_serialize_sql``), computes it, and registers
the result under the name the macro reads (``query_table``). First it runs the natural per-neuron GROUP BY
over ``neurons`` as ``neuron_stats`` where exactly equal (store/neuron_rewrite.py). It refuses a statement
whose plan would hold the ``neurons`` long form in a join's hash table, or a median/quantile/list over it
that was not rewritten and does not restrict the neurons (memory growing with the data).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pyarrow as pa
from hookpoints.store.neuron_rewrite import EXPLAIN, rewrite
from hookpoints.store.neuron_sql import ARGUMENTS, neuron_stats
from hookpoints.store.sql_tree import is_select, nodes

from hookpoints.errors import UserError

MACRO = f"""
CREATE MACRO neuron_stats(hooks, {", ".join(f"{name} := ''" for name in ARGUMENTS)}) AS TABLE
FROM query_table('_neuron_stats_' || md5(concat_ws(chr(31), hooks, {", ".join(ARGUMENTS)})))
"""


def table_name(hooks: str, args: dict[str, str]) -> str:
    """The name the macro reads a call's result from (the md5 of its arguments, as the macro computes it)."""
    key = "\x1f".join([hooks, *(args.get(name, "") for name in ARGUMENTS)])
    return "_neuron_stats_" + hashlib.md5(key.encode()).hexdigest()


def prepare(session, text: str, params: dict | None = None) -> str:
    """Before a statement runs: the statement to run instead (each natural per-neuron GROUP BY over ``neurons``
    read from ``neuron_stats``, store/neuron_rewrite.py); refuse a plan that would hold the ``neurons`` long
    form in memory; compute every ``neuron_stats(...)`` call (registered under the name the macro reads)."""
    text = rewrite(session, text)
    lowered = text.lower()
    if "neurons" in lowered.replace("neuron_stats", ""):
        _check_holistic(session, text)
        _check_plan(session, text, params)
    if "neuron_stats" not in lowered:
        return text
    explain = EXPLAIN.match(text)  # EXPLAIN [ANALYZE] of a neuron_stats(...) read: its calls are computed too
    inner = text[explain.end() :] if explain else text
    tree = json.loads(session.con.execute("SELECT json_serialize_sql($q)", {"q": inner}).fetchall()[0][0])
    if tree.get("error"):
        return text  # the statement itself reports the parse error
    for call in _calls(tree):
        hooks, args = _call_arguments(call)
        session_neuron_stats(session, hooks, **args)
    return text


def session_neuron_stats(session, hooks: str, **args: str) -> pa.Table:
    """``neuron_stats(session, hooks, **args)`` computed once per session (its snapshot does not change), and
    registered under the name the SQL macro reads: a sweep planning many conditions over the same hooks, or a
    statement naming the same call again, reads the result computed the first time."""
    name = table_name(hooks, args)
    if name not in session.neuron_stats_results:
        session.neuron_stats_results[name] = neuron_stats(session, hooks, **args)
        session.con.register(name, session.neuron_stats_results[name])
    return session.neuron_stats_results[name]


def _check_plan(session, text: str, params: dict | None) -> None:
    """UserError if a join would build its hash table from the unnested vectors (memory grows with the data).

    DuckDB holds a join's right input (its build side) in memory; the session keeps joins in the order written
    (store/query.py), so ``FROM neurons n JOIN examples e`` streams the long form and ``FROM examples e JOIN
    neurons n`` would hold all of it (13 GB for one layer of 4,000 examples).
    """
    try:
        rows = session.con.execute("EXPLAIN (FORMAT json) " + text, params or {}).fetchall()
    except Exception:
        return  # the statement itself reports the error when it runs
    for _, plan in rows:
        if any(_builds_long_form(node) for node in json.loads(plan)):
            raise UserError(
                "this query would hold every value of `neurons` in memory (the right side of a join is held "
                "whole): put neurons first, e.g. FROM neurons n JOIN examples e USING (run, example_id), or use "
                "neuron_stats(...) for per-neuron statistics (docs/store.md)"
            )


#: Aggregates that keep every value of a group (DuckDB holds them outside its buffer manager: no spilling).
HOLISTIC = {"median", "quantile", "quantile_cont", "quantile_disc", "mode", "mad", "list", "array_agg"}
HOLISTIC |= {"string_agg", "group_concat", "listagg", "histogram", "arg_min_n", "arg_max_n"}


def _check_holistic(session, text: str) -> None:
    """UserError for a median/quantile/list over ``neurons`` values left to DuckDB (not rewritten to
    neuron_stats) unless its WHERE restricts ``neuron`` or ``example_id``: such a state holds every value
    of every group, so its memory grows with the examples (docs/store.md)."""
    explain = EXPLAIN.match(text)
    text = text[explain.end() :] if explain else text
    tree = json.loads(session.con.execute("SELECT json_serialize_sql($q)", {"q": text}).fetchall()[0][0])
    if tree.get("error") or not getattr(session, "rewrite_neuron_groups", True):  # off: DuckDB's plan as written
        return
    for node in _select_nodes(tree):
        if not _reads_neurons(node.get("from_table") or {}):
            continue
        parts = [node.get("select_list"), node.get("having"), node.get("qualify"), node.get("modifiers")]
        holistic = sorted({name for part in parts for name in _holistic_calls(part)})
        if holistic and not _restricted(node.get("where_clause")):
            raise UserError(
                f"{holistic[0]}(...) over `neurons` keeps every value of each group in memory (it grows with the "
                "examples): use neuron_stats('hook or pattern', stats := 'median, p95', group_by := 'language') "
                "or restrict the neurons (WHERE neuron = ...); see docs/store.md"
            )


def _select_nodes(tree) -> Iterator[dict]:
    return (node for node in nodes(tree) if is_select(node))


def _reads_neurons(table: dict) -> bool:
    if table.get("type") == "BASE_TABLE":
        return str(table.get("table_name", "")).lower() == "neurons"
    if table.get("type") == "JOIN":
        return _reads_neurons(table.get("left") or {}) or _reads_neurons(table.get("right") or {})
    return False


def _holistic_calls(part) -> set[str]:
    """The holistic aggregates ``part`` calls, its subqueries left out (each is checked on its own)."""
    return {
        str(node["function_name"]).lower()
        for node in nodes(part, stop=is_select)
        if node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in HOLISTIC
    }


def _restricted(where: dict | None) -> bool:
    """True if a top-level AND term of ``where`` reads ``neuron`` or ``example_id`` (a few neurons or examples)."""
    if not where:
        return False
    terms = where["children"] if where.get("type") == "CONJUNCTION_AND" else [where]
    return any({"neuron", "example_id"} & _column_names(term) for term in terms)


def _column_names(part) -> set[str]:
    return {str(node["column_names"][-1]).lower() for node in nodes(part) if node.get("class") == "COLUMN_REF"}


def _builds_long_form(node: dict) -> bool:
    children = node.get("children", [])
    name = str(node.get("name", "")).upper()
    if ("JOIN" in name or "CROSS_PRODUCT" in name) and len(children) == 2 and _has_unnest(children[1]):
        return True
    return any(_builds_long_form(child) for child in children)


def _has_unnest(node: dict) -> bool:
    if "UNNEST" in str(node.get("name", "")).upper() and "activation" in json.dumps(node):
        return True
    return any(_has_unnest(child) for child in node.get("children", []))


def _calls(tree) -> Iterator[dict]:
    """The ``neuron_stats(...)`` calls in the FROM clauses of ``tree``."""
    for node in nodes(tree):
        function = node.get("function") if node.get("type") == "TABLE_FUNCTION" else None
        if isinstance(function, dict) and str(function.get("function_name", "")).lower() == "neuron_stats":
            yield function


def _call_arguments(function: dict) -> tuple[str, dict[str, str]]:
    positional, named = [], {}
    for argument in function.get("arguments", []):
        expression = argument.get("expression", {})
        literal = expression.get("literal", {}) if expression.get("class") == "CONSTANT" else {}
        name = argument.get("name") or ""
        if literal.get("kind") != "STRING":
            what = f"argument {name!r}" if name else "the hook pattern"
            raise UserError(
                f"neuron_stats: {what} must be a quoted string constant, e.g. neuron_stats('encoder.layers.3.%', "
                "group_by := 'language')"
            )
        if name:
            if name.lower() not in ARGUMENTS:
                raise UserError(f"neuron_stats: unknown argument {name!r}; it takes {', '.join(ARGUMENTS)}")
            named[name.lower()] = literal.get("text", "")
        else:
            positional.append(literal.get("text", ""))
    if len(positional) != 1:
        raise UserError(
            "neuron_stats: give one hook name or LIKE pattern first, e.g. neuron_stats('encoder.layers.3.%')"
        )
    return positional[0], named
