"""``hookpoints store ...``: look after a store (local folder or s3:// URI)."""

from __future__ import annotations

import sys

import click
from hookpoints.cli.console import err, out, progress, render
from hookpoints.cli.params import FiniteFloat
from rich.markup import escape


@click.group("store")
def command() -> None:
    """Inspect, check and look after a store."""


@command.command("info")
@click.argument("store_path", metavar="STORE")
def info(store_path: str) -> None:
    """What STORE holds: runs, their examples and hook points, and table sizes."""
    from hookpoints.store.catalog import Store
    from hookpoints.store.summary import run_summary, table_sizes

    store = Store.open(store_path)
    meta = store.meta()
    out.print(f"[bold]{escape(store.location.uri)}[/bold]  schema version {escape(str(meta.get('schema_version')))}")
    with store.query() as session:  # one snapshot for both: the runs and the sizes agree, each log read once
        runs, sizes = run_summary(store, session), table_sizes(store, session)
    render(runs, title="runs")
    render(sizes, title="tables")


@command.command("verify")
@click.argument("store_path", metavar="STORE")
def verify(store_path: str) -> None:
    """Check STORE: schema, every file readable and whole, vector widths, NaN, ids, duplicates.

    Exits with status 1 when something is wrong (each problem is listed with the file or row it is in).
    """
    from hookpoints.store.catalog import Store
    from hookpoints.store.verify import data_files
    from hookpoints.store.verify import verify as run_verify

    store = Store.open(store_path, check_version=False)
    with progress() as bar:
        task = bar.add_task("reading files", total=data_files(store))
        report = run_verify(store, on_file=lambda _: bar.advance(task))
    render(report.tables, title=f"tables of {store.location.uri}")
    styles = {"error": "bold red", "warning": "yellow", "info": "dim"}
    for finding in report.findings:  # one line each, never wrapped: paths stay copyable
        label = f"[{styles[finding.level]}]{finding.level}[/{styles[finding.level]}]"
        out.print(f"{label} {finding.table}: {escape(finding.message)}", soft_wrap=True, highlight=False)
    if report.ok:
        out.print("[bold green]store is consistent[/bold green]")
        return
    errors = sum(finding.level == "error" for finding in report.findings)
    err.print(f"[bold red]{errors} problem{'s' if errors != 1 else ''} found[/bold red]")
    sys.exit(1)


@command.command("compact")
@click.argument("store_path", metavar="STORE")
@click.option(
    "--target-mb", type=FiniteFloat(0, strict=True), default=64, show_default=True, help="Size of the merged files."
)
def compact(store_path: str, target_mb: float) -> None:
    """Merge STORE's small files into larger ones (safe while others read and record)."""
    from hookpoints.store.catalog import Store
    from hookpoints.store.maintenance import compact as run_compact

    store = Store.open(store_path)
    with err.status("compacting"):
        rows = run_compact(store, target_mb=target_mb)
    render(rows, title="compacted (old files stay for readers until `hookpoints store vacuum`)")


@command.command("vacuum")
@click.argument("store_path", metavar="STORE")
@click.option(
    "--retention-hours",
    type=int,
    default=168,
    show_default=True,
    help="Keep every file a table version of this many past hours uses (readers of those versions keep working).",
)
@click.option("--dry-run", is_flag=True, help="List what would be deleted, delete nothing.")
@click.option("--force", is_flag=True, help="Allow a retention under 1 hour (only when nobody else uses the store).")
def vacuum(store_path: str, retention_hours: int, dry_run: bool, force: bool) -> None:
    """Delete files of STORE that no recent table version uses (replaced, deleted, or never committed)."""
    from hookpoints.store.catalog import Store
    from hookpoints.store.maintenance import vacuum as run_vacuum

    store = Store.open(store_path)
    with err.status("vacuuming"):
        rows = run_vacuum(store, retention_hours=retention_hours, dry_run=dry_run, force=force)
    render(rows, title="dry run: nothing deleted" if dry_run else f"vacuumed (retention {retention_hours} h)")


@command.command("migrate")
@click.argument("store_path", metavar="STORE")
def migrate(store_path: str) -> None:
    """Upgrade STORE, written by an older hookpoints, to this version's schema (adds columns only)."""
    from hookpoints.store.catalog import Store
    from hookpoints.store.migrate import migrate as run_migrate
    from hookpoints.store.schema import SCHEMA_VERSION

    store = Store.open(store_path, check_version=False)
    steps = run_migrate(store)
    for step in steps:
        out.print(f"  {step}")
    out.print(f"store {store.location.uri} is at schema version {SCHEMA_VERSION}" + ("" if steps else " already"))


@command.command("delete")
@click.argument("store_path", metavar="STORE")
@click.option("--run", required=True, help="The run to delete (all its shards).")
def delete(store_path: str, run: str) -> None:
    """Delete a run's rows from STORE (its files go at the next vacuum after the retention period)."""
    from hookpoints.store.catalog import Store

    store = Store.open(store_path)
    store.delete_run(run)
    out.print(f"deleted run [bold]{escape(run)}[/bold] from {escape(store.location.uri)}")
