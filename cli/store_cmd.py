"""``hookpoints store ...``: look after a store."""

from __future__ import annotations

import click

from cli.console import out, render


@click.group("store")
def command() -> None:
    """Inspect a store."""


@command.command("info")
@click.argument("store_path", metavar="STORE")
def info(store_path: str) -> None:
    """What STORE holds: runs, their examples and hook points, and table sizes."""
    from store.catalog import Store
    from store.summary import run_summary, table_sizes

    store = Store.open(store_path)
    meta = store.meta()
    out.print(f"[bold]{store.location.uri}[/bold]  schema version {meta.get('schema_version')}")
    render(run_summary(store), title="runs")
    render(table_sizes(store), title="tables")
