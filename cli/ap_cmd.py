"""``hookpoints ap``: rank neurons by average precision against label sets, into the store's ``scores`` table.

Also how every selectivity command prints the summary of ranked label sets
(:func:`hookpoints.analyses.ap_report.selectivity_report`) and saves its figures.
"""

from __future__ import annotations

from pathlib import Path

import click
from hookpoints.analyses.labels import PRESETS
from hookpoints.analyses.selection import PAPER_KS
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
    default=PAPER_KS,
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
    with store.query() as session:
        note_left_out(session, job.group.runs, job.hooks, list(patterns) or None)
    note_null_labels(job.masks)
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


def note_null_labels(masks) -> None:
    """Say how many examples each label set leaves out because its --positive is NULL for them (one line per
    count: a preset's 32 label sets over examples with a NULL language would otherwise print 32 lines)."""
    by_count: dict[int, list] = {}
    for label_set, n in zip(masks.label_sets, masks.left_out, strict=True):
        if n:
            by_count.setdefault(int(n), []).append(label_set)
    for n, sets in by_count.items():
        which = (
            f"label set {sets[0].name}"
            if len(sets) == 1
            else f"{len(sets)} label sets (e.g. {sets[0].name}, {sets[1].name})"
        )
        out.print(
            f"[yellow]note:[/yellow] {which}: {n:,} example(s) are left out: --positive {sets[0].positive!r} is NULL "
            "for them (a NULL or NaN label is neither positive nor negative)",
            highlight=False,
        )


def note_left_out(session, runs, hooks, patterns) -> None:
    """Say which hook points of the analysed module groups are left out because not every run recorded them."""
    from hookpoints.analyses.hook_matrix import left_out

    missing = left_out(session, runs, hooks, patterns=patterns)
    for component in dict.fromkeys(h.component for h in missing):
        names = [h.hook for h in missing if h.component == component]
        out.print(
            f"[yellow]note:[/yellow] {len(names)} hook point(s) of {component} are left out: not every run recorded "
            f"them (e.g. {', '.join(names[:3])}{' ...' if len(names) > 3 else ''})",
            highlight=False,
        )


def _report_k(ks: tuple[int, ...], report_k: int | None, smallest_group: int) -> int:
    from hookpoints.analyses.selection import shown_k

    from hookpoints.errors import UserError

    if report_k is None:
        return shown_k(ks)
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
    fmt: str | None = "table",
) -> list[Path]:
    """Print the summary of ranked label sets (and save its figures); returns the files written.

    ``fmt``: ``table`` (with the modality overlaps), ``csv`` or ``json`` (the summary rows alone, nothing else on
    stdout), or None (printed nothing: only the figures)."""
    from hookpoints.analyses.ap_report import selectivity_report

    if fmt is None and plots_dir is None:
        return []
    summary = selectivity_report(
        store, run, label_sets, k, components=components, gini_unit=gini_unit, overlaps=overlaps
    )
    if fmt == "table":
        show_report(summary)
    elif fmt is not None:
        render(summary_rows(summary), fmt)
    return save_figures(summary, plots_dir, note=out if fmt == "table" else err)


def save_figures(summary, plots_dir: Path | None, note=out) -> list[Path]:
    """Save a selectivity report's figures (PNG and SVG) into ``plots_dir``; returns the files. ``note``: the
    console that says where they are (stderr where stdout holds csv or json)."""
    from hookpoints.analyses.figures import save

    paths: list[Path] = []
    if plots_dir is None:
        return paths
    for name, figure in summary.figures():
        paths += save(figure, plots_dir, name)
    if paths:
        note.print(f"plots: {len(paths)} files in {plots_dir} (e.g. {paths[0].name})", soft_wrap=True)
    return paths


def summary_rows(summary) -> list[dict]:
    """The summary as plain values for csv / json: one row per label set and module group, the same columns in
    every row (neurons of the top-k / bottom-k per panel, 0 where a group has no such panel)."""
    panels = [p for p in PANEL_SHORT if any(p in row.top or p in row.bottom for row in summary.rows)]
    return [
        {
            "label_set": row.label_set,
            "component": row.component,
            "k": summary.k,
            "n_positive": row.n_positive,
            "n_among": row.n_among,
            "max_ap": row.max_ap,
            "best_neuron": row.best_neuron,
            "median_ap": row.median_ap,
            "min_ap": row.min_ap,
            **{f"top_{panel}": row.top.get(panel, 0) for panel in panels},
            **{f"bottom_{panel}": row.bottom.get(panel, 0) for panel in panels},
            "gini_top": row.gini_top,
            "gini_bottom": row.gini_bottom,
            "gini_unit": summary.gini_unit,
        }
        for row in summary.rows
    ]


def show_report(summary) -> None:
    """Print a :class:`hookpoints.analyses.ap_report.SelectivityReport` as tables."""
    k = summary.k
    rows = [
        {
            "label set": row.label_set,
            "component": row.component,
            "pos / among": f"{row.n_positive} / {row.n_among}",
            "max AP": f"{row.max_ap:.3f} {row.best_neuron}",
            "median AP": round(row.median_ap, 3),
            "min AP": round(row.min_ap, 3),
            f"top-{k}": _shares(row.top),
            f"bottom-{k}": _shares(row.bottom),
            "Gini top/bottom": f"{row.gini_top:.3f} / {row.gini_bottom:.3f}",
        }
        for row in summary.rows
    ]
    render(
        rows, title=f"AP selectivity of run(s) {summary.run} (Gini over {summary.gini_unit.replace('_', ' x ')} cells)"
    )
    out.print(
        "[dim]pos / among: positive examples / examples compared (AP of a random neuron ~ their ratio); "
        f"top-{k} / bottom-{k}: where the group's {k} highest / lowest-AP neurons are[/dim]"
    )
    for o in summary.overlaps:
        out.print(
            f"[bold]{o.component}: neurons shared by {o.side}-{k} unimodal language sets, {o.first} vs {o.second}"
        )
        render(
            [
                {f"{o.first} \\ {o.second}": language, **{c: int(v) for c, v in zip(o.columns, counts, strict=True)}}
                for language, counts in zip(o.languages, o.result.counts, strict=True)
            ]
        )


def _shares(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "-"
    return " · ".join(f"{PANEL_SHORT[p]} {100 * n / total:.0f}%" for p, n in counts.items())
