"""``hookpoints magnitudes``: layer-wise activation magnitudes by group, their deviation from the mean trend, and
activation inequality (Gini over neurons), as in Experiment 3 of seeds/seamless-m4t-v2-neurons.txt."""

from __future__ import annotations

from pathlib import Path

import click
from hookpoints.cli.console import counting, err, out, render
from hookpoints.cli.params import FiniteFloat


@click.command("magnitudes")
@click.option("--store", "store_path", required=True, help="Store folder or s3:// URI.")
@click.option("--run", "runs", multiple=True, required=True, help="Run(s) to compare (repeatable).")
@click.option("--by", "by", multiple=True, help="Examples columns to group by (default: language and modality).")
@click.option("--where", metavar="PRED", help="Only the examples matching this predicate.")
@click.option(
    "--hooks", "patterns", multiple=True, metavar="GLOB", help="Hook points (default: all but layer outputs)."
)
@click.option("--component", "components", multiple=True, help="Only these module groups (repeatable).")
@click.option("--absolute", is_flag=True, help="Average |activation| instead of the signed activation.")
@click.option(
    "--scale",
    type=FiniteFloat(0, strict=True),
    default=1000.0,
    show_default=True,
    help="Factor the deviations are shown at.",
)
@click.option("--gini/--no-gini", "with_gini", default=True, show_default=True, help="Also activation inequality.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), help="Write figures here.")
def command(store_path, runs, by, where, patterns, components, absolute, scale, with_gini, plots_dir) -> None:
    """Mean pooled activation per layer and group, and its deviation from the mean trend (section 3.4 and
    Figure 6 of the SeamlessM4T v2 neuron paper)."""
    from hookpoints.analyses.examples import open_runs, select_examples
    from hookpoints.analyses.hook_matrix import shared_hooks
    from hookpoints.analyses.magnitudes import activation_gini, example_groups, group_columns, layer_magnitudes
    from hookpoints.cli.ap_cmd import check_plots_dir, note_left_out
    from hookpoints.store.catalog import Store

    check_plots_dir(plots_dir)
    store = Store.open(store_path)
    with store.query() as session:
        group = open_runs(session, list(runs))
        examples = select_examples(session, group, where)
        hooks = shared_hooks(session, group.runs, patterns=list(patterns) or None, components=list(components) or None)
        columns = group_columns(session, examples, list(by) or None)
        note_left_out(session, group.runs, hooks, list(patterns) or None)
        with err.status("layer-wise magnitudes: one aggregate over the runs' activations"):  # minutes at scale
            magnitudes = layer_magnitudes(session, examples, hooks, columns, absolute=absolute)
        groups = example_groups(session, examples, columns) if with_gini else None
    label = "|activation|" if absolute else "activation"
    shown = magnitudes.to_pylist()
    for row in shown:
        row["magnitude"] = float(f"{row['magnitude']:.6g}")  # 6 significant digits: 3e-09 is no 0
        row[f"deviation x{scale:g}"] = round(row.pop("deviation") * scale, 3)
    render(shown, title=f"layer-wise mean {label} of run(s) {group.key} by {', '.join(columns)}")
    inequality = None
    if with_gini:
        with counting("activation Gini (neurons)") as (on_start, on_progress):
            on_start(sum(h.width for h in hooks if h.layer is not None))
            inequality = activation_gini(store, examples, hooks, groups, on_progress=on_progress)
        render(
            [{**row, "gini": round(row["gini"], 4)} for row in inequality.to_pylist()],
            title="Gini over each layer's neurons of their mean |activation| in the group",
        )
    if plots_dir is not None:
        from hookpoints.analyses.figures import safe, save
        from hookpoints.analyses.figures_selectivity import activation_gini_figure, magnitude_figure

        paths = []
        for component in dict.fromkeys(magnitudes["component"].to_pylist()):
            title = f"run(s) {group.key}: mean {label} by layer"
            figure = magnitude_figure(magnitudes, columns, component, scale, title, absolute=absolute)
            paths += save(figure, plots_dir, f"magnitudes-{safe(group.key)}-{component}")
            if inequality is not None:
                figure = activation_gini_figure(inequality, columns, component, f"run(s) {group.key}")
                paths += save(figure, plots_dir, f"activation-gini-{safe(group.key)}-{component}")
        out.print(f"plots: {', '.join(str(p) for p in paths if p.suffix == '.png')} (and .svg)")
