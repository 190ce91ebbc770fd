"""Independent checks of what a store holds: straight from the Delta tables, not through hookpoints' SQL."""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc
from deltalake import DeltaTable
from hookpoints.store.catalog import Store


def table_rows(store: Store, table: str, run: str, columns: list[str]) -> list[tuple]:
    delta = DeltaTable(store.location.table_uri(table), storage_options=store.location.storage_options)
    rows = delta.to_pyarrow_dataset().to_table(columns=columns, filter=pc.field("run") == run).to_pylist()
    return [tuple(row[column] for column in columns) for row in rows]


def assert_exactly_once(store: Store, run: str, example_ids: list[str], n_hooks: int) -> None:
    """Every example is stored once in ``examples`` and once at each of the run's ``n_hooks`` hooks."""
    hooks = [hook for (hook,) in table_rows(store, "hooks", run, ["hook"])]
    assert len(hooks) == n_hooks == len(set(hooks)), f"hooks table: {Counter(hooks).most_common(3)}"
    examples = Counter(example for (example,) in table_rows(store, "examples", run, ["example_id"]))
    duplicated = [example for example, count in examples.items() if count > 1]
    assert not duplicated, f"examples stored more than once: {duplicated[:5]}"
    assert set(examples) == set(example_ids), f"examples missing: {sorted(set(example_ids) - set(examples))[:5]}"
    activations = Counter(table_rows(store, "activations", run, ["hook", "example_id"]))
    duplicated = [key for key, count in activations.items() if count > 1]
    assert not duplicated, f"activations stored more than once: {duplicated[:5]}"
    expected = {(hook, example) for hook in hooks for example in example_ids}
    assert set(activations) == expected, f"activations missing: {sorted(expected - set(activations))[:5]}"
