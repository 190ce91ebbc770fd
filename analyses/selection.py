"""Where the selected neurons are: SQL over the ``scores`` table (seeds/seamless-m4t-v2-neurons.txt, 5.1).

- counts of top-k / bottom-k neurons per layer x submodule of a module group (Figures 2 and 4),
- overlap between two families of selections, e.g. speech- vs text-conditioned language neurons of the
  decoder, as a matrix over languages (Figure 3),
- the Gini coefficient of a selection's distribution over the group's layer x submodule cells (section 5.2:
  0.900 / 0.980 for modality-specific neurons against 0.774 / 0.607 for the other types),
- the neurons themselves, for interventions (:func:`selected_neurons`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from hookpoints.analyses.arguments import name_list, table_columns
from hookpoints.analyses.gini import gini
from hookpoints.store.query import QuerySession
from hookpoints.store.quoting import sql_string

from hookpoints.errors import UserError

#: The paper's selection sizes (neurons per module group); the default of ranking and of the sweep.
PAPER_KS = (500, 1000, 2500, 5000)
#: The k the paper's Figures 2-4 show: what `ap` prints and the report draws when the ranking stored it.
FIGURE_K = 1000


def shown_k(ks: list[int] | tuple[int, ...]) -> int:
    """The k a summary shows of a ranking that stored ``ks``: the paper's 1000 if stored, else the smallest.

    >>> shown_k((500, 1000, 2500, 5000)), shown_k((20, 50))
    (1000, 20)
    """
    return FIGURE_K if FIGURE_K in ks else min(ks)


#: The sides of a ranking a selection takes; interventions may also take ``both``.
SIDES = ("top", "bottom")
SIDE_CHOICES = (*SIDES, "both")
GINI_UNITS = ("layer_submodule", "submodule", "layer")
#: Submodule families the figures split a module group into (the paper's attention / FFN / convolution panels).
PANELS = ("attention", "ffn", "convolution", "other")


def panel_of(submodule: str) -> str:
    """attention, ffn, convolution or other, from the submodule's name (layer norms go with their block)."""
    name = submodule.lower()
    if "conv" in name:
        return "convolution"
    if "attn" in name or "attention" in name:
        return "attention"
    if any(part in name for part in ("ffn", "mlp", "fc", "intermediate", "dense")):
        return "ffn"
    return "other"


def panel_order(component: str) -> tuple[str, ...]:
    """The paper's panel order: decoders attention then FFN; encoders FFN, attention, convolution."""
    if component.endswith("decoder"):
        return ("attention", "ffn", "convolution", "other")
    return ("ffn", "attention", "convolution", "other")


def check_side(side: str, allowed: tuple[str, ...] = SIDES) -> str:
    """``side`` if it is one of ``allowed`` (top, bottom; or both where a selection may take both)."""
    if side not in allowed:
        raise UserError(f"side must be {' or '.join(allowed)}, not {side!r}")
    return side


def _rank_column(side: str) -> str:
    return f"{check_side(side)}_rank"


def check_ks(ks) -> tuple[int, ...]:
    """Selection sizes: at least one, each at least 1; sorted and without repeats (``--k``)."""
    given = [ks] if isinstance(ks, int | np.integer) else ks
    if not isinstance(given, list | tuple | set | range) or not all(
        isinstance(k, int | np.integer) and not isinstance(k, bool) for k in given
    ):  # int() read k=2.5 as 2 and "5" as 5 without a word
        raise UserError(f"k must be whole numbers (an int or a list of ints), not {ks!r:.80}")
    ks = tuple(sorted({int(k) for k in given}))
    if not ks:
        raise UserError("give at least one --k")
    if ks[0] < 1:
        raise UserError(f"k must be at least 1, not {ks[0]}")
    return ks


def check_k(k: int) -> int:
    return check_ks((k,))[0]


@dataclass(frozen=True)
class StoredSet:
    """A label set ranked in the ``scores`` table, with what it was computed over."""

    run: str
    label_set: str
    preset: str | None
    positive: str
    among: str | None
    n_positive: int
    n_among: int
    components: dict[str, int]  # component -> neurons ranked


