"""The store's intervention tables, queryable by SQL like every other table (docs/interventions.md).

- ``interventions``: every generation of a sweep, with its condition, reference and sentence scores.
- ``intervention_scores``: corpus scores per (sweep, condition, task, language): what Figure 5 plots.
- ``intervention_neurons``: the neurons each condition edited and the values they took (or were shifted by).

All are partitioned by sweep; a sweep's rows of one (task, language) are committed together. ``sampling`` was
added later: a sweep gives an older store's tables the column (rows before it: null, greedy; store/tables.py
add_columns).
"""

from __future__ import annotations

import pyarrow as pa
from hookpoints.store.schema import TableSpec

#: What defines a condition: one neuron type (or none) x k x kind, applied the same way to every generation.
CONDITION_FIELDS = [
    ("sweep", pa.string()),
    ("condition", pa.string()),  # e.g. unimodal/top/k=500, random/k=500, none
    ("neuron_type", pa.string()),  # unimodal | multimodal | modality | language-modality | random | explicit | none
    ("side", pa.string()),  # top | bottom | both (null for random, explicit, none)
    ("k", pa.int32()),  # neurons per module group (0 for none)
    ("kind", pa.string()),  # median | mean | zero | constant | steer (null for none)
    ("value", pa.float64()),  # the constant, or the steering scale
    ("seed", pa.int64()),  # random draws
    ("matched", pa.string()),  # random: the label set whose counts per module group it matches
    ("ranking", pa.string()),  # the scores' run key the neurons come from
    ("stats_run", pa.string()),  # the run medians / means were computed over
    ("stats_where", pa.string()),
    ("model", pa.string()),
    ("task", pa.string()),
    ("language", pa.string()),  # the examples' language (manifest label)
    ("tgt_lang", pa.string()),  # the language generated into (model code)
    ("label_set", pa.string()),  # the ranked label set the neurons come from, for this language
    ("n_neurons", pa.int32()),
    ("sampling", pa.string()),  # sampled decoding's settings, JSON (Sampling.config()); null: greedy
]
SCORE_FIELDS = [
    ("metric", pa.string()),  # wer | cer | combined
    ("score", pa.float64()),  # the metric's value (error rates: 0-1 and more; combined: 0-100)
    ("error_rate", pa.float64()),
    ("bleu", pa.float64()),
    ("chrf", pa.float64()),
]

INTERVENTIONS = TableSpec(
    "interventions",
    pa.schema(
        [
            *CONDITION_FIELDS,
            ("example_id", pa.string()),
            ("reference", pa.string()),
            ("generated_text", pa.string()),
            ("generated_tokens", pa.int32()),
            *SCORE_FIELDS,
            ("created_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    ("sweep",),
)
INTERVENTION_SCORES = TableSpec(
    "intervention_scores",
    pa.schema(
        [*CONDITION_FIELDS, ("n_generations", pa.int32()), *SCORE_FIELDS, ("created_at", pa.timestamp("us", tz="UTC"))]
    ),
    ("sweep",),
)
INTERVENTION_NEURONS = TableSpec(
    "intervention_neurons",
    pa.schema(
        [
            ("sweep", pa.string()),
            ("condition", pa.string()),
            ("task", pa.string()),
            ("language", pa.string()),
            ("component", pa.string()),
            ("hook", pa.string()),
            ("neuron", pa.int32()),
            ("value", pa.float64()),  # what the neuron was set to (kind steer: what was added to it)
            ("add", pa.bool_()),
        ]
    ),
    ("sweep",),
)
TABLES = (INTERVENTIONS, INTERVENTION_SCORES, INTERVENTION_NEURONS)
