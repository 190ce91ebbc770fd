"""``hookpoints intervene``: median replacement (or mean, zero, constant, steering) of selected neurons during
generation, against random neurons of the same number; scored, stored, tabled and plotted (Figure 5)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click
from hookpoints.analyses.intervention_sweep import PAPER_SEED, SweepSpec
from hookpoints.analyses.interventions import KINDS, NEURON_TYPES
from hookpoints.analyses.selection import PAPER_KS, SIDE_CHOICES
from hookpoints.cli.console import counting, out, render
from hookpoints.cli.placement_options import load_options, placement_options
from hookpoints.cli.sampling_options import sampling_from, sampling_options


@click.command("intervene")
@click.option("--store", "store_path", required=True, help="Store folder or s3:// URI.")
@click.option("--run", "runs", multiple=True, required=True, help="The runs the neurons were ranked over (repeatable).")
@click.option("--task", "tasks", multiple=True, required=True, type=click.Choice(["asr", "s2tt", "t2tt", "continue"]))
@click.option(
    "--type", "neuron_types", multiple=True, type=click.Choice([t for t in NEURON_TYPES if t != "none"]),
    help="Neuron types to replace (repeatable; default: unimodal random, or random beside --label-set/--neurons).",
)  # fmt: skip
@click.option(
    "--k", "ks", multiple=True, type=int, default=PAPER_KS, show_default=True, help="Neurons per module group."
)
@click.option("--side", type=click.Choice(SIDE_CHOICES), default="top", show_default=True, help="Top, bottom or both.")
@click.option("--kind", type=click.Choice(KINDS), default="median", show_default=True, help="What neurons become.")
@click.option("--value", type=float, help="The constant (--kind constant) or steering scale (--kind steer).")
@click.option("--seed", type=int, default=PAPER_SEED, show_default=True, help="Seed of the random neurons.")
@click.option("--random-like", help="The neuron type whose counts per module group random draws match.")
@click.option(
    "--neurons",
    multiple=True,
    metavar="HOOK:IDX",
    help="Explicit neurons, e.g. 'text_decoder.layers.3.ffn.fc1:0,5,7-9'.",
)
@click.option(
    "--label-set",
    "label_sets",
    multiple=True,
    metavar="NAME",
    help="Any label set ranked in scores, e.g. an 'ap --name' one; may name {language} (repeatable).",
)
@click.option("--language", "languages", multiple=True, help="Languages (manifest labels) to generate from.")
@click.option("--limit", type=int, default=100, show_default=True, help="Generations per language (the paper: 100).")
@click.option(
    "--stats-run", "stats_runs", multiple=True, help="Run the medians/means come from (default: the --run of the task)."
)
@click.option("--stats-where", metavar="PRED", help="Examples the statistics are computed over; may name {language}.")
@click.option("--data", help="Manifest or FLEURS folder to generate from (default: the statistics run's manifest).")
@click.option("--model", help="Model folder or hub id (default: the statistics run's model).")
@click.option("--tgt-lang", help="Target language of translation (default eng: X -> En, as in the paper).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--frames", type=int, help="Fix speech features to this many frames (the paper: 300).")
@click.option("--reference-column", help="Column holding each example's reference text.")
@click.option("--pair-column", default="semantic_id", show_default=True, help="Column pairing translations.")
@click.option("--sweep", "sweep_name", help="Name of the sweep in the store (default: sweep-<UTC time>).")
@click.option("--overwrite", is_flag=True, help="Replace a sweep of the same name.")
@click.option(
    "--plots",
    "plots_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the score-vs-k plot (Figure 5 of the SeamlessM4T v2 neuron paper).",
)
@sampling_options
@placement_options
def command(
    store_path, sweep_name, overwrite, plots_dir, device, model_dtype, device_map, offload_folder,
    sample, temperature, top_k, top_p, sample_seed, **options,
) -> None:  # fmt: skip
    """Replace selected neurons during generation and score what happens (Experiment 2 and Figure 5 of the
    SeamlessM4T v2 neuron paper)."""
    from hookpoints.cli.ap_cmd import check_plots_dir
    from hookpoints.store.catalog import Store

    check_plots_dir(plots_dir)  # before the generations, not after them
    sampling = sampling_from(sample, temperature, top_k, top_p, sample_seed)
    placement = load_options(device, model_dtype, device_map, offload_folder)
    name = sweep_name or datetime.now(UTC).strftime("sweep-%Y%m%dT%H%M%S")
    spec = SweepSpec(
        sweep=name,
        **{key: tuple(value) if isinstance(value, (list, tuple)) else value for key, value in options.items()},
        if_exists="overwrite" if overwrite else "error",
        sampling=sampling,
    )
    store = Store.open(store_path)
    scores = sweep(store, spec, plots_dir, placement)
    out.print(f"sweep {name}: {scores.num_rows} scores; SQL: SELECT * FROM intervention_scores WHERE sweep = '{name}'")


def sweep(store, spec, plots_dir: Path | None, placement: dict | None = None):
    """Run the sweep with a progress bar, print the table and write Figure 5; returns the corpus scores.
    ``placement``: the models' load options (device, dtype, device map)."""
    from hookpoints.analyses.sweeps import sweep as run

    load_model = None
    if placement:
        from hookpoints.loading import load

        models = {}

        def load_model(source: str, modality: str):
            if (source, modality) not in models:
                models[source, modality] = load(source, modality=modality, **placement)
            return models[source, modality]

    scores = run(store, spec, progress=counting, load_model=load_model)
    show_sweep(scores, spec.sweep, plots_dir)
    return scores


def show_sweep(scores, name: str, plots_dir: Path | None) -> None:
    """Print a sweep's score table and write Figure 5 into ``plots_dir``."""
    from hookpoints.analyses.figures_interventions import plot_sweep
    from hookpoints.analyses.sweeps import score_table

    render(score_table(scores), title=f"intervention scores ({name}): mean over languages")
    if plots_dir is not None:
        for path in plot_sweep(scores, name, plots_dir):
            if path.suffix == ".png":
                out.print(f"  figure: {path}")
