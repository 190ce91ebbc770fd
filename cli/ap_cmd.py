"""``hookpoints ap``: rank neurons by average precision against label sets, into the store's ``scores`` table.

Also the summary every selectivity command prints (per label set and module group: AP range, where the
top-k / bottom-k neurons are, their Gini), its plots, and the demo's stage.
"""

from __future__ import annotations

from pathlib import Path

import click
from hookpoints.analyses.labels import PRESETS
from hookpoints.analyses.ranking import DEFAULT_KS
from hookpoints.cli.console import counting, err, out, render
from hookpoints.cli.params import FiniteFloat

PANEL_SHORT = {"attention": "attn", "ffn": "ffn", "convolution": "conv", "other": "other"}


@click.command("ap")
@click.option("--store", "store_path", required=True, help="Store folder or s3:// URI.")
@click.option(
    "--run",
    "runs",
    multiple=True,
    required=True,
    help="Run to rank (repeatable: the union of their examples, over the hook points they share).",
)
@click.option(
    "--preset",
    "presets",
    multiple=True,
    type=click.Choice([*PRESETS, "all"]),
    help="The paper's settings over every language (and modality) present (repeatable).",
)
@click.option("--positive", metavar="PRED", help="A label set: SQL predicate over examples for the positives.")
@click.option("--among", metavar="PRED", help="Only compare the examples matching this predicate (with --positive).")
@click.option("--name", help="Name of the --positive label set (default: made from the predicate).")
@click.option("--where", metavar="PRED", help="Only use the examples matching this predicate, for every label set.")
@click.option("--language-column", default="language", show_default=True, help="Examples column of the languages.")
@click.option("--modality-column", default="modality", show_default=True, help="Examples column of the modalities.")
@click.option(
    "--hooks", "patterns", multiple=True, metavar="GLOB", help="Hook points to rank (default: all but layer outputs)."
)
@click.option("--component", "components", multiple=True, help="Only these module groups (repeatable).")
@click.option(
    "--k",
    "ks",
    multiple=True,
    type=int,
    default=DEFAULT_KS,
    show_default=True,
    help="Top-k / bottom-k sizes per module group (repeatable).",
)
@click.option("--report-k", type=int, help="k of the summary and plots (default: 1000 if given, else the smallest).")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), help="Write figures here.")
@click.option(
    "--memory-gb",
    type=FiniteFloat(),
    default=2.0,
    show_default=True,
    help="Budget for one hook's matrix.",
)
@click.option("--threads", type=click.IntRange(min=1), help="Kernel threads (default: every core).")
def command(
    store_path,
    runs,
    presets,
    positive,
    among,
    name,
    where,
    language_column,
    modality_column,
    patterns,
    components,
    ks,
    report_k,
    plots_dir,
    memory_gb,
    threads,
) -> None:
    """Rank every neuron of the runs' hook points by AP against label sets; keep the scores in the store."""
    from hookpoints.analyses.labels import custom_label_set
    from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
    from hookpoints.store.catalog import Store

    from hookpoints.errors import UserError

    if positive is None and (among is not None or name is not None):
        raise UserError("--among and --name describe a --positive label set: give --positive too")
    if positive is None and not presets:
        raise UserError(
            "give a label set: --preset (unimodal, multimodal, modality, language-modality, all) or --positive"
        )
    if memory_gb <= 0:
        raise UserError(f"--memory-gb must be positive, not {memory_gb}")
    store = Store.open(store_path)
    custom = [] if positive is None else [custom_label_set(positive, among, name)]
    job = plan_ranking(
        store,
        list(runs),
        presets=list(presets),
        custom=custom,
        where=where,
        hooks=list(patterns) or None,
        components=list(components) or None,
        ks=tuple(ks),
        language_column=language_column,
        modality_column=modality_column,
    )
    sizes = {c: sum(h.width for h in job.hooks if h.component == c) for c in job.components}
    report_k = _report_k(job.ks, report_k, min(sizes.values()))
    check_plots_dir(plots_dir)
    out.print(
        f"ranking [bold]{job.n_neurons:,}[/bold] neurons ({', '.join(f'{c} {n:,}' for c, n in sizes.items())}) "
        f"of run(s) [bold]{job.group.key}[/bold] over {len(job.examples):,} examples against "
        f"{len(job.masks.label_sets)} label set(s)"
    )
    with counting("AP ranking (neurons)") as (on_start, on_progress):
        ranking = rank(
            store, job, memory_bytes=int(memory_gb * 2**30), threads=threads, on_start=on_start, on_progress=on_progress
        )
    with err.status("writing the scores table"):
        write_scores(store, ranking)
    t = ranking.timings
    out.print(
        f"scored in {t['read_wait_s'] + t['kernel_s']:.1f} s (AP kernel {t['kernel_s']:.1f} s, waiting for reads "
        f"{t['read_wait_s']:.1f} s); {len(job.masks.label_sets) * job.n_neurons:,} rows in table [bold]scores[/bold] "
        f"(run = '{job.group.key}')"
    )
    names = [ls.name for ls in job.masks.label_sets]
    report(store, job.group.key, names, report_k, plots_dir)
    out.print(
        f'\nQuery them: hookpoints sql --store {store_path} "SELECT hook, neuron, ap FROM scores WHERE '
        f"run = '{job.group.key}' AND label_set = '{names[0]}' AND top_rank <= {report_k} ORDER BY top_rank\""
    )


