"""What an intervention changes: which neurons, and to what (seeds/seamless-m4t-v2-neurons.txt, 3.3 and 5.2).

Neurons come from the ``scores`` table (a ranked label set's top-k, bottom-k or both, k per module group),
are drawn at random (the paper's baseline: the same number of neurons per module group, uniformly, with a
stored seed), or are given explicitly (``hook:1,2,3``). Their new values are computed from the store by SQL
over a chosen example subset of a run: the per-neuron median (the paper's), or mean; or zero, a constant, or a
steering vector added to them (``alpha * (mean over the subset - mean over the run)``).

Everything here only reads the store; the model side applies the edits (hookpoints.editing) and the CLI
runs the sweep (analyses/intervention_sweep.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from hookpoints.analyses.examples import record_again, run_settings
from hookpoints.analyses.labels import PRESETS, check_predicate, slug
from hookpoints.analyses.selection import SIDE_CHOICES, check_side, selected_neurons, stored_sets
from hookpoints.store.neuron_surface import session_neuron_stats
from hookpoints.store.query import QuerySession

from hookpoints.errors import UserError
from hookpoints.points import closest_names

#: Neuron types of a sweep: the four settings of the selectivity analysis, random neurons, or none at all.
NEURON_TYPES = (*PRESETS, "random", "none")
#: What selected neurons become: statistics of the store (median, mean), fixed values, or a steering shift.
KINDS = ("median", "mean", "zero", "constant", "steer")
NEURON_SCHEMA = pa.schema([("component", pa.string()), ("hook", pa.string()), ("neuron", pa.int32())])


@dataclass(frozen=True)
class Selection:
    """Neurons of one condition: (component, hook, neuron) rows, sorted by hook and neuron."""

    neuron_type: str  # a preset, random, explicit or none
    neurons: pa.Table  # NEURON_SCHEMA
    label_set: str | None = None
    side: str | None = None
    k: int = 0  # per module group (0: no neurons; explicit: all given)
    seed: int | None = None  # random draws
    matched: str | None = None  # random: the label set whose counts per module group it matches

    def per_component(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for component in self.neurons["component"].to_pylist():
            counts[component] = counts.get(component, 0) + 1
        return counts


def label_set_for(neuron_type: str, language: str, modality: str | None) -> str:
    """The label set a neuron type means for a generation in ``language`` from ``modality`` input.

    unimodal -> ``unimodal/{modality}/{language}``, multimodal -> ``multimodal/{language}``, modality ->
    ``modality/{modality}``, language-modality -> ``language-modality/{modality}/{language}`` (the names
    ``hookpoints ap --preset`` writes; ``unimodal/{language}`` when the ranking had no modality column).
    """
    lang, mod = slug(str(language)), slug(str(modality)) if modality else None
    if neuron_type == "unimodal":
        return f"unimodal/{mod}/{lang}" if mod else f"unimodal/{lang}"
    if neuron_type == "multimodal":
        return f"multimodal/{lang}"
    if neuron_type == "modality":
        return f"modality/{mod}"
    if neuron_type == "language-modality":
        return f"language-modality/{mod}/{lang}"
    raise UserError(f"neuron type must be one of {', '.join(NEURON_TYPES)}, not {neuron_type!r}")


def scored_selection(
    session: QuerySession, ranking: str, label_set: str, k: int, side: str, neuron_type: str | None = None
) -> Selection:
    """Top-k / bottom-k / both of a ranked label set, k per module group (checked against each group's size)."""
    check_side(side, SIDE_CHOICES)
    if any(char in label_set for char in "*?["):
        raise UserError(f"give one label set by name, not the pattern {label_set!r}")
    ranked = {s.label_set: s for s in stored_sets(session, ranking)}
    stored = ranked.get(label_set)
    if stored is None:  # a --type names no label set itself: say which one it needs, and which preset writes it
        names = sorted(ranked)
        raise UserError(
            (
                f"--type {neuron_type} reads label set {label_set}: it"
                if neuron_type in PRESETS
                else f"--label-set {label_set}"
            )
            + f" matches no label set of run(s) {ranking!r}; it has "
            + f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
            + (f" (hookpoints ap --preset {neuron_type} writes it)" if neuron_type in PRESETS else "")
        )
    for component, size in stored.components.items():
        if k > size:
            raise UserError(
                f"k={k} is larger than module group {component} ({size:,} neurons) of label set {label_set!r}: "
                "pass a smaller --k"
            )
    table = selected_neurons(session, ranking, label_set, k, side=side)
    neurons = table.select(["component", "hook", "neuron"]).cast(NEURON_SCHEMA)
    return Selection(neuron_type or stored.preset or "label-set", neurons, label_set, side, k)


def random_selection(
    session: QuerySession, ranking: str, like: Selection, seed: int, *, label_set: str | None = None
) -> Selection:
    """As many neurons per module group as ``like`` has, drawn uniformly (without replacement) with ``seed``.

    A group's neurons are those ranked in ``label_set`` (default: ``like``'s), in hook then index order, so
    the same seed gives the same neurons.
    """
    label_set = label_set or like.label_set
    if label_set is None:
        raise UserError("random neurons are matched to a ranked label set: give one")
    universe = session.sql(
        """SELECT component, hook, count(*) AS width FROM scores
           WHERE run = $run AND label_set = $label_set GROUP BY ALL ORDER BY component, hook""",
        {"run": ranking, "label_set": label_set},
    ).to_pylist()
    rng = np.random.default_rng(seed)
    parts = []
    for component, count in sorted(like.per_component().items()):
        hooks = [row for row in universe if row["component"] == component]
        widths = np.array([row["width"] for row in hooks], np.int64)
        if count > widths.sum():
            raise UserError(f"{count} random neurons asked of module group {component} ({widths.sum()} neurons)")
        flat = np.sort(rng.choice(int(widths.sum()), size=count, replace=False))
        starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
        which = np.searchsorted(starts, flat, side="right") - 1
        parts.append(
            pa.table(
                {
                    "component": [component] * count,
                    "hook": [hooks[i]["hook"] for i in which],
                    "neuron": (flat - starts[which]).astype(np.int32),
                },
                schema=NEURON_SCHEMA,
            )
        )
    neurons = pa.concat_tables(parts) if parts else NEURON_SCHEMA.empty_table()
    neurons = neurons.sort_by([("hook", "ascending"), ("neuron", "ascending")])
    return Selection("random", neurons, None, None, like.k, seed, matched=like.label_set)


_EXPLICIT = re.compile(r"^(?P<hook>[^:\s]+(?::input)?):(?P<neurons>\*|[0-9,\s-]+)$")


def explicit_selection(specs: list[str], hooks: dict[str, tuple[str | None, int]]) -> Selection:
    """Neurons given as ``HOOK:1,2,7-9`` (or ``HOOK:*`` for all); ``hooks``: name -> (component, width)."""
    rows: dict[tuple[str, int], str | None] = {}
    for spec in specs:
        match = _EXPLICIT.match(spec.strip())
        if not match:
            raise UserError(f"--neurons {spec!r}: write HOOK:INDICES, e.g. text_decoder.layers.3.ffn.fc1:0,5,7-9")
        hook = match["hook"]
        if hook not in hooks:
            same_end = [name for name in hooks if name.split(".")[-1] == hook.split(".")[-1]]
            close = (same_end or closest_names(hook, hooks, count=3))[:3]  # a typo
            raise UserError(f"--neurons: no hook point {hook!r} here" + (f"; e.g. {', '.join(close)}" if close else ""))
        component, width = hooks[hook]
        for index in _indices(match["neurons"], width, hook):
            rows[hook, index] = component
    table = pa.table(
        {
            "component": list(rows.values()),
            "hook": [hook for hook, _ in rows],
            "neuron": [index for _, index in rows],
        },
        schema=NEURON_SCHEMA,
    ).sort_by([("hook", "ascending"), ("neuron", "ascending")])
    return Selection("explicit", table, k=table.num_rows)


def _indices(text: str, width: int, hook: str) -> list[int]:
    if text == "*":
        return list(range(width))
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise UserError(f"--neurons {hook}:{text}: {part!r} is not an index or a range like 7-9")
        if high and int(high) < int(low):
            raise UserError(f"--neurons {hook}:{text}: range {part!r} runs backwards; write it {high}-{low}")
        for index in range(int(low), int(high or low) + 1):
            if index >= width:
                raise UserError(f"neuron {index} is out of range for hook {hook} (width {width}: 0..{width - 1})")
            out.append(index)
    return out


def replacement_values(
    session: QuerySession,
    selection: Selection,
    kind: str,
    *,
    run: str | None = None,
    where: str | None = None,
    value: float | None = None,
) -> np.ndarray:
    """The value each selected neuron takes (``steer``: is shifted by), ``[neurons]`` in the selection's order.

    ``median`` / ``mean``: over the stored activations of ``run`` (its pooling: one row per example, or per
    position / step for runs that keep them) of the examples matching ``where`` (all when None).
    ``zero``; ``constant``: ``value``; ``steer``: ``value * (mean over where - mean over the run)``.
    """
    n = selection.neurons.num_rows
    if kind not in KINDS:
        raise UserError(f"intervention kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "zero":
        return np.zeros(n)
    if kind in ("constant", "steer") and value is None:
        raise UserError(f"kind {kind} needs --value (the constant, or the steering scale)")
    if kind == "constant":
        return np.full(n, float(value))
    if run is None:
        raise UserError(f"kind {kind} computes values from a run: give --stats-run")
    if n == 0:
        return np.zeros(0)
    if kind == "steer":
        if where is None:
            raise UserError("kind steer shifts towards a subset: give --stats-where (e.g. \"language = 'de'\")")
        return float(value) * (
            _statistic(session, selection, "avg", run, where) - _statistic(session, selection, "avg", run, None)
        )
    return _statistic(session, selection, "median" if kind == "median" else "avg", run, where)


def _statistic(session: QuerySession, selection: Selection, function: str, run: str, where: str | None) -> np.ndarray:
    """``function`` (median / avg) of each selected neuron over ``run``'s stored rows of the ``where`` examples."""
    hooks = sorted(set(selection.neurons["hook"].to_pylist()))
    known = session.sql(
        "SELECT hook, width FROM hooks WHERE run = $run AND hook IN (SELECT unnest($hooks))",
        {"run": run, "hooks": hooks},
    ).to_pylist()
    widths = {row["hook"]: row["width"] for row in known}
    missing = [hook for hook in hooks if hook not in widths]
    if missing:
        raise UserError(
            f"run {run!r} did not record hook {missing[0]!r}: record it there, or choose another --stats-run"
        )
    subset = "TRUE" if where is None else f"({check_predicate(where, '--stats-where')})"
    try:
        counted = session.sql(f"SELECT count(*) AS n FROM examples WHERE run = $run AND {subset}", {"run": run})
    except UserError as error:  # an unknown column: say which option to fix
        raise UserError(f"--stats-where {where!r} does not work on the examples table: {error}") from None
    n_examples = counted["n"][0].as_py()
    if n_examples == 0:
        raise UserError(
            f"no example of run {run!r} matches --stats-where {where!r}: a {function} over an empty subset; "
            "check the values with hookpoints sql"
        )
    # Per-neuron statistics streamed hook by hook in bounded memory (store/neuron_sql.py), not a join of the
    # activations to the selection (whose memory grew with the examples).
    # The mean comes along with a median: it is finite only when every value is (a median ranks an inf or NaN
    # among the values and can come out finite).
    values, finite = {}, {}
    for hook in hooks:
        wanted = "avg" if function == "avg" else f"{function}, avg"
        stats = session_neuron_stats(session, hook, stats=wanted, run=run, examples_where=subset if where else "")
        for neuron, value, mean in zip(
            stats["neuron"].to_pylist(), stats[function].to_numpy(), stats["avg"].to_numpy(), strict=True
        ):
            values[hook, neuron] = float(value)
            finite[hook, neuron] = bool(np.isfinite(mean))
    order = list(zip(selection.neurons["hook"].to_pylist(), selection.neurons["neuron"].to_pylist(), strict=True))
    for hook, neuron in order:
        if values.get((hook, neuron)) is None:
            raise UserError(
                f"run {run!r} has no value of {hook}[{neuron}] for the chosen examples "
                f"(width {widths[hook]}): check the neuron index and --stats-where"
            )
        if not finite[hook, neuron]:
            again = record_again([run_settings(session, [run])[run].dtype.value])
            raise UserError(
                f"run {run!r} holds NaN or infinite activations of {hook}[{neuron}] for the chosen examples: "
                f"leave those examples out with --stats-where, or {again}"
            )
    return np.array([values[key] for key in order], np.float64)
