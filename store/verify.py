"""``hookpoints store verify``: check that a store is whole and consistent, and name what is not.

Checks, in order:

1. the schema version, every core table's log, and its columns and types (store/schema.py);
2. every data file the current version refers to: present, of the size the log recorded, a readable
   Parquet footer with the logged row count, and every page decodable (a truncated or damaged file is named);
3. nothing else lives in the store: only Parquet files and Delta's JSON logs (no pickle or anything else
   that runs code when read), and no symbolic link in a local store (readers would follow it anywhere);
   files not in the current version are counted (vacuum removes them);
4. activations: each vector's width is its hook's width, exactly one of the vector columns (``activation``,
   ``activation_f16``, ``activation_f16_bytes``) is set, and no NaN or inf unless the writer flagged the row
   (``finite = false``);
5. integrity: no duplicate example, hook or activation row; every activation's example and hook exist; no
   rows of deleted runs; every example of a complete run is recorded at every hook of the run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from hookpoints.store import tables, vectors, verify_logs, verify_tables
from hookpoints.store.catalog import Store
from hookpoints.store.schema import CORE_TABLES, SCHEMA_VERSION

from hookpoints.errors import UserError


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning | info
    table: str
    message: str


@dataclass
class VerifyReport:
    findings: list[Finding] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)  # table, version, files, rows, MiB

    @property
    def ok(self) -> bool:
        return not any(finding.level == "error" for finding in self.findings)

    def add(self, level: str, table: str, message: str) -> None:
        self.findings.append(Finding(level, table, message))


def verify(store: Store, *, on_file: Callable[[str], None] | None = None) -> VerifyReport:
    """Run every check; ``on_file(path)`` is called as each data file is read (for a progress bar)."""
    report = VerifyReport()
    if verify_logs.check_logs(store, ["store_meta"], report):
        return report  # nothing else can be found without the store's own table
    version = store.schema_version()
    if version != SCHEMA_VERSION:
        older = version is not None and version < SCHEMA_VERSION
        hint = "run `hookpoints store migrate`" if older else "use the hookpoints that wrote it"
        if version is None and "created_at" not in store.meta():  # written last with the version, at creation
            hint = "its creation was interrupted (the process creating it killed?): recording into it finishes it"
        report.add("error", "store_meta", f"schema version {version}, this hookpoints checks {SCHEMA_VERSION}: {hint}")
        return report
    _check_links(store, report)
    names = ["store_meta", *verify_logs.registered_names(store, report)]
    missing = [name for name in CORE_TABLES if name not in names]
    for name in missing:
        report.add("error", name, "table is not registered in store_meta or missing")
    broken = verify_logs.check_logs(store, names[1:], report)
    widths = _hook_widths(store) if "hooks" in names and "hooks" not in broken else {}
    for name in names:
        if name not in broken:
            _check_table(store, name, widths, report, on_file)
    _check_root(store, names, report)
    if not missing and not broken and report.ok:
        verify_tables.check_integrity(store, report)
        verify_tables.check_runs(store, report)
    return report


def data_files(store: Store) -> int:
    """How many data files the current version of every table refers to (the progress bar's total)."""
    total = 0
    try:
        names = ["store_meta", *store.table_names()]
    except UserError:
        return 0  # store_meta itself is damaged: verify says so
    for name in names:
        try:
            total += tables.open_table(store.location, name).get_add_actions().num_rows
        except BaseException as error:  # noqa: BLE001 - a damaged log is verify's finding, not a crash here
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
    return total


# -- tables and files --------------------------------------------------------------------------------------


def _check_table(store: Store, name: str, widths: dict, report: VerifyReport, on_file) -> None:
    try:
        table = tables.open_table(store.location, name)
        schema = pa.schema(table.schema().to_arrow())
        actions = pa.table(table.get_add_actions(flatten=True))
    except BaseException as error:  # noqa: BLE001 - any failure to read the log (a Rust panic too) is the finding
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        report.add("error", name, f"cannot read the table's log: {_one_line(error)}")
        return
    spec = CORE_TABLES.get(name)
    if spec is not None:
        for wanted in spec.schema:
            if wanted.name not in schema.names:
                report.add("error", name, f"column {wanted.name!r} is missing")
            elif schema.field(wanted.name).type != wanted.type:
                found = schema.field(wanted.name).type
                report.add("error", name, f"column {wanted.name!r} is {found}, expected {wanted.type}")
    listing = tables.list_files(store.location, name)
    partitions = [column for column in actions.column_names if column.startswith("partition.")]
    nonfinite: Counter = Counter()
    for row in actions.select(["path", "size_bytes", "num_records", *partitions]).to_pylist():
        path = row["path"] = unquote(row["path"])  # the log holds paths URL-encoded (``hook=%253Ainput``)
        if on_file:
            on_file(f"{name}/{path}")
        data = _read_file(store, name, path, row, listing, report)
        if data is not None and name == "activations":
            _check_vectors(name, path, data, row, widths, report, nonfinite)
    for (run, hook), count in sorted(nonfinite.items()):
        report.add("warning", name, f"run {run!r}, hook {hook!r}: {count} vectors hold NaN or inf (flagged)")
    referenced = {unquote(path) for path in actions["path"].to_pylist()}
    foreign = [path for path in listing if path not in referenced and not _is_store_file(store, name, path)]
    for path in foreign:
        if verify_logs.is_cut_short(store, name, path):
            report.add(
                "warning",
                name,
                f"file {path} was cut short by an interrupted write (no Parquet footer; no commit refers to it): "
                "`hookpoints store vacuum` deletes it after the retention period",
            )
            continue
        report.add("error", name, f"unexpected file {path}: a store holds only Parquet files and Delta logs; remove it")
    stale = [p for p in listing if p.endswith(".parquet") and not p.startswith("_delta_log/") and p not in referenced]
    if stale:
        report.add(
            "info",
            name,
            f"{len(stale)} files not in the current version (replaced, deleted, or left by an interrupted write); "
            "`hookpoints store vacuum` deletes them after the retention period",
        )
    report.tables.append(
        {
            "table": name,
            "version": table.version(),
            "files": actions.num_rows,
            "rows": int(pc.sum(actions["num_records"]).as_py() or 0),
            "MiB": round((pc.sum(actions["size_bytes"]).as_py() or 0) / 2**20, 2),
        }
    )


def _read_file(store: Store, name: str, path: str, row: dict, listing: dict, report: VerifyReport):
    where = f"{name}/{path}"
    if path not in listing:
        report.add("error", name, f"file {where} is missing (the log refers to it)")
        return None
    if listing[path] != row["size_bytes"]:
        report.add(
            "error",
            name,
            f"file {where} is damaged: {listing[path]} bytes, the log recorded {row['size_bytes']} (truncated?)",
        )
        return None
    try:
        with tables.filesystem(store.location, name).open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle, page_checksum_verification=True)
            rows = parquet.metadata.num_rows
            if row["num_records"] is not None and rows != row["num_records"]:
                report.add("error", name, f"file {where} holds {rows} rows, the log recorded {row['num_records']}")
                return None
            return parquet.read()
    except Exception as error:  # noqa: BLE001 - an unreadable file is the finding
        report.add("error", name, f"file {where} is damaged: {_one_line(error)}")
        return None