def _need_scores(session: QuerySession) -> None:
    """Before reading scores: a store never ranked said "Catalog Error: Table with name scores does not exist"."""
    if "scores" not in session.store.table_names():
        raise UserError("this store has no scores table yet: rank neurons first with hookpoints ap")


def stored_sets(session: QuerySession, run: str, patterns: list[str] | None = None) -> list[StoredSet]:
    """The label sets of ranking ``run`` (a run key) in the scores table, optionally matching globs."""
    _need_scores(session)
    # one row per (label set, component): its top-ranked neuron carries the label set's description
    rows = session.sql(
        """SELECT label_set, preset, positive, among, n_positive, n_among, component, group_size AS neurons
           FROM scores WHERE run = $run AND top_rank = 1 ORDER BY label_set, component""",
        {"run": run},
    ).to_pylist()
    if not rows:
        known = session.sql("SELECT DISTINCT run FROM scores ORDER BY run")["run"].to_pylist()
        raise UserError(
            f"the scores table has no ranking of run(s) {run!r}; it has {', '.join(known) or 'none'} "
            "(pass every --run the ranking used)"
        )
    sets: dict[str, StoredSet] = {}
    for row in rows:
        name = row["label_set"]
        if name not in sets:
            sets[name] = StoredSet(
                run,
                name,
                row["preset"],
                row["positive"],
                row["among"],
                row["n_positive"],
                row["n_among"],
                {},
            )
        sets[name].components[row["component"]] = row["neurons"]
    chosen = list(sets.values())
    if patterns:
        chosen = [s for s in chosen if any(fnmatch.fnmatchcase(s.label_set, p) for p in patterns)]
        if not chosen:
            names = sorted(sets)
            raise UserError(
                f"--label-set {' '.join(patterns)} matches no label set of run(s) {run!r}; it has "
                f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
            )
    return chosen


def ranked_sets(session: QuerySession, run: str, label_sets) -> dict[str, StoredSet]:
    """``label_sets`` (names, or one name) of ranking ``run``, each of which must be in the scores table: a
    string was read letter by letter and an unknown name matched no row, so a summary came back empty and an
    overlap all zeros without a word."""
    names = name_list(label_sets, "label_sets")
    if not names:
        raise UserError("no label sets given")
    stored = {s.label_set: s for s in stored_sets(session, run)}
    missing = [name for name in names if name not in stored]
    if missing:
        known = sorted(stored)
        raise UserError(
            f"label set {missing[0]!r} is not ranked in run(s) {run!r}; it has {', '.join(known[:8])}"
            f"{' ...' if len(known) > 8 else ''}"
        )
    return {name: stored[name] for name in names}


def layer_counts(session: QuerySession, run: str, label_set: str, component: str, k: int) -> pa.Table:
    """Per (layer, submodule) of the group: neurons, and how many are in the top-k and the bottom-k.

    Every cell of the group is listed, also those no selected neuron falls in (they count for Gini).

    >>> with store.query() as session:
    ...     counts = layer_counts(session, "r1", "de", "lm", k=10)  # then distribution_figure(counts, ...)
    """
    _need_scores(session)
    table = session.sql(
        """SELECT layer, submodule, count(*) AS neurons,
                  count(*) FILTER (WHERE top_rank <= $k) AS top,
                  count(*) FILTER (WHERE bottom_rank <= $k) AS bottom
           FROM scores WHERE run = $run AND label_set = $label_set AND component = $component
           GROUP BY layer, submodule ORDER BY layer NULLS FIRST, submodule""",
        {"run": run, "label_set": label_set, "component": component, "k": check_k(k)},
    )
    if table.num_rows == 0:
        raise UserError(f"label set {label_set!r} of run(s) {run!r} has no neurons in component {component!r}")
    size = sum(table["neurons"].to_pylist())
    if k > size:
        raise UserError(f"k={k} is larger than module group {component} ({size:,} neurons): pass a smaller --k")
    return table


