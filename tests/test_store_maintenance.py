"""``store compact`` and ``store vacuum``: fewer files, same rows, and safe for readers within the retention."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hookpoints.store import tables
from hookpoints.store.catalog import Store
from hookpoints.store.maintenance import vacuum
from hookpoints.store.verify import verify

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import record

QUERY = "SELECT run, hook, example_id, activation FROM activations ORDER BY ALL"


@pytest.fixture(scope="module")
def small_files_recorded(tmp_path_factory, gpt2_dir) -> Path:
    """Two runs, each committed in many small files (a commit per batch of 2): recorded once for the module."""
    folder = tmp_path_factory.mktemp("small-files")
    rows = [{"id": f"ex{i}", "text": f"a sentence of {i} words " * (1 + i % 2), "lang": "en"} for i in range(10)]
    (folder / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = Store.open(folder / "store", create=True)
    model, manifest = load(gpt2_dir), read_manifest(folder / "m.jsonl")
    for run in ("a", "b"):
        record(model, manifest, store, run, hooks=["blocks.*.hook_resid_post"], batch_size=2, max_buffer_bytes=0)
    return folder / "store"


@pytest.fixture
def small_files_store(small_files_recorded, tmp_path) -> Store:
    """Each test's own copy of the two-run store (byte for byte its files), to compact, vacuum or damage."""
    shutil.copytree(small_files_recorded, tmp_path / "store")
    return Store.open(tmp_path / "store")


def _data_files(store: Store, table: str) -> int:
    return sum(not path.startswith("_delta_log/") for path in tables.list_files(store.location, table))


def test_compact_merges_files_and_keeps_every_row(small_files_store, run_cli):
    store = small_files_store
    with store.query() as session:
        before = session.sql(QUERY).to_pylist()
    files_before = tables.open_table(store.location, "activations").get_add_actions().num_rows
    code, out, err = run_cli("store", "compact", store.location.uri)
    assert code == 0, err
    files_after = tables.open_table(store.location, "activations").get_add_actions().num_rows
    assert files_after == 4 < files_before  # one file per partition: 2 runs x 2 hooks
    with store.query() as session:
        assert session.sql(QUERY).to_pylist() == before
    assert verify(store).ok


def test_readers_of_an_older_snapshot_keep_reading_until_the_retention_allows_vacuum(small_files_store, run_cli):
    store = small_files_store
    old = store.query()  # a teammate's session, opened before the maintenance
    expected = old.sql(QUERY).to_pylist()
    code, out, err = run_cli("store", "delete", store.location.uri, "--run", "b")
    assert code == 0 and "deleted run b" in out, err
    code, _, err = run_cli("store", "delete", store.location.uri, "--run", "b")
    assert code == 2 and "there is no run 'b'" in err
    assert run_cli("store", "compact", store.location.uri)[0] == 0
    assert run_cli("store", "vacuum", store.location.uri)[0] == 0  # default retention: one week
    assert old.sql(QUERY).to_pylist() == expected  # its files are all still there
    stale = _data_files(store, "activations")

    code, _, err = run_cli("store", "vacuum", store.location.uri, "--retention-hours", "0", "--force")
    assert code == 0, err
    assert _data_files(store, "activations") == 2 < stale  # only the compacted files of run a remain
    with pytest.raises(UserError):  # past the retention, an old snapshot may lose its files
        old.sql(QUERY)
    old.close()
    with store.query() as session:
        assert session.sql(QUERY).to_pylist() == [row for row in expected if row["run"] == "a"]
    assert verify(store).ok


def test_vacuum_deletes_files_a_killed_writer_left(small_files_store):
    store = small_files_store
    folder = store.location.uri + "/activations/run=a"
    from pathlib import Path

    some = next(Path(folder).rglob("*.parquet"))
    stray = some.with_name("part-00000-00000000-0000-0000-0000-000000000000-c000.zstd.parquet")
    stray.write_bytes(some.read_bytes())  # what a commit killed before its log entry leaves
    assert vacuum(store, retention_hours=0, dry_run=True, force=True)
    assert stray.exists()  # a dry run deletes nothing
    vacuum(store, retention_hours=0, force=True)
    assert not stray.exists()
    assert verify(store).ok


def test_vacuum_refuses_a_retention_that_would_break_readers(small_files_store, run_cli):
    files = tables.list_files(small_files_store.location)
    code, _, err = run_cli("store", "vacuum", small_files_store.location.uri, "--retention-hours", "0")
    assert code == 2
    assert "can delete files that running SQL sessions or recorders still use" in err
    code, _, err = run_cli("store", "vacuum", small_files_store.location.uri, "--retention-hours", "-1", "--force")
    assert code == 2
    assert "retention must be a whole number of hours, 0 or more" in err
    assert tables.list_files(small_files_store.location) == files


