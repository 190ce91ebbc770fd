"""Layer-wise activation magnitudes and their inequality (Experiment 3, seeds/seamless-m4t-v2-neurons.txt 3.4, 5.3).

Magnitude of layer l for example X (section 3.4): the mean-pooled activations averaged over the neurons of
each submodule m of the layer, then over the layer's submodules M(l)::

    s^(l)(X) = 1/|M(l)| sum_{m in M(l)} 1/J^(m) sum_j [s^(l,m)(X)]_j

averaged over the examples of each group (e.g. language x modality). Figure 6 shows each group's deviation
from the mean trend: the group's magnitude minus the mean over groups at that layer. Both are one SQL
statement over the store (:func:`layer_magnitudes`). ``absolute=True`` averages |s| instead (signed means
of layer norms and projections can cancel; the paper's formula is signed).

Inequality (section 5.3: "non-dominant conditions rely on a smaller subset of highly active units"): for each
group and layer, the Gini coefficient over the layer's neurons of their mean absolute pooled activation over
the group's examples (:func:`activation_gini`, streamed hook by hook in numpy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from hookpoints.analyses.arguments import as_store, name_list
from hookpoints.analyses.examples import ExampleSet, record_again, recorded_modalities
from hookpoints.analyses.gini import gini
from hookpoints.analyses.hook_matrix import HookMatrixReader, neuron_slices
from hookpoints.analyses.hooks import StoredHook
from hookpoints.analyses.labels import quote_name, sql_literal
from hookpoints.store.catalog import Store
from hookpoints.store.query import QuerySession

from hookpoints.errors import UserError, check_count

DEFAULT_GROUPS = ("language", "modality")


def group_columns(session: QuerySession, examples: ExampleSet, by: list[str] | None) -> list[str]:
    """The examples columns to group by: ``by``, or those of language and modality that exist (and ``run`` in place
    of a missing modality column when the runs read speech and text: the modalities stay apart)."""
    columns = examples.columns(session)
    if by:
        for column in by:
            if column not in columns:
                shown = ", ".join(c for c in columns if c not in ("run", "example_id"))
                raise UserError(f"--by {column!r} is not a column of the examples table; it has {shown}")
        return list(dict.fromkeys(by))
    found = [c for c in DEFAULT_GROUPS if c in columns]
    if (
        "modality" not in found
        and len({m for m in recorded_modalities(session, examples.group.runs).values() if m}) > 1
    ):
        found.append("run")  # speech and text runs without a modality column: each run is one modality
    if not found:
        raise UserError("the examples have no language or modality column: name the columns to group by with --by")
    return found


def layer_magnitudes(
    session: QuerySession,
    examples: ExampleSet,
    hooks: list[StoredHook],
    by: list[str],
    *,
    absolute: bool = False,
) -> pa.Table:
    """Per (component, layer, group): mean magnitude, deviation from the mean over groups, examples counted.

    >>> with store.query() as session:
    ...     examples = select_examples(session, open_runs(session, ["r1"]))
    ...     hooks = shared_hooks(session, ("r1",), layer_outputs=True)
    ...     table = layer_magnitudes(session, examples, hooks, ["language"])
    """
    # checked here too: an unknown column was a Binder Error, [] a Parser Error and a string read letter by letter
    by = group_columns(session, examples, name_list(by, "by") if by else None)
    layered = [h for h in hooks if h.layer is not None]
    if not layered:
        raise UserError("none of the chosen hook points belongs to a layer: pick layer hook points with --hooks")
    runs = ", ".join(sql_literal(run) for run in examples.group.runs)
    groups = ", ".join(f"e.{quote_name(c)}" for c in by)
    where = "" if examples.where is None else f" AND ({examples.where})"
    ctes = f"""
        WITH per_hook AS ({_per_hook(examples, layered, absolute)}
        ), chosen AS (
            SELECT * FROM {examples.source} WHERE run IN ({runs}){where}
        )"""
    sql = f"""{ctes}, per_layer AS (
            SELECT p.run, p.example_id, h.component, h.layer, avg(p.m) AS magnitude, count(*) AS hooks
            FROM per_hook p JOIN hooks h ON h.run = p.run AND h.hook = p.hook
            GROUP BY ALL
        ), grouped AS (
            SELECT l.component, l.layer, {groups}, avg(l.magnitude) AS magnitude, count(*) AS examples,
                min(l.hooks) AS fewest_hooks, max(l.hooks) AS most_hooks
            FROM per_layer l JOIN chosen e ON e.run = l.run AND e.example_id = l.example_id
            GROUP BY ALL
        )
        SELECT *, magnitude - avg(magnitude) OVER (PARTITION BY component, layer) AS deviation
        FROM grouped ORDER BY component, layer, {", ".join(quote_name(c) for c in by)}
    """
    table = session.sql(sql)
    _check_complete(session, examples, layered, table, ctes)
    table = table.drop_columns(["fewest_hooks", "most_hooks"])
    if table.num_rows and not np.isfinite(table["magnitude"].to_numpy(zero_copy_only=False)).all():
        bad = session.sql(
            f"""{ctes} SELECT p.hook, count(*) AS n, min(p.example_id) AS example FROM per_hook p
                JOIN chosen e ON e.run = p.run AND e.example_id = p.example_id
                WHERE NOT isfinite(p.m) GROUP BY p.hook ORDER BY p.hook"""
        ).to_pylist()[0]
        raise UserError(
            f"hook {bad['hook']} holds NaN or infinite activations ({bad['n']} example(s), e.g. {bad['example']!r}): "
            f"leave it out with --hooks, or {record_again(examples.group.dtypes.values())}"
        )
    return table


def _check_complete(
    session: QuerySession, examples: ExampleSet, hooks: list[StoredHook], table: pa.Table, ctes: str
) -> None:
    """Refuse examples without activations at a chosen hook (a recording killed between commits), as ap and
    the activation Gini do: they would drop out of their group's average, or their layer's magnitude would
    come from the hooks they have."""
    expected: dict[tuple, int] = {}  # (component, layer) -> hooks
    for hook in hooks:
        expected[(hook.component, hook.layer)] = expected.get((hook.component, hook.layer), 0) + 1
    seen: dict[tuple, list[int]] = {}  # (component, layer) -> [examples, fewest hooks of one, most hooks of one]
    for row in table.select(["component", "layer", "examples", "fewest_hooks", "most_hooks"]).to_pylist():
        counts = seen.setdefault((row["component"], row["layer"]), [0, row["fewest_hooks"], row["most_hooks"]])
        counts[0] += row["examples"]
        counts[1], counts[2] = min(counts[1], row["fewest_hooks"]), max(counts[2], row["most_hooks"])
    if all(seen.get(key) == [len(examples), n, n] for key, n in expected.items()):
        return
    names = ", ".join(sql_literal(h.hook) for h in hooks)
    runs = ", ".join(sql_literal(run) for run in examples.group.runs)
    gap = session.sql(
        f"""{ctes}, present AS (
            SELECT DISTINCT run, example_id, hook FROM activations WHERE run IN ({runs}) AND hook IN ({names})
        ), wanted AS (
            SELECT e.run, e.example_id, h.hook FROM chosen e CROSS JOIN (SELECT unnest([{names}]) AS hook) h
        )
        SELECT w.run, w.hook, count(*) AS n, min(w.example_id) AS example
        FROM wanted w ANTI JOIN present p ON p.run = w.run AND p.example_id = w.example_id AND p.hook = w.hook
        GROUP BY ALL ORDER BY w.run, w.hook LIMIT 1"""
    ).to_pylist()
    if not gap:  # every example at every hook, some more than once
        raise UserError(
            f"run(s) {', '.join(examples.group.runs)} hold more than one vector of an example at a hook: the run is "
            "damaged; run hookpoints store verify"
        )
    gap = gap[0]
    start, stop = examples.offsets[gap["run"]]
    raise UserError(
        f"run {gap['run']!r} has no activations at {gap['hook']} for {gap['n']} of its {stop - start} examples "
        f"(e.g. {gap['example']!r}): finish the recording (hookpoints record --resume) or leave them out with --where"
    )


def _per_hook(examples: ExampleSet, hooks: list[StoredHook], absolute: bool) -> str:
    """SQL of (run, example_id, hook, m): the mean over the neurons of each example's vector at each hook.

    A per-step run's decoder hooks hold one row per generation step; they are pooled with the run's pooling
    (mean, max or last over the steps) first, as the recorder stores them without ``--per-step`` and as
    :class:`hookpoints.analyses.hook_matrix.HookMatrixReader` reads them. The last step's mean, and the mean of
    the steps' means (signed), need one number per row; |mean| and max pool each neuron over the steps, which
    holds an example's steps of a hook in memory.
    """
    absolute_mean = "list_avg(list_transform({v}, lambda x: abs(x)))"
    mean = absolute_mean if absolute else "list_avg({v})"
    parts = []
    for run in examples.group.runs:
        settings = examples.group.settings[run]
        steps = [h.hook for h in hooks if settings.rows_per_example(h.space) == "steps"]
        one = [h.hook for h in hooks if settings.rows_per_example(h.space) != "steps"]
        scope = f"FROM activations WHERE run = {sql_literal(run)} AND hook IN "
        if one:
            m = mean.format(v="activation")
            parts.append(f"SELECT run, example_id, hook, {m} AS m {scope}({', '.join(map(sql_literal, one))})")
        if not steps:
            continue
        how, rows = settings.pooling.value, f"{scope}({', '.join(map(sql_literal, steps))}) GROUP BY ALL"
        if how == "last":
            m = f"arg_max({mean.format(v='activation')}, position)"
        elif how == "mean" and not absolute:
            m = "avg(list_avg(activation))"  # every step has the same width: the mean of the pooled vector
        else:
            per_neuron = "list_avg" if how == "mean" else "list_max"
            column = f"{per_neuron}(list_transform(list(activation), lambda r: r[i]))"  # neuron i over the steps
            m = mean.format(v=f"list_transform(range(1, max(len(activation)) + 1), lambda i: {column})")
        parts.append(f"SELECT run, example_id, hook, {m} AS m {rows}")
    return "\n            UNION ALL ".join(parts)


@dataclass(frozen=True)
class Groups:
    """Each example's group (a combination of the ``by`` columns' values)."""

    columns: list[str]
    labels: list[tuple]  # [groups] the values of each group
    index: np.ndarray  # [examples] int group of each example

    def __len__(self) -> int:
        return len(self.labels)


def example_groups(session: QuerySession, examples: ExampleSet, by: list[str]) -> Groups:
    if not by:  # one group of every example ("SELECT  FROM" did not parse)
        return Groups([], [()], np.zeros(len(examples), np.int64))
    table = session.sql(examples.base_sql(", ".join(quote_name(c) for c in by)), {"runs": list(examples.group.runs)})
    rows = list(zip(*(table[c].to_pylist() for c in by), strict=True))
    labels = sorted(set(rows), key=lambda row: tuple("" if v is None else str(v) for v in row))
    lookup = {label: i for i, label in enumerate(labels)}
    return Groups(list(by), labels, np.array([lookup[row] for row in rows], np.int64))


def activation_gini(
    store: Store,
    examples: ExampleSet,
    hooks: list[StoredHook],
    groups: Groups,
    *,
    memory_bytes: int = 2 * 2**30,
    on_progress: Callable[[int], None] | None = None,
) -> pa.Table:
    """Per (component, layer, group): Gini over the layer's neurons of their mean |activation| in the group.

    >>> from hookpoints.analyses.magnitudes import example_groups  # not in hookpoints' top-level names
    >>> with store.query() as session:
    ...     examples = select_examples(session, open_runs(session, ["r1"]))
    ...     hooks = shared_hooks(session, ("r1",), layer_outputs=True)
    ...     groups = example_groups(session, examples, ["language"])
    >>> table = activation_gini(store, examples, hooks, groups)
    """
    store = as_store(store)
    check_count("memory_bytes", memory_bytes)  # None was a TypeError after the first hook was read
    layered = [h for h in hooks if h.layer is not None]
    reader = HookMatrixReader(store, examples)
    onehot = np.zeros((len(groups), len(examples)), np.float32)  # [groups, examples]
    onehot[groups.index, np.arange(len(examples))] = 1.0
    onehot /= onehot.sum(axis=1, keepdims=True)
    per_layer: dict[tuple[str, int], list[np.ndarray]] = {}
    buffer = np.empty(0, np.float32)
    for hook in layered:
        for part in neuron_slices(hook.width, len(examples), memory_bytes):
            if buffer.size < len(examples) * (part.stop - part.start):
                buffer = np.empty(len(examples) * (part.stop - part.start), np.float32)
            x = reader.read(hook, part, out=buffer)  # [examples, neurons]
            if not np.isfinite(x).all():
                raise UserError(
                    f"hook {hook.hook} holds NaN or infinite activations: leave it out with --hooks, or "
                    f"{record_again(examples.group.dtypes.values())}"
                )
            np.abs(x, out=x)
            per_layer.setdefault((hook.component, hook.layer), []).append(onehot @ x)  # [groups, neurons]
            if on_progress:
                on_progress(part.stop - part.start)
    rows = []
    for (component, layer), parts in per_layer.items():
        means = np.concatenate(parts, axis=1)  # [groups, layer neurons]
        coefficients = gini(means, axis=1)
        for g, label in enumerate(groups.labels):
            rows.append(
                {
                    "component": component,
                    "layer": layer,
                    **dict(zip(groups.columns, label, strict=True)),
                    "gini": float(coefficients[g]),
                    "neurons": means.shape[1],
                }
            )
    return pa.Table.from_pylist(rows)
