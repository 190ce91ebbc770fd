"""Running an intervention sweep end to end: load the models, plan (:func:`plan_sweep`), generate and score
(:func:`run_sweep`), with progress; and the sweep's scores as a table of means over languages.

Example::

    spec = SweepSpec(sweep="s1", runs=("s2tt", "t2tt"), tasks=("s2tt",), ks=(50,), limit=10)
    scores = sweep(store, spec)                     # pyarrow Table, also in the store's intervention_scores
    score_table(scores)                             # rows per (task, condition): per-language and mean scores
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
from hookpoints.analyses.arguments import as_store, table_columns
from hookpoints.analyses.intervention_sweep import SweepSpec, plan_sweep, run_sweep
from hookpoints.analyses.progress import Progress, quiet


def sweep(store, spec: SweepSpec, *, progress: Progress = quiet, load_model: Callable | None = None) -> pa.Table:
    """Plan and run ``spec`` over ``store`` (writing its tables); returns the corpus scores.

    ``load_model(source, modality)`` defaults to :func:`hookpoints.loading.load`, each model loaded once.

    >>> scores = sweep(store, SweepSpec(sweep="exp2", runs=("s2tt", "t2tt"), tasks=("s2tt",)))  # doctest: +SKIP
    """
    if load_model is None:
        from hookpoints.loading import load

        models = {}

        def load_model(source: str, modality: str):
            if (source, modality) not in models:
                models[source, modality] = load(source, modality=modality)
            return models[source, modality]

    store = as_store(store)
    cells = plan_sweep(store, spec, load_model)
    total = sum(cell.examples.num_rows * len(cell.conditions) for cell in cells)
    conditions = {c.fields["condition"] for cell in cells for c in cell.conditions}
    label = f"sweep {spec.sweep}: {len(conditions)} conditions x {len(cells)} task-languages (generations)"
    with progress(label) as (on_start, on_batch):
        on_start(total)
        return run_sweep(store, spec, cells, on_batch)


def score_table(scores: pa.Table) -> list[dict]:
    """Rows per (task, condition): the metric's mean over languages and each language's score.

    >>> rows = score_table(sweep(store, spec))  # doctest: +SKIP
    """
    rows: dict[tuple, dict] = {}
    raw: dict[tuple, list[float]] = {}  # the mean is of the scores, not of the rounded ones shown
    columns = ["task", "neuron_type", "side", "k", "condition", "n_neurons", "metric", "language", "score"]
    for row in table_columns(scores, columns, "run_sweep(...) or sweep(...)").to_pylist():
        # by neuron type, side and k (as Figure 5): a --label-set NAME with {language} names another label set
        # per language, one condition each, and is still one row
        key = (row["task"], row["neuron_type"], row["side"], row["k"])
        entry = rows.setdefault(
            key,
            {"task": row["task"], "condition": row["condition"], "neurons": row["n_neurons"], "metric": row["metric"]},
        )
        if entry["condition"] != row["condition"]:
            entry["condition"] = f"{row['neuron_type']}/{row['side']}/k={row['k']}"
        entry[row["language"]] = round(row["score"], 3)
        raw.setdefault(key, []).append(row["score"])
    for key, entry in rows.items():
        entry["mean"] = round(sum(raw[key]) / len(raw[key]), 3)
    return list(rows.values())