def _is_store_file(store: Store, table: str, path: str) -> bool:
    """A Delta log file, or a Parquet file by content (a file's name proves nothing: ``x.pkl.parquet``)."""
    if verify_logs.LOG_FILE.match(path):
        return True
    data = path.endswith(".parquet") and not path.startswith("_delta_log/")
    return data and verify_logs.is_parquet(store, table, path)


def _check_root(store: Store, names: list[str], report: VerifyReport) -> None:
    """Nothing outside the tables' folders (e.g. a pickle dropped next to them)."""
    listing = tables.list_files(store.location)
    unregistered = {path.split("/", 1)[0] for path in listing if verify_logs.LOG_FILE.match(path.partition("/")[2])}
    for top in sorted(unregistered - {*names, *CORE_TABLES}):  # created by a process killed before registering it
        report.add(
            "error",
            "store",
            f"folder {top} is a Delta table that store_meta does not register (its creator was killed before "
            "registering it?): readers do not see its rows; the next write to that table registers it",
        )
    for path in listing:
        top = path.split("/", 1)[0]
        if top not in names and top not in CORE_TABLES and top not in unregistered:
            report.add("error", "store", f"unexpected file {path}: it belongs to no table of the store; remove it")


def _check_links(store: Store, report: VerifyReport) -> None:
    """No symbolic link in a local store: readers follow links (the log names a file, the file system opens what
    it points to), so a link planted in a shared store reads any file of the reader's machine into a table."""
    if not store.location.is_local:
        return
    root, links, folders = Path(store.location.uri), [], [store.location.uri]
    while folders:
        with os.scandir(folders.pop()) as entries:  # one listing per folder, no stat per file
            for entry in entries:
                if entry.is_symlink():
                    links.append((Path(entry.path).relative_to(root).as_posix(), os.readlink(entry.path)))
                elif entry.is_dir():
                    folders.append(entry.path)
    for path, target in sorted(links):
        report.add(
            "error",
            "store",
            f"{path} is a symbolic link (to {target}): readers would read what it points to; a store holds plain "
            "files and folders only: replace it with the file itself or record the run again",
        )


