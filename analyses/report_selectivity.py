"""The report's AP-ranking and intervention sections, after the SeamlessM4T v2 neuron paper
(seeds/seamless-m4t-v2-neurons.txt): where each label set's top-k / bottom-k neurons are
(Figures 2 and 4), speech-vs-text overlaps (Figure 3), the Gini table (section 5.2), layer-wise magnitudes and
their deviation from the mean trend (Figure 6), and each intervention sweep (Figure 5 and its numbers).

Everything comes from SQL aggregates: one GROUP BY over a ranking's scores gives every label set's counts per
layer x submodule; magnitudes are one aggregate statement over the activations (analyses.magnitudes).
"""

from __future__ import annotations

import pyarrow as pa
from hookpoints.analyses.figures import png_bytes
from hookpoints.analyses.figures_interventions import figure5, sweep_title
from hookpoints.analyses.figures_selectivity import distribution_figure, magnitude_figure, overlap_figure
from hookpoints.analyses.report_html import Section, absent, image, paragraph, table
from hookpoints.analyses.report_runs import literals
from hookpoints.analyses.selection import overlap, selection_gini, shown_k
from hookpoints.store.query import QuerySession

from hookpoints.errors import UserError


def rankings(session: QuerySession, runs: list[str] | None) -> list[dict]:
    """One row per ranking (scores ``run`` key): its runs, label sets, components and ks."""
    if "scores" not in session.store.table_names():
        return []
    rows = session.sql(
        """SELECT run AS ranking, any_value(runs) AS runs, count(DISTINCT label_set) AS label_sets,
                  list(DISTINCT component ORDER BY component) AS components, any_value(ks) AS ks,
                  any_value(subset) AS subset
           FROM scores WHERE top_rank = 1 GROUP BY run ORDER BY run"""
    ).to_pylist()
    return [r for r in rows if runs is None or set(r["runs"]) & set(runs)]


def add_ranking(section: Section, session: QuerySession, ranking: dict, *, magnitudes: bool = True) -> None:
    """Distributions, overlaps, Gini table and magnitudes of one ranking."""
    key = ranking["ranking"]
    k = shown_k(ranking["ks"] or [50])  # as `hookpoints ap` prints it
    sets = session.sql(
        f"""SELECT label_set, any_value(preset) AS preset, any_value(positive) AS positive,
                   any_value(among) AS among, any_value(n_positive) AS n_positive, any_value(n_among) AS n_among
            FROM scores WHERE run IN ({literals([key])}) AND top_rank = 1 GROUP BY label_set ORDER BY label_set"""
    ).to_pylist()
    section.add(
        paragraph(
            f"Ranking of run(s) {' + '.join(ranking['runs'])}: {len(sets)} label sets, module groups "
            f"{', '.join(ranking['components'])}; selections of k = {k} neurons per module group "
            f"(ks stored: {', '.join(str(x) for x in ranking['ks'] or [])})."
        )
    )
    section.add(table(sets, caption="label sets (positive examples against those compared)"))
    counts = _layer_counts(session, key, k)
    gini_rows = []
    by_preset: dict[str, list[str]] = {}
    for row in sets:
        by_preset.setdefault(row["preset"] or "named", []).append(row["label_set"])
    figures = section.section(f"Where the top-{k} and bottom-{k} neurons are (Figures 2 and 4)")
    for preset, names in by_preset.items():
        sub = figures.section(f"{preset} label sets")
        for name in names:
            for component in ranking["components"]:
                cells = counts.get((name, component))
                if cells is None:
                    continue
                title = f"label set {name} (run {key})"
                sub.add(image(png_bytes(distribution_figure(cells, component, k, title)), f"{title}, {component}"))
                gini_rows.append(
                    {
                        "label set": name,
                        "component": component,
                        f"Gini top-{k}": round(selection_gini(cells, "top"), 3),
                        f"Gini bottom-{k}": round(selection_gini(cells, "bottom"), 3),
                    }
                )
    gini = section.section("Gini of the selections over layer x submodule cells (section 5.2)")
    gini.add(table(gini_rows))
    _add_overlaps(section.section("Speech vs text: shared language neurons (Figure 3)"), session, key, sets, k)
    mags = section.section("Layer-wise magnitudes and deviation from the mean trend (Figure 6)")
    if magnitudes:
        add_magnitudes(mags, session, ranking["runs"])
    else:
        mags.add(paragraph("Left out (report --no-magnitudes)."))


