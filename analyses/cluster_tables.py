"""The t-SNE maps and dendrogram linkages of a clustering analysis, stored next to its ``clusters`` rows, so a
report redraws the figures of seeds/lalm-representation-spaces.txt ("Representation spaces of large audio
language models", Figures 3, 8, 10 and 13c) from the store instead of recomputing them (docs/store.md).

- ``cluster_maps``: one row per (analysis, hook, example of the seeded sample): the 2-D t-SNE coordinates.
  The example's labels are in the ``examples`` table (join on ``run, example_id``).
- ``cluster_linkages``: one row per (analysis, hook, label): the class names in centroid order and the scipy
  linkage matrix ``[classes - 1, 4]`` flattened row by row (``Z.reshape(-1)``).

Example::

    z = np.array(row["linkage"]).reshape(-1, 4)   # scipy.cluster.hierarchy.dendrogram(z, labels=row["classes"])
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hookpoints.store.schema import TableSpec

MAP_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("analysis", pa.string()),  # the clusters table's analysis id
        ("component", pa.string()),
        ("layer", pa.int32()),
        ("hook", pa.string()),
        ("example_id", pa.string()),
        ("x", pa.float64()),
        ("y", pa.float64()),
    ]
)
LINKAGE_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("analysis", pa.string()),
        ("component", pa.string()),
        ("layer", pa.int32()),
        ("hook", pa.string()),
        ("label", pa.string()),
        ("method", pa.string()),  # scipy linkage method (average, ward, ...)
        ("classes", pa.list_(pa.string())),  # leaf i of the linkage = classes[i]
        ("linkage", pa.list_(pa.float64())),  # [classes - 1, 4] row-major: left, right, distance, size
    ]
)
MAPS_TABLE = TableSpec("cluster_maps", MAP_SCHEMA, ("run",))
LINKAGES_TABLE = TableSpec("cluster_linkages", LINKAGE_SCHEMA, ("run",))


def map_rows(result) -> pa.Table:
    """The t-SNE coordinates of every layer of ``result`` (an analyses.clusters.ClusterResult)."""
    every = result.subset.example_ids  # a property that converts the column: once
    ids = [every[row] for row in result.sample]
    columns: dict[str, list] = {name: [] for name in MAP_SCHEMA.names}
    for layer in result.layers:
        if layer.tsne is None:
            continue
        n = len(layer.tsne)  # [sample, 2]
        columns["run"] += [result.run] * n
        columns["analysis"] += [result.analysis] * n
        columns["component"] += [layer.hook.component] * n
        columns["layer"] += [layer.hook.layer] * n
        columns["hook"] += [layer.hook.hook] * n
        columns["example_id"] += ids
        columns["x"] += layer.tsne[:, 0].tolist()
        columns["y"] += layer.tsne[:, 1].tolist()
    return pa.table(columns, schema=MAP_SCHEMA)


def linkage_rows(result) -> pa.Table:
    """The centroid linkages of every layer and label of ``result``."""
    classes = {labelling.name: labelling.classes for labelling in result.labellings}
    rows = [
        {
            "run": result.run,
            "analysis": result.analysis,
            "component": layer.hook.component,
            "layer": layer.hook.layer,
            "hook": layer.hook.hook,
            "label": label,
            "method": result.settings.linkage,
            "classes": classes[label],
            "linkage": np.asarray(tree, np.float64).reshape(-1).tolist(),
        }
        for layer in result.layers
        for label, tree in layer.linkages.items()
    ]
    return pa.Table.from_pylist(rows, schema=LINKAGE_SCHEMA)


def write_maps(store, result) -> None:
    """Append ``result``'s t-SNE maps and linkages (before its ``clusters`` rows: a reader that finds the
    analysis in ``clusters`` finds its maps too)."""
    maps = map_rows(result)
    if maps.num_rows:
        store.append(MAPS_TABLE, maps)
    linkages = linkage_rows(result)
    if linkages.num_rows:
        store.append(LINKAGES_TABLE, linkages)
