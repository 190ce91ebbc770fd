"""Shared rich consoles and output formats (table, csv, json) for command results."""

from __future__ import annotations

import csv
import datetime
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow as pa
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

# Piped output (files, grep, tests) gets wide lines instead of folded table cells.
# Emoji codes off: text from a store or an error message (``:-1:``) prints as written.
out = Console(emoji=False) if Console().is_terminal else Console(width=200, emoji=False)
err = Console(stderr=True, emoji=False)

FORMATS = ("table", "csv", "json")


def progress() -> Progress:
    """A progress bar on stderr for long work (examples done, rate, time left)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


@contextmanager
def counting(label: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """``(on_start, on_batch)`` callbacks driving a progress bar that appears only once work starts."""
    bar = progress()
    task = bar.add_task(label, start=False)

    def on_start(total: int) -> None:
        bar.update(task, total=total)
        bar.start()
        bar.start_task(task)

    try:
        yield on_start, lambda n: bar.advance(task, n)
    finally:
        bar.stop()


def render(rows: pa.Table | list[dict], fmt: str = "table", *, title: str | None = None) -> None:
    """Print rows as a rich table, CSV, or JSON (a list of row objects)."""
    if isinstance(rows, pa.Table):
        columns, records = rows.column_names, rows.to_pylist()
    else:
        records = rows
        columns = list(records[0]) if records else []
    if fmt == "json":
        sys.stdout.write(strict_json(records, indent=1) + "\n")
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        for record in records:
            writer.writerow([_cell(record[c], csv_cell=True) for c in columns])
    else:
        table = Table(title=title, show_lines=False, header_style="bold cyan")
        for column in columns:
            table.add_column(Text(column), overflow="fold")
        for record in records:  # cells are Text, never markup: "[/INST]" or ":-1:" from a store print as written
            table.add_row(*[Text("null", "dim") if record[c] is None else Text(_cell(record[c])) for c in columns])
        out.print(table)
        out.print(Text(f"{len(records)} row{'s' if len(records) != 1 else ''}", "dim"))


def strict_json(value, indent: int | None = None) -> str:
    """JSON that strict parsers accept: NaN and infinities as null, timestamps as ISO text, bytes as hex."""
    return json.dumps(_finite(value), default=_plain, ensure_ascii=False, allow_nan=False, indent=indent)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


def _plain(value):
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _cell(value, *, csv_cell: bool = False) -> str:
    if value is None:
        return "" if csv_cell else "[dim]null[/dim]"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        if csv_cell:
            return json.dumps(value, default=_plain)
        shown = ", ".join(_cell(v, csv_cell=True) for v in value[:6])
        return f"[{shown}{', …' if len(value) > 6 else ''}] ({len(value)})"
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat(timespec="seconds")
    return str(value)
