"""Manifests: the examples to record, as JSONL, CSV or Parquet, with an ``id``, the input, and labels.

Speech examples name a WAV/FLAC file in an ``audio`` column (relative to the manifest's folder); a FLEURS
folder can be given instead of a manifest (:func:`read_data`). Every column besides ``id`` is kept with the
example in the store's ``examples`` table (``id`` becomes ``example_id``), so labels such as language,
modality or speaker can be used in SQL and in analyses.
"""

from __future__ import annotations

import codecs
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from hookpoints.errors import UserError

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

    @property
    def base(self) -> Path:
        """The folder relative paths in the manifest (``audio``) start from."""
        return self.path if self.path.is_dir() else self.path.parent

    def require(self, column: str) -> None:
        """Check that every example has a non-empty ``column`` (the input a run reads)."""
        _require(self.table, f"{'FLEURS folder' if self.path.is_dir() else 'manifest'} {self.path}", column, self.ids)

    def read_as(self, column: str) -> None:
        """Check the input a run reads (``text`` or ``audio``) and label a FLEURS folder's rows with it: they
        say ``modality = speech`` (recordings), but a run that reads their transcripts (T2TT) saw text, and the
        analyses compare modalities by that label (a T2TT run of FLEURS was counted as speech)."""
        self.require(column)
        if self.path.is_dir() and "modality" in self.table.column_names:
            modality = pa.array([("speech" if column == "audio" else "text")] * self.table.num_rows, pa.string())
            self.table = self.table.set_column(self.table.column_names.index("modality"), "modality", modality)

    def audio_path(self, value: str) -> Path:
        return audio_path(self.base, value)


def audio_path(base: Path, value: str) -> Path:
    """An ``audio`` value as a path: absolute as given, relative from the manifest's folder ``base``."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def read_manifest(path: str | Path, *, required: tuple[str, ...] = ("text",)) -> Manifest:
    """Read and check a manifest; every problem is a one-line :class:`UserError` naming what to fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"manifest {path}: unknown format {path.suffix!r}; use .jsonl, .csv or .parquet")
    table = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[kind](path)
    return Manifest(path, checked(table, f"manifest {path}", required=required, id_column="id"))


def read_data(
    path: str | Path,
    *,
    required: tuple[str, ...] = ("text",),
    split: str | None = None,
    languages: tuple[str, ...] | None = None,
    limit: int | None = None,
) -> Manifest:
    """A manifest file, or a FLEURS folder (``split``, ``languages`` and ``limit`` apply to FLEURS only)."""
    path = Path(path)
    if path.is_dir():
        from hookpoints.fleurs import read_fleurs

        table = read_fleurs(path, split=split or "test", languages=languages, limit=limit)
        return Manifest(path, checked(table, f"FLEURS folder {path}", required=required, id_column="id"))
    if split or languages or limit is not None:
        raise UserError("--split, --languages and --limit apply to a FLEURS folder, not to a manifest file")
    return read_manifest(path, required=required)


def checked(table: pa.Table, source: str, *, required: tuple[str, ...], id_column: str = "example_id") -> pa.Table:
    """``table`` with ids checked (present, unique) and renamed to ``example_id``, and required inputs present."""
    if table.num_rows == 0:
        raise UserError(f"{source} has no rows")
    twice = [name for name, count in Counter(table.column_names).items() if count > 1]
    if twice:  # a CSV header naming a column twice was a KeyError (exit 1)
        raise UserError(f"{source} has two columns named {twice[0]!r}: rename or drop one")
    if id_column not in table.column_names:
        raise UserError(f"{source} has no {id_column!r} column (it has: {', '.join(table.column_names)}): add it")
    if id_column != "example_id" and "example_id" in table.column_names:
        raise UserError(f"{source} has an 'example_id' column: the store names ids that way, call it 'id'")
    ids = [None if value is None else str(value) for value in table[id_column].to_pylist()]
    missing = [(row, value) for row, value in enumerate(ids, start=1) if not value or not value.strip()]
    if missing:
        row, value = missing[0]
        what = f"an id of only whitespace ({value!r})" if value else "no id"
        raise UserError(f"{source}: row {row} has {what}; every example needs a unique id")
    duplicates = [value for value, count in Counter(ids).items() if count > 1]
    if duplicates:
        raise UserError(
            f"{source} has duplicate ids ({', '.join(repr(d) for d in duplicates[:3])}"
            f"{' ...' if len(duplicates) > 3 else ''}): ids must be unique"
        )
    for column in required:
        _require(table, source, column, ids)
    rest = _storable(table.drop_columns([id_column]), source)
    return rest.add_column(0, "example_id", pa.array(ids, pa.string()))


def _storable(table: pa.Table, source: str) -> pa.Table:
    """Label columns as the store (Delta Lake) holds them: a pandas categorical (dictionary) column as its values,
    float16 as float32, timestamps in microseconds, unsigned integers as wider signed ones; a type Delta refuses
    (durations, times, 256-bit decimals) is named before anything is written. Before, float16 and uint8 values
    over 127 failed at the first commit (a Rust backtrace, the run left failed), and a categorical or a pandas
    datetime (ns) column was refused once the store held that column (as text, as us)."""
    for i, field in enumerate(table.schema):
        kind = field.type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if pa.types.is_float16(kind):
            kind = pa.float32()
        elif pa.types.is_timestamp(kind) and kind.unit != "us":  # Delta keeps microseconds: a later ns column
            kind = pa.timestamp("us", kind.tz)  # (pandas' datetimes) was refused against the stored us one
        elif pa.types.is_unsigned_integer(kind):  # Delta reads uint8 as int8: 200 failed at the commit
            kind = {8: pa.int16(), 16: pa.int32()}.get(kind.bit_width, pa.int64())
        if kind != field.type:
            try:
                table = table.set_column(
                    i, field.name, table.column(i).cast(kind, safe=not pa.types.is_timestamp(kind))
                )
            except pa.ArrowInvalid:
                raise UserError(
                    f"{source}: column {field.name!r} holds values over 2**63 - 1: store them as text"
                ) from None
        if _unstorable(kind):
            raise UserError(
                f"{source}: column {field.name!r} holds {kind}, which the store (Delta Lake) cannot hold: convert it "
                "(to text or a number)"
            )
    return table


