"""A small store holding one of each analysis the report shows: a run of two modalities x three languages with
submodule and layer-output hook points, an AP ranking, a clustering analysis with t-SNE maps and example
distances, and an intervention sweep's scores."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
from clusters_helpers import write_run
from hookpoints.store.catalog import Store

LANGUAGES = ["de", "en", "<b>fr</b>"]  # a tag in a label: the report must escape it
MODALITIES = ["speech", "text"]
SUBMODULES = {"self_attn.q_proj": 8, "ffn.fc1": 16, "ffn.fc2": 8}
LAYERS = 3


def hooks() -> list[dict]:
    rows = []
    for layer in range(LAYERS):
        for submodule, width in [*SUBMODULES.items(), ("hook_resid_post", 8)]:
            rows.append(
                {
                    "hook": f"text_decoder.layers.{layer}.{submodule}",
                    "module": f"text_decoder.layers.{layer}",
                    "io": "output",
                    "component": "text_decoder",
                    "layer": layer,
                    "submodule": submodule,
                    "width": width,
                    "shape": [width],
                    "neuron_axis": 2,
                    "space": "decoder",
                    "layer_output": submodule == "hook_resid_post",
                }
            )
    return rows


def write_report_store(store: Store, run: str = "syn", seed: int = 0) -> None:
    """Record a synthetic run, rank it, cluster it and add a sweep's scores."""
    from hookpoints.analyses.clusters import ClusterSettings, cluster_layers, write_clusters
    from hookpoints.analyses.intervention_tables import INTERVENTION_SCORES
    from hookpoints.analyses.ranking import plan_ranking, rank, write_scores

    rng = np.random.default_rng(seed)
    examples, cells = [], []
    for m, modality in enumerate(MODALITIES):
        for g, language in enumerate(LANGUAGES):
            for i in range(6):
                examples.append(
                    {
                        "example_id": f"{modality[0]}{g}-{i}",
                        "language": language,
                        "modality": modality,
                        "semantic_id": f"s{i}",
                        "generated_text": f"<i>output</i> {language} {i}",
                        "generated_tokens": 3,
                    }
                )
                cells.append(m * len(LANGUAGES) + g)
    cells = np.array(cells)
    vectors = {}
    for h in hooks():
        shift = rng.normal(size=(len(MODALITIES) * len(LANGUAGES), h["width"])) * 2
        vectors[h["hook"]] = shift[cells] + rng.normal(size=(len(examples), h["width"]))
    write_run(store, run, examples, vectors, pooling="mean", hooks=hooks())
    job = plan_ranking(store, [run], presets=["unimodal", "modality"], ks=(5, 10))
    write_scores(store, rank(store, job))
    settings = ClusterSettings(labels=("language", "modality"), perplexity=5.0, examples=("s0-0", "s1-0", "t0-0"))
    write_clusters(store, cluster_layers(store, run, settings))
    scores = []
    for task in ("s2tt", "t2tt"):
        for language in LANGUAGES[:2]:
            scores.append(_score(task, "none", 0, language, 40.0))
            for neuron_type in ("unimodal", "random"):
                for k in (5, 10):
                    value = 40.0 - (k if neuron_type == "unimodal" else k / 5)
                    scores.append(_score(task, neuron_type, k, language, value, ranking=run))
    store.append(INTERVENTION_SCORES, pa.Table.from_pylist(scores, schema=INTERVENTION_SCORES.schema))


def _score(task, neuron_type, k, language, value, ranking=None) -> dict:
    return {
        "sweep": "syn-sweep",
        "condition": "none" if neuron_type == "none" else f"{neuron_type}/k={k}",
        "neuron_type": neuron_type,
        "k": k,
        "kind": None if neuron_type == "none" else "median",
        "ranking": ranking,
        "stats_run": "syn",
        "task": task,
        "language": language,
        "metric": "combined",
        "score": value,
        "n_generations": 6,
        "created_at": datetime.now(UTC),
    }
