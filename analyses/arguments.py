"""Arguments of the public analysis functions, checked once: names given as one string or a list of them, and a
store given as a Store or its path.

A string where a list was expected used to be read letter by letter (``runs="r1"``: "there is no run '1'";
``ClusterSettings(labels="language")``: "a label is given twice (l, a, n, g, ...)"), and a store path fell over
with an AttributeError.
"""

from __future__ import annotations

from pathlib import Path

from hookpoints.store.catalog import Store

from hookpoints.errors import UserError


def name_list(value, what: str) -> list[str]:
    """``value`` (a name or a list / tuple of names) as a list of names; anything else is a UserError."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(name, str) for name in value):
        return list(value)
    raise UserError(f"{what} must be a name or a list of names, not {value!r:.80}")


def as_store(store) -> Store:
    """``store`` as given, or the store at a folder / ``s3://`` URI (which must exist)."""
    if isinstance(store, Store):
        return store
    if isinstance(store, str | Path):
        return Store.open(store)
    raise UserError(f"store must be a Store (hp.Store.open(path)) or its path, not {type(store).__name__}")