def selection_gini(counts: pa.Table, side: str, unit: str = "layer_submodule") -> float:
    """Gini of a selection's counts over the group's cells (``unit``: layer_submodule, submodule or layer).

    >>> selection_gini(counts, "top")  # counts from layer_counts
    """
    if unit not in GINI_UNITS:
        raise UserError(f"Gini unit must be one of {', '.join(GINI_UNITS)}, not {unit!r}")
    _rank_column(side)
    table_columns(counts, [side] + ([] if unit == "layer_submodule" else [unit]), "layer_counts(...)")
    values = np.asarray(counts[side].to_pylist(), dtype=np.float64)
    if unit == "layer_submodule":
        return gini(values)
    keys = counts[unit].to_pylist()
    totals: dict = {}
    for key, value in zip(keys, values, strict=True):
        totals[key] = totals.get(key, 0.0) + value
    return gini(np.array(list(totals.values())))


def panel_shares(counts: pa.Table, side: str, component: str) -> dict[str, int]:
    """Selected neurons per panel (attention, ffn, convolution, other), in the paper's order for the group."""
    totals = {panel: 0 for panel in panel_order(component)}
    for submodule, value in zip(counts["submodule"].to_pylist(), counts[side].to_pylist(), strict=True):
        totals[panel_of(submodule)] += value
    return {panel: value for panel, value in totals.items() if value}


@dataclass(frozen=True)
class Overlap:
    """Shared neurons between selections ``rows[i]`` and ``columns[j]`` of one module group."""

    rows: list[str]  # label sets
    columns: list[str]
    counts: np.ndarray  # [rows, columns] int
    component: str
    side: str
    k: int


def overlap(
    session: QuerySession,
    rows: tuple[str, list[str]],
    columns: tuple[str, list[str]],
    component: str,
    k: int,
    side: str,
) -> Overlap:
    """How many (hook, neuron) pairs each row selection shares with each column selection.

    ``rows``/``columns``: (run key, label sets). Neurons are matched by hook name and index, so selections of
    different rankings of the same model (e.g. a speech run's and a text run's decoder) compare too.

    >>> with store.query() as session:
    ...     speech, text = ("s2tt+t2tt", ["unimodal/speech/de"]), ("s2tt+t2tt", ["unimodal/text/de"])
    ...     shared = overlap(session, speech, text, "text_decoder", 1000, "top")  # shared.counts: [rows, columns]
    """
    rank = _rank_column(side)
    if not all(isinstance(pair, tuple | list) and len(pair) == 2 for pair in (rows, columns)):
        raise UserError("overlap's rows and columns are each a (run, label sets) pair, e.g. ('r1', ['de', 'fr'])")
    (row_run, row_sets), (col_run, col_sets) = rows, columns
    if not isinstance(component, str):
        raise UserError(f"component must be the name of a module group, not {component!r:.80}")
    k = check_k(k)
    for run, label_sets in ((row_run, row_sets), (col_run, col_sets)):
        for name, stored in ranked_sets(session, run, label_sets).items():
            if component not in stored.components:
                raise UserError(
                    f"label set {name!r} of run(s) {run!r} ranks no neuron of component {component!r}; it ranks "
                    f"{', '.join(stored.components)}"
                )
            if k > stored.components[component]:
                raise UserError(
                    f"k={k} is larger than module group {component} ({stored.components[component]:,} neurons): "
                    "pass a smaller k"
                )
    row_sets, col_sets = name_list(row_sets, "label_sets"), name_list(col_sets, "label_sets")
    result = session.sql(
        f"""WITH a AS (SELECT label_set, hook, neuron FROM scores
                       WHERE run = $row_run AND label_set IN ({_literals(row_sets)})
                         AND component = $component AND {rank} <= $k),
                 b AS (SELECT label_set, hook, neuron FROM scores
                       WHERE run = $col_run AND label_set IN ({_literals(col_sets)})
                         AND component = $component AND {rank} <= $k)
            SELECT a.label_set AS a, b.label_set AS b, count(*) AS shared
            FROM a JOIN b USING (hook, neuron) GROUP BY ALL""",
        {"row_run": row_run, "col_run": col_run, "component": component, "k": k},
    ).to_pylist()
    counts = np.zeros((len(row_sets), len(col_sets)), np.int64)
    for row in result:
        counts[row_sets.index(row["a"]), col_sets.index(row["b"])] = row["shared"]
    return Overlap(list(row_sets), list(col_sets), counts, component, side, k)


