"""The natural per-neuron GROUP BY over ``neurons``, run as ``neuron_stats(...)`` where that is exactly equal.

``SELECT n.hook, e.language, n.neuron, avg(n.value) FROM neurons n JOIN examples e USING (run, example_id)
WHERE n.run = 'r' GROUP BY ALL``: DuckDB's unnest + join + hash aggregate grows with the examples (Arrow's scan
reads ahead outside DuckDB's buffer manager, so ``memory_limit`` bounds nothing; median/quantile keep every
value). :func:`rewrite` replaces each SELECT of that shape in DuckDB's parse tree with the same columns read
from ``neuron_stats(...)``; anything it cannot prove equal runs as written. The conditions (FROM, GROUP BY,
SELECT, WHERE, ORDER BY/LIMIT, one run in scope, finite vectors): docs/store.md, "Natural GROUP BY over
neurons".
"""

from __future__ import annotations

import json
import re

import duckdb
from hookpoints.store.neuron_sql import StatSpec
from hookpoints.store.sql_tree import is_select, nodes

from hookpoints.errors import UserError

EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(\(\s*[A-Za-z_ ,]*\)\s*)?(ANALY[SZ]E\s+)?", re.I)
NEURON_COLUMNS = ("run", "hook", "example_id", "position", "neuron", "value")
#: DuckDB aggregate name -> neuron_stats statistic, and the SQL type DuckDB gives it over FLOAT values.
AGGREGATES = {
    "count": ("count", None),
    "count_star": ("count", None),
    "sum": ("sum", None),
    "avg": ("avg", None),
    "mean": ("avg", None),
    "stddev": ("stddev", None),
    "stddev_samp": ("stddev", None),
    "variance": ("variance", None),
    "var_samp": ("variance", None),
    "min": ("min", "FLOAT"),
    "max": ("max", "FLOAT"),
    "median": ("median", "FLOAT"),
    "quantile_cont": (None, "FLOAT"),  # pNN from its constant second argument
}


class _NoRewrite(Exception):
    """The SELECT is not (provably) the natural per-neuron form: it runs as written."""


def rewrite(session, text: str) -> str:
    """``text`` with each natural per-neuron GROUP BY over ``neurons`` replaced by a ``neuron_stats`` read.

    >>> rewrite(session, "SELECT hook, neuron, avg(value) FROM neurons WHERE run = 'r' GROUP BY ALL")  # doctest: +SKIP
    'SELECT _ns.hook AS hook, _ns.neuron AS neuron, _ns.avg AS "avg(""value"")" FROM neuron_stats(...) AS _ns'
    """
    if not getattr(session, "rewrite_neuron_groups", True) or "neurons" not in text.lower():
        return text
    explain = EXPLAIN.match(text)
    if explain and explain.end():  # EXPLAIN [ANALYZE] shows (and runs) the statement that would run
        return text[: explain.end()] + rewrite(session, text[explain.end() :])
    tree = _serialize(session, text)
    if tree.get("error") or len(tree.get("statements", [])) != 1:
        return text
    changed = _walk(session, tree["statements"][0], tree)
    if not changed:
        return text
    return session.con.execute("SELECT json_deserialize_sql($t)", {"t": json.dumps(tree)}).fetchall()[0][0]


def _serialize(session, text: str) -> dict:
    return json.loads(session.con.execute("SELECT json_serialize_sql($q)", {"q": text}).fetchall()[0][0])


def _walk(session, node, tree) -> bool:
    """Replace, in place, every SELECT_NODE under ``node`` that has the natural form; True if any was."""
    changed = False
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict) and value.get("type") == "SELECT_NODE":
                try:
                    node[key] = _replacement(session, value)
                    changed = True
                    continue
                except _NoRewrite:
                    pass
            changed |= _walk(session, value, tree)
    elif isinstance(node, list):
        for value in node:
            changed |= _walk(session, value, tree)
    return changed


