"""``hookpoints sql``: read-only SQL over a store."""

from __future__ import annotations

import click
from hookpoints.cli.console import FORMATS, render


@click.command("sql")
@click.option("--store", "store_path", required=True, help="Store folder or s3:// URI.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.argument("query")
def command(store_path: str, fmt: str, query: str) -> None:
    """Run one read-only SELECT over the store's views: runs, hooks, examples, activations, neurons."""
    from hookpoints.store.catalog import Store

    with Store.open(store_path).query() as session:
        render(session.sql(query), fmt)
