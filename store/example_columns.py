"""The manifest columns a run adds to the store's ``examples`` table: checked and cast to what it holds.

Example: ``examples_casts(store, manifest.schema)`` is the schema a run's examples are cast to before their
commit, or a one-line UserError naming the column to rename or convert.
"""

from __future__ import annotations

import pyarrow as pa
from hookpoints.store.catalog import Store
from hookpoints.store.schema import RESERVED_EXAMPLE_COLUMNS

from hookpoints.errors import UserError


def examples_casts(store: Store, schema: pa.Schema) -> pa.Schema:
    """The schema manifest columns are written with, checked against the store's examples table."""
    check_column_names(schema.names)
    current = store.dataset("examples").schema
    stored_names = {name.lower(): name for name in current.names}
    fields = []
    for field in schema:
        same = stored_names.get(field.name.lower(), field.name)
        if same != field.name:  # Delta and DuckDB match column names case-insensitively
            raise UserError(
                f"manifest column {field.name!r} clashes with the store's examples column {same!r} (names are "
                f"matched case-insensitively): rename it to {same!r} or to another name"
            )
        target = pa.string() if pa.types.is_null(field.type) else field.type
        if pa.types.is_large_string(target):
            target = pa.string()
        if field.name in current.names and field.name != "run":
            stored = current.field(field.name).type
            if stored != target and not _castable(target, stored):
                raise UserError(
                    f"manifest column {field.name!r} holds {target} but the store's examples table holds "
                    f"{stored} in that column: convert the column in the manifest, or rename it"
                )
            target = stored
        fields.append(pa.field(field.name, target))
    return pa.schema(fields)


def check_column_names(names: list[str]) -> None:
    """Refuse manifest columns the store reserves, or two that differ only in case (compared like DuckDB)."""
    seen: dict[str, str] = {}
    for name in names:
        if name.lower() in RESERVED_EXAMPLE_COLUMNS and name != "example_id":
            raise UserError(f"manifest column {name!r} is reserved by the store (names ignore case): rename it")
        if name.lower() in seen:
            raise UserError(
                f"manifest columns {seen[name.lower()]!r} and {name!r} differ only in case, which SQL does not "
                "tell apart: rename one"
            )
        seen[name.lower()] = name


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    numeric = pa.types.is_integer(source) or pa.types.is_floating(source)
    if numeric and (pa.types.is_integer(target) or pa.types.is_floating(target)):
        return pa.types.is_floating(target) or pa.types.is_integer(source)
    return pa.types.is_null(source)
