"""The stored schema version: an older store gets a clear message and a migration, a newer one a clear refusal."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from hookpoints.store.catalog import Store
from hookpoints.store.migrate import ADDED_COLUMNS
from hookpoints.store.schema import CORE_TABLES, SCHEMA_VERSION
from hookpoints.store.verify import verify

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.manifest import Manifest, read_manifest
from hookpoints.recorder import record
from tests.store_checks import assert_exactly_once

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def manifest(tmp_path):
    rows = [{"id": f"ex{i}", "text": f"text number {i}", "lang": "en"} for i in range(6)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return read_manifest(tmp_path / "m.jsonl")


@pytest.fixture
def version_1_store(tmp_path, gpt2_dir, manifest):
    """A store as hookpoints with schema version 1 wrote it: the same tables without version 2's columns.

    Run ``r`` recorded its first 4 examples and was killed (no ``complete`` event).
    """
    current = Store.open(tmp_path / "current", create=True)
    first_four = Manifest(manifest.path, manifest.table.slice(0, 4))
    record(load(gpt2_dir), first_four, current, "r", hooks=[HOOK])
    old = tmp_path / "old"
    dropped = {}  # every column added after version 1
    for added in ADDED_COLUMNS.values():
        for table, columns in added.items():
            dropped[table] = [*dropped.get(table, []), *columns]
    for name, spec in CORE_TABLES.items():
        data = current.dataset(name).to_table()
        if name == "run_events":
            data = data.filter(pa.compute.field("status") != "complete")
        data = data.drop_columns(dropped.get(name, []))
        if name == "store_meta":
            meta = dict(zip(data["key"].to_pylist(), data["value"].to_pylist(), strict=True))
            data = pa.table({"key": list(meta), "value": [{"schema_version": "1"}.get(k, v) for k, v in meta.items()]})
        write_deltalake(str(old / name), data, partition_by=list(spec.partition_by) or None)
    return old


def test_an_older_store_is_refused_with_the_migrate_command(version_1_store, run_cli):
    code, _, err = run_cli("sql", "--store", str(version_1_store), "SELECT * FROM runs")
    assert code == 2
    assert f"has schema version 1, older than this hookpoints' {SCHEMA_VERSION}: run `hookpoints store migrate" in err


def test_migrate_then_everything_works_on_the_old_rows(version_1_store, run_cli, gpt2_dir, manifest):
    before = {name: DeltaTable(str(version_1_store / name)).version() for name in CORE_TABLES}
    code, out, err = run_cli("store", "migrate", str(version_1_store))
    assert code == 0, err
    assert "run_events: added shard" in out and "activations: added finite" in out
    assert f"schema version {SCHEMA_VERSION}" in out
    # only metadata commits: no data file was rewritten
    for name in ("hooks", "examples"):
        assert DeltaTable(str(version_1_store / name)).version() == before[name]

    store = Store.open(version_1_store)
    info = store.run_info("r")
    assert (info.status, info.shards) == ("recording", 1)  # events without shard columns: shard 0 of 1
    summary = record(load(gpt2_dir), manifest, store, "r", hooks=[HOOK], if_exists="resume")
    assert (summary.recorded, summary.skipped) == (2, 4)
    assert_exactly_once(store, "r", manifest.ids, 1)
    assert store.run_info("r").status == "complete"
    assert verify(store).ok
    code, out, _ = run_cli("store", "migrate", str(version_1_store))
    assert code == 0 and "already" in out


def test_a_newer_store_is_refused_and_cannot_be_migrated(tmp_path, run_cli):
    store = Store.open(tmp_path / "store", create=True)
    DeltaTable(store.location.table_uri("store_meta")).update(
        updates={"value": f"'{SCHEMA_VERSION + 1}'"}, predicate="key = 'schema_version'"
    )
    code, _, err = run_cli("store", "info", str(tmp_path / "store"))
    assert code == 2
    assert f"schema version {SCHEMA_VERSION + 1}, written by a newer hookpoints" in err
    assert "upgrade hookpoints" in err
    code, _, err = run_cli("store", "migrate", str(tmp_path / "store"))
    assert code == 2 and "upgrade hookpoints instead" in err
    with pytest.raises(UserError, match="newer hookpoints"):
        Store.open(tmp_path / "store")