def _unstorable(kind: pa.DataType) -> bool:
    if pa.types.is_duration(kind) or pa.types.is_time(kind) or pa.types.is_decimal256(kind):
        return True
    if pa.types.is_float16(kind) or pa.types.is_interval(kind) or pa.types.is_dictionary(kind):
        return True  # nested in a list or struct (a top-level one was cast above)
    return any(_unstorable(kind.field(i).type) for i in range(kind.num_fields))


def _require(table: pa.Table, source: str, column: str, ids: list[str]) -> None:
    if column not in table.column_names:
        raise UserError(f"{source} has no {column!r} column (it has: {', '.join(table.column_names)}): add it")
    values = table[column].to_pylist()
    wrong = [(ids[i], value) for i, value in enumerate(values) if value is not None and not isinstance(value, str)]
    if wrong:
        example, value = wrong[0]
        raise UserError(
            f"{source}: example {example!r} has {column} {value!r} ({type(value).__name__}), not a string; "
            f"make the {column!r} column text (in JSON, quote it)"
        )
    empty = [ids[i] for i, value in enumerate(values) if not isinstance(value, str) or not value.strip()]
    if empty:
        what = "text" if column == "text" else f"{column!r}"
        raise UserError(f"{source}: example {empty[0]!r} has empty {what}; give it one or remove the example")


def _read_jsonl(path: Path) -> pa.Table:
    rows = []
    _check_utf8(path)
    with path.open(encoding="utf-8-sig") as lines:  # a byte-order mark (Windows editors) is skipped
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"manifest {path}, line {number}: not valid JSON ({error.msg})") from None
            except RecursionError:
                raise UserError(
                    f"manifest {path}, line {number}: JSON nested too deeply to read; flatten that value"
                ) from None
            if not isinstance(row, dict):
                raise UserError(f"manifest {path}, line {number}: expected a JSON object per line")
            rows.append(row)
    try:
        return pa.Table.from_pylist(rows)
    except RecursionError:
        raise UserError(f"manifest {path}: a value is nested too deeply to store; flatten it") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise UserError(
            f"manifest {path}: a column mixes types ({_one_line(error)}); make each column one type"
        ) from None


def _read_csv(path: Path) -> pa.Table:
    # ids, inputs and languages are text even when they look like numbers ("001", a text "1984")
    text = {name: pa.string() for name in ("id", "text", "audio", "language")}
    _check_utf8(path)
    try:
        inferred = pacsv.read_csv(path, convert_options=_csv_options(text))
        raw = pacsv.read_csv(path, convert_options=_csv_options(dict.fromkeys(inferred.column_names, pa.string())))
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise UserError(f"manifest {path} is not a readable CSV file: {_one_line(error)}") from None
    columns = [
        column if _reads_back(column, raw.column(i)) else raw.column(i) for i, column in enumerate(inferred.columns)
    ]
    return pa.table(columns, names=inferred.column_names)


def _csv_options(column_types: dict[str, pa.DataType]) -> pacsv.ConvertOptions:
    return pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=False)


_PLAIN_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _reads_back(column: pa.ChunkedArray, raw: pa.ChunkedArray) -> bool:
    """Whether a label column may keep the number/boolean type pyarrow inferred: no value's text is lost.

    Every text must be a plain number (no ``007``, ``+1``, ``.5``) and no two texts may read as the same value
    (``1`` and ``1.0``, ``true`` and ``True``); dates and other inferred types stay text.
    """
    if pa.types.is_string(column.type) or pa.types.is_null(column.type):
        return True
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
        return False
    texts: dict[object, str] = {}
    for value, text in zip(column.to_pylist(), raw.to_pylist(), strict=True):
        if value is None:
            continue
        if not pa.types.is_boolean(column.type) and not _PLAIN_NUMBER.fullmatch(text):
            return False
        if texts.setdefault(value, text) != text:
            return False
    return True


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"manifest {path} is not a readable Parquet file: {_one_line(error)}") from None


def _check_utf8(path: Path) -> None:
    """Refuse a text manifest that is not UTF-8, naming the first bad line (read in 1 MiB blocks)."""
    decoder, line, offset = codecs.getincrementaldecoder("utf-8")(), 1, 0
    with path.open("rb") as handle:
        while block := handle.read(2**20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                start = min(max(error.start, 0), len(block) - 1)  # (a character split across blocks: about)
                line += block[:start].count(b"\n")
                raise UserError(
                    f"manifest {path}, line {line}: not UTF-8 (byte 0x{block[start]:02x} at offset "
                    f"{offset + start}); save the file as UTF-8"
                ) from None
            line += block.count(b"\n")
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"manifest {path}, line {line}: ends inside a UTF-8 character; save it as UTF-8") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]
