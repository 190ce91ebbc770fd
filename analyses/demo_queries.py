"""The SQL queries the demo shows after each stage (title, query), over the runs the demo records."""

from __future__ import annotations

MINILM_RUN = "minilm-text"
SEAMLESS_RUNS = {  # run -> (task, input)
    "seamless-asr": ("asr", "speech"),
    "seamless-s2tt": ("s2tt", "speech"),
    "seamless-t2tt": ("t2tt", "text"),
}
_SEAMLESS = ", ".join(f"'{run}'" for run in SEAMLESS_RUNS)

MINILM_QUERIES = [
    (
        "Layer-wise norm of MiniLM's layer outputs, by script (a trained model's structure)",
        f"""SELECT h.layer,
   round(avg(sqrt(list_sum(list_transform(a.activation, lambda x: x * x)))), 2) AS all_languages,
   round(avg(sqrt(list_sum(list_transform(a.activation, lambda x: x * x))))
         FILTER (WHERE e.script = 'latin'), 2) AS latin_script,
   round(avg(sqrt(list_sum(list_transform(a.activation, lambda x: x * x))))
         FILTER (WHERE e.script = 'non-latin'), 2) AS non_latin_script
FROM activations a JOIN hooks h USING (run, hook) JOIN examples e USING (run, example_id)
WHERE a.run = '{MINILM_RUN}' AND h.layer_output
GROUP BY h.layer ORDER BY h.layer""",
    ),
    (
        "MiniLM neurons whose mean differs most between Mandarin and English (last layer), via the neurons view",
        f"""SELECT n.neuron,
   round(avg(n.value) FILTER (WHERE e.language = 'zh'), 3) AS zh,
   round(avg(n.value) FILTER (WHERE e.language = 'en'), 3) AS en
FROM neurons n JOIN examples e USING (run, example_id)
WHERE n.run = '{MINILM_RUN}' AND n.hook = 'blocks.5.hook_normalized_resid_post'
GROUP BY n.neuron ORDER BY abs(zh - en) DESC LIMIT 5""",
    ),
]

SEAMLESS_QUERIES = [
    (
        "Table 1 components recorded from SeamlessM4T v2, per module group",
        f"""SELECT component, count(DISTINCT submodule) - 1 AS components, count(DISTINCT layer) AS layers,
   count(DISTINCT hook) AS hook_points, max(width) AS widest
FROM hooks WHERE run IN ({_SEAMLESS}) GROUP BY component ORDER BY component""",
    ),
    (
        "Generated text (greedy) saved with the examples",
        f"""SELECT run, example_id, tgt_lang, generated_tokens AS tokens, generated_text
FROM examples WHERE run IN ({_SEAMLESS}) AND semantic_id = 's001' AND language IN ('de', 'ja')
ORDER BY run, example_id""",
    ),
    (
        "Shared decoder, speech vs text input: mean activation magnitude per decoder layer (S2TT vs T2TT)",
        """SELECT h.layer,
   round(avg(list_avg(list_transform(a.activation, lambda x: abs(x)))) FILTER (WHERE a.run = 'seamless-s2tt'), 4)
       AS speech,
   round(avg(list_avg(list_transform(a.activation, lambda x: abs(x)))) FILTER (WHERE a.run = 'seamless-t2tt'), 4)
       AS text
FROM activations a JOIN hooks h USING (run, hook)
WHERE a.run IN ('seamless-s2tt', 'seamless-t2tt') AND h.component = 'text_decoder' AND h.layer IS NOT NULL
GROUP BY h.layer ORDER BY h.layer""",
    ),
]

INTERVENTION_QUERIES = [
    (
        "Intervention scores by neuron type and k, averaged over languages (Figure 5's numbers)",
        """SELECT task, neuron_type, k, round(avg(score), 2) AS combined_score, sum(n_generations) AS generations
FROM intervention_scores WHERE sweep = 'demo' GROUP BY ALL ORDER BY task, neuron_type, k""",
    ),
]

#: Shown first by the last stage.
STORE_QUERIES = [("Runs in the store", "SELECT run, model, task, pooling, status FROM runs ORDER BY created_at")]
