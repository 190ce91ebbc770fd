"""The report's representation-space sections, after "Demystifying Representation Spaces of Multilingual
and Multimodal Aspects in Large Audio Language Models" (seeds/lalm-representation-spaces.txt): for each
clustering analysis in the store, silhouette and Davies-Bouldin against layer (Figures 4 and 13a-b), the
t-SNE grids (Figures 3, 8, 10), centroid dendrograms (Figure 13c) and the distance tables between chosen
examples (Tables 1-2).

The maps and linkages are read back from ``cluster_maps`` and ``cluster_linkages`` (analyses.cluster_tables)
and redrawn; nothing is recomputed.
"""

from __future__ import annotations

import numpy as np
from hookpoints.analyses.figures import png_bytes
from hookpoints.analyses.figures_clusters import (
    ClusterMaps,
    MapLabelling,
    MapLayer,
    components_with_shared_layers,
    dendrogram_figure,
    dendrogram_layers_of,
    measures_figure,
    tsne_figure,
)
from hookpoints.analyses.labels import quote_name
from hookpoints.analyses.report_html import Section, absent, image, paragraph, table
from hookpoints.analyses.report_runs import literals
from hookpoints.store.query import QuerySession

from hookpoints.errors import UserError


def analyses_of(session: QuerySession, runs: list[str] | None) -> list[dict]:
    """One row per clustering analysis (oldest first), with its settings."""
    if "clusters" not in session.store.table_names():
        return []
    rows = session.sql(
        """SELECT run, analysis, any_value(pooling) AS pooling, any_value(subset) AS subset,
                  any_value(n_subset) AS n_subset, any_value(sample_size) AS sample_size, any_value(seed) AS seed,
                  max(n_examples) FILTER (WHERE measure = 'silhouette') AS sampled,
                  list(DISTINCT label ORDER BY label) FILTER (WHERE label IS NOT NULL) AS labels,
                  min(computed_at) AS computed_at
           FROM clusters GROUP BY run, analysis ORDER BY computed_at"""
    ).to_pylist()
    return [r for r in rows if runs is None or r["run"] in runs]


def load_maps(session: QuerySession, info: dict) -> ClusterMaps:
    """The figures' view of one stored analysis: its rows, t-SNE maps (with the examples' labels) and linkages."""
    run, analysis = info["run"], info["analysis"]
    where = f"run IN ({literals([run])}) AND analysis = $analysis"
    rows = session.sql(
        f"SELECT component, layer, hook, label, measure, space, a, b, value FROM clusters WHERE {where}",
        {"analysis": analysis},
    ).to_pylist()
    hooks = {}
    for row in rows:
        hooks.setdefault(row["hook"], (row["component"], row["layer"]))
    layers = {hook: MapLayer(hook, component, layer) for hook, (component, layer) in hooks.items()}
    labels = info["labels"] or []
    linkages = _linkages(session, where, analysis, layers)
    codes_by_label = {label: None for label in labels}
    classes_by_label = {label: linkages.get(label) for label in labels}
    tables = session.store.table_names()
    if "cluster_maps" in tables:
        columns = ", ".join(f"e.{quote_name(label)}::VARCHAR AS {quote_name(label)}" for label in labels)
        maps = session.sql(
            f"""SELECT m.hook, m.example_id, m.x, m.y{", " + columns if columns else ""}
                FROM cluster_maps m JOIN examples e ON e.run = m.run AND e.example_id = m.example_id
                WHERE m.run IN ({literals([run])}) AND m.analysis = $analysis
                ORDER BY m.hook, m.example_id""",
            {"analysis": analysis},
        )
        ids = None
        for hook in dict.fromkeys(maps["hook"].to_pylist()):
            part = maps.filter(maps["hook"].to_numpy(zero_copy_only=False) == hook)
            mine = part["example_id"].to_pylist()
            if ids is not None and mine != ids:
                raise UserError(
                    f"the stored t-SNE maps of analysis {analysis} cover different examples at {hook}: the store "
                    "is inconsistent; run hookpoints clusters again"
                )
            ids = mine
            if hook in layers:
                layers[hook].tsne = np.column_stack([part["x"].to_numpy(), part["y"].to_numpy()])  # [sample, 2]
            for label in labels:
                if codes_by_label[label] is None:
                    values = part[label].to_pylist()
                    classes = classes_by_label[label] or sorted({v for v in values if v is not None})
                    classes_by_label[label] = classes
                    lookup = {c: i for i, c in enumerate(classes)}
                    codes_by_label[label] = np.array([lookup.get(v, -1) for v in values], np.int64)
    labellings = [
        MapLabelling(
            label,
            classes_by_label[label] or [],
            codes_by_label[label] if codes_by_label[label] is not None else np.zeros(0, np.int64),
        )
        for label in labels
    ]
    method = (
        session.sql(f"SELECT any_value(method) AS m FROM cluster_linkages WHERE {where}", {"analysis": analysis})["m"][
            0
        ].as_py()
        if "cluster_linkages" in tables
        else None
    )
    return ClusterMaps(run, caption(info), rows, labellings, list(layers.values()), method or "average")