def _report_k(ks: tuple[int, ...], report_k: int | None, smallest_group: int) -> int:
    from hookpoints.errors import UserError

    if report_k is None:
        return 1000 if 1000 in ks else min(ks)
    if not 1 <= report_k <= smallest_group:
        raise UserError(f"--report-k must be between 1 and the smallest module group's {smallest_group:,} neurons")
    return report_k


def check_plots_dir(folder: Path | None) -> None:
    """Make the plots folder now, so that a bad path fails before any work is done."""
    from hookpoints.errors import UserError

    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"cannot write plots to {folder}: {error.strerror or error}; pick a folder you can write"
        ) from None


def report(
    store,
    run: str,
    label_sets: list[str],
    k: int,
    plots_dir: Path | None,
    *,
    components: list[str] | None = None,
    gini_unit: str = "layer_submodule",
    overlaps: bool = True,
) -> list[Path]:
    """Print the summary of ranked label sets (and plot them); returns the files written."""
    from hookpoints.analyses.selection import ap_summary, layer_counts, panel_shares, selection_gini

    paths: list[Path] = []
    rows = []
    with store.query() as session:
        summary = ap_summary(session, run, label_sets)
        order = {name: i for i, name in enumerate(label_sets)}
        summary.sort(key=lambda r: (order.get(r["label_set"], len(order)), _component_order(r["component"])))
        for row in summary:
            component = row["component"]
            if components and component not in components:
                continue
            counts = layer_counts(session, run, row["label_set"], component, k)
            top, bottom = panel_shares(counts, "top", component), panel_shares(counts, "bottom", component)
            rows.append(
                {
                    "label set": row["label_set"],
                    "component": component,
                    "pos / among": f"{row['n_positive']} / {row['n_among']}",
                    "max AP": f"{row['max_ap']:.3f} {row['best_neuron']}",
                    "median AP": round(row["median_ap"], 3),
                    "min AP": round(row["min_ap"], 3),
                    f"top-{k}": _shares(top),
                    f"bottom-{k}": _shares(bottom),
                    "Gini top/bottom": f"{selection_gini(counts, 'top', gini_unit):.3f} / "
                    f"{selection_gini(counts, 'bottom', gini_unit):.3f}",
                }
            )
            if plots_dir is not None:
                paths += _plot_distribution(counts, run, row["label_set"], component, k, plots_dir)
        render(rows, title=f"AP selectivity of run(s) {run} (Gini over {gini_unit.replace('_', ' x ')} cells)")
        out.print(
            "[dim]pos / among: positive examples / examples compared (AP of a random neuron ~ their ratio); "
            f"top-{k} / bottom-{k}: where the group's {k} highest / lowest-AP neurons are[/dim]"
        )
        if overlaps:
            paths += report_modality_overlaps(session, run, label_sets, k, plots_dir)
    if paths:
        out.print(f"plots: {len(paths)} files in {plots_dir} (e.g. {paths[0].name})")
    return paths


