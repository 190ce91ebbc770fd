"""``hookpoints clusters``: how a run's examples cluster by a label, layer by layer (docs/clusters.md)."""

from __future__ import annotations

from pathlib import Path

import click
from hookpoints.cli.console import counting, err, out, render

from hookpoints.settings import VECTOR_POOLINGS

SHOWN = [  # (measure, space, column title) per label in the summary table
    ("silhouette", "original", "silhouette"),
    ("silhouette", "tsne", "sil. t-SNE"),
    ("davies_bouldin", "original", "DB"),
    ("davies_bouldin", "tsne", "DB t-SNE"),
]


@click.command("clusters")
@click.option("--store", "store_path", required=True, help="Store folder or s3:// URI.")
@click.option("--run", required=True, help="The run to analyse.")
@click.option("--label", "labels", multiple=True, required=True, metavar="COL", help="Examples column (repeatable).")
@click.option("--where", default="", metavar="PRED", help="SQL predicate over the examples table.")
@click.option(
    "--pooling",
    type=click.Choice(VECTOR_POOLINGS),
    help="Default: last if the run kept every position (pooling none), else the run's own pooling.",
)
@click.option(
    "--hooks", "patterns", multiple=True, metavar="GLOB", help="Hook points to compare (default: layer outputs)."
)
@click.option("--sample", type=int, default=2000, show_default=True, help="Seeded sample for silhouette and t-SNE.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tsne/--no-tsne", default=True, show_default=True, help="Also measure on each layer's 2-D t-SNE map.")
@click.option("--perplexity", type=float, default=30.0, show_default=True, help="t-SNE perplexity.")
@click.option("--tsne-threads", type=int, default=1, show_default=True, help="OpenMP threads for t-SNE (0: all).")
@click.option("--examples", "example_ids", default="", metavar="ID,ID,...", help="Examples to tabulate distances of.")
@click.option(
    "--linkage",
    type=click.Choice(["average", "complete", "single", "ward", "centroid", "median", "weighted"]),
    default="average",
    show_default=True,
    help="Linkage of the centroid dendrograms.",
)
@click.option(
    "--dendrogram-layers", default="", metavar="L,L,...", help="Layers to draw (default: first, middle, last)."
)
@click.option(
    "--plots", "plots_dir", type=click.Path(file_okay=False), help="Plot folder (default: next to the store)."
)
@click.option("--no-plots", is_flag=True, help="Skip the plots.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def command(
    store_path,
    run,
    labels,
    where,
    pooling,
    patterns,
    sample,
    seed,
    tsne,
    perplexity,
    tsne_threads,
    example_ids,
    linkage,
    dendrogram_layers,
    plots_dir,
    no_plots,
    fmt,
) -> None:
    """Silhouette, Davies-Bouldin, distances and t-SNE maps of --run's examples by --label, per layer.

    Results are appended to the store's `clusters` table (query it with `hookpoints sql`).
    """
    from hookpoints.analyses.clusters import ClusterSettings
    from hookpoints.cli.ap_cmd import check_plots_dir
    from hookpoints.store.catalog import Store

    from hookpoints.errors import UserError

    if plots_dir and no_plots:
        raise UserError("give --plots DIR or --no-plots, not both")
    if tsne_threads < 0:
        raise UserError(f"--tsne-threads must be 0 (all cores) or more, not {tsne_threads}")
    settings = ClusterSettings(
        labels=tuple(labels),
        where=where,
        pooling=pooling,
        hooks=tuple(patterns),
        sample=sample,
        seed=seed,
        tsne=tsne,
        perplexity=perplexity,
        tsne_threads=tsne_threads or None,
        examples=_id_list(example_ids),
        linkage=linkage,
    )
    store = Store.open(store_path)
    folder = None if no_plots else Path(plots_dir) if plots_dir else default_plot_folder(store)
    check_plots_dir(folder)  # a folder that cannot be written fails now, not after the analysis is stored
    layers = _layer_list(dendrogram_layers)
    if layers is not None:
        _check_layers(store, run, list(patterns), layers)  # before minutes of t-SNE, not after
    analyse(store, run, settings, folder, fmt=fmt, dendrogram_layers=layers)


def analyse(store, run: str, settings, folder: Path | None, *, fmt: str = "table", dendrogram_layers=None):
    """Compute, store, print and plot one clustering analysis; returns its result."""
    from hookpoints.analyses.clusters import cluster_layers, write_clusters

    with counting(f"clustering {run}") as (on_start, advance):  # the bar shows once the input passed its checks
        result = cluster_layers(store, run, settings, on_start=on_start, on_layer=lambda hook: advance(1))
    write_clusters(store, result)
    show(store, result, folder, fmt=fmt, dendrogram_layers=dendrogram_layers)
    return result


