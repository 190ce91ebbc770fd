"""Synthetic runs for the clustering tests: vectors with a known cluster structure written straight into a store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run


def hook_row(layer: int, width: int, *, name: str | None = None, layer_output: bool = True) -> dict:
    return {
        "hook": name or f"blocks.{layer}.hook_resid_post",
        "module": f"model.layers.{layer}",
        "io": "output",
        "component": "lm",
        "layer": layer,
        "submodule": "hook_resid_post",
        "width": width,
        "shape": [width],
        "neuron_axis": 2,
        "space": "input",
        "layer_output": layer_output,
    }


def write_run(
    store: Store,
    run: str,
    examples: list[dict],
    vectors: dict[str, np.ndarray],
    *,
    pooling: str = "last",
    dtype: str = "float32",
    positions: np.ndarray | None = None,
    hooks: list[dict] | None = None,
    if_exists: str = "error",
) -> None:
    """Write a run: ``examples`` rows (``example_id`` + labels), ``vectors[hook]`` ``[rows, width]``.

    With ``positions`` (pooling none), row r of every hook belongs to example ``positions[r, 0]`` (an index
    into ``examples``) at position ``positions[r, 1]``.
    """
    table = pa.Table.from_pylist(examples)
    if hooks is None:
        hooks = [hook_row(layer, matrix.shape[1]) for layer, matrix in enumerate(vectors.values())]
    writer = open_run(
        store,
        run,
        settings={"model": "synthetic", "task": "forward", "pooling": pooling, "dtype": dtype},
        config={},
        hooks=hooks,
        examples_schema=table.schema,
        if_exists=if_exists,
    )
    ids = table["example_id"].to_pylist()
    rows = {}
    for hook, matrix in vectors.items():
        if positions is None:
            rows[hook] = HookRows(ids, matrix.astype(np.float32))
        else:
            rows[hook] = HookRows([ids[i] for i in positions[:, 0]], matrix.astype(np.float32), positions[:, 1])
    writer.add(table, rows)
    writer.finish()


def clustered(
    n_languages: int = 3, n_meanings: int = 8, width: int = 16, layers: int = 3, seed: int = 0
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Examples (language x meaning) whose layers move from language clusters to meaning clusters."""
    rng = np.random.default_rng(seed)
    language_centres = rng.normal(size=(n_languages, width)) * 4
    meaning_centres = rng.normal(size=(n_meanings, width)) * 4
    examples, lang, mean = [], [], []
    for m in range(n_meanings):
        for g in range(n_languages):
            examples.append({"example_id": f"s{m:02d}-l{g}", "language": f"l{g}", "semantic_id": f"s{m:02d}"})
            lang.append(g)
            mean.append(m)
    lang, mean = np.array(lang), np.array(mean)
    vectors = {}
    for layer in range(layers):
        weight = layer / max(layers - 1, 1)
        noise = rng.normal(size=(len(examples), width))
        vectors[f"blocks.{layer}.hook_resid_post"] = (
            (1 - weight) * language_centres[lang] + weight * meaning_centres[mean] + noise
        )
    return examples, vectors
