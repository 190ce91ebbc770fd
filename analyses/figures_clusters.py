"""Plots of a clustering analysis, after "Demystifying Representation Spaces of Multilingual and Multimodal
Aspects in Large Audio Language Models" (seeds/lalm-representation-spaces.txt):

- measures by layer, one line per label, original space solid and t-SNE dashed (Figures 4 and 13a-b),
- t-SNE maps per layer in a grid, coloured by a label (Figures 3, 8 and 10),
- dendrograms of a label's class centroids at chosen layers (Figure 13c).

The figures draw a :class:`ClusterMaps`, built from a fresh analysis (:func:`from_result`) or read back from the
store (analyses.report_clusters), so the CLI and the report draw the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from hookpoints.analyses.figures import integer_axis, safe, save, subplots
from matplotlib.figure import Figure

from hookpoints.errors import UserError

#: Up to this many classes a map gets a legend (distinct colours of tab20); above, classes are named at their
#: centroids on the map (colours repeat).
LEGEND_MAX_CLASSES = 20
MEASURE_TITLES = {"silhouette": "silhouette (higher: tighter clusters)", "davies_bouldin": "Davies-Bouldin (lower)"}


@dataclass
class MapLayer:
    """One layer's t-SNE map (``[sample, 2]``, row i = sample example i) and its centroid linkages by label."""

    hook: str
    component: str | None
    layer: int | None
    tsne: np.ndarray | None = None
    linkages: dict[str, np.ndarray] = field(default_factory=dict)  # label -> scipy linkage [classes - 1, 4]

    @property
    def title(self) -> str:
        component = f"{self.component} " if self.component else ""
        return f"{component}layer {self.layer}" if self.layer is not None else self.hook


@dataclass
class MapLabelling:
    """A label's classes and each sample example's class code (-1: no label)."""

    name: str
    classes: list[str]
    codes: np.ndarray  # [sample] int


@dataclass
class ClusterMaps:
    """What the clustering figures draw. ``rows``: clusters-table rows (component, layer, label, measure,
    space, value); ``caption``: names the run, subset, pooling and sample."""

    run: str
    caption: str
    rows: list[dict]
    labellings: list[MapLabelling]
    layers: list[MapLayer]
    linkage: str = "average"


def from_result(result) -> ClusterMaps:
    """The figures' view of an analyses.clusters.ClusterResult."""
    layers = [
        MapLayer(layer.hook.hook, layer.hook.component, layer.hook.layer, layer.tsne, dict(layer.linkages))
        for layer in result.layers
    ]
    labellings = [MapLabelling(lab.name, lab.classes, lab.codes[result.sample]) for lab in result.labellings]
    return ClusterMaps(result.run, caption(result), result.rows, labellings, layers, result.settings.linkage)


def as_maps(result) -> ClusterMaps:
    """``result`` as the figures' view: a ClusterMaps as it is, a ClusterResult through :func:`from_result`."""
    return result if isinstance(result, ClusterMaps) else from_result(result)


def _map_labelling(maps: ClusterMaps, labelling) -> MapLabelling:
    """The map labelling of ``labelling`` (a MapLabelling, a ClusterResult's Labelling, or a label name): its
    codes over the sample the maps hold, not over the whole subset."""
    name = labelling if isinstance(labelling, str) else labelling.name
    found = [m for m in maps.labellings if m.name == name]
    if not found:
        have = ", ".join(m.name for m in maps.labellings)
        raise UserError(f"label {name!r} was not clustered in run {maps.run}; its labels: {have}")
    return found[0]


def _map_layer(maps: ClusterMaps, layer) -> MapLayer:
    """The MapLayer of ``layer``: a MapLayer, a ClusterResult's LayerResult, or a layer number (its first hook)."""
    if isinstance(layer, int):
        found = [m for m in maps.layers if m.layer == layer]
        if not found:
            have = ", ".join(str(n) for n in sorted({m.layer for m in maps.layers}))
            raise UserError(f"layer {layer} was not clustered in run {maps.run}; its layers: {have}")
        return found[0]
    return {m.hook: m for m in maps.layers}[layer.hook if isinstance(layer, MapLayer) else layer.hook.hook]


def plot_all(result, folder: Path, *, dendrogram_layers: list[int] | None = None) -> list[Path]:
    """Every plot of ``result`` (a ClusterResult or ClusterMaps) into ``folder``; returns the files written."""
    maps = as_maps(result)
    stem = f"clusters-{safe(maps.run)}"
    paths = save(measures_figure(maps), folder, f"{stem}-measures")
    for labelling in maps.labellings:
        if any(layer.tsne is not None for layer in maps.layers):
            paths += save(tsne_figure(maps, labelling), folder, f"{stem}-tsne-{safe(labelling.name)}")
        layers = dendrogram_layers_of(maps, labelling.name, dendrogram_layers)
        if layers:
            figure = dendrogram_figure(maps, labelling, layers)
            paths += save(figure, folder, f"{stem}-dendrogram-{safe(labelling.name)}")
    return paths