# -- activation vectors ------------------------------------------------------------------------------------


def _hook_widths(store: Store) -> dict[tuple[str, str], int]:
    hooks = store.dataset("hooks").to_table(columns=["run", "hook", "width"]).to_pylist()
    return {(row["run"], row["hook"]): row["width"] for row in hooks}


def _check_vectors(name, path, data: pa.Table, row: dict, widths, report: VerifyReport, nonfinite) -> None:
    where = f"{name}/{path}"
    run, hook = row.get("partition.run"), row.get("partition.hook")
    width = widths.get((run, hook))
    if width is None:
        return  # reported by the integrity check (an activation of an unknown hook)
    held = {column: data[column] for column in vectors.present(data.column_names)}  # (older files lack newer ones)
    count = np.zeros(data.num_rows, np.int64)  # [rows] vector columns set
    for column in held.values():
        count += np.asarray(column.is_valid())
    if (count != 1).any():
        wrong = int((count != 1).sum())
        report.add("error", name, f"file {where}: {wrong} rows do not hold exactly one activation vector")
        return
    nonfinite_rows = np.zeros(data.num_rows, dtype=bool)
    for kind, column in held.items():
        set_rows = np.asarray(column.is_valid())
        if not set_rows.any():
            continue
        column = vectors.as_binary(column) if kind == "activation_f16_bytes" else column.combine_chunks()
        present = column.filter(pa.array(set_rows))
        if kind == "activation_f16_bytes":
            lengths = np.asarray(pc.binary_length(present)) / 2  # bytes -> float16 values
        else:
            lengths = np.asarray(pc.list_value_length(present))
        wrong = int((lengths != width).sum())
        if wrong:
            report.add("error", name, f"file {where}: {wrong} vectors are not {width} wide (the width of {hook!r})")
            return
        if kind == "activation_f16_bytes":
            values = vectors.halves(present)[0].view(np.int16).reshape(len(present), width)  # [rows, width] bits
        else:
            flat = present.flatten()
            if flat.null_count:  # the writer never stores one (a float16 null would read as NaN bits)
                report.add("error", name, f"file {where}: {flat.null_count} null values inside vectors of {hook!r}")
                return
            values = np.asarray(flat).reshape(len(present), width)  # [rows, width] (-1 is ambiguous at width 0)
        nonfinite_rows[set_rows] = (_nonfinite_f32 if kind == "activation" else _nonfinite_f16)(values).any(axis=1)
    finite = data["finite"] if "finite" in data.column_names else pa.nulls(data.num_rows, pa.bool_())  # (v1 files)
    flagged = np.asarray(pc.fill_null(pc.invert(finite), False))  # the writer said: not finite
    unflagged = int((nonfinite_rows & ~flagged).sum())
    if unflagged:
        report.add("error", name, f"file {where}: {unflagged} vectors hold NaN or inf the writer did not flag")
    if flagged.any():
        nonfinite[run, hook] += int(flagged.sum())


def _nonfinite_f32(values: np.ndarray) -> np.ndarray:
    return ~np.isfinite(values)


def _nonfinite_f16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.int32) & 0x7C00) == 0x7C00  # exponent all ones: inf or NaN


def _one_line(error: BaseException) -> str:
    return verify_logs.one_line(error)