def _component_order(component: str) -> tuple[int, str]:
    """Encoders before decoders (the order inputs flow through the model), then by name."""
    return (0 if "encoder" in component else 1 if "decoder" in component else 2, component)


def _shares(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "-"
    return " · ".join(f"{PANEL_SHORT[p]} {100 * n / total:.0f}%" for p, n in counts.items())


def _plot_distribution(counts, run: str, label_set: str, component: str, k: int, folder: Path) -> list[Path]:
    from hookpoints.analyses.figures import safe, save
    from hookpoints.analyses.figures_selectivity import distribution_figure

    figure = distribution_figure(counts, component, k, f"{label_set} (run {run})")
    return save(figure, folder, f"ap-{safe(run)}-{safe(label_set)}-{component}-k{k}")


def report_modality_overlaps(session, run: str, label_sets: list[str], k: int, plots_dir: Path | None) -> list[Path]:
    """For unimodal label sets of two modalities: the overlap of their selections over languages (Figure 3)."""
    from hookpoints.analyses.selection import overlap, stored_sets

    unimodal = [s for s in stored_sets(session, run, label_sets) if s.preset == "unimodal"]
    by_modality: dict[str, list[str]] = {}
    for s in unimodal:
        parts = s.label_set.split("/")
        if len(parts) == 3:
            by_modality.setdefault(parts[1], []).append(s.label_set)
    modalities = sorted(by_modality)
    paths: list[Path] = []
    if len(modalities) < 2:
        return paths
    first, second = modalities[0], modalities[1]
    components = sorted(set.intersection(*(set(s.components) for s in unimodal)))
    for component in components:
        for side in ("bottom", "top"):
            result = overlap(session, (run, by_modality[first]), (run, by_modality[second]), component, k, side)
            languages = [name.split("/")[-1] for name in result.rows]
            columns = [name.split("/")[-1] for name in result.columns]
            out.print(f"[bold]{component}: neurons shared by {side}-{k} unimodal language sets, {first} vs {second}")
            render(
                [
                    {f"{first} \\ {second}": language, **{c: int(v) for c, v in zip(columns, counts, strict=True)}}
                    for language, counts in zip(languages, result.counts, strict=True)
                ]
            )
            if plots_dir is not None:
                from hookpoints.analyses.figures import safe, save
                from hookpoints.analyses.figures_selectivity import overlap_figure

                title = f"unimodal language neurons, {first} vs {second} (run {run})"
                paths += save(overlap_figure(result, title), plots_dir, f"overlap-{safe(run)}-{component}-{side}{k}")
    return paths


def demo_stage(store, runs: list[str], plots_dir: Path, *, ks: tuple[int, ...] = (20, 50)) -> list[Path]:
    """The demo's selectivity stage: language-specific neurons of ``runs`` (all four settings when the runs hold
    both modalities, else the unimodal one), a summary and figures in ``plots_dir``."""
    from hookpoints.analyses.examples import open_runs, select_examples
    from hookpoints.analyses.ranking import plan_ranking, rank, write_scores

    with store.query() as session:
        modalities = select_examples(session, open_runs(session, runs)).values(session, "modality") or []
    presets = ["all"] if len(modalities) > 1 else ["unimodal"]
    job = plan_ranking(store, runs, presets=presets, ks=ks)
    with counting(f"AP ranking of {job.group.key} (neurons)") as (on_start, on_progress):
        ranking = rank(store, job, on_start=on_start, on_progress=on_progress)
    write_scores(store, ranking)
    out.print(
        f"  ranked {job.n_neurons:,} neurons of {job.group.key} ({len(job.examples)} examples) against "
        f"{len(job.masks.label_sets)} label sets (preset {presets[0]}) into table scores"
    )
    return report(store, job.group.key, [ls.name for ls in job.masks.label_sets], min(ks), plots_dir)