@pytest.mark.parametrize("target", ["nan", "inf", "-5", "0"])
def test_a_bad_compaction_target_is_refused_and_changes_nothing(store, run_cli, target):
    """`store compact --target-mb nan` (inf, -5, 0) gave ValueError / OverflowError from deep inside; now the
    option type refuses it, and the Python function refuses a size under one byte."""
    from hookpoints.store.maintenance import compact

    from tests.hostile_helpers import checksums, fill

    fill(store, "r1")
    root = Path(store.location.uri)
    before = checksums(root)
    code, _, err = run_cli("store", "compact", str(root), f"--target-mb={target}")
    assert code == 2 and "Invalid value for '--target-mb'" in err, err
    with pytest.raises(UserError, match="positive number of MiB"):
        compact(store, target_mb=float(target) if target != "0" else 1e-9)
    assert checksums(root) == before


def test_flipped_bytes_in_a_compacted_activations_file_are_found(small_files_store):
    """`store compact` rewrote the activations through delta-rs' writer, which writes no page checksums: three
    flipped bytes in a compacted file then read as wrong vectors and verify said the store was consistent. Now
    the activations are compacted into checksummed files (store/files.py) and verify names the damaged file."""
    from urllib.parse import unquote

    from hookpoints.store.maintenance import compact

    store = small_files_store
    with store.query() as session:
        before = session.sql(QUERY).to_pylist()
    rows = {row["table"]: row for row in compact(store)}
    assert rows["activations"]["files after"] < rows["activations"]["files before"]
    with store.query() as session:
        assert session.sql(QUERY).to_pylist() == before  # every row, bit for bit, in order
    assert verify(store).ok
    delta = tables.open_table(store.location, "activations")
    path = max(delta.get_add_actions(flatten=True).column("path").to_pylist(), key=len)
    damaged = Path(store.location.uri) / "activations" / unquote(path)
    data = bytearray(damaged.read_bytes())
    for offset in (-40, 0, 40):
        data[len(data) // 2 + offset] ^= 0x5A
    damaged.write_bytes(bytes(data))
    errors = [f.message for f in verify(store).findings if f.level == "error"]
    assert len(errors) == 1 and errors[0].startswith(f"file activations/{unquote(path)} is damaged"), errors


def test_a_compaction_racing_a_delete_does_not_bring_the_deleted_rows_back(small_files_store, monkeypatch):
    """The activations' compaction writes its merged file, then commits it in place of the files it read: a
    `store delete` landing in between must win (the merge is dropped), not see run a's rows come back."""
    from hookpoints.store import maintenance

    store = small_files_store
    with store.query() as session:
        kept = session.sql(QUERY.replace("FROM activations", "FROM activations WHERE run = 'b'")).to_pylist()
    write_files, raced = maintenance.files.write_files, []

    def write_then_delete(location, spec, data):
        actions = write_files(location, spec, data)
        if not raced and data["run"][0].as_py() == "a":
            raced.append(Store.open(location.uri).delete_run("a"))  # lands before the merge's commit
        return actions

    monkeypatch.setattr(maintenance.files, "write_files", write_then_delete)
    maintenance.compact(store)
    monkeypatch.undo()
    assert raced
    with store.query() as session:
        assert session.sql(QUERY).to_pylist() == kept  # run a stays deleted; run b whole
    assert verify(store).ok


def test_compact_and_vacuum_go_past_an_analysis_table_whose_folder_was_deleted(store, run_cli):
    """`scores` registered but its folder removed by hand: `store compact` and `store vacuum` stopped at it
    ("FileNotFoundError: table 'scores' is missing"), so no table of the store could be compacted or vacuumed.
    They now skip it, as SQL sessions and `store delete` do; a missing core table still stops them."""
    import shutil

    import pyarrow as pa
    from hookpoints.analyses.ranking import SCORES_SCHEMA, SCORES_TABLE

    from tests.hostile_helpers import fill, vectors

    for seed in range(3):  # three small commits of r1: files to merge
        fill(store, "r1", seed=seed, if_exists="resume" if seed else "error", columns={"example_id": [f"e{seed}"]})
    row = {"label_set": "l", "hook": "h0", "neuron": 0, "ap": 0.9, "n_positive": 1, "n_among": 3}
    store.append(SCORES_TABLE, pa.Table.from_pylist([{**row, "run": "r1", "runs": ["r1"]}], schema=SCORES_SCHEMA))
    shutil.rmtree(f"{store.location.uri}/{SCORES_TABLE.name}")
    before = vectors(store, "r1")
    code, out, err = run_cli("store", "compact", store.location.uri)
    assert code == 0, err
    assert _data_files(store, "activations") == 2 + 6  # one merged file per hook (the merged ones until vacuum)
    code, out, err = run_cli("store", "vacuum", store.location.uri, "--retention-hours", "0", "--force")
    assert code == 0, err
    assert _data_files(store, "activations") == 2 and vectors(store, "r1") == before
    shutil.rmtree(f"{store.location.uri}/hooks")
    code, out, err = run_cli("store", "compact", store.location.uri)
    assert code != 0 and "table 'hooks' is missing" in err