def show(store, result, folder: Path | None, *, fmt: str = "table", dendrogram_layers=None) -> None:
    """Print a clustering result (tables or JSON) and save its plots into ``folder``."""
    note = err if fmt == "json" else out
    note.print(_scope(result), highlight=False)
    if fmt == "json":
        render(result.table(), "json")
    else:
        render(summary_rows(result), title=f"clusters of run {result.run} by {', '.join(result.settings.labels)}")
        for layer in _first_and_last(result.layers):
            if layer.example_distances is not None:
                render(_distance_table(result, layer), title=f"Euclidean distances at {layer.hook.hook}")
    if folder is not None:
        from hookpoints.analyses.figures_clusters import plot_all

        paths = plot_all(result, folder, dendrogram_layers=dendrogram_layers)
        note.print(f"plots ({len(paths)} files, PNG and SVG) in [bold]{folder}[/bold]:", highlight=False)
        for path in paths:
            if path.suffix == ".png":
                note.print(f"  {path}", highlight=False)
    note.print(f"[dim]stored as analysis {result.analysis} in the clusters table of {store.location.uri}[/dim]")


def summary_rows(result) -> list[dict]:
    """One row per layer and label: silhouette and Davies-Bouldin per space, and mean distances."""
    values = {
        (row["hook"], row["label"], row["measure"], row["space"]): row["value"]
        for row in result.rows
        if row["a"] is None
    }
    several = len({layer.hook.component for layer in result.layers}) > 1
    per_layer: dict[tuple, int] = {}  # several hook points of one layer (--hooks): each row names its hook
    for layer in result.layers:
        key = (layer.hook.component, layer.hook.layer)
        per_layer[key] = per_layer.get(key, 0) + 1
    named = any(count > 1 for count in per_layer.values())
    rows = []
    for layer in result.layers:
        for labelling in result.labellings:
            row = {"component": layer.hook.component} if several else {}
            row.update({"layer": layer.hook.layer, **({"hook": layer.hook.hook} if named else {})})
            row["label"] = labelling.name
            for measure, space, title in SHOWN:
                value = values.get((layer.hook.hook, labelling.name, measure, space))
                if value is not None:
                    row[title] = round(value, 3)
            for measure, title in (("within_distance", "within"), ("between_distance", "between")):
                row[title] = float(f"{values[(layer.hook.hook, labelling.name, measure, 'original')]:.4g}")
            rows.append(row)
    return rows


def default_plot_folder(store) -> Path:
    """Next to a local store (``STORE-plots``); under the working folder for an s3:// store."""
    if store.location.is_local:
        root = Path(store.location.uri)
        return root.parent / f"{root.name}-plots"
    return Path.cwd() / "hookpoints-plots"


def _scope(result) -> str:
    where = f" where {result.subset.where}" if result.subset.where else ""
    n = len(result.subset)
    if result.sampled:
        sample = (
            f"silhouette and t-SNE on a seeded sample of {len(result.sample):,} of the {n:,} examples "
            f"(--sample {result.settings.sample}, --seed {result.settings.seed}); Davies-Bouldin and centroids on all"
        )
    else:
        sample = f"every measure on all {n:,} examples"
    return f"run {result.run}{where}: {len(result.layers)} layers, {result.pooling} pooling; {sample}"


def _distance_table(result, layer) -> list[dict]:
    ids = [result.subset.example_ids[row] for row in result.example_rows]
    matrix = layer.example_distances
    return [
        {"": a, **{b: ("" if i == j else round(float(matrix[i, j]), 3)) for j, b in enumerate(ids)}}
        for i, a in enumerate(ids)
    ]


def _first_and_last(layers: list) -> list:
    return layers[:1] + layers[-1:] if len(layers) > 1 else layers


def _id_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _check_layers(store, run: str, patterns: list[str], layers: list[int]) -> None:
    """Every --dendrogram-layers number is a layer of the hook points compared, or a one-line UserError."""
    from hookpoints.analyses.layers import layer_hooks

    from hookpoints.errors import UserError

    with store.query() as session:
        known = sorted({h.layer for h in layer_hooks(session, run, patterns or None) if h.layer is not None})
    missing = [layer for layer in layers if layer not in known]
    if missing:
        raise UserError(
            f"--dendrogram-layers {missing[0]} is not a layer of the hook points compared; they have layers "
            f"{', '.join(map(str, known)) or 'none'}"
        )


def _layer_list(text: str) -> list[int] | None:
    from hookpoints.errors import UserError

    if not text.strip():
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--dendrogram-layers takes layer numbers separated by commas (0,3,5), not {text!r}") from None