def measures_figure(maps: ClusterMaps) -> Figure:
    """Silhouette and Davies-Bouldin against layer: a row per component, a line per label and space.

    ``maps``: a ClusterMaps, or the ClusterResult of :func:`hookpoints.analyses.clusters.cluster_layers`.

    >>> figure = measures_figure(cluster_layers(store, "r1", ClusterSettings(labels=("language",))))
    """
    maps = as_maps(maps)
    components = list(dict.fromkeys(layer.component for layer in maps.layers))
    shared = components_with_shared_layers(maps.layers)
    measures = list(MEASURE_TITLES)
    fig, axes = subplots(
        len(components), len(measures), figsize=(5.2 * len(measures), 3.4 * len(components)), squeeze=False
    )
    colours = matplotlib.colormaps.get_cmap("tab10")
    for row, component in enumerate(components):
        for col, measure in enumerate(measures):
            ax = axes[row][col]
            # one line per hook series of the component (blocks.*.attn, blocks.*.mlp) when a layer has several;
            # a hook point outside the layers (embeddings, a final norm) is its own point left of layer 0
            series: dict[str | None, list[dict]] = {}
            for r in maps.rows:
                if r["component"] == component and r["measure"] == measure:
                    outside = r["layer"] is None
                    key = series_name(r.get("hook"), r["layer"]) if component in shared or outside else None
                    series.setdefault(key, []).append({**r, "x": -1 if outside else r["layer"]})
            for number, (key, members) in enumerate(sorted(series.items(), key=lambda item: str(item[0]))):
                marker = SERIES_MARKERS[number % len(SERIES_MARKERS)]
                for index, labelling in enumerate(maps.labellings):
                    for space, style in (("original", "-"), ("tsne", "--")):
                        points = sorted(
                            (r["x"], r["value"])
                            for r in members
                            if r["label"] == labelling.name and r["space"] == space
                        )
                        if points:
                            xs, ys = zip(*points, strict=True)
                            name = f"{labelling.name} ({'t-SNE' if space == 'tsne' else 'original space'})"
                            name += f" {key}" if key else ""
                            ax.plot(xs, ys, style, marker=marker, ms=3.5, color=colours(index % 10), label=name)
            ax.set_title(f"{component or 'layers'}: {MEASURE_TITLES[measure]}", fontsize=10)
            ax.set_xlabel("layer")
            integer_axis(ax.xaxis)
            ax.grid(alpha=0.3)
            if measure == "silhouette":
                ax.axhline(0, color="grey", lw=0.8)
            values = [y for line in ax.get_lines() for y in line.get_ydata()]
            if values and min(values) > 0 and max(values) / min(values) > 20:
                ax.set_yscale("log")  # t-SNE maps can make one class pair's ratio dwarf the rest
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    labels = ", ".join(labelling.name for labelling in maps.labellings)
    fig.suptitle(f"clusters by {labels}; {maps.caption}", fontsize=10)
    fig.tight_layout()
    return fig


SERIES_MARKERS = ("o", "s", "^", "D", "v", "P")


def series_name(hook: str | None, layer: int | None) -> str | None:
    """The hook's name with its layer number as ``*`` (``blocks.3.mlp`` -> ``blocks.*.mlp``): its series."""
    if hook is None or layer is None:
        return hook
    parts = hook.split(".")
    last = max((i for i, part in enumerate(parts) if part == str(layer)), default=None)  # after any stack index
    return hook if last is None else ".".join(parts[:last] + ["*"] + parts[last + 1 :])


def components_with_shared_layers(layers: list[MapLayer]) -> set:
    """Components where one layer (or the outside of the layers) has several hook points (``--hooks`` chose
    more than one per layer)."""
    seen: dict[tuple, set[str]] = {}
    for layer in layers:
        seen.setdefault((layer.component, layer.layer), set()).add(layer.hook)
    return {component for (component, _), hooks in seen.items() if len(hooks) > 1}


