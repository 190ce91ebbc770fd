"""Plots of neuron selectivity and activation magnitudes, after the SeamlessM4T v2 neuron paper
(seeds/seamless-m4t-v2-neurons.txt). Each function returns a matplotlib Figure; analyses.figures saves it
(PNG and SVG) or embeds it (the report).

- selected neurons per layer, stacked by submodule, bottom-k | top-k, one row per panel (attention / FFN /
  convolution): Figures 2, 4 and 7-48,
- overlap between two families of selections as an annotated matrix (Figure 3),
- magnitudes by layer and their deviation from the mean trend (Figure 6), and activation Gini by layer.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pyarrow as pa
from hookpoints.analyses.arguments import name_list, table_columns
from hookpoints.analyses.figures import integer_axis, subplots
from hookpoints.analyses.selection import Overlap, panel_of, panel_order
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from hookpoints.errors import UserError

PANEL_TITLES = {"attention": "Attention", "ffn": "FFN", "convolution": "Convolution", "other": "Other"}
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D"]


def distribution_figure(counts: pa.Table, component: str, k: int, title: str) -> Figure:
    """Selected neurons per layer, stacked by submodule: a row per panel, bottom-k left and top-k right.

    ``counts``: analyses.selection.layer_counts (layer, submodule, neurons, top, bottom).

    >>> with store.query() as session:
    ...     figure = distribution_figure(layer_counts(session, "r1", "de", "lm", 10), "lm", 10, "de")
    """
    rows = table_columns(counts, ["layer", "submodule", "top", "bottom"], "layer_counts(...)").to_pylist()
    numbered = sorted({r["layer"] for r in rows if r["layer"] is not None})
    # hook points outside the layers (embeddings, final norms) get their own bar left of layer 0, "no layer"
    outside = any(r["layer"] is None for r in rows)
    layers = ([None] if outside else []) + numbered
    where = ([min(numbered, default=0) - 1] if outside else []) + numbered  # x of each bar
    submodules = sorted({r["submodule"] for r in rows})
    panels = [p for p in panel_order(component) if any(panel_of(s) == p for s in submodules)]
    fig, axes = subplots(len(panels), 2, figsize=(12, 3.3 * len(panels)), squeeze=False)
    value = {(r["layer"], r["submodule"], side): r[side] for r in rows for side in ("top", "bottom")}
    letter = iter("abcdefghijklmnopqrstuvwxyz")
    for row, panel in enumerate(panels):
        members = [s for s in submodules if panel_of(s) == panel]
        colours = matplotlib.colormaps.get_cmap("tab20" if len(members) > 10 else "tab10")
        peak = 0
        for col, side in enumerate(("bottom", "top")):
            ax = axes[row][col]
            base = np.zeros(len(layers))
            for i, submodule in enumerate(members):
                heights = np.array([value.get((layer, submodule, side), 0) for layer in layers], dtype=float)
                ax.bar(where, heights, bottom=base, color=colours(i % colours.N), label=submodule, width=0.8)
                base += heights
            peak = max(peak, base.max() if len(base) else 0)
            ax.set_title(f"({next(letter)}) {side.capitalize()} {PANEL_TITLES[panel]}", fontsize=10)
            ax.set_xlabel("Layer index")
            ax.set_ylabel("Neuron count")
            if layers:
                ticks = numbered if len(numbered) <= 12 else numbered[:: max(1, len(numbered) // 12)]
                ax.set_xticks(where[:1] + ticks if outside else ticks, (["no layer"] if outside else []) + ticks)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(axis="y", alpha=0.3)
        for col in range(2):
            axes[row][col].set_ylim(0, max(1, peak) * 1.08)
        axes[row][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(f"{title}\n{component}: bottom-{k} and top-{k} neurons by layer and submodule", fontsize=11)
    fig.tight_layout()
    return fig


def short_labels(names: list[str]) -> tuple[list[str], str]:
    """Label set names without their shared path prefix (``unimodal/speech/de`` -> ``de``), and the prefix."""
    parts = [name.split("/") for name in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({tuple(p[: common + 1]) for p in parts}) == 1:
        common += 1
    prefix = "/".join(parts[0][:common])
    return ["/".join(p[common:]) for p in parts], prefix


def overlap_figure(result: Overlap, title: str) -> Figure:
    """Shared neurons between row and column selections, as an annotated matrix (Figure 3).

    >>> with store.query() as session:
    ...     shared = overlap(session, speech, text, "text_decoder", 1000, "top")  # speech, text: (run, label sets)
    >>> figure = overlap_figure(shared, "speech vs text")
    """
    rows, row_prefix = short_labels(result.rows)
    cols, col_prefix = short_labels(result.columns)
    size = 0.6 * max(len(rows), len(cols)) + 2.5
    fig, ax = subplots(figsize=(size + 1.2, size))
    image = ax.imshow(result.counts, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(col_prefix or "columns")
    ax.set_ylabel(row_prefix or "rows")
    top = result.counts.max() if result.counts.size else 0
    for i in range(len(rows)):
        for j in range(len(cols)):
            shade = "white" if top and result.counts[i, j] > 0.6 * top else "black"
            ax.text(j, i, str(result.counts[i, j]), ha="center", va="center", color=shade, fontsize=8)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="shared neurons")
    integer_axis(bar.ax.yaxis)
    ax.set_title(f"{title}\n{result.component}: {result.side}-{result.k} overlap", fontsize=10)
    fig.tight_layout()
    return fig


def _group_styles(table: pa.Table, by: list[str]) -> list[tuple[tuple, dict]]:
    """(group values, line style) for each group: colour by the first column, line style and marker by the
    second (speech solid with circles, text dashed with squares)."""
    groups = sorted(set(zip(*(table[c].to_pylist() for c in by), strict=True)), key=lambda g: tuple(str(v) for v in g))
    firsts = sorted({str(g[0]) for g in groups})
    seconds = sorted({str(g[1]) for g in groups}) if len(by) > 1 else []
    colours = matplotlib.colormaps.get_cmap("tab10")
    styles = []
    for group in groups:
        style = {"color": colours(firsts.index(str(group[0])) % 10)}
        if seconds:
            index = seconds.index(str(group[1]))
            style["linestyle"] = LINESTYLES[index % len(LINESTYLES)]
            style["marker"] = MARKERS[index % len(MARKERS)]
        styles.append((group, style))
    return styles


def _group_legend(ax, table: pa.Table, by: list[str]) -> None:
    """Two legends: colour = the first column's values, line style and marker = the second's (e.g. modality)."""
    styles = _group_styles(table, by)
    firsts = dict.fromkeys(str(g[0]) for g, _ in styles)
    colour_of = {str(g[0]): s["color"] for g, s in styles}
    handles = [Line2D([], [], color=colour_of[v], lw=2, label=v) for v in firsts]
    first = ax.legend(
        handles=handles, title=by[0], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
    )
    if len(by) > 1:
        ax.add_artist(first)
        seen: dict[str, dict] = {}
        for group, style in styles:
            seen.setdefault(str(group[1]), style)
        handles = [
            Line2D([], [], color="black", linestyle=s["linestyle"], marker=s["marker"], label=v)
            for v, s in seen.items()
        ]
        ax.legend(handles=handles, title=by[1], fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0.0), frameon=False)


def _check_groups(table, by, component: str, values: list[str], made_by: str) -> list[str]:
    """``by`` as a list, once the table has its columns and rows of ``component`` (a component it lacks drew an
    empty figure without a word; a wrong table or column was a KeyError)."""
    by = name_list(by, "by")
    table_columns(table, ["component", "layer", *values, *by], made_by)
    components = list(dict.fromkeys(table["component"].to_pylist()))
    if component not in components:
        raise UserError(f"the table has no rows of component {component!r}; it has {', '.join(map(str, components))}")
    return by


def _series(table: pa.Table, by: list[str], component: str, group: tuple, column: str) -> tuple[list, list]:
    rows = [
        r
        for r in table.to_pylist()
        if r["component"] == component and tuple(r[c] for c in by) == group and r["layer"] is not None
    ]
    rows.sort(key=lambda r: r["layer"])
    return [r["layer"] for r in rows], [r[column] for r in rows]


def magnitude_figure(
    table: pa.Table, by: list[str], component: str, scale: float, title: str, *, absolute: bool = False
) -> Figure:
    """Mean magnitude by layer, and deviation from the mean trend (x ``scale``) by layer, one line per group
    (``absolute``: the table averages |activation|, as ``layer_magnitudes(..., absolute=True)`` gives).

    >>> with store.query() as session:
    ...     table = layer_magnitudes(session, examples, hooks, ["language"])
    >>> figure = magnitude_figure(table, ["language"], "lm", 1.0, "r1")
    """
    by = _check_groups(table, by, component, ["magnitude", "deviation"], "layer_magnitudes(...)")
    fig, axes = subplots(1, 2, figsize=(13, 4.2))
    for group, style in _group_styles(table, by):
        label = " · ".join(str(v) for v in group)
        style = {"marker": "o", **style}
        layers, values = _series(table, by, component, group, "magnitude")
        axes[0].plot(layers, values, markersize=3, label=label, **style)
        layers, values = _series(table, by, component, group, "deviation")
        axes[1].plot(layers, np.array(values) * scale, markersize=3, label=label, **style)
    axes[0].set_title("(a) layer-wise activation magnitude", fontsize=10)
    axes[1].set_title(f"(b) deviation from the mean trend (x{scale:g})", fontsize=10)
    axes[1].axhline(0, color="black", linewidth=0.8)
    quantity = "|activation|" if absolute else "activation"
    axes[0].set_ylabel(f"Mean {quantity} (over neurons, submodules, examples)")
    axes[1].set_ylabel(f"Group mean {quantity} minus mean over groups (x{scale:g})")
    for ax in axes:
        ax.set_xlabel("Layer index")
        integer_axis(ax.xaxis)
        ax.grid(alpha=0.3)
    _group_legend(axes[1], table, by)
    fig.suptitle(f"{title}\n{component}", fontsize=11)
    fig.tight_layout()
    return fig


def activation_gini_figure(table: pa.Table, by: list[str], component: str, title: str) -> Figure:
    """Gini of the neurons' mean |activation| by layer, one line per group.

    >>> figure = activation_gini_figure(activation_gini(store, examples, hooks, groups), ["language"], "lm", "r1")
    """
    by = _check_groups(table, by, component, ["gini"], "activation_gini(...)")
    fig, ax = subplots(figsize=(8, 4.2))
    for group, style in _group_styles(table, by):
        layers, values = _series(table, by, component, group, "gini")
        style = {"marker": "o", **style}
        ax.plot(layers, values, markersize=3, label=" · ".join(str(v) for v in group), **style)
    ax.set_xlabel("Layer index")
    integer_axis(ax.xaxis)
    ax.set_ylabel("Gini of mean |activation| over neurons")
    ax.grid(alpha=0.3)
    _group_legend(ax, table, by)
    ax.set_title(f"{title}\n{component}: activation inequality by layer", fontsize=10)
    fig.tight_layout()
    return fig
