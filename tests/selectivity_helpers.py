"""Synthetic runs for the selectivity tests: hook points in module groups, labelled examples, planted signals."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run

LANGUAGES = ["de", "en", "ja"]


def hook_rows(component: str, layers: int, submodules: dict[str, int], *, layer_output: bool = True) -> list[dict]:
    """Hooks-table rows: ``{component}.layers.{l}.{submodule}`` for each layer, plus each layer's output."""
    rows = []
    for layer in range(layers):
        items = list(submodules.items()) + ([("hook_resid_post", 4)] if layer_output else [])
        for sub, width in items:
            rows.append(
                {
                    "hook": f"{component}.layers.{layer}.{sub}",
                    "module": f"{component}.layers.{layer}.{sub}",
                    "io": "output",
                    "component": component,
                    "layer": layer,
                    "submodule": sub,
                    "width": width,
                    "shape": [width],
                    "neuron_axis": 2,
                    "space": "input",
                    "layer_output": sub == "hook_resid_post",
                }
            )
    return rows


DECODER = {"self_attn.k_proj": 6, "cross_attention.v_proj": 5, "ffn.fc1": 9}
ENCODER = {"self_attn.q_proj": 4, "conv_module.depthwise_conv": 3, "ffn1.intermediate_dense": 7}


def examples_table(n_per_language: int, modality: str | None, seed: int = 0, prefix: str = "") -> pa.Table:
    rng = np.random.default_rng(seed)
    languages = [lang for lang in LANGUAGES for _ in range(n_per_language)]
    order = rng.permutation(len(languages))
    columns = {
        "example_id": [f"{prefix}{languages[i]}-{i:03d}" for i in order],
        "text": ["x"] * len(order),
        "language": [languages[i] for i in order],
    }
    if modality is not None:
        columns["modality"] = [modality] * len(order)
    return pa.table(columns)


def planted_values(examples: pa.Table, width: int, seed: int, *, ties: bool = False) -> np.ndarray:
    """``[examples, width]``: noise plus a per-language shift on some neurons (so APs spread), ties optional."""
    rng = np.random.default_rng(seed)
    languages = examples["language"].to_pylist()
    x = rng.standard_normal((len(languages), width)).astype(np.float32)
    shift = rng.standard_normal((len(LANGUAGES), width)).astype(np.float32)
    lang_index = np.array([LANGUAGES.index(lang) for lang in languages])
    x += shift[lang_index]
    if ties:
        x = np.round(x).astype(np.float32)
        x[:, ::2] = np.maximum(x[:, ::2], 0)
    return x


def write_run(
    store: Store,
    run: str,
    examples: pa.Table,
    hooks: list[dict],
    *,
    seed: int = 0,
    dtype: str = "float32",
    pooling: str = "mean",
    ties: bool = False,
    values: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Record ``examples`` at ``hooks`` (in a few flushes, rows in the examples' order); returns the values."""
    values = values or {
        h["hook"]: planted_values(examples, h["width"], seed + i, ties=ties) for i, h in enumerate(hooks)
    }
    settings = {"model": "synthetic", "task": "forward", "pooling": pooling, "dtype": dtype}
    writer = open_run(
        store, run, settings=settings, config={}, hooks=hooks, examples_schema=examples.schema, max_buffer_bytes=1
    )
    ids = examples["example_id"].to_pylist()
    step = max(1, len(ids) // 3)
    for start in range(0, len(ids), step):
        rows = slice(start, start + step)
        writer.add(
            examples.slice(start, step),
            {h["hook"]: HookRows(ids[rows], values[h["hook"]][rows]) for h in hooks},
        )
    writer.finish()
    return values