def selected_neurons(
    session: QuerySession,
    run: str,
    label_set: str,
    k: int,
    *,
    side: str = "top",
    component: str | None = None,
) -> pa.Table:
    """The top-k / bottom-k (or ``side="both"``) neurons of a ranked label set: hook, neuron, ap, ranks.

    One row per neuron, ordered by hook and neuron; for interventions (issue 5) and ad hoc analysis.

    >>> with store.query() as session:
    ...     top = selected_neurons(session, "r1", "de", k=10).to_pandas()
    """
    _need_scores(session)
    if not isinstance(label_set, str):  # None was a TypeError in the glob match of the error message
        raise UserError(f"label_set must be the name of a ranked label set, not {label_set!r:.80}")
    sides = SIDES if check_side(side, SIDE_CHOICES) == "both" else (side,)
    condition = " OR ".join(f"{_rank_column(s)} <= $k" for s in sides)
    component_filter = "" if component is None else " AND component = $component"
    params = {"run": run, "label_set": label_set, "k": check_k(k)}
    if component is not None:
        params["component"] = component
    table = session.sql(
        f"""SELECT component, layer, submodule, hook, neuron, ap, top_rank, bottom_rank
            FROM scores WHERE run = $run AND label_set = $label_set{component_filter} AND ({condition})
            ORDER BY component, hook, neuron""",
        params,
    )
    if table.num_rows == 0:
        stored_sets(session, run, [label_set])  # says which label sets there are
        raise UserError(f"label set {label_set!r} of run(s) {run!r} has no neurons in component {component!r}")
    return table


def ap_summary(session: QuerySession, run: str, label_sets: list[str]) -> list[dict]:
    """Per (label set, component): examples compared, highest AP and its neuron, median and lowest AP.

    >>> with store.query() as session:
    ...     rows = ap_summary(session, "r1", ["de"])
    """
    label_sets = list(ranked_sets(session, run, label_sets))
    sets = _literals(label_sets)
    extremes = session.sql(
        f"""SELECT label_set, component, n_positive, n_among, group_size AS neurons, top_rank, bottom_rank, ap,
                   hook || '[' || neuron || ']' AS neuron
            FROM scores WHERE run = $run AND label_set IN ({sets}) AND (top_rank = 1 OR bottom_rank = 1)""",
        {"run": run},
    ).to_pylist()
    medians = session.sql(
        f"""SELECT label_set, component, median(ap) AS median_ap FROM scores
            WHERE run = $run AND label_set IN ({sets}) GROUP BY label_set, component""",
        {"run": run},
    ).to_pylist()
    rows: dict[tuple[str, str], dict] = {}
    for row in extremes:
        key = (row["label_set"], row["component"])
        entry = rows.setdefault(key, {"label_set": key[0], "component": key[1]})
        entry.update(n_positive=row["n_positive"], n_among=row["n_among"], neurons=row["neurons"])
        if row["top_rank"] == 1:
            entry.update(max_ap=row["ap"], best_neuron=row["neuron"])
        if row["bottom_rank"] == 1:
            entry["min_ap"] = row["ap"]
    for row in medians:
        rows[row["label_set"], row["component"]]["median_ap"] = row["median_ap"]
    return list(rows.values())


def _literals(values: list[str]) -> str:
    """SQL string literals (lists of constants are pushed down to the Delta partitions; parameters are not)."""
    if not values:
        raise UserError("no label sets given")
    return ", ".join(sql_string(value) for value in values)