def _layer_counts(session: QuerySession, key: str, k: int) -> dict[tuple[str, str], pa.Table]:
    """(label set, component) -> counts per layer x submodule, from one GROUP BY over the ranking's scores."""
    table_ = session.sql(
        f"""SELECT label_set, component, layer, submodule, count(*) AS neurons,
                   count(*) FILTER (WHERE top_rank <= {int(k)}) AS top,
                   count(*) FILTER (WHERE bottom_rank <= {int(k)}) AS bottom
            FROM scores WHERE run IN ({literals([key])})
            GROUP BY ALL ORDER BY label_set, component, layer NULLS FIRST, submodule"""
    )
    out: dict[tuple[str, str], list[dict]] = {}
    for row in table_.to_pylist():
        out.setdefault((row.pop("label_set"), row.pop("component")), []).append(row)
    return {key_: pa.Table.from_pylist(rows) for key_, rows in out.items()}


def _add_overlaps(section: Section, session: QuerySession, key: str, sets: list[dict], k: int) -> None:
    by_modality: dict[str, list[str]] = {}
    for row in sets:
        parts = row["label_set"].split("/")
        if row["preset"] == "unimodal" and len(parts) == 3:
            by_modality.setdefault(parts[1], []).append(row["label_set"])
    if len(by_modality) < 2:
        section.add(
            absent(
                f"ranking of unimodal label sets in two modalities for ranking {key}",
                f"hookpoints ap --store {session.store.location.uri} --run SPEECH_RUN --run TEXT_RUN --preset unimodal",
            )
        )
        return
    first, second = sorted(by_modality)[:2]
    components = session.sql(
        f"""SELECT DISTINCT component FROM scores WHERE run IN ({literals([key])}) AND top_rank = 1
            AND label_set IN ({literals(by_modality[first] + by_modality[second])}) ORDER BY component"""
    )["component"].to_pylist()
    for component in components:
        for side in ("bottom", "top"):
            try:
                result = overlap(session, (key, by_modality[first]), (key, by_modality[second]), component, k, side)
            except UserError as error:
                section.add(paragraph(f"{component} {side}-{k}: {error}"))
                continue
            title = f"unimodal language neurons, {first} vs {second} (run {key})"
            section.add(image(png_bytes(overlap_figure(result, title)), f"{title}: {component}, {side}-{k}"))


def add_magnitudes(section: Section, session: QuerySession, runs: list[str]) -> None:
    """Figure 6 for a group of runs: one SQL aggregate over their activations (every hook but layer outputs)."""
    from hookpoints.analyses.examples import open_runs, select_examples
    from hookpoints.analyses.hook_matrix import shared_hooks
    from hookpoints.analyses.magnitudes import group_columns, layer_magnitudes

    try:
        group = open_runs(session, list(runs))
        examples = select_examples(session, group)
        hooks = shared_hooks(session, group.runs)
        columns = group_columns(session, examples, None)
        result = layer_magnitudes(session, examples, hooks, columns)
    except UserError as error:
        section.add(paragraph(f"No magnitudes for run(s) {' + '.join(runs)}: {error}"))
        return
    scale = 1000.0
    for component in dict.fromkeys(result["component"].to_pylist()):
        title = f"run(s) {group.key}: mean activation by layer"
        section.add(
            image(png_bytes(magnitude_figure(result, columns, component, scale, title)), f"{title}, {component}")
        )
    rows = result.to_pylist()
    for row in rows:
        row["deviation x1000"] = round(row.pop("deviation") * scale, 3)
    section.add(table(rows, caption=f"mean activation per layer and {' x '.join(columns)} (section 3.4)"))


def sweeps(session: QuerySession, runs: list[str] | None) -> list[str]:
    """Sweeps in ``intervention_scores`` whose ranking or statistics run is among ``runs`` (all: None)."""
    if "intervention_scores" not in session.store.table_names():
        return []
    rows = session.sql(
        "SELECT sweep, list(DISTINCT ranking) AS rankings, list(DISTINCT stats_run) AS stats "
        "FROM intervention_scores GROUP BY sweep ORDER BY sweep"
    ).to_pylist()
    chosen = []
    for row in rows:
        named = {r for ranking in row["rankings"] if ranking for r in ranking.split("+")} | set(row["stats"])
        if runs is None or named & set(runs):
            chosen.append(row["sweep"])
    return chosen


def add_sweep(section: Section, session: QuerySession, sweep: str) -> None:
    """Figure 5 of one sweep and its numbers (scores averaged over languages)."""
    scores = session.sql(f"SELECT * FROM intervention_scores WHERE sweep IN ({literals([sweep])})")
    title = sweep_title(scores, sweep)
    section.add(image(png_bytes(figure5(scores, title)), title))
    numbers = session.sql(
        f"""SELECT task, neuron_type, k, string_agg(DISTINCT metric, '/' ORDER BY metric) AS metric,
                   round(avg(score), 3) AS mean_score,
                   count(DISTINCT language) AS languages, sum(n_generations) AS generations
            FROM intervention_scores WHERE sweep IN ({literals([sweep])})
            GROUP BY task, neuron_type, k ORDER BY task, neuron_type, k"""
    ).to_pylist()
    section.add(table(numbers, caption="scores averaged over languages (Figure 5's numbers)"))
