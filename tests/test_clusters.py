"""Clustering over runs in a store: per-layer reads, pooling derived from every-position runs, sampling, the
clusters table, and a clear error for each kind of bad input (with the store left as it was)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from clusters_helpers import clustered, hook_row, write_run
from hookpoints.analyses.clusters import CLUSTERS_TABLE, ClusterSettings, cluster_layers, write_clusters
from hookpoints.analyses.layers import layer_hooks, read_layer, run_settings
from hookpoints.analyses.subsets import select_subset
from sklearn.metrics import davies_bouldin_score, silhouette_score

from hookpoints.errors import UserError


def value(result, hook, label, measure, space="original"):
    (row,) = [
        r
        for r in result.rows
        if r["hook"] == hook and r["label"] == label and r["measure"] == measure and r["space"] == space
    ]
    return row


@pytest.fixture
def synthetic(store):
    examples, vectors = clustered()
    write_run(store, "syn", examples, vectors)
    return store, examples, vectors


def test_measures_per_layer_equal_sklearn_on_the_recorded_vectors(synthetic):
    store, examples, vectors = synthetic
    result = cluster_layers(store, "syn", ClusterSettings(labels=("language", "semantic_id"), perplexity=5))
    language = np.array([e["language"] for e in examples])
    meaning = np.array([e["semantic_id"] for e in examples])
    assert [layer.hook.hook for layer in result.layers] == list(vectors)
    for hook, matrix in vectors.items():
        x = matrix.astype(np.float32).astype(np.float64)  # as stored
        for label, classes in (("language", language), ("semantic_id", meaning)):
            sil = value(result, hook, label, "silhouette")
            assert sil["value"] == pytest.approx(silhouette_score(x, classes), abs=1e-6)
            assert sil["n_examples"] == len(examples)
            db = value(result, hook, label, "davies_bouldin")["value"]
            assert db == pytest.approx(davies_bouldin_score(x, classes), rel=1e-6)
            layer = next(layer for layer in result.layers if layer.hook.hook == hook)
            on_map = value(result, hook, label, "silhouette", "tsne")
            assert on_map["value"] == pytest.approx(silhouette_score(layer.tsne, classes), abs=1e-9)
            assert on_map["perplexity"] == 5
    # the synthetic layers move from language clusters (layer 0) to meaning clusters (layer 2)
    first, last = list(vectors)[0], list(vectors)[-1]
    assert (
        value(result, first, "language", "silhouette")["value"] > value(result, last, "language", "silhouette")["value"]
    )
    assert value(result, last, "semantic_id", "silhouette")["value"] > 0.3


def test_centroid_and_example_distances(synthetic):
    store, examples, vectors = synthetic
    chosen = ("s00-l0", "s00-l1", "s03-l2")
    settings = ClusterSettings(labels=("language",), tsne=False, examples=chosen)
    result = cluster_layers(store, "syn", settings)
    hook = "blocks.1.hook_resid_post"
    x = {e["example_id"]: v.astype(np.float32).astype(np.float64) for e, v in zip(examples, vectors[hook], strict=True)}
    rows = [r for r in result.rows if r["hook"] == hook and r["measure"] == "distance"]
    assert {(r["a"], r["b"]) for r in rows} == {(chosen[0], chosen[1]), (chosen[0], chosen[2]), (chosen[1], chosen[2])}
    for row in rows:
        assert row["value"] == pytest.approx(np.linalg.norm(x[row["a"]] - x[row["b"]]), rel=1e-9)
    centroid = {g: np.mean([v for k, v in x.items() if k.endswith(g)], axis=0) for g in ("l0", "l1", "l2")}
    pairs = [r for r in result.rows if r["hook"] == hook and r["measure"] == "centroid_distance"]
    assert len(pairs) == 3
    for row in pairs:
        assert row["value"] == pytest.approx(np.linalg.norm(centroid[row["a"]] - centroid[row["b"]]), rel=1e-7)
    assert set(result.layers[0].linkages) == {"language"} and result.layers[0].linkages["language"].shape == (2, 4)


def test_where_picks_the_subset_and_results_land_in_the_clusters_table(synthetic, run_cli):
    store, examples, _ = synthetic
    settings = ClusterSettings(labels=("semantic_id",), where="language IN ('l0', 'l2')", tsne=False)
    result = cluster_layers(store, "syn", settings)
    assert len(result.subset) == 16 and all(not i.endswith("l1") for i in result.subset.example_ids)
    write_clusters(store, result)
    code, out, _ = run_cli(
        "sql",
        "--store",
        store.location.uri,
        "--format",
        "json",
        "SELECT count(*) AS n, min(n_subset) AS subset, any_value(subset) AS predicate FROM clusters",
    )
    assert code == 0
    assert f'"n": {len(result.rows)}' in out and '"subset": 16' in out and "language IN" in out
    assert "clusters" in store.table_names()


def test_sampling_is_seeded_stated_and_davies_bouldin_uses_every_example(store):
    examples, vectors = clustered(n_languages=4, n_meanings=30, layers=2, seed=3)
    write_run(store, "big", examples, vectors)
    settings = ClusterSettings(labels=("language",), sample=40, seed=11, perplexity=8)
    first, again = cluster_layers(store, "big", settings), cluster_layers(store, "big", settings)
    other = cluster_layers(store, "big", ClusterSettings(labels=("language",), sample=40, seed=12, perplexity=8))
    hook = "blocks.0.hook_resid_post"
    assert first.sampled and len(first.sample) == 40
    assert value(first, hook, "language", "silhouette")["n_examples"] == 40
    assert value(first, hook, "language", "davies_bouldin")["n_examples"] == 120
    assert (
        value(first, hook, "language", "silhouette")["value"] == value(again, hook, "language", "silhouette")["value"]
    )
    assert (
        value(first, hook, "language", "silhouette")["value"] != value(other, hook, "language", "silhouette")["value"]
    )
    x = vectors[hook].astype(np.float32).astype(np.float64)[first.sample]
    labels = np.array([e["language"] for e in examples])[first.sample]
    assert value(first, hook, "language", "silhouette")["value"] == pytest.approx(silhouette_score(x, labels), abs=1e-6)
    table = first.table()
    assert set(table["sample_size"].to_pylist()) == {40} and set(table["seed"].to_pylist()) == {11}


def test_every_position_run_gives_last_mean_and_max(store):
    rng = np.random.default_rng(0)
    lengths = [3, 1, 4, 2, 5, 2]
    examples = [{"example_id": f"e{i}", "group": "ab"[i % 2]} for i in range(len(lengths))]
    positions = np.array([(i, p) for i, n in enumerate(lengths) for p in range(n)])
    values = rng.normal(size=(len(positions), 8))
    shuffled = rng.permutation(len(positions))  # rows need not arrive in order
    write_run(store, "all", examples, {"blocks.0.hook_resid_post": values[shuffled]}, pooling="none",
              positions=positions[shuffled])  # fmt: skip
    stored = values.astype(np.float32)
    expected = {
        "last": np.stack([stored[(positions[:, 0] == i)][-1] for i in range(len(lengths))]),
        "mean": np.stack([stored[positions[:, 0] == i].mean(0) for i in range(len(lengths))]),
        "max": np.stack([stored[positions[:, 0] == i].max(0) for i in range(len(lengths))]),
    }
    with store.query() as session:
        settings = run_settings(session, "all")
        subset = select_subset(session, "all", "", ["group"])
        (hook,) = layer_hooks(session, "all")
        for pooling, matrix in expected.items():
            np.testing.assert_allclose(read_layer(session, subset, hook, settings, pooling), matrix, rtol=1e-6)


def test_float16_runs_are_read_as_their_stored_halves(store):
    examples, vectors = clustered(layers=1)
    write_run(store, "half", examples, vectors, dtype="float16")
    with store.query() as session:
        subset = select_subset(session, "half", "", ["language"])
        (hook,) = layer_hooks(session, "half")
        matrix = read_layer(session, subset, hook, run_settings(session, "half"), "last")
    order = np.argsort([e["example_id"] for e in examples])
    expected = vectors["blocks.0.hook_resid_post"].astype(np.float32).astype(np.float16).astype(np.float32)[order]
    np.testing.assert_array_equal(matrix, expected)


def test_pooling_derived_from_positions_equals_pooled_recording(store, tiny_model_dir, write_manifest):
    from hookpoints.loading import load
    from hookpoints.manifest import read_manifest
    from hookpoints.recorder import record

    texts = ["The weather is nice today.", "Hi", "Das Wetter ist heute schön und warm.", "今天天气很好。", "ok then"]
    manifest = read_manifest(write_manifest([{"id": f"t{i}", "text": t, "kind": "x"} for i, t in enumerate(texts)]))
    model = load(tiny_model_dir("gpt2"))
    for pooling in ("none", "last", "mean"):
        record(model, manifest, store, f"gpt2-{pooling}", hooks=["blocks.*.hook_resid_post"], pooling=pooling,
               batch_size=2)  # fmt: skip
    with store.query() as session:
        every = run_settings(session, "gpt2-none")
        every_subset = select_subset(session, "gpt2-none", "", ["kind"])
        for pooling in ("last", "mean"):
            subset = select_subset(session, f"gpt2-{pooling}", "", ["kind"])
            pooled = run_settings(session, f"gpt2-{pooling}")
            for hook in layer_hooks(session, "gpt2-none"):
                derived = read_layer(session, every_subset, hook, every, pooling)
                recorded = read_layer(session, subset, hook, pooled, pooling)
                np.testing.assert_allclose(derived, recorded, rtol=1e-5, atol=1e-5)


# -- bad input: one clear error each, nothing written -------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (ClusterSettings(labels=("dialect",)), "label column 'dialect' is not in the examples table; it has: language"),
        (ClusterSettings(labels=("language",), where="language = 'l0'"), "has one class only ('l0')"),
        (ClusterSettings(labels=("example_id",)), "class(es) with a single example"),
        (ClusterSettings(labels=("language",), perplexity=30), "t-SNE with perplexity 30 needs more than 30 examples"),
        (ClusterSettings(labels=("language",), where="language = "), "does not parse as SQL"),
        (ClusterSettings(labels=("language",), where="dialect = 'x'"), "does not work on the examples table"),
        (ClusterSettings(labels=("language",), where="1=1) OR (1=1"), "does not parse as SQL"),
        (ClusterSettings(labels=("language",), where="true; DROP TABLE x"), "without ';'"),
        (ClusterSettings(labels=("language",), where="language = 'l9'"), "has no examples matching --where"),
        (ClusterSettings(labels=("language",), pooling="mean"), "recorded with pooling last, which cannot give mean"),
        (ClusterSettings(labels=("language",), hooks=("blocks.*.mlp.*",)), "matches no hook point of run 'syn'"),
        (ClusterSettings(labels=("language",), examples=("s00-l0", "nope"), tsne=False), "example 'nope' is not among"),
        (ClusterSettings(labels=("language",), sample=2), "--sample must be a whole number of at least 3"),
        # a TypeError on the comparison, an AttributeError on .strip, numpy's "negative dimensions" (lo-analyses)
        (ClusterSettings(labels=("language",), sample=None), "--sample must be a whole number of at least 3"),
        (ClusterSettings(labels=("language",), sample=2.5e3), "--sample must be a whole number of at least 3"),
        (ClusterSettings(labels=("language",), seed="1"), "--seed must be a non-negative integer, not '1'"),
        (ClusterSettings(labels=("language",), perplexity="5"), "--perplexity must be a positive number, not '5'"),
        (ClusterSettings(labels=("language",), where=5), "--where must be a SQL boolean expression (a string)"),
        (ClusterSettings(labels=("semantic_id",), sample=3, seed=2, tsne=False), "raise --sample"),
        (ClusterSettings(labels=("language", "language")), "given twice"),
        (ClusterSettings(labels=()), "at least one label"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(synthetic, settings, message):
    store = synthetic[0]
    with pytest.raises(UserError, match=None) as error:
        cluster_layers(store, "syn", settings)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert "clusters" not in store.table_names()


def test_unknown_run_lists_the_runs(synthetic):
    with pytest.raises(UserError, match=r"there is no run 'other' in this store \(runs: syn\)"):
        cluster_layers(synthetic[0], "other", ClusterSettings(labels=("language",)))


def test_run_without_layer_outputs_says_how_to_pick_hooks(store):
    examples, vectors = clustered(layers=1)
    hooks = [hook_row(0, 16, name="blocks.0.mlp.hook_post", layer_output=False)]
    write_run(store, "mlp", examples, {"blocks.0.mlp.hook_post": vectors["blocks.0.hook_resid_post"]}, hooks=hooks)
    with pytest.raises(UserError, match="recorded no layer outputs .* --hooks GLOB"):
        cluster_layers(store, "mlp", ClusterSettings(labels=("language",)))
    result = cluster_layers(store, "mlp", ClusterSettings(labels=("language",), hooks=("*.mlp.*",), tsne=False))
    assert [layer.hook.hook for layer in result.layers] == ["blocks.0.mlp.hook_post"]


def test_non_finite_activations_are_named(store):
    examples, vectors = clustered(layers=1)
    vectors["blocks.0.hook_resid_post"][5, 3] = np.nan
    write_run(store, "nan", examples, vectors)
    with pytest.raises(UserError, match=f"NaN or infinite activations \\(example '{examples[5]['example_id']}'\\)"):
        cluster_layers(store, "nan", ClusterSettings(labels=("language",), tsne=False))


def test_missing_activations_are_an_error_not_a_silent_gap(store):
    from hookpoints.store.schema import CORE_TABLES

    examples, vectors = clustered(layers=2)
    write_run(store, "gap", examples, vectors)
    extra = pa.Table.from_pylist(
        [{"run": "gap", "example_id": "late", "language": "l0", "semantic_id": "s00"}],
        schema=store.dataset("examples").schema,
    )
    store.append(CORE_TABLES["examples"], extra)  # an example recorded at no hook (a killed recording)
    with pytest.raises(UserError, match="no activations at blocks.0.hook_resid_post for 1 of the 25 examples"):
        cluster_layers(store, "gap", ClusterSettings(labels=("language",), tsne=False))
    assert "clusters" not in store.table_names()
    assert CLUSTERS_TABLE.name == "clusters"


def test_deleting_a_run_deletes_its_cluster_rows(synthetic):
    store = synthetic[0]
    write_clusters(store, cluster_layers(store, "syn", ClusterSettings(labels=("language",), tsne=False)))
    with store.query() as session:
        assert session.sql("SELECT count(*) AS n FROM clusters")["n"][0].as_py() > 0
    store.delete_run("syn")
    with store.query() as session:
        assert session.sql("SELECT count(*) AS n FROM clusters")["n"][0].as_py() == 0


def test_a_label_of_numbers_with_fractions_or_lists_is_refused(store):
    examples, vectors = clustered(layers=1)
    for i, example in enumerate(examples):
        example.update(score=i / 7, tags=["a", "b"][: 1 + i % 2], turn=i % 2)
    write_run(store, "typed", examples, vectors)
    for label, kind in (("score", "double"), ("tags", "list<")):
        with pytest.raises(UserError, match=f"label {label!r} holds {kind}.* values: cluster by a column of text"):
            cluster_layers(store, "typed", ClusterSettings(labels=(label,), tsne=False))
    result = cluster_layers(store, "typed", ClusterSettings(labels=("turn",), tsne=False))  # integers are fine
    assert result.labellings[0].classes == ["0", "1"]


def test_the_sql_recipes_of_clusters_md_give_one_row_per_component_layer(store):
    """docs/clusters.md's two queries, run as written (run renamed): on a model with two stacks (SeamlessM4T's text
    encoder and decoder share layer numbers) they gave two silhouette rows per layer and the last layer's
    distances of both stacks, with nothing to tell them apart."""
    import re
    from pathlib import Path

    examples, vectors = clustered(layers=4)
    hooks = []
    for i in range(len(vectors)):
        component, layer = ("text_encoder", i) if i < 2 else ("text_decoder", i - 2)
        hooks.append(
            {**hook_row(layer, 16, name=f"{component}.layers.{layer}.hook_resid_post"), "component": component}
        )
    renamed = {hook["hook"]: matrix for hook, matrix in zip(hooks, vectors.values(), strict=True)}
    write_run(store, "r1", examples, renamed, hooks=hooks)
    write_clusters(store, cluster_layers(store, "r1", ClusterSettings(labels=("language",), tsne=False)))
    latest = cluster_layers(store, "r1", ClusterSettings(labels=("language",), tsne=False, seed=1))
    write_clusters(store, latest)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "clusters.md").read_text()
    silhouette, distances = [q for q in re.findall(r"```sql\n(.*?)```", doc, re.S)[0].split(";") if q.strip()]
    with store.query() as session:
        rows, shown = session.sql(silhouette).to_pylist(), session.sql(distances).to_pylist()
    keys = [(r["component"], r["layer"]) for r in rows]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 4
    expected = {(r["component"], r["layer"]): r["value"] for r in latest.rows if r["measure"] == "silhouette"}
    assert all(abs(r["silhouette"] - expected[r["component"], r["layer"]]) < 1e-3 for r in rows)
    last = {
        (r["a"], r["b"]): r["value"]
        for r in latest.rows
        if r["measure"] == "centroid_distance" and r["hook"] == "text_decoder.layers.1.hook_resid_post"
    }
    assert len(shown) == len(last) == 3
    assert all(abs(r["distance"] - last[r["a"], r["b"]]) < 1e-2 for r in shown)