def tsne_figure(maps: ClusterMaps, labelling: MapLabelling) -> Figure:
    """The t-SNE map of every layer in a grid, points coloured by ``labelling``'s classes.

    Up to LEGEND_MAX_CLASSES classes get distinct colours and a legend; more get their names written at
    their centroid on every map (colours repeat, names do not).

    ``maps``: a ClusterMaps or a ClusterResult; ``labelling``: one of its labellings, or a label name.

    >>> result = cluster_layers(store, "r1", ClusterSettings(labels=("language",)))
    >>> figure = tsne_figure(result, "language")
    """
    maps = as_maps(maps)
    labelling = _map_labelling(maps, labelling)
    layers = [layer for layer in maps.layers if layer.tsne is not None]
    if not layers:
        raise UserError(f"run {maps.run}'s clustering has no t-SNE maps (it was made with tsne=False / --no-tsne)")
    columns = min(4, len(layers))
    rows = -(-len(layers) // columns)
    fig, axes = subplots(rows, columns, figsize=(3.3 * columns, 3.1 * rows), squeeze=False)
    codes = labelling.codes
    many = len(labelling.classes) > LEGEND_MAX_CLASSES
    colours = matplotlib.colormaps.get_cmap("tab20" if len(labelling.classes) > 10 else "tab10")
    shared = components_with_shared_layers(maps.layers)
    for ax, layer in zip(axes.flat, layers, strict=False):
        ax.scatter(*layer.tsne[codes < 0].T, s=6, c="lightgrey", label="(no label)")
        for code, name in enumerate(labelling.classes):
            mine = codes == code
            ax.scatter(*layer.tsne[mine].T, s=9, color=colours(code % colours.N), label=name, alpha=0.85)
            if many and mine.any():
                centre = np.median(layer.tsne[mine], axis=0)
                ax.annotate(name, centre, fontsize=6, ha="center", va="center", alpha=0.9)
        ax.set_title(layer.hook if layer.component in shared else layer.title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    if not many:
        handles, names = axes.flat[0].get_legend_handles_labels()
        shown = [(h, n) for h, n in zip(handles, names, strict=True) if n != "(no label)" or (codes < 0).any()]
        fig.legend(
            *zip(*shown, strict=True), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title=labelling.name
        )
    named = "classes named at their centroids" if many else "legend"
    fig.suptitle(
        f"t-SNE per layer, coloured by {labelling.name} ({len(labelling.classes)} classes, {named})\n{maps.caption}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def dendrogram_figure(maps: ClusterMaps, labelling: MapLabelling, layers: list[MapLayer]) -> Figure:
    """Hierarchical clustering of ``labelling``'s class centroids at each of ``layers``.

    ``maps``: a ClusterMaps or a ClusterResult; ``labelling``: one of its labellings or a label name;
    ``layers``: its layers (MapLayer or the result's LayerResult), or layer numbers.

    >>> figure = dendrogram_figure(result, "language", [0, 1])
    """
    maps = as_maps(maps)
    labelling = _map_labelling(maps, labelling)
    layers = [_map_layer(maps, layer) for layer in layers]
    if not layers or any(labelling.name not in layer.linkages for layer in layers):
        raise UserError(f"no dendrogram of {labelling.name!r} at these layers (labels of at most 100 classes have one)")
    from scipy.cluster.hierarchy import dendrogram

    height = max(2.8, 0.22 * len(labelling.classes))
    fig, axes = subplots(1, len(layers), figsize=(4.2 * len(layers), height), squeeze=False)
    # one distance scale for every layer: the trees are compared side by side (scipy sets each axis to its own)
    reach = max((float(layer.linkages[labelling.name][:, 2].max(initial=0.0)) for layer in layers), default=0.0)
    shared = components_with_shared_layers(maps.layers)
    for ax, layer in zip(axes[0], layers, strict=True):
        tree = layer.linkages[labelling.name]
        dendrogram(tree, labels=labelling.classes, orientation="left", ax=ax, leaf_font_size=8, color_threshold=0)
        ax.set_xlim(1.05 * reach or 1.0, 0)
        ax.set_title(layer.hook if layer.component in shared else layer.title, fontsize=9)
        ax.set_xlabel("Euclidean distance between centroids")
    fig.suptitle(
        f"{maps.linkage}-linkage clustering of {labelling.name} centroids ({len(labelling.classes)} classes)\n"
        f"{maps.caption}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def dendrogram_layers_of(maps: ClusterMaps, label: str, chosen: list[int] | None) -> list[MapLayer]:
    """The layers to draw dendrograms of: ``chosen`` layer numbers, or the first, middle and last."""
    layers = [layer for layer in maps.layers if label in layer.linkages]
    if not layers:
        return []
    if chosen is None:
        picks = sorted({0, len(layers) // 2, len(layers) - 1})
        return [layers[i] for i in picks]
    return [layer for layer in layers if layer.layer in chosen]


def caption(result) -> str:
    """Run, subset, pooling and sample of a ClusterResult, for titles."""
    subset = f" where {result.subset.where}" if result.subset.where else ""
    sample = (
        f"sample {len(result.sample)} of {len(result.subset)}, seed {result.settings.seed}"
        if result.sampled
        else f"{len(result.subset)} examples"
    )
    return f"run {result.run}{subset}, {result.pooling} pooling, {sample}"
