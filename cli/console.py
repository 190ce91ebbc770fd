"""Shared rich consoles and output formats (table, csv, json) for command results."""

from __future__ import annotations

import csv
import datetime
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    import pyarrow as pa
    from rich.progress import Progress

# Piped output (files, grep, tests) gets wide lines instead of folded table cells.
# Emoji codes off: text from a store or an error message (``:-1:``) prints as written.
out = Console(emoji=False) if Console().is_terminal else Console(width=200, emoji=False)
err = Console(stderr=True, emoji=False)

FORMATS = ("table", "csv", "json")


def progress() -> Progress:
    """A progress bar on stderr for long work (examples done, rate, time left)."""
    from rich.progress import (  # here: `hookpoints sql` and `store info` show none (12 ms to import)
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
    from hookpoints.progress_bar import bar_callbacks

    with bar_callbacks(progress(), label) as callbacks:
        yield callbacks


def render(rows: pa.Table | list[dict], fmt: str = "table", *, title: str | None = None) -> None:
    """Print rows as a rich table, CSV, or JSON (a list of row objects)."""
    if hasattr(rows, "column_names"):  # an Arrow table (pyarrow is not imported here: `--help` starts faster)
        columns, records = rows.column_names, rows.to_pylist()
    else:
        records = rows
        columns = list(records[0]) if records else []
    if fmt == "json":
        sys.stdout.write(strict_json(records, indent=1) + "\n")
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for record in records:
            writer.writerow([_cell(record[c], csv_cell=True) for c in columns])
    else:
        table = Table(title=title, show_lines=False, header_style="bold cyan")
        cells = [[_cell(record[c]) for c in columns] for record in records]
        needed = 1 + 3 * len(columns)  # borders and padding
        for i, column in enumerate(columns):
            values = [row[i] for row in cells]
            if _names(values):  # hook names, runs, paths: copied by people, so never folded
                values = [shorten_middle(v) for v in values]
                for row, value in zip(cells, values, strict=True):
                    row[i] = value
                width = max([len(column), *(len(v) for v in values if v != NULL)])
                table.add_column(Text(column), no_wrap=True, overflow="ellipsis", min_width=width)
                needed += width
            else:
                table.add_column(Text(column), overflow="fold")
                needed += min(8, max([len(column), *(len(v) for v in values)]))
        for row in cells:  # cells are Text, never markup: "[/INST]" or ":-1:" from a store print as written
            table.add_row(*[_text(value) for value in row])
        if needed > out.width:  # the names do not fit side by side: one block per row instead of cut names
            _blocks(columns, cells, title)
            return
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


def _text(value: str) -> Text:
    """A cell as literal text (the null marker dimmed)."""
    return Text("null", "dim") if value is NULL else Text(value)


#: Longer path-like cells (with a '/') are shortened in the middle: the start and the file name stay.
PATH_LIMIT = 60
NULL = "[dim]null[/dim]"


def _blocks(columns: list[str], cells: list[list[str]], title: str | None) -> None:
    """Rows as ``column: value`` blocks (for tables too wide for the terminal)."""
    if title:
        out.print(Text(title, "bold"))
    pad = max(len(c) for c in columns)
    for n, row in enumerate(cells, 1):
        out.print(Text(f"-- row {n}", "dim"))
        for column, value in zip(columns, row, strict=True):
            out.print(Text.assemble((column.rjust(pad), "cyan"), "  ", _text(value)), soft_wrap=True)
    out.print(Text(f"{len(cells)} row{'s' if len(cells) != 1 else ''}", "dim"))


def shorten_middle(text: str, limit: int = PATH_LIMIT) -> str:
    """``text`` if it is short or not a path; else its start and end around an ellipsis (no wrapping)."""
    if len(text) <= limit or "/" not in text:
        return text
    tail = limit * 2 // 3
    return f"{text[: limit - tail - 1]}…{text[-tail:]}"


def _names(values: list[str]) -> bool:
    """Cells that are names (no spaces, no markup): hook names, runs, label sets, paths."""
    real = [v for v in values if v != NULL]
    return bool(real) and all(v and " " not in v and not v.startswith("[") for v in real)


def _plain(value):
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _cell(value, *, csv_cell: bool = False) -> str:
    if value is None:
        return "" if csv_cell else NULL
    if isinstance(value, float):  # csv keeps every digit (as `hookpoints sql` does); a table shows 6
        return str(value) if csv_cell else f"{value:.6g}"
    if isinstance(value, list):
        if csv_cell:
            return json.dumps(value, default=_plain)
        shown = ", ".join(f"{v:.6g}" if isinstance(v, float) else _cell(v, csv_cell=True) for v in value[:6])
        return f"[{shown}{', …' if len(value) > 6 else ''}] ({len(value)})"
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat(timespec="seconds")
    return str(value)
