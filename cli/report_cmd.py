"""``hookpoints report``: one self-contained HTML file of what a store holds (docs/report.md)."""

from __future__ import annotations

import click
from hookpoints.cli.console import err, out


@click.command("report")
@click.option("--store", "store_path", required=True, help="Store folder or s3:// URI.")
@click.option("--run", "runs", multiple=True, help="Only these runs and the analyses over them (repeatable).")
@click.option(
    "--out",
    "out_path",
    metavar="FILE.html",
    help="HTML file, not inside the store (default: STORE-report.html beside a local store, "
    "hookpoints-report.html here for s3://).",
)
@click.option(
    "--magnitudes/--no-magnitudes",
    default=True,
    show_default=True,
    help="Layer-wise magnitudes (Figure 6 of the SeamlessM4T v2 neuron paper): one "
    "aggregate over the ranked runs' activations, the report's only scan of them.",
)
def command(store_path: str, runs: tuple[str, ...], out_path: str | None, magnitudes: bool) -> None:
    """Runs, AP rankings (Figures 2-4 and 6 of the SeamlessM4T v2 neuron paper), intervention sweeps (its
    Figure 5) and clustering (Figures 3-4, 8, 10, 13 and Tables 1-2 of 'Demystifying Representation Spaces of
    Multilingual and Multimodal Aspects in Large Audio Language Models') of a store, in one HTML file with
    figures inline."""
    from hookpoints.analyses.report import write_report
    from hookpoints.store.catalog import Store

    store = Store.open(store_path)
    with err.status("writing the report") as status:
        path = write_report(
            store, list(runs) or None, out_path, magnitudes=magnitudes, on_step=lambda s: status.update(f"report: {s}")
        )
    out.print(f"report: {path}", highlight=False, soft_wrap=True)
