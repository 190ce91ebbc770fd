"""``hookpoints selection``: where the top-k / bottom-k neurons of ranked label sets are, from the scores table."""

from __future__ import annotations

from pathlib import Path

import click
from hookpoints.cli.console import FORMATS, err, out, render


@click.command("selection")
@click.option("--store", "store_path", required=True, help="Store folder or s3:// URI.")
@click.option("--run", "runs", multiple=True, required=True, help="The run(s) of the ranking (as given to ap).")
@click.option("--label-set", "patterns", multiple=True, metavar="GLOB", help="Label sets to show (default: all).")
@click.option("--component", "components", multiple=True, help="Only these module groups (repeatable).")
@click.option(
    "--k",
    "k",
    type=int,
    help="Size of the top-k / bottom-k selection (default: 1000 if the ranking stored it, else its smallest k: "
    "what ap and the report show).",
)
@click.option(
    "--gini-unit",
    type=click.Choice(["layer_submodule", "submodule", "layer"]),
    default="layer_submodule",
    show_default=True,
    help="Cells the selection's Gini is computed over.",
)
@click.option(
    "--overlap",
    nargs=2,
    metavar="ROWS COLUMNS",
    help="Also the overlap matrix between two label set globs, e.g. 'unimodal/speech/*' 'unimodal/text/*'.",
)
@click.option(
    "--overlap-run",
    "overlap_runs",
    multiple=True,
    help="With --overlap: run(s) of the COLUMNS ranking (default: --run).",
)
@click.option(
    "--side",
    type=click.Choice(["top", "bottom", "both"]),
    default="both",
    show_default=True,
    help="Selections --list and --overlap show (the summary shows both).",
)
@click.option("--list", "list_neurons", is_flag=True, help="List the selected neurons of one label set.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="csv and json print one table: the neurons (--list), the overlaps (--overlap), else the summary.",
)
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), help="Write figures here.")
def command(
    store_path, runs, patterns, components, k, gini_unit, overlap, overlap_runs, side, list_neurons, fmt, plots_dir
) -> None:
    """Counts per layer x submodule, Gini and overlaps of the neurons selected by a ranking (hookpoints ap)."""
    from hookpoints.analyses.examples import run_key
    from hookpoints.analyses.selection import FIGURE_K, selected_neurons, shown_k, stored_sets
    from hookpoints.analyses.selection import overlap as overlap_matrix
    from hookpoints.cli.ap_cmd import check_plots_dir, report
    from hookpoints.store.catalog import Store

    from hookpoints.errors import UserError

    if overlap_runs and overlap is None:
        raise UserError("--overlap-run names the runs of an --overlap's columns: give --overlap ROWS COLUMNS too")
    check_plots_dir(plots_dir)
    store = Store.open(store_path)
    run = run_key(runs)
    with store.query() as session:
        sets = stored_sets(session, run, list(patterns) or None)
        if k is None:
            stored = session.sql("SELECT any_value(ks) AS ks FROM scores WHERE run = $run", {"run": run})
            k = shown_k(stored["ks"][0].as_py() or [FIGURE_K])
        if list_neurons:
            if len(sets) != 1:
                raise UserError(f"--list shows one label set; --label-set matches {len(sets)}: narrow it")
            component = components[0] if len(components) == 1 else None
            render(selected_neurons(session, run, sets[0].label_set, k, side=side, component=component), fmt)
            return
        columns_run = run_key(overlap_runs) if overlap_runs else run
        if overlap is not None:  # checked before the summary is printed
            rows_sets = stored_sets(session, run, [overlap[0]])
            rows = [s.label_set for s in rows_sets]
            cols_sets = stored_sets(session, columns_run, [overlap[1]])
    report(
        store,
        run,
        [s.label_set for s in sets],
        k,
        plots_dir,
        components=list(components) or None,
        gini_unit=gini_unit,
        overlaps=overlap is None,
        fmt="table" if fmt == "table" else fmt if overlap is None else None,  # csv / json: one table on stdout
    )
    if overlap is None:
        return
    note = out if fmt == "table" else err
    machine_rows = []
    with store.query() as session:
        columns = [s.label_set for s in cols_sets]
        shared = sorted(set.intersection(*(set(s.components) for s in [*rows_sets, *cols_sets])))
        for component in [c for c in shared if not components or c in components]:
            for chosen in ("bottom", "top") if side == "both" else (side,):
                result = overlap_matrix(session, (run, rows), (columns_run, columns), component, k, chosen)
                matrix = [
                    (name, {column: int(v) for column, v in zip(columns, counts, strict=True)})
                    for name, counts in zip(rows, result.counts, strict=True)
                ]
                if fmt == "table":
                    out.print(f"[bold]{component}: neurons shared by {chosen}-{k} selections")
                    render([{"rows \\ columns": name, **by_column} for name, by_column in matrix])
                else:
                    machine_rows += [
                        {"component": component, "side": chosen, "k": k, "row": name, **by_column}
                        for name, by_column in matrix
                    ]
                if plots_dir is not None:
                    from hookpoints.analyses.figures import safe, save
                    from hookpoints.analyses.figures_selectivity import overlap_figure

                    title = f"{overlap[0]} (run {run}) vs {overlap[1]} (run {columns_run})"
                    paths = save(
                        overlap_figure(result, title),
                        plots_dir,
                        f"overlap-{safe(run)}-{safe(overlap[0])}-{safe(overlap[1])}-{component}-{chosen}{k}",
                    )
                    note.print(f"plot: {paths[0]}", soft_wrap=True)
    if fmt != "table":
        render(machine_rows, fmt)
