"""Read-only use for teammates: ``hookpoints sql`` changes nothing, reads nothing else, and runs no code.

Every statement below is refused with a one-line error, and afterwards every file of the store is byte for
byte what it was. Nothing hookpoints writes into a store is executable when read: a store holds Parquet
files and Delta's JSON logs only (``store verify`` refuses anything else), and no module that reads a store
uses pickle.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hookpoints.store import tables
from hookpoints.store.catalog import Store

from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import record

REPO = Path(__file__).resolve().parent.parent

REFUSED = [
    "INSERT INTO _examples VALUES ('r', 'x')",
    "DELETE FROM _activations",
    "UPDATE _hooks SET width = 0",
    "CREATE TABLE t AS SELECT 1",
    "DROP VIEW runs",
    "COPY (SELECT * FROM activations) TO '/tmp/leak.parquet'",
    "ATTACH '/tmp/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "PRAGMA enable_profiling",
    "CALL pragma_version()",
    "SELECT 1; DROP VIEW runs",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('" + str(REPO / "store") + "/*.parquet')",
    "SELECT * FROM glob('/etc/*')",
    "EXPORT DATABASE '/tmp/dump'",
    "SELECT * FROM read_text('/etc/hostname')",
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, gpt2_dir):
    folder = tmp_path_factory.mktemp("sql")
    rows = [{"id": f"ex{i}", "text": f"text {i}"} for i in range(4)]
    (folder / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = Store.open(folder / "store", create=True)
    record(load(gpt2_dir), read_manifest(folder / "m.jsonl"), store, "r", hooks=["blocks.0.hook_resid_post"])
    return store


def _fingerprint(store: Store) -> dict[str, str]:
    root = Path(store.location.uri)
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() for path in root.rglob("*")
            if path.is_file()}  # fmt: skip


@pytest.mark.parametrize("statement", REFUSED)
def test_statements_that_write_or_reach_outside_are_refused(recorded, run_cli, statement):
    before = _fingerprint(recorded)
    code, out, err = run_cli("sql", "--store", recorded.location.uri, statement)
    assert code == 2, out
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(r"read-only|exactly one SQL statement|SQL failed|does not parse", err), err
    assert _fingerprint(recorded) == before
    assert not Path("/tmp/leak.parquet").exists()


def test_reading_still_works_after_refusals(recorded, run_cli):
    query = "SELECT count(*) AS n FROM activations"
    code, out, _ = run_cli("sql", "--store", recorded.location.uri, "--format", "json", query)
    assert code == 0
    assert json.loads(out) == [{"n": 4}]


def test_a_store_holds_only_parquet_and_delta_json(recorded):
    for path in tables.list_files(recorded.location):
        name = path.rsplit("/", 1)[-1]
        assert name.endswith((".parquet", ".json")) or name == "_last_checkpoint", path
        data = (Path(recorded.location.uri) / path).read_bytes()
        if name.endswith(".parquet"):
            assert data[:4] == data[-4:] == b"PAR1", path
        else:
            for line in data.decode("utf-8").splitlines():
                json.loads(line)  # plain JSON, nothing else


def test_no_module_that_reads_a_store_deserialises_code():
    """No pickle, no torch.load, no numpy object arrays: reading a teammate's store never runs code."""
    banned = re.compile(
        r"\bimport pickle\b|\bpickle\.|torch\.load\(|allow_pickle\s*=\s*True|\bjoblib\.load|(?<![.\w])eval\("
    )
    for package in ("store", "cli", "analyses", "hookpoints"):
        for path in (REPO / package).rglob("*.py"):
            assert not banned.search(path.read_text(encoding="utf-8")), path
