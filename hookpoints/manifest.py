"""Manifests: the examples to record, as JSONL, CSV or Parquet, with an ``id``, the input, and labels.

Every column besides ``id`` is kept with the example in the store's ``examples`` table (``id`` becomes
``example_id``), so labels such as language, modality or speaker can be used in SQL and in analyses.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from store.errors import UserError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Manifest:
    """A validated manifest: ``table`` has ``example_id`` first, then the other columns as given."""

    path: Path
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> list[str]:
        return self.table["example_id"].to_pylist()

    def column(self, name: str) -> list:
        return self.table[name].to_pylist()


def read_manifest(path: str | Path, *, required: tuple[str, ...] = ("text",)) -> Manifest:
    """Read and check a manifest; every problem is a one-line :class:`UserError` naming what to fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"manifest {path}: unknown format {path.suffix!r}; use .jsonl, .csv or .parquet")
    table = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[kind](path)
    if table.num_rows == 0:
        raise UserError(f"manifest {path} has no rows")
    for column in ("id", *required):
        if column not in table.column_names:
            raise UserError(
                f"manifest {path} has no {column!r} column (it has: {', '.join(table.column_names)}): add it"
            )
    if "example_id" in table.column_names:
        raise UserError(f"manifest {path} has an 'example_id' column: the store names ids that way, call it 'id'")
    ids = [None if value is None else str(value) for value in table["id"].to_pylist()]
    missing = [row for row, value in enumerate(ids, start=1) if not value]
    if missing:
        raise UserError(f"manifest {path}: row {missing[0]} has no id; every example needs a unique id")
    duplicates = [value for value, count in Counter(ids).items() if count > 1]
    if duplicates:
        raise UserError(
            f"manifest {path} has duplicate ids ({', '.join(repr(d) for d in duplicates[:3])}"
            f"{' ...' if len(duplicates) > 3 else ''}): ids must be unique"
        )
    if "text" in required:
        texts = table["text"].to_pylist()
        empty = [ids[i] for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
        if empty:
            raise UserError(f"manifest {path}: example {empty[0]!r} has empty text; give it text or remove it")
    rest = table.drop_columns(["id"])
    table = rest.add_column(0, "example_id", pa.array(ids, pa.string()))
    return Manifest(path, table)


def _read_jsonl(path: Path) -> pa.Table:
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"manifest {path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"manifest {path}, line {number}: expected a JSON object per line")
            rows.append(row)
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise UserError(
            f"manifest {path}: a column mixes types ({_one_line(error)}); make each column one type"
        ) from None


def _read_csv(path: Path) -> pa.Table:
    options = pacsv.ConvertOptions(column_types={"id": pa.string()}, strings_can_be_null=False)
    try:
        return pacsv.read_csv(path, convert_options=options)
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise UserError(f"manifest {path} is not a readable CSV file: {_one_line(error)}") from None


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"manifest {path} is not a readable Parquet file: {_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]