def _replacement(session, node: dict) -> dict:
    """The parse tree of ``SELECT <same columns> FROM neuron_stats(...) _ns`` for a natural ``node``."""
    plain = ("having", "qualify", "sample")
    if any(node.get(key) for key in plain) or node.get("cte_map", {}).get("map"):
        raise _NoRewrite
    aliases, joined = _sources(node.get("from_table") or {})
    examples = [c for c in session.sql("SELECT * FROM examples LIMIT 0").column_names] if joined else []

    def column(ref: dict) -> str:
        """``neurons.<name>`` or ``examples.<name>`` for a column reference, else _NoRewrite."""
        if ref.get("class") != "COLUMN_REF":
            raise _NoRewrite
        names = ref["column_names"]
        if len(names) == 2 and aliases.get(names[0].lower()) == "neurons" and names[1] in NEURON_COLUMNS:
            return f"neurons.{names[1]}"
        if len(names) == 2 and aliases.get(names[0].lower()) == "examples" and names[1] in examples:
            return f"examples.{names[1]}"
        if len(names) == 1 and names[0] in NEURON_COLUMNS:
            return f"neurons.{names[0]}"
        if len(names) == 1 and names[0] in examples:
            return f"examples.{names[0]}"
        raise _NoRewrite

    keys = _group_keys(node, column)
    labels = [k.split(".", 1)[1] for k in keys if k.startswith("examples.")]
    if not {"neurons.hook", "neurons.neuron"} <= set(keys) or any(
        k in ("neurons.example_id", "neurons.position", "neurons.value", "examples.run", "examples.example_id")
        for k in keys
    ):
        raise _NoRewrite
    run, hooks, where = _where(node.get("where_clause"), column)
    outputs, stats, output_keys = [], [], {}
    try:
        names = session.con.sql(_deserialize(session, node)).columns  # the names DuckDB gives the columns
    except duckdb.Error:
        raise _NoRewrite from None  # the statement reports its own error when it runs
    for item, name in zip(node["select_list"], names, strict=True):
        if item.get("class") == "COLUMN_REF":
            key = column(item)
            if key not in keys:
                raise _NoRewrite
            source = f'_ns."{key.split(".", 1)[1]}"'
            outputs.append((f"CAST({source} AS BIGINT)" if key == "neurons.neuron" else source, name))
            output_keys.setdefault(key, name)
            continue
        stat, cast = _statistic(item, column)
        stats.append(stat)
        source = f'_ns."{stat}"'
        outputs.append((f"CAST({source} AS {cast})" if cast else source, name))
    if not stats:
        raise _NoRewrite
    if set(labels) & {"run", "hook", "neuron", "example_id", *stats}:
        raise _NoRewrite  # a label named like an output column of neuron_stats
    run, pattern = _checked_scope(session, run, hooks, "neurons.run" in keys)
    try:
        StatSpec.parse(", ".join(stats))
    except UserError:
        raise _NoRewrite from None
    where = " AND ".join(f"({_expression_text(session, e)})" for e in where)
    arguments = [_quoted(pattern), f"stats := {_quoted(', '.join(dict.fromkeys(stats)))}"]
    arguments += [f"run := {_quoted(run)}"] if run else []
    arguments += [f"group_by := {_quoted(', '.join(labels))}"] if labels else []
    arguments += [f"examples_where := {_quoted(where)}"] if where else []
    select = ", ".join(f"{expression} AS {_identifier(name)}" for expression, name in outputs)
    text = f"SELECT {select} FROM neuron_stats({', '.join(arguments)}) AS _ns"
    modifiers = _outer_modifiers(node.get("modifiers") or [], column, output_keys, [name for _, name in outputs])
    if modifiers:  # ORDER BY / LIMIT over the output columns, on the rewritten rows
        outer = _serialize(session, f"SELECT * FROM ({text}) AS _nq")["statements"][0]["node"]
        outer["modifiers"] = modifiers
        return outer
    return _serialize(session, text)["statements"][0]["node"]


def _outer_modifiers(modifiers: list[dict], column, output_keys: dict, names: list[str]) -> list[dict]:
    """ORDER BY (columns, positions, ALL) and constant LIMIT/OFFSET, re-pointed at the output column names."""
    modifiers = json.loads(json.dumps(modifiers))
    for modifier in modifiers:
        if modifier.get("type") == "LIMIT_MODIFIER":
            if any(modifier.get(k) and modifier[k].get("class") != "CONSTANT" for k in ("limit", "offset")):
                raise _NoRewrite
            continue
        if modifier.get("type") != "ORDER_MODIFIER":
            raise _NoRewrite  # DISTINCT ...
        for order in modifier["orders"]:
            expression = order["expression"]
            if expression.get("class") == "STAR" and expression.get("columns") is True and not expression.get("expr"):
                continue  # ORDER BY ALL: the same columns in the same order
            if expression.get("class") == "CONSTANT" and expression["literal"].get("kind") == "INTEGER":
                continue  # a position in the select list: the same
            if expression.get("class") != "COLUMN_REF":
                raise _NoRewrite
            last = expression["column_names"][-1]
            if len(expression["column_names"]) == 1 and last in names:
                target = last  # an output alias (or a column named as its output)
            else:
                try:
                    target = output_keys.get(column(expression))
                except _NoRewrite:
                    target = None
            if target is None:
                raise _NoRewrite
            expression["column_names"] = [target]
    return modifiers


