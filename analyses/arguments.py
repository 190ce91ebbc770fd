"""Arguments of the public analysis functions, checked once: names given as one string or a list of them, a
store given as a Store or its path, and arrays of numbers (:func:`number_array`, :func:`binary_array`).

A string where a list was expected used to be read letter by letter (``runs="r1"``: "there is no run '1'";
``ClusterSettings(labels="language")``: "a label is given twice (l, a, n, g, ...)"), and a store path fell over
with an AttributeError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
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


def number_array(value, what: str) -> np.ndarray:
    """``value`` (an array or nested lists of bools, integers or floats) as a numpy array; a string, None, ragged
    lists or non-numbers are a UserError (numpy's "could not convert string to float", an object array that
    failed later, or a 0-d array of a string before)."""
    if value is None or isinstance(value, str | bytes | dict | set):
        raise UserError(f"{what} must be an array of numbers, not {type(value).__name__}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):  # ragged nested lists
        raise UserError(f"{what} must be an array of numbers of one shape, not lists of different lengths") from None
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise UserError(f"{what} must hold real numbers (bool, int or float), not {array.dtype} values")
    return array


def binary_array(value, what: str) -> np.ndarray:
    """``value`` as a bool array: True/False, or numbers that are all 0 or 1 (NaN and 2 are refused)."""
    array = number_array(value, what)
    if array.dtype == bool:
        return array
    if not np.isin(array, (0, 1)).all():
        bad = array[~np.isin(array, (0, 1))].ravel()[:3]
        raise UserError(f"{what} must be binary (True/False or 0/1), but hold {', '.join(map(repr, bad.tolist()))}")
    return array.astype(bool)


def table_columns(table, columns: list[str], made_by: str) -> pa.Table:
    """``table`` if it is an Arrow table with ``columns``, else a UserError naming the function that makes it
    (a wrong table was a KeyError 'Field "top" does not exist in schema', anything else an AttributeError)."""
    if not isinstance(table, pa.Table):
        raise UserError(f"pass the Arrow table {made_by} returns, not {type(table).__name__}")
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise UserError(
            f"this table has no column {', '.join(map(repr, missing))}: pass the table {made_by} returns "
            f"(it has {', '.join(table.column_names[:8])}{' ...' if table.num_columns > 8 else ''})"
        )
    return table
