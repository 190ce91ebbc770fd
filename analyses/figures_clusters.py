"""Plots of a clustering analysis (matplotlib, Agg backend; each figure as PNG and SVG).

- measures by layer, one line per label, original space solid and t-SNE dashed (Figures 4 and 13a-b),
- t-SNE maps per layer in a grid, coloured by a label (Figures 3, 8 and 10),
- dendrograms of a label's class centroids at chosen layers (Figure 13c).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from hookpoints.analyses.clusters import ClusterResult, Labelling, LayerResult  # noqa: E402
from hookpoints.analyses.figures import safe, save  # noqa: E402

#: Above this many classes a map gets no legend (colours repeat).
LEGEND_MAX_CLASSES = 20
MEASURE_TITLES = {"silhouette": "silhouette (higher: tighter clusters)", "davies_bouldin": "Davies-Bouldin (lower)"}


def plot_all(result: ClusterResult, folder: Path, *, dendrogram_layers: list[int] | None = None) -> list[Path]:
    """Every plot of ``result`` into ``folder``; returns the files written."""
    stem = f"clusters-{result.run}"
    paths = save(measures_figure(result), folder, f"{stem}-measures")
    for labelling in result.labellings:
        if result.settings.tsne:
            paths += save(tsne_figure(result, labelling), folder, f"{stem}-tsne-{safe(labelling.name)}")
        layers = _dendrogram_layers(result, labelling, dendrogram_layers)
        if layers:
            figure = dendrogram_figure(result, labelling, layers)
            paths += save(figure, folder, f"{stem}-dendrogram-{safe(labelling.name)}")
    return paths


def measures_figure(result: ClusterResult) -> plt.Figure:
    """Silhouette and Davies-Bouldin against layer: a row per component, a line per label and space.

    >>> figure = measures_figure(cluster_layers(store, "r1", ClusterSettings(labels=("language",))))
    """
    components = list(dict.fromkeys(layer.hook.component for layer in result.layers))
    measures = list(MEASURE_TITLES)
    fig, axes = plt.subplots(
        len(components), len(measures), figsize=(5.2 * len(measures), 3.4 * len(components)), squeeze=False
    )
    colours = plt.get_cmap("tab10")
    for row, component in enumerate(components):
        for col, measure in enumerate(measures):
            ax = axes[row][col]
            for index, labelling in enumerate(result.labellings):
                for space, style in (("original", "-"), ("tsne", "--")):
                    points = sorted(
                        (r["layer"] if r["layer"] is not None else i, r["value"])
                        for i, r in enumerate(result.rows)
                        if r["component"] == component
                        and r["label"] == labelling.name
                        and r["measure"] == measure
                        and r["space"] == space
                    )
                    if points:
                        xs, ys = zip(*points, strict=True)
                        name = f"{labelling.name} ({'t-SNE' if space == 'tsne' else 'original space'})"
                        ax.plot(xs, ys, style, marker="o", ms=3.5, color=colours(index % 10), label=name)
            ax.set_title(f"{component or 'layers'}: {MEASURE_TITLES[measure]}", fontsize=10)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
            if measure == "silhouette":
                ax.axhline(0, color="grey", lw=0.8)
            values = [y for line in ax.get_lines() for y in line.get_ydata()]
            if values and min(values) > 0 and max(values) / min(values) > 20:
                ax.set_yscale("log")  # t-SNE maps can make one class pair's ratio dwarf the rest
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(_caption(result), fontsize=10)
    fig.tight_layout()
    return fig


def tsne_figure(result: ClusterResult, labelling: Labelling) -> plt.Figure:
    """The t-SNE map of every layer in a grid, points coloured by ``labelling``'s classes.

    >>> result = cluster_layers(store, "r1", ClusterSettings(labels=("language",)))
    >>> figure = tsne_figure(result, result.labellings[0])
    """
    layers = [layer for layer in result.layers if layer.tsne is not None]
    columns = min(4, len(layers))
    rows = -(-len(layers) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.1 * rows), squeeze=False)
    codes = labelling.codes[result.sample]
    colours = plt.get_cmap("tab20" if len(labelling.classes) > 10 else "tab10")
    for ax, layer in zip(axes.flat, layers, strict=False):
        ax.scatter(*layer.tsne[codes < 0].T, s=6, c="lightgrey", label="(no label)")
        for code, name in enumerate(labelling.classes):
            mine = codes == code
            ax.scatter(*layer.tsne[mine].T, s=9, color=colours(code % colours.N), label=name, alpha=0.85)
        ax.set_title(_layer_title(layer), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    if len(labelling.classes) <= LEGEND_MAX_CLASSES:
        handles, names = axes.flat[0].get_legend_handles_labels()
        shown = [(h, n) for h, n in zip(handles, names, strict=True) if n != "(no label)" or (codes < 0).any()]
        fig.legend(
            *zip(*shown, strict=True), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title=labelling.name
        )
    fig.suptitle(
        f"t-SNE per layer, coloured by {labelling.name} ({len(labelling.classes)} classes); {_caption(result)}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def dendrogram_figure(result: ClusterResult, labelling: Labelling, layers: list[LayerResult]) -> plt.Figure:
    """Hierarchical clustering of ``labelling``'s class centroids at each of ``layers``.

    >>> figure = dendrogram_figure(result, result.labellings[0], result.layers[-1:])
    """
    from scipy.cluster.hierarchy import dendrogram

    height = max(2.8, 0.22 * len(labelling.classes))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), height), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        tree = layer.linkages[labelling.name]
        dendrogram(tree, labels=labelling.classes, orientation="left", ax=ax, leaf_font_size=8, color_threshold=0)
        ax.set_title(_layer_title(layer), fontsize=9)
        ax.set_xlabel("Euclidean distance")
    fig.suptitle(
        f"{result.settings.linkage}-linkage clustering of {labelling.name} centroids; {_caption(result)}", fontsize=10
    )
    fig.tight_layout()
    return fig


def _dendrogram_layers(result: ClusterResult, labelling: Labelling, chosen: list[int] | None) -> list[LayerResult]:
    layers = [layer for layer in result.layers if labelling.name in layer.linkages]
    if not layers:
        return []
    if chosen is None:
        picks = sorted({0, len(layers) // 2, len(layers) - 1})
        return [layers[i] for i in picks]
    return [layer for layer in layers if layer.hook.layer in chosen]


def _layer_title(layer: LayerResult) -> str:
    component = f"{layer.hook.component} " if layer.hook.component else ""
    return f"{component}layer {layer.hook.layer}" if layer.hook.layer is not None else layer.hook.hook


def _caption(result: ClusterResult) -> str:
    subset = f" where {result.subset.where}" if result.subset.where else ""
    sample = (
        f"sample {len(result.sample)} of {len(result.subset)}, seed {result.settings.seed}"
        if result.sampled
        else f"{len(result.subset)} examples"
    )
    return f"run {result.run}{subset}, {result.pooling} pooling, {sample}"
