"""Walking a statement as DuckDB parses it (``SELECT json_serialize_sql(...)``: nested dicts and lists).

>>> [node["x"] for node in nodes({"x": 1, "children": [{"x": 2}]})]
[1, 2]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator


def nodes(tree, stop: Callable[[dict], bool] | None = None) -> Iterator[dict]:
    """Every dict in ``tree``, parents before children; one for which ``stop(node)`` holds is neither
    yielded nor entered (e.g. a subquery checked on its own)."""
    if isinstance(tree, dict):
        if stop is not None and stop(tree):
            return
        yield tree
        for value in tree.values():
            yield from nodes(value, stop)
    elif isinstance(tree, list):
        for value in tree:
            yield from nodes(value, stop)


def is_select(node: dict) -> bool:
    """The node is a SELECT (a statement's own, a subquery's or a CTE's)."""
    return node.get("type") == "SELECT_NODE"