def _linkages(session: QuerySession, where: str, analysis: str, layers: dict[str, MapLayer]) -> dict[str, list]:
    """Fill each layer's linkages; returns label -> class names in centroid order."""
    if "cluster_linkages" not in session.store.table_names():
        return {}
    classes = {}
    rows = session.sql(
        f"SELECT hook, label, classes, linkage FROM cluster_linkages WHERE {where}", {"analysis": analysis}
    ).to_pylist()
    for row in rows:
        if row["hook"] in layers:
            layers[row["hook"]].linkages[row["label"]] = np.array(row["linkage"], np.float64).reshape(-1, 4)
            classes[row["label"]] = row["classes"]
    return classes


def caption(info: dict) -> str:
    subset = f" where {info['subset']}" if info["subset"] else ""
    if info["sampled"] is not None and info["sampled"] < info["n_subset"]:
        sample = f"sample {info['sampled']} of {info['n_subset']}, seed {info['seed']}"
    else:
        sample = f"{info['n_subset']} examples"
    return f"run {info['run']}{subset}, {info['pooling']} pooling, {sample}"


def add_analysis(section: Section, session: QuerySession, info: dict) -> None:
    """Every figure and table of one stored clustering analysis."""
    maps = load_maps(session, info)
    labels = ", ".join(info["labels"] or [])
    again = f"hookpoints clusters --store {session.store.location.uri} --run {maps.run}"
    section.add(
        paragraph(
            f"Analysis {info['analysis']}: {maps.caption}; labels {labels}; "
            f"computed {info['computed_at']:%Y-%m-%d %H:%M}."
        )
    )
    measures = section.section("Silhouette and Davies-Bouldin by layer (Figures 4 and 13)")
    measures.add(image(png_bytes(measures_figure(maps)), f"clusters of run {maps.run} by {labels}"))
    measures.add(table(_measure_table(maps)))
    tsne = section.section("t-SNE maps per layer (Figures 3, 8 and 10)")
    if any(layer.tsne is not None for layer in maps.layers):
        for labelling in maps.labellings:
            tsne.add(image(png_bytes(tsne_figure(maps, labelling)), f"t-SNE of run {maps.run} by {labelling.name}"))
    else:
        tsne.add(
            absent(
                f"t-SNE maps for analysis {info['analysis']} (run with --no-tsne, or before maps were stored)",
                f"{again} --label {' --label '.join(info['labels'] or ['L'])}",
            )
        )
    trees = section.section("Dendrograms of class centroids (Figure 13c)")
    drawn = False
    for labelling in maps.labellings:
        layers = dendrogram_layers_of(maps, labelling.name, None)
        if layers and labelling.classes:
            trees.add(
                image(
                    png_bytes(dendrogram_figure(maps, labelling, layers)),
                    f"{maps.linkage}-linkage dendrogram of {labelling.name}",
                )
            )
            drawn = True
    if not drawn:
        trees.add(
            paragraph(
                "No linkages stored for this analysis (labels with over 100 classes, or an analysis "
                "stored before linkages were kept)."
            )
        )
    distances = section.section("Distances between chosen examples (Tables 1-2)")
    tables_ = _distance_tables(maps)
    if tables_:
        for title, rows in tables_:
            distances.add(table(rows, caption=title))
    else:
        distances.add(
            absent(
                "example distance table for this analysis",
                f"{again} --label L --examples ID,ID,...",
            )
        )


def _measure_table(maps: ClusterMaps) -> list[dict]:
    """Silhouette and Davies-Bouldin per layer and label; per hook too where a layer has several hook points."""
    named = bool(components_with_shared_layers(maps.layers))
    values: dict[tuple, dict] = {}
    for r in maps.rows:
        if r["a"] is not None or r["measure"] not in ("silhouette", "davies_bouldin"):
            continue
        hook = {"hook": r["hook"]} if named else {}
        entry = values.setdefault(
            (r["component"] or "", r["layer"] if r["layer"] is not None else -1, r["hook"], r["label"]),
            {"component": r["component"], "layer": r["layer"], **hook, "label": r["label"]},
        )
        entry[f"{r['measure']} ({r['space']})"] = round(r["value"], 3)
    return [values[key] for key in sorted(values)]


def _distance_tables(maps: ClusterMaps) -> list[tuple[str, list[dict]]]:
    """Example-by-example Euclidean distances at the first and last layer."""
    rows = [r for r in maps.rows if r["measure"] == "distance"]
    hooks = list(dict.fromkeys(layer.hook for layer in maps.layers if any(r["hook"] == layer.hook for r in rows)))
    out = []
    for hook in hooks[:1] + hooks[-1:] if len(hooks) > 1 else hooks:
        mine = [r for r in rows if r["hook"] == hook]
        ids = list(dict.fromkeys([r["a"] for r in mine] + [r["b"] for r in mine]))
        matrix = {(r["a"], r["b"]): r["value"] for r in mine} | {(r["b"], r["a"]): r["value"] for r in mine}
        out.append(
            (
                f"Euclidean distances at {hook}",
                [{"": a, **{b: ("" if a == b else round(matrix[a, b], 3)) for b in ids}} for a in ids],
            )
        )
    return out
