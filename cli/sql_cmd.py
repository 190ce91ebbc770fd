"""``hookpoints sql``: read-only SQL over a store."""

from __future__ import annotations

import click
from hookpoints.cli.console import FORMATS
from hookpoints.cli.params import FiniteFloat


@click.command("sql")
@click.option("--store", "store_path", required=True, help="Store folder or s3:// URI.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option(
    "--timeout",
    type=FiniteFloat(0, strict=True),
    default=600,
    show_default=True,
    help="Stop the query after this many seconds.",
)
@click.argument("query")
def command(store_path: str, fmt: str, timeout: float, query: str) -> None:
    """Run one read-only SELECT over the store's views: runs, hooks, examples, activations, neurons.

    Rows stream out as they are computed (csv and json print all of them; table the first 1000).
    """
    from hookpoints.cli.sql_output import write_stream
    from hookpoints.store.catalog import Store

    with Store.open(store_path).query() as session:
        write_stream(session.batches(query, timeout=timeout), fmt)
