"""Printing a query's result as it streams: batch by batch, text from the store printed literally.

``csv`` and ``json`` write every row, one batch at a time, so a 2 M-row SELECT never sits in memory; ``json``
is strict JSON (NaN and infinities become null); ``csv`` keeps them (a vector cell is ``[1.0, NaN, -Infinity]``).
``table`` is for reading on a screen: it shows the first :data:`TABLE_ROWS` rows and says when there are more.
Cells are rich ``Text``, never markup, so a manifest text like ``[/INST]``, ``[bold red]`` or ``:-1:`` prints as
written.

Example::

    write_stream(*session.rows("SELECT * FROM examples", timeout=600), "csv")

The rows come from ``QuerySession.rows`` (Python tuples, values as Arrow's ``to_pylist`` gives them), so
printing imports no pyarrow unless a column's type needs Arrow's conversion (store/query_rows.py).
"""

from __future__ import annotations

import csv
import datetime
import json
import sys
from collections.abc import Iterable

from hookpoints.cli.console import _plain, out, strict_json
from rich.table import Table
from rich.text import Text

TABLE_ROWS = 1000


def write_stream(names: list[str], chunks: Iterable[list[tuple]], fmt: str) -> int:
    """Write every chunk of rows in ``fmt`` (table, csv, json); the number of rows written."""
    if fmt == "csv":
        return _csv(names, chunks)
    if fmt == "json":
        return _json(names, chunks)
    return _table(names, chunks)


def _csv(names, chunks) -> int:
    writer, rows = csv.writer(sys.stdout, lineterminator="\n"), 0  # LF, as DuckDB COPY and pandas write
    writer.writerow(names)  # also for an empty result
    for chunk in chunks:
        for record in chunk:
            writer.writerow([_csv_cell(value) for value in record])
        rows += len(chunk)
    return rows


def _json(names, chunks) -> int:
    rows = 0
    sys.stdout.write("[")
    for chunk in chunks:
        for record in chunk:  # an object per row: a repeated column name keeps its last value
            sys.stdout.write(("\n" if rows == 0 else ",\n") + json_line(dict(zip(names, record, strict=True))))
            rows += 1
    sys.stdout.write("\n]\n" if rows else "]\n")
    return rows


def json_line(value) -> str:
    """Strict JSON of one value on one line (console.strict_json)."""
    return strict_json(value)


def _table(names, chunks) -> int:
    table, rows, more = Table(show_lines=False, header_style="bold cyan"), 0, False
    for name in names:
        table.add_column(Text(name), overflow="fold")
    for chunk in chunks:
        for record in chunk:
            if rows == TABLE_ROWS:
                more = True
                break
            table.add_row(*[_text_cell(value) for value in record])
            rows += 1
        if more:
            break
    out.print(table)
    if more:
        out.print(
            Text(f"first {TABLE_ROWS} rows shown; there are more: use --format csv or json for all, or LIMIT", "dim")
        )
    else:
        out.print(Text(f"{rows} row{'s' if rows != 1 else ''}", "dim"))
    return rows


def _csv_cell(value) -> str:
    """A csv cell: lists and structs as JSON that keeps NaN and infinities (``NaN``, ``Infinity``, ``-Infinity``,
    as Python's json reads them, and as the scalars of the same file print ``nan``/``inf``); never null."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=_plain, ensure_ascii=False)
    return str(value)


def _text_cell(value) -> Text:
    if value is None:
        return Text("null", style="dim")
    if isinstance(value, float):
        return Text(f"{value:.6g}")
    if isinstance(value, list):
        shown = ", ".join(_csv_cell(item) if not isinstance(item, float) else f"{item:.6g}" for item in value[:6])
        return Text(f"[{shown}{', …' if len(value) > 6 else ''}] ({len(value)})")
    if isinstance(value, (datetime.datetime, datetime.date)):
        return Text(value.isoformat(timespec="seconds") if isinstance(value, datetime.datetime) else value.isoformat())
    return Text(str(value))