def _sources(table: dict) -> tuple[dict[str, str], bool]:
    """``{alias: 'neurons' | 'examples'}`` and whether examples is joined, for the two FROM shapes rewritten."""

    def base(ref: dict, name: str) -> str:
        if ref.get("type") != "BASE_TABLE" or ref.get("table_name", "").lower() != name or ref.get("schema_name"):
            raise _NoRewrite
        return (ref.get("alias") or name).lower()

    if table.get("type") == "BASE_TABLE":
        return {base(table, "neurons"): "neurons"}, False
    if (
        table.get("type") != "JOIN"
        or table.get("join_type") != "INNER"
        or table.get("ref_type") != "REGULAR"
        or table.get("condition")
        or sorted(c.lower() for c in table.get("using_columns", [])) != ["example_id", "run"]
    ):
        raise _NoRewrite
    return {base(table["left"], "neurons"): "neurons", base(table["right"], "examples"): "examples"}, True


def _group_keys(node: dict, column) -> list[str]:
    if node.get("aggregate_handling") == "FORCE_AGGREGATES" and not node.get("group_expressions"):  # GROUP BY ALL
        return [column(item) for item in node["select_list"] if item.get("class") == "COLUMN_REF"]
    expressions = node.get("group_expressions") or []
    if not expressions or len(node.get("group_sets") or []) != 1:
        raise _NoRewrite
    keys = []
    for expression in expressions:
        if expression.get("class") == "CONSTANT":  # GROUP BY 1, 2: positions in the select list
            literal = expression["literal"]
            text = str(literal.get("text", literal.get("value", "")))
            if not text.isdigit() or not 1 <= int(text) <= len(node["select_list"]):
                raise _NoRewrite
            expression = node["select_list"][int(text) - 1]
        try:
            keys.append(column(expression))
        except _NoRewrite:  # GROUP BY an output alias (DuckDB tries the FROM columns first, as column() does)
            names = expression.get("column_names", [])
            aliased = [item for item in node["select_list"] if names and [item.get("alias")] == names]
            if len(aliased) != 1:
                raise
            keys.append(column(aliased[0]))
    return list(dict.fromkeys(keys))


def _where(clause: dict | None, column) -> tuple[str, str | tuple[str, str], list[dict]]:
    """(run, hook pattern, examples predicate) from a WHERE of the rewritten shape."""
    run = hooks = None
    kept = []
    for conjunct in _conjuncts(clause):
        target = _constant_test(conjunct, column)
        if target and target[0] == "neurons.run" and target[1] == "=" and run is None:
            run = target[2]
        elif target and target[0] == "neurons.hook" and hooks is None:
            hooks = target[2] if target[1] == "~~" else ("=", target[2])
        elif _references(conjunct, column) and all(c.startswith("examples.") for c in _references(conjunct, column)):
            kept.append(_unqualified(conjunct))
        else:
            raise _NoRewrite
    return run or "", hooks if hooks is not None else "%", kept


def _conjuncts(clause: dict | None) -> list[dict]:
    if not clause:
        return []
    if clause.get("type") == "CONJUNCTION_AND":
        return [c for child in clause["children"] for c in _conjuncts(child)]
    return [clause]


def _constant_test(expression: dict, column) -> tuple[str, str, str] | None:
    """(column, '=' or '~~', text) for ``column = 'text'`` / ``column LIKE 'text'`` on run or hook."""
    if expression.get("type") == "COMPARE_EQUAL":
        sides = [expression["left"], expression["right"]]
        operator = "="
    elif expression.get("class") == "FUNCTION" and expression.get("function_name") == "~~":
        sides = [a["expression"] for a in expression.get("arguments", [])]
        operator = "~~"
        if len(sides) != 2 or sides[0].get("class") != "COLUMN_REF":
            return None
    else:
        return None
    refs = [s for s in sides if s.get("class") == "COLUMN_REF"]
    constants = [s for s in sides if s.get("class") == "CONSTANT" and s["literal"].get("kind") == "STRING"]
    if len(refs) != 1 or len(constants) != 1:
        return None
    try:
        name = column(refs[0])
    except _NoRewrite:
        return None
    if name not in ("neurons.run", "neurons.hook"):
        return None
    return name, operator, constants[0]["literal"]["text"]


