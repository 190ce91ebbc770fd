"""Checks of a store's Delta logs and folders that run before anything is opened through delta-rs.

delta-rs reports a damaged log with a Rust backtrace (``Kernel error: Json error ... 0: <unknown>``) and
follows any path a log entry names, ``../other-store/...`` included. ``hookpoints store verify`` reads each
table's ``_delta_log`` itself first: every commit file must be whole JSON lines, every file an entry adds must
lie inside the table's folder, and the folder must have a log at all. A table whose log fails is named with
the file and left out of the later checks (they would only repeat the failure). Also: the table names
``store_meta`` registers must be plain names (a name like ``../other-store/activations`` would read a table
outside the store), and every file that is neither a Delta log entry nor Parquet data is flagged, whatever
its name says (a pickle named ``x.pkl.parquet`` or left in ``_delta_log/.tmp/``).

Example::

    broken = check_logs(store, ["store_meta", "hooks"], report)   # {"hooks"} if its log is damaged
"""

from __future__ import annotations

import json
import re

from hookpoints.store import tables
from hookpoints.store.catalog import TABLE_NAME, Store
from hookpoints.store.delta_read import inside
from hookpoints.store.location import without_backtrace

_COMMIT = re.compile(r"^_delta_log/(\d{20})\.json$")
#: Files Delta Lake itself keeps in a table's ``_delta_log`` folder (commits, checkpoints, their helpers).
LOG_FILE = re.compile(
    r"^_delta_log/(\d{20}\.json|\d{20}\.checkpoint(\.\d+\.\d+)?\.parquet|_last_checkpoint|\d{20}\.crc)$"
)


def registered_names(store: Store, report) -> list[str]:
    """Every table store_meta registers; a name that is not a plain table name is an error and left out."""
    names = []
    for key in store.meta():
        if not key.startswith("table:"):
            continue
        name = key.removeprefix("table:")
        if TABLE_NAME.match(name):
            names.append(name)
        else:
            report.add("error", "store_meta", f"registers a table named {name!r}, which is not inside the store")
    return sorted(names)


def check_logs(store: Store, names: list[str], report) -> set[str]:
    """Check each table's log files; the names of tables whose log is damaged."""
    broken = set()
    for name in names:
        listing = tables.list_files(store.location, name)
        commits = sorted(path for path in listing if _COMMIT.match(path))
        if not commits and not any(path.startswith("_delta_log/") for path in listing):
            report.add("error", name, f"{name}/_delta_log is missing: the table cannot be read")
            broken.add(name)
            continue
        for path in commits:
            problem = _check_commit(store, name, path)
            if problem:
                report.add("error", name, f"log entry {name}/{path} {problem}")
                broken.add(name)
    return broken


def _check_commit(store: Store, table: str, path: str) -> str | None:
    with tables.filesystem(store.location, table).open_input_stream(path) as handle:
        data = handle.read()
    try:
        lines = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"is damaged (not JSON lines: {error}); restore it from a backup"
    if not lines or not all(isinstance(line, dict) for line in lines):
        return "is damaged (empty or not Delta actions); restore it from a backup"
    for action in lines:
        for kind in ("add", "remove"):
            file = action.get(kind)
            if isinstance(file, dict) and not inside(str(file.get("path", ""))):
                return f"points outside the table ({kind} {file.get('path')!r}): restore the table from a backup"
    return None


def is_parquet(store: Store, table: str, path: str) -> bool:
    """Whether a file starts and ends with Parquet's magic bytes (whatever its name)."""
    filesystem = tables.filesystem(store.location, table)
    try:
        with filesystem.open_input_file(path) as handle:
            size = handle.size()
            head = handle.read(4)
            handle.seek(max(0, size - 4))
            return size >= 12 and head == b"PAR1" and handle.read(4) == b"PAR1"
    except OSError:
        return False


#: The name of an activations (or other fixed-schema) file as store/files.py writes it.
WRITER_FILE = re.compile(r"(^|/)part-[0-9a-f]{32}-\d+\.zstd\.parquet$")


def is_cut_short(store: Store, table: str, path: str) -> bool:
    """Whether a file that is not Parquet is one of this store's writer's, cut short by an interrupted write
    (a killed recording): its writer's name, and empty or holding Parquet's leading magic bytes only (Arrow
    writes a file in pieces; the footer comes last)."""
    if not WRITER_FILE.search(path):
        return False
    try:
        with tables.filesystem(store.location, table).open_input_file(path) as handle:
            return handle.size() == 0 or handle.read(4) == b"PAR1"
    except OSError:
        return False


def one_line(error: BaseException) -> str:
    """An error's message on one line, without delta-rs' Rust backtrace."""
    return without_backtrace(error)
