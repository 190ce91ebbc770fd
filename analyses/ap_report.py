"""The summary of ranked label sets (the SeamlessM4T paper's Figures 2-4), as data a notebook or the CLI shows.

Per label set and module group: the AP range and best neuron, where the top-k / bottom-k neurons are (attention,
FFN, convolution shares, per layer), and the Gini coefficient of those counts; and, for unimodal label sets of
two modalities, how many neurons the speech and the text selections of each language pair share (Figure 3).
Figures come from :mod:`hookpoints.analyses.figures_selectivity`.

Example::

    report = selectivity_report(store, "s2tt+t2tt", ["unimodal/speech/de", "unimodal/text/de"], k=50)
    report.rows[0].gini_top, report.overlaps[0].result.counts
    for name, figure in report.figures():
        figure.savefig(f"{name}.png")
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
from hookpoints.analyses.arguments import as_store, name_list
from hookpoints.analyses.selection import (
    SIDES,
    Overlap,
    ap_summary,
    check_k,
    layer_counts,
    overlap,
    panel_shares,
    selection_gini,
    stored_sets,
)

from hookpoints.errors import UserError


@dataclass(frozen=True)
class SelectivityRow:
    """One label set in one module group."""

    label_set: str
    component: str
    n_positive: int
    n_among: int
    max_ap: float
    best_neuron: str
    median_ap: float
    min_ap: float
    top: dict[str, int]  # panel (attention, ffn, convolution, other) -> neurons of the top-k
    bottom: dict[str, int]
    gini_top: float
    gini_bottom: float
    counts: pa.Table = field(repr=False)  # per layer and submodule: top / bottom counts (layer_counts)


@dataclass(frozen=True)
class ModalityOverlap:
    """Neurons shared by the ``side``-k unimodal selections of two modalities, language by language."""

    component: str
    side: str
    first: str  # modality of the rows
    second: str  # modality of the columns
    result: Overlap

    @property
    def languages(self) -> list[str]:
        return [name.split("/")[-1] for name in self.result.rows]

    @property
    def columns(self) -> list[str]:
        return [name.split("/")[-1] for name in self.result.columns]


@dataclass(frozen=True)
class SelectivityReport:
    run: str
    k: int
    gini_unit: str
    rows: list[SelectivityRow]
    overlaps: list[ModalityOverlap]

    def figures(self) -> Iterator[tuple[str, object]]:
        """(file stem, matplotlib Figure) of every row's layer distribution and every overlap matrix."""
        from hookpoints.analyses.figures import safe
        from hookpoints.analyses.figures_selectivity import distribution_figure, overlap_figure

        for row in self.rows:
            title = f"{row.label_set} (run {self.run})"
            figure = distribution_figure(row.counts, row.component, self.k, title)
            yield f"ap-{safe(self.run)}-{safe(row.label_set)}-{row.component}-k{self.k}", figure
        for o in self.overlaps:
            title = f"unimodal language neurons, {o.first} vs {o.second} (run {self.run})"
            yield f"overlap-{safe(self.run)}-{o.component}-{o.side}{self.k}", overlap_figure(o.result, title)


def component_order(component: str) -> tuple[int, str]:
    """Encoders before decoders (the order inputs flow through the model), then by name."""
    return (0 if "encoder" in component else 1 if "decoder" in component else 2, component)


def selectivity_report(
    store,
    run: str,
    label_sets: list[str],
    k: int,
    *,
    components: list[str] | None = None,
    gini_unit: str = "layer_submodule",
    overlaps: bool = True,
) -> SelectivityReport:
    """Summarise ranked ``label_sets`` of ``run`` (a run key of the scores table) at selection size ``k``.

    >>> report = selectivity_report(store, "s2tt+t2tt", ["language/de", "language/fr"], k=500)  # doctest: +SKIP
    """
    check_k(k)
    store = as_store(store)
    label_sets = name_list(label_sets, "label_sets")  # a string was read letter by letter
    components = None if components is None else name_list(components, "components")
    if not label_sets:
        raise UserError("give at least one label set to summarise")
    rows = []
    with store.query() as session:
        summary = ap_summary(session, run, label_sets) if "scores" in store.table_names() else []
        if not summary:
            raise UserError(
                f"the scores table holds no AP of run {run!r} for label set(s) {', '.join(label_sets[:3])}"
                f"{' ...' if len(label_sets) > 3 else ''}: rank them first (hookpoints ap, or plan_ranking + rank "
                "+ write_scores)"
            )
        ranked = sorted({r["component"] for r in summary}, key=component_order)
        unknown = [c for c in components or () if c not in ranked]
        if unknown:
            raise UserError(
                f"component {unknown[0]!r} is not ranked in run(s) {run!r} for these label sets: it has "
                f"{', '.join(ranked)}"
            )
        order = {name: i for i, name in enumerate(label_sets)}
        summary.sort(key=lambda r: (order.get(r["label_set"], len(order)), component_order(r["component"])))
        for row in summary:
            component = row["component"]
            if components and component not in components:
                continue
            counts = layer_counts(session, run, row["label_set"], component, k)
            rows.append(
                SelectivityRow(
                    row["label_set"],
                    component,
                    row["n_positive"],
                    row["n_among"],
                    row["max_ap"],
                    row["best_neuron"],
                    row["median_ap"],
                    row["min_ap"],
                    panel_shares(counts, "top", component),
                    panel_shares(counts, "bottom", component),
                    selection_gini(counts, "top", gini_unit),
                    selection_gini(counts, "bottom", gini_unit),
                    counts,
                )
            )
        shared = modality_overlaps(session, run, label_sets, k, components) if overlaps else []
    return SelectivityReport(run, k, gini_unit, rows, shared)


def modality_overlaps(
    session, run: str, label_sets: list[str], k: int, components: list[str] | None = None
) -> list[ModalityOverlap]:
    """For unimodal label sets of two modalities: the overlap of their selections over languages (Figure 3),
    in every module group both hold (or those of ``components``)."""
    unimodal = [s for s in stored_sets(session, run, label_sets) if s.preset == "unimodal"]
    by_modality: dict[str, list[str]] = {}
    for s in unimodal:
        parts = s.label_set.split("/")
        if len(parts) == 3:
            by_modality.setdefault(parts[1], []).append(s.label_set)
    modalities = sorted(by_modality)
    if len(modalities) < 2:
        return []
    first, second = modalities[0], modalities[1]
    shared = sorted(set.intersection(*(set(s.components) for s in unimodal)))
    components = [c for c in shared if not components or c in components]
    return [
        ModalityOverlap(
            component,
            side,
            first,
            second,
            overlap(session, (run, by_modality[first]), (run, by_modality[second]), component, k, side),
        )
        for component in components
        for side in reversed(SIDES)  # bottom, then top
    ]
