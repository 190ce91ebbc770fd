"""hookpoints: TransformerLens-style named hook points over any HuggingFace model, and an activation store.

>>> import hookpoints as hp
>>> model = hp.load("path/to/model")                                   # doctest: +SKIP
>>> output, cache = model.run_with_cache(["Hallo Welt", "Hi"], names="blocks.*.hook_resid_post")  # doctest: +SKIP
>>> hp.record(model, "manifest.jsonl", "my-store", run="r1", pooling="mean")  # doctest: +SKIP
>>> hp.Store.open("my-store").sql("SELECT * FROM runs").to_pandas()   # doctest: +SKIP

Names are loaded on first use (PEP 562), so ``import hookpoints`` imports neither torch nor transformers.
docs/python-api.md walks through the whole API.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it (imported when the name is first used)
_EXPORTS = {
    # models and hook points
    "load": "hookpoints.loading",
    "HookedModel": "hookpoints.model",
    "HookPoint": "hookpoints.points",
    "HookPointSet": "hookpoints.points",
    "ModelInputs": "hookpoints.inputs",
    "build_tiny": "hookpoints.tiny",
    "Placement": "hookpoints.placement",
    "convert_ct2_whisper": "hookpoints.convert_ct2",
    # activations and interventions
    "ActivationCache": "hookpoints.cache",
    "act_name": "hookpoints.cache",
    "NeuronEdit": "hookpoints.editing",
    "ablate": "hookpoints.hook_fns",
    "mean_ablate": "hookpoints.hook_fns",
    "patch": "hookpoints.hook_fns",
    "steer": "hookpoints.hook_fns",
    # the store and recording
    "Store": "hookpoints.store_handle",
    "record": "hookpoints.record_api",
    "RecordSummary": "hookpoints.recorder",
    "UserError": "hookpoints.errors",
    "neuron_stats": "hookpoints.store.neuron_sql",
    "RunSettings": "hookpoints.settings",
    "Pooling": "hookpoints.settings",
    "Sampling": "hookpoints.settings",
    # analyses: AP selectivity
    "average_precision": "hookpoints.analyses.ap",
    "custom_label_set": "hookpoints.analyses.labels",
    "plan_ranking": "hookpoints.analyses.ranking",
    "rank": "hookpoints.analyses.ranking",
    "write_scores": "hookpoints.analyses.ranking",
    "ap_summary": "hookpoints.analyses.selection",
    "layer_counts": "hookpoints.analyses.selection",
    "selected_neurons": "hookpoints.analyses.selection",
    "selection_gini": "hookpoints.analyses.selection",
    "overlap": "hookpoints.analyses.selection",
    "selectivity_report": "hookpoints.analyses.ap_report",
    "select_hooks": "hookpoints.analyses.hooks",
    # analyses: Gini, magnitudes, clusters, interventions
    "gini": "hookpoints.analyses.gini",
    "open_runs": "hookpoints.analyses.examples",
    "select_examples": "hookpoints.analyses.examples",
    "shared_hooks": "hookpoints.analyses.hook_matrix",
    "layer_magnitudes": "hookpoints.analyses.magnitudes",
    "activation_gini": "hookpoints.analyses.magnitudes",
    "ClusterSettings": "hookpoints.analyses.clusters",
    "cluster_layers": "hookpoints.analyses.clusters",
    "SweepSpec": "hookpoints.analyses.intervention_sweep",
    "plan_sweep": "hookpoints.analyses.intervention_sweep",
    "run_sweep": "hookpoints.analyses.intervention_sweep",
    "sweep": "hookpoints.analyses.sweeps",
    "score_table": "hookpoints.analyses.sweeps",
    "run_demo": "hookpoints.analyses.demo",
    # figures (each returns a matplotlib Figure)
    "distribution_figure": "hookpoints.analyses.figures_selectivity",
    "overlap_figure": "hookpoints.analyses.figures_selectivity",
    "magnitude_figure": "hookpoints.analyses.figures_selectivity",
    "activation_gini_figure": "hookpoints.analyses.figures_selectivity",
    "measures_figure": "hookpoints.analyses.figures_clusters",
    "tsne_figure": "hookpoints.analyses.figures_clusters",
    "dendrogram_figure": "hookpoints.analyses.figures_clusters",
    "figure5": "hookpoints.analyses.figures_interventions",
    # one self-contained HTML report of a store
    "report": "hookpoints.analyses.report",
    "write_report": "hookpoints.analyses.report",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hookpoints' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