def _references(node, column) -> set[str]:
    """Every column an expression reads; a subquery or parameter makes it unusable (_NoRewrite)."""
    found = set()
    for part in nodes(node):
        if part.get("class") in ("SUBQUERY", "PARAMETER", "LAMBDA") or is_select(part):
            raise _NoRewrite
        if part.get("class") == "COLUMN_REF":
            found.add(column(part))
    return found


def _unqualified(expression: dict) -> str:
    """An examples predicate without table aliases (as ``examples_where`` reads it)."""

    copy = json.loads(json.dumps(expression))
    for node in nodes(copy):
        if node.get("class") == "COLUMN_REF":
            node["column_names"] = node["column_names"][-1:]
    return copy


def _expression_text(session, expression: dict) -> str:
    template = _serialize(session, "SELECT 1 FROM examples WHERE TRUE")["statements"][0]["node"]
    template["where_clause"] = expression
    return _deserialize(session, template).split(" WHERE ", 1)[1]


def _statistic(item: dict, column) -> tuple[str, str | None]:
    name = str(item.get("function_name", "")).lower()
    if item.get("class") != "FUNCTION" or name not in AGGREGATES or item.get("distinct") or item.get("filter"):
        raise _NoRewrite
    if (item.get("order_bys") or {}).get("orders") or item.get("schema") or item.get("catalog"):
        raise _NoRewrite
    arguments = [a["expression"] for a in item.get("arguments", [])]
    if any(a.get("name") for a in item.get("arguments", [])):
        raise _NoRewrite
    stat, cast = AGGREGATES[name]
    if name == "count_star":
        if arguments:
            raise _NoRewrite
        return stat, cast
    if not arguments or column(arguments[0]) != "neurons.value":
        raise _NoRewrite
    if name != "quantile_cont":
        if len(arguments) != 1:
            raise _NoRewrite
        return stat, cast
    if len(arguments) != 2 or arguments[1].get("class") != "CONSTANT":
        raise _NoRewrite
    literal = arguments[1]["literal"]
    try:
        q = float(literal.get("text", literal.get("value")))
    except (TypeError, ValueError):
        raise _NoRewrite from None
    percent = f"{q * 100:.10g}"
    if not 0 <= q <= 1 or float(percent) / 100 != q or len(percent.split(".")[0]) > 2 and percent != "100":
        raise _NoRewrite
    return f"p{percent}", cast


def _checked_scope(session, run: str, hooks, run_grouped: bool) -> tuple[str, str]:
    """The run and hook pattern neuron_stats reads; _NoRewrite unless its hooks are the WHERE's, all finite."""
    exact = isinstance(hooks, tuple)
    pattern = hooks[1] if exact else hooks
    rows = session.sql(
        "SELECT run, hook FROM hooks WHERE hook LIKE $p AND ($run = '' OR run = $run)", {"p": pattern, "run": run}
    ).to_pylist()
    names = {row["hook"] for row in rows}
    # neuron_stats keeps only an exact name when one equals its pattern; `hook = 'a_b'` must not match 'axb'
    if (pattern in names) != exact or not rows:
        raise _NoRewrite
    runs = {row["run"] for row in rows}
    if len(runs) > 1 and not run_grouped:
        raise _NoRewrite  # the natural query pools runs; neuron_stats keeps them apart
    finite = session.sql(
        "SELECT count(*) FILTER (NOT finite OR finite IS NULL) AS bad FROM activations "
        "WHERE hook LIKE $p AND ($run = '' OR run = $run)",
        {"p": pattern, "run": run},
    )["bad"][0].as_py()
    if finite:
        raise _NoRewrite
    return run, pattern


def _deserialize(session, node: dict) -> str:
    tree = {"error": False, "statements": [{"node": node, "named_param_map": []}]}
    return session.con.execute("SELECT json_deserialize_sql($t)", {"t": json.dumps(tree)}).fetchall()[0][0]


def _quoted(text) -> str:
    return "'" + str(text).replace("'", "''") + "'"


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
