"""``hookpoints sql``: read-only SQL over a store."""

from __future__ import annotations

import click
from hookpoints.cli.console import FORMATS
from hookpoints.cli.params import FiniteFloat
from hookpoints.cli.sql_export import EXPORT_FORMATS


@click.command("sql")
@click.option("--store", "store_path", required=True, help="Store folder or s3:// URI.")
@click.option("--format", "fmt", type=click.Choice(FORMATS + EXPORT_FORMATS), default="table", show_default=True)
@click.option("--out", "out_path", metavar="FILE", help="File for --format parquet or arrow (vectors stay lists).")
@click.option(
    "--timeout",
    type=FiniteFloat(0, strict=True),
    default=600,
    show_default=True,
    help="Stop the query after this many seconds.",
)
@click.argument("query")
def command(store_path: str, fmt: str, out_path: str | None, timeout: float, query: str) -> None:
    """Run one read-only SELECT over the store's views: runs, hooks, examples, activations, neurons.

    Rows stream out as they are computed (csv, json and the files print all of them; table the first 1000).
    """
    from hookpoints.cli.sql_export import check_export, export
    from hookpoints.cli.sql_output import write_stream
    from hookpoints.store.catalog import Store

    from hookpoints.errors import UserError

    path = check_export(fmt, out_path)
    store = Store.open(store_path)
    if path is not None and store.location.is_local and path.resolve().is_relative_to(store.location.uri):
        raise UserError(
            f"--out {path} is inside the store: write the result elsewhere (a store holds only its own tables, and a "
            "file there could replace one of them)"
        )
    with store.query() as session:
        if path is not None:
            rows = export(session.batches(query, timeout=timeout), fmt, path)
            click.echo(f"{rows} rows -> {path}", err=True)
            return
        write_stream(*session.rows(query, timeout=timeout), fmt)
