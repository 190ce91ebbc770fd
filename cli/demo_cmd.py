"""``hookpoints demo``: the end-to-end run on the bundled corpus, into a local store, printed stage by stage.

The stages are library functions (:mod:`hookpoints.analyses.demo`, callable one by one from a notebook); this
module prints what each returns, saves its figures next to the store, and shows the store with SQL at the end.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from hookpoints.cli.console import counting, out, render

HEADINGS = {  # stage -> rule printed before it runs
    "rank_neurons": "Language- and modality-specific neurons: AP ranking (hookpoints ap)",
    "intervene": "Interventions: median replacement during generation (hookpoints intervene)",
    "cluster_spaces": "Representation spaces: a trained encoder on paraphrase pairs (hookpoints clusters)",
    "trained_speech": "Trained speech: Whisper tiny.en (hookpoints convert ct2-whisper, record, ap, intervene)",
}


def show_stage(name: str, demo, result, plots_dir: Path) -> None:
    """Print one stage's result (and save its figures in ``plots_dir``)."""
    if name == "prepare_corpus":
        from hookpoints.corpus import VARIANTS

        out.print(
            f"corpus: {result.text_rows} sentences in 6 languages, {result.speech_rows} utterances "
            f"({len(VARIANTS)} voices) in {result.speech.parent}"
        )
    elif name in ("record_minilm", "record_seamless"):
        for s in result if isinstance(result, list) else [result]:
            out.print(f"  {s.run}: {s.recorded} examples x {s.hooks} hook points in {s.seconds:.1f} s")
    elif name == "rank_neurons":
        from hookpoints.cli.ap_cmd import save_figures, show_report

        job = result.job
        out.print(
            f"  ranked {job.n_neurons:,} neurons of {job.group.key} ({len(job.examples)} examples) against "
            f"{len(job.masks.label_sets)} label sets (preset {result.presets[0]}) into table scores"
        )
        show_report(result.report)
        save_figures(result.report, plots_dir)
    elif name == "intervene":
        from hookpoints.cli.intervene_cmd import show_sweep

        show_sweep(result, "demo", plots_dir)
    elif name == "cluster_spaces":
        from hookpoints.cli.clusters_cmd import show

        for i, clusters in enumerate(result):
            if i:
                out.rule(f"[bold]Language and meaning clusters of run {clusters.run}, layer by layer")
            show(demo.store, clusters, plots_dir)


def _check_model(model: str) -> None:
    """``--model`` names a SeamlessM4T v2 checkpoint that is there, or a one-line UserError."""
    from transformers import AutoConfig

    from hookpoints.errors import UserError
    from hookpoints.loading import model_modalities

    model_modalities(model)  # a missing path, an unreachable hub id, an unreadable config: one line each
    kind = AutoConfig.from_pretrained(model).model_type
    if kind != "seamless_m4t_v2":
        raise UserError(f"--model {model} is a {kind} model: the demo needs a SeamlessM4T v2 one (ASR, S2TT, T2TT)")


def show_store(demo) -> None:
    from hookpoints.analyses.demo_queries import STORE_QUERIES
    from hookpoints.store.summary import run_summary

    render(run_summary(demo.store), title="what the store holds")
    with demo.store.query() as session:
        for title, sql in STORE_QUERIES + demo.queries:
            out.rule(title, style="dim")
            out.print(f"[dim]{sql}[/dim]", highlight=False)
            render(session.sql(sql))
    out.print(f'\nYour turn: hookpoints sql --store {demo.store.location.uri} "SELECT * FROM hooks LIMIT 5"')


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
    from hookpoints.analyses.demo import STAGES, Demo
    from hookpoints.cli.clusters_cmd import default_plot_folder
    from hookpoints.store.catalog import Store

    from hookpoints.errors import UserError

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, not {threads}")
    if model:
        _check_model(model)  # before the store is made and the corpus recorded, not at the SeamlessM4T stage
    if threads or not model:
        # Small models gain nothing from intra-op threads, and on a busy machine their spinning costs several times
        # the work (all-MiniLM-L6-v2 on the corpus: 6 s of CPU with 1 thread, 43 s with 2 on a loaded 2-core box).
        torch.set_num_threads(threads or 1)
    store = Store.open(store_path, create=True)
    out.rule("[bold]hookpoints demo")
    out.print(f"store: {store.location.uri}")
    plots_dir = default_plot_folder(store)
    with tempfile.TemporaryDirectory() as scratch:
        demo = Demo(
            store, Path(scratch), limit=limit, model=model, progress=counting,
            say=lambda message: out.print(message, highlight=False),
        )  # fmt: skip
        for stage in STAGES:
            if stage.__name__ in HEADINGS:
                out.rule(f"[bold]{HEADINGS[stage.__name__]}")
            show_stage(stage.__name__, demo, stage(demo), plots_dir)
        show_store(demo)
    from hookpoints.analyses.report import write_report

    out.print(f"report: {write_report(store)}", highlight=False, soft_wrap=True)
