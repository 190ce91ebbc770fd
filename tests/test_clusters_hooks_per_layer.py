"""Clustering several hook points per layer (``--hooks 'blocks.*.attn' --hooks 'blocks.*.mlp'``): each hook
point keeps its own line in the measures figure and its own row in the CLI and report tables (they were merged
by layer: one zigzag line through both hooks' values, two rows without a hook name, and a report table keeping
one hook's value)."""

from __future__ import annotations

import numpy as np
from clusters_helpers import hook_row, write_run
from hookpoints.analyses.clusters import ClusterSettings, cluster_layers, write_clusters
from hookpoints.analyses.figures_clusters import from_result, measures_figure
from hookpoints.analyses.report_clusters import _measure_table, analyses_of, load_maps
from hookpoints.cli.clusters_cmd import summary_rows
from sklearn.metrics import silhouette_score


def two_hooks_per_layer(store, layers: int = 3) -> tuple[list[str], dict[str, np.ndarray], list[str]]:
    rng = np.random.default_rng(4)
    n = 30
    languages = ["de", "en", "ja"] * (n // 3)
    examples = [{"example_id": f"e{i:03d}", "language": languages[i]} for i in range(n)]
    hooks, vectors = [], {}
    for layer in range(layers):
        for sub, spread in (("attn", 0.5), ("mlp", 3.0)):  # attn clusters by language far better than mlp
            name = f"blocks.{layer}.{sub}"
            hooks.append({**hook_row(layer, 6, name=name, layer_output=False), "submodule": sub})
            centres = rng.normal(size=(3, 6)) * 2
            vectors[name] = centres[np.arange(n) % 3] + spread * rng.normal(size=(n, 6))
    write_run(store, "r", examples, vectors, hooks=hooks)
    return languages, vectors, [e["example_id"] for e in examples]


def expected_silhouettes(vectors, languages, ids) -> dict[str, float]:
    order = np.argsort(ids)
    labels = np.array(languages)[order]
    return {
        hook: silhouette_score(x[order].astype(np.float32).astype(np.float64), labels) for hook, x in vectors.items()
    }


def test_each_hook_of_a_layer_keeps_its_line_and_its_row(store):
    languages, vectors, ids = two_hooks_per_layer(store)
    expected = expected_silhouettes(vectors, languages, ids)
    result = cluster_layers(store, "r", ClusterSettings(labels=("language",), hooks=("blocks.*",), tsne=False))

    # CLI table: one row per hook, named
    rows = summary_rows(result)
    assert len(rows) == 6
    for row in rows:
        assert row["silhouette"] == round(expected[row["hook"]], 3)

    # figure: one line per hook series, each through its own hook's values in layer order
    fig = measures_figure(from_result(result))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if "language" in line.get_label()}
    assert len(lines) == 2
    for sub in ("attn", "mlp"):
        (line,) = [line for label, line in lines.items() if f"blocks.*.{sub}" in label]
        assert list(line.get_xdata()) == [0, 1, 2]
        np.testing.assert_allclose(line.get_ydata(), [expected[f"blocks.{i}.{sub}"] for i in range(3)], rtol=1e-9)

    # report table, from the stored rows: every hook's value, none overwritten by another's
    write_clusters(store, result)
    with store.query() as session:
        (info,) = analyses_of(session, None)
        table = _measure_table(load_maps(session, info))
    assert len(table) == 6
    for entry in table:
        assert entry["silhouette (original)"] == round(expected[entry["hook"]], 3)


def test_one_hook_per_layer_keeps_the_plain_tables_and_lines(store):
    from clusters_helpers import clustered
    from clusters_helpers import write_run as write

    examples, vectors = clustered()
    write(store, "one", examples, vectors)
    result = cluster_layers(store, "one", ClusterSettings(labels=("language",), tsne=False))
    assert all("hook" not in row for row in summary_rows(result))
    fig = measures_figure(from_result(result))
    assert [line.get_label() for line in fig.axes[0].get_lines() if "language" in line.get_label()] == [
        "language (original space)"
    ]


def test_figures_take_the_result_cluster_layers_returns(store):
    """``hp.measures_figure(result)``, as cluster_layers' docstring shows, raised AttributeError ('LayerResult' has
    no 'component'): the figures took only the ClusterMaps view. They take the result, its labellings (codes over
    the sampled examples the maps hold, not the whole subset) and layers, or names."""
    from clusters_helpers import clustered
    from clusters_helpers import write_run as write

    import hookpoints as hp

    examples, vectors = clustered(n_meanings=12)
    write(store, "one", examples, vectors)
    settings = hp.ClusterSettings(labels=("language",), sample=20, perplexity=4.0)  # a sample of the 36 examples
    result = hp.cluster_layers(store, "one", settings)
    maps = from_result(result)
    expected = [list(line.get_ydata()) for line in measures_figure(maps).axes[0].get_lines()]
    assert [list(line.get_ydata()) for line in hp.measures_figure(result).axes[0].get_lines()] == expected
    for labelling in (result.labellings[0], "language"):
        figure = hp.tsne_figure(result, labelling)
        points = sum(len(c.get_offsets()) for c in figure.axes[0].collections)
        assert points == len(result.sample) == 20
    figure = hp.dendrogram_figure(result, result.labellings[0], result.layers[-1:])
    assert figure.axes[0].get_title().endswith(f"layer {result.layers[-1].hook.layer}")
    assert hp.dendrogram_figure(result, "language", [0, 2]).axes[1].get_title().endswith("layer 2")


def test_hook_points_outside_the_layers_sit_left_of_layer_0_not_at_a_row_index(store):
    """A hook point without a layer (an embedding) was drawn at x = its row's index in the result rows (e.g. 9)."""
    rng = np.random.default_rng(5)
    n = 24
    examples = [{"example_id": f"e{i:03d}", "language": ["de", "en", "ja"][i % 3]} for i in range(n)]
    hooks = [{**hook_row(0, 4, name="embed", layer_output=False), "layer": None, "submodule": "embed"}]
    hooks += [hook_row(layer, 4) for layer in range(2)]
    vectors = {h["hook"]: rng.normal(size=(n, 4)) for h in hooks}
    write_run(store, "r", examples, vectors, hooks=hooks)
    result = cluster_layers(store, "r", ClusterSettings(labels=("language",), hooks=("*",), tsne=False))
    lines = [line for line in measures_figure(result).axes[0].get_lines() if "language" in line.get_label()]
    xs = sorted(x for line in lines for x in line.get_xdata())
    assert xs == [-1, 0, 1]
