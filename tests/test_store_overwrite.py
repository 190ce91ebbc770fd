"""`record --overwrite`'s swap (store/overwrite.py): the swapped-in files keep what a normal write gives them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from hookpoints.store import tables
from hookpoints.store.writer import HookRows, open_run

from hookpoints.errors import UserError
from tests.hostile_helpers import SETTINGS, hooks

_STATS = ("num_records", "null_count", "min", "max", "partition")


def record(store, run: str, if_exists: str = "error") -> None:
    """Three commits of three examples each (ids e00..e22) at h0 and h1: three files per partition."""
    schema = pa.table({"example_id": ["a"], "text": ["x"]}).schema
    writer = open_run(
        store, run, settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists=if_exists
    )
    rng = np.random.default_rng(0)
    for part in range(3):
        ids = [f"e{part}{i}" for i in range(3)]
        rows = {h["hook"]: HookRows(ids, rng.normal(size=(3, 4)).astype(np.float32)) for h in hooks()}
        writer.add(pa.table({"example_id": ids, "text": [f"t{i}" for i in ids]}), rows)
        writer.flush()
    writer.finish()


def file_stats(store, table: str) -> list[dict]:
    """Each file's Delta statistics as delta-rs reads them from the log (no path, no time)."""
    actions = pa.table(tables.open_table(store.location, table).get_add_actions(flatten=False)).to_pylist()
    return sorted(({key: action[key] for key in _STATS} for action in actions), key=repr)


def test_an_overwrite_keeps_the_files_statistics_of_a_normal_write(store):
    """The swap re-added the staging run's files with `numRecords` alone: no null counts, no min/max, so a reader
    filtering on example_id read every file of the run. They now carry the statistics a fresh write gives."""
    record(store, "r1")
    fresh = {table: file_stats(store, table) for table in ("hooks", "examples", "activations")}
    assert fresh["activations"][0]["min"]["example_id"] is not None  # a fresh write has them (store/files.py)
    record(store, "r1", if_exists="overwrite")  # the same rows, recorded aside and swapped in
    assert {table: file_stats(store, table) for table in fresh} == fresh
    with store.query() as session:
        assert session.sql("SELECT count(*) AS n FROM activations WHERE run = 'r1'")["n"][0].as_py() == 18


def test_data_skipping_still_prunes_the_files_of_an_overwritten_run(store):
    record(store, "r1", if_exists="error")
    record(store, "r1", if_exists="overwrite")
    dataset = tables.dataset(store.location, "activations")
    assert len(list(dataset.get_fragments())) == 6  # three files for each of h0 and h1
    kept = list(dataset.get_fragments(filter=ds.field("example_id") == "e11"))
    assert len(kept) == 2  # only the file of each hook holding e10..e12
    assert dataset.to_table(filter=ds.field("example_id") == "e11").num_rows == 2


class _Paused(Exception):
    """Stops an overwrite's swap just before it moves the activations (another process, mid-swap)."""


def test_a_session_opened_during_an_overwrites_swap_never_takes_mixed_rows_for_a_complete_run(store, monkeypatch):
    """A session pins each table's version one after the other, and the swap commits each table's move on its
    own: a session that read `run_events` before the swap began and the other tables during it showed run r1
    `complete` (the old run's settings) with the new recording's examples beside the old one's activations.
    A session now checks that `run_events` did not change while it pinned the others, and pins again if it did:
    it shows r1 as being overwritten (analyses refuse it) or all of one recording."""
    from hookpoints.store import delta_read, overwrite

    record(store, "r1")  # the old recording: texts "te00".., random vectors
    schema = pa.table({"example_id": ["a"], "text": ["x"]}).schema
    writer = open_run(
        store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists="overwrite"
    )
    new = {h["hook"]: HookRows(["e00"], np.full((1, 4), 7, np.float32)) for h in hooks()}
    writer.add(pa.table({"example_id": ["e00"], "text": ["new"]}), new)
    writer.replaces = None  # the staging run is complete; its swap is started below, while a session opens
    writer.finish()

    move_run, open_table, swapped = overwrite.move_run, delta_read.open_table, []

    def move_until_activations(store, table, source, target):
        if table == "activations":
            raise _Paused
        move_run(store, table, source, target)

    def swap_while_pinning(location, table):
        delta = open_table(location, table)
        if table == "activations" and not swapped:  # the session pinned run_events and activations: swap now
            swapped.append(table)
            monkeypatch.setattr(overwrite, "move_run", move_until_activations)
            try:
                overwrite.swap(store, "r1", SETTINGS, {})
            except _Paused:
                pass
            monkeypatch.setattr(overwrite, "move_run", move_run)
        return delta

    monkeypatch.setattr(delta_read, "open_table", swap_while_pinning)
    with store.query() as session:
        status = session.sql("SELECT status, message FROM runs WHERE run = 'r1'").to_pylist()
        texts = session.sql("SELECT text FROM examples WHERE run = 'r1' ORDER BY example_id")["text"].to_pylist()
        values = session.sql("SELECT activation FROM activations WHERE run = 'r1'")["activation"].to_pylist()
    monkeypatch.undo()
    assert swapped  # the swap did run while the session pinned its tables
    assert texts == ["new"] and len(values) == 18  # the new examples beside the old activations: mixed ...
    assert status[0]["status"] == "failed" and status[0]["message"].startswith("being overwritten")  # ... not complete

    assert overwrite.recover(store, "r1")  # the swap finished (the next record does this)
    with store.query() as session:
        assert session.sql("SELECT status FROM runs WHERE run = 'r1'")["status"].to_pylist() == ["complete"]
        values = session.sql("SELECT activation FROM activations WHERE run = 'r1'")["activation"].to_pylist()
    assert values == [[7.0] * 4] * 2


def killed_while_swapping(store):
    """r1 recorded, then overwritten with one example of 7s, killed after the swap moved the hooks."""
    from hookpoints.store import overwrite

    record(store, "r1")
    schema = pa.table({"example_id": ["a"], "text": ["x"]}).schema
    writer = open_run(
        store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists="overwrite"
    )
    new = {h["hook"]: HookRows(["e00"], np.full((1, 4), 7, np.float32)) for h in hooks()}
    writer.add(pa.table({"example_id": ["e00"], "text": ["new"]}), new)
    writer.replaces = None  # killed right after the staging run was logged complete ...
    writer.finish()
    overwrite.move_run(store, "hooks", overwrite.staging_name("r1"), "r1")  # ... and after the hooks' swap


def core_rows(store) -> dict:
    with store.query() as session:
        return {
            table: session.sql(f"SELECT run, count(*) AS n FROM {table} GROUP BY run ORDER BY run").to_pylist()
            for table in ("hooks", "examples", "activations")
        }


def test_deleting_a_run_whose_overwrite_was_killed_while_swapping_in_deletes_the_overwrite_too(store):
    """`store delete --run r1` left the killed overwrite `r1~overwrite` (complete, its hooks already moved and
    deleted with r1): the next `record` of r1 finished its swap, logging r1 `complete` with activations and no
    hooks, and refused the new recording ("already exists"). The delete now removes the pending overwrite too."""
    from hookpoints.store.verify import verify

    killed_while_swapping(store)
    store.delete_run("r1")
    assert store.run_info("r1") is None and store.run_info("r1~overwrite") is None
    assert core_rows(store) == {"hooks": [], "examples": [], "activations": []}
    assert verify(store).ok, verify(store).findings
    record(store, "r1")  # a new recording under the name, as after any delete
    assert core_rows(store)["activations"] == [{"run": "r1", "n": 18}]


def test_a_record_after_a_run_deleted_during_its_swap_does_not_bring_back_part_of_it(store, monkeypatch):
    """The same, with the delete done before this fix (or killed before it reached the overwrite): the next
    `record` no longer finishes a swap whose run was deleted since; it deletes what is left of the overwrite."""
    from hookpoints.store import catalog, overwrite
    from hookpoints.store.verify import verify

    killed_while_swapping(store)
    monkeypatch.setattr(overwrite, "staging_name", lambda run: run + "~none")  # the delete does not see it
    catalog.Store.delete_run(store, "r1")
    monkeypatch.undo()
    assert store.run_info("r1~overwrite").status == "complete"  # left, its hooks gone with r1
    found = [finding.message for finding in verify(store).findings if finding.table == "runs"]
    assert found == [  # not "record ... --resume finishes it": r1 is gone
        "the overwrite of run 'r1' was killed while swapping in its new rows (complete as run 'r1~overwrite'): run "
        f"'r1' was deleted since: `hookpoints store delete {store.location.uri} --run r1~overwrite` removes what is "
        "left of the overwrite"
    ]
    record(store, "r1")
    assert store.run_info("r1").status == "complete" and store.run_info("r1~overwrite") is None
    assert core_rows(store) == {
        table: [{"run": "r1", "n": n}] for table, n in [("hooks", 2), ("examples", 9), ("activations", 18)]
    }


def test_an_overwrite_swaps_in_past_an_analysis_table_whose_folder_was_deleted(store):
    """`scores` registered but its folder removed by hand (`store delete` and SQL sessions skip such a table): the
    swap moved the rows, then stopped on the table with a FileNotFoundError traceback, leaving r1 `failed` ("being
    overwritten") and every later `record` of r1 stopping the same way. The swap now skips it too."""
    import shutil

    from hookpoints.analyses.ranking import SCORES_SCHEMA, SCORES_TABLE

    record(store, "r1")
    row = {"label_set": "modality/text", "hook": "h0", "neuron": 0, "ap": 0.9, "n_positive": 1, "n_among": 3}
    store.append(SCORES_TABLE, pa.Table.from_pylist([{**row, "run": "r1", "runs": ["r1"]}], schema=SCORES_SCHEMA))
    shutil.rmtree(f"{store.location.uri}/{SCORES_TABLE.name}")
    schema = pa.table({"example_id": ["a"], "text": ["x"]}).schema
    writer = open_run(
        store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists="overwrite"
    )
    writer.add(
        pa.table({"example_id": ["e00"], "text": ["new"]}),
        {h["hook"]: HookRows(["e00"], np.ones((1, 4), np.float32)) for h in hooks()},
    )
    writer.finish()
    assert store.run_info("r1").status == "complete" and store.run_info("r1~overwrite") is None
    assert core_rows(store) == {
        table: [{"run": "r1", "n": n}] for table, n in [("hooks", 2), ("examples", 1), ("activations", 2)]
    }


def test_what_verify_says_removes_an_overwrite_left_of_a_deleted_run(store, monkeypatch, run_cli):
    from hookpoints.store import catalog, overwrite
    from hookpoints.store.verify import verify

    killed_while_swapping(store)
    monkeypatch.setattr(overwrite, "staging_name", lambda run: run + "~none")  # a delete of before this fix
    catalog.Store.delete_run(store, "r1")
    monkeypatch.undo()
    code, _, err = run_cli("store", "delete", store.location.uri, "--run", "r1~overwrite")
    assert code == 0, err
    assert verify(store).ok and core_rows(store) == {"hooks": [], "examples": [], "activations": []}


def test_a_run_starting_or_ending_while_a_session_pins_its_tables_leaves_its_snapshot_as_pinned(store, monkeypatch):
    """Only a commit that may change rows already there (a swap's, a delete's) makes a session pin again: a run
    starting or ending meanwhile (100 shards starting at once) does not, and its end does not show, as the
    run's last rows may come after the session's activations."""
    from hookpoints.store import delta_read

    record(store, "r1")
    open_table, opened = delta_read.open_table, []

    def log_while_pinning(location, table):
        opened.append(table)
        delta = open_table(location, table)
        if table == "activations" and opened.count(table) == 1:
            store.log_run_event("r2", "recording", SETTINGS, {}, shard=(0, 1))
            store.log_run_event("r2", "complete", SETTINGS, {}, shard=(0, 1))
        return delta

    monkeypatch.setattr(delta_read, "open_table", log_while_pinning)
    with store.query() as session:
        runs = session.sql("SELECT run FROM runs ORDER BY run")["run"].to_pylist()
    monkeypatch.undo()
    assert runs == ["r1"] and opened.count("activations") == 1  # pinned once, r2 not in its snapshot
    with store.query() as session:
        assert session.sql("SELECT run FROM runs ORDER BY run")["run"].to_pylist() == ["r1", "r2"]


def test_an_overwrite_whose_run_was_deleted_while_it_recorded_is_still_finished_after_a_kill(store):
    """Deleted before the new recording was complete, the run's name is free: the overwrite swaps in under it, and
    a swap killed half-way is finished by the next `record`, not taken for a run deleted during its swap."""
    from hookpoints.store import overwrite
    from hookpoints.store.verify import verify

    record(store, "r1")
    schema = pa.table({"example_id": ["a"], "text": ["x"]}).schema
    writer = open_run(
        store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists="overwrite"
    )
    store.delete_run("r1")  # while the overwrite records: its staging run is not complete, so it stays
    new = {h["hook"]: HookRows(["e00"], np.full((1, 4), 7, np.float32)) for h in hooks()}
    writer.add(pa.table({"example_id": ["e00"], "text": ["new"]}), new)
    writer.replaces = None  # killed right after the staging run was logged complete ...
    writer.finish()
    overwrite.move_run(store, "hooks", overwrite.staging_name("r1"), "r1")  # ... and after the hooks' swap
    found = [finding.message for finding in verify(store).findings if finding.table == "runs"]
    assert found == [
        "the overwrite of run 'r1' was killed while swapping in its new rows (complete as run 'r1~overwrite'): "
        "`hookpoints record` of run 'r1' with --resume and the overwrite's other options finishes it"
    ]
    assert overwrite.recover(store, "r1")
    assert store.run_info("r1").status == "complete" and store.run_info("r1~overwrite") is None
    assert core_rows(store) == {
        table: [{"run": "r1", "n": n}] for table, n in [("hooks", 2), ("examples", 1), ("activations", 2)]
    }


def test_a_delete_landing_during_an_overwrites_swap_leaves_no_complete_run_without_rows(store, monkeypatch):
    """`store delete --run r1` run while r1's overwrite swaps in (after its moves, before its last commit): the
    delete took every row of r1 and logged it deleted, then the swap logged r1 `complete` ("overwritten") over
    nothing: a complete run without hooks, examples or activations, and the next `record` of r1 refused. The
    swap's last commit now lands only onto the run_events version it checked; finding the delete, it stops."""
    from hookpoints.store import overwrite
    from hookpoints.store.verify import verify

    record(store, "r1")
    schema = pa.table({"example_id": ["a"], "text": ["x"]}).schema
    writer = open_run(
        store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists="overwrite"
    )
    new = {h["hook"]: HookRows(["e00"], np.full((1, 4), 7, np.float32)) for h in hooks()}
    writer.add(pa.table({"example_id": ["e00"], "text": ["new"]}), new)
    move_run = overwrite.move_run

    def move_then_delete(store, table, source, target):
        move_run(store, table, source, target)
        if table == "activations":  # another member's `store delete --run r1`, between the swap's commits
            store.delete_run("r1")

    monkeypatch.setattr(overwrite, "move_run", move_then_delete)
    with pytest.raises(UserError, match="^run 'r1' was deleted while its overwrite swapped in: the overwrite is"):
        writer.finish()
    monkeypatch.undo()
    assert store.run_info("r1") is None and store.run_info("r1~overwrite") is None  # as the delete asked
    assert core_rows(store) == {"hooks": [], "examples": [], "activations": []}
    assert verify(store).ok, verify(store).findings
    record(store, "r1")  # the name is free again
    assert store.run_info("r1").status == "complete" and core_rows(store)["activations"] == [{"run": "r1", "n": 18}]


def test_a_run_starting_just_after_a_swap_began_does_not_hide_the_swap_from_a_session(store, monkeypatch):
    """A session pinning its tables during a swap pins again (above), but it read which commits landed from
    delta-rs' `history()`, which lists the newest commits on storage while numbering them from the version
    loaded: a shard starting between the session's look at the log and that call hid the swap's `failed`
    commit, and the session showed r1 `complete` over the new examples and the old activations."""
    from deltalake import DeltaTable
    from hookpoints.store import delta_read, overwrite

    record(store, "r1")
    schema = pa.table({"example_id": ["a"], "text": ["x"]}).schema
    writer = open_run(
        store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists="overwrite"
    )
    new = {h["hook"]: HookRows(["e00"], np.full((1, 4), 7, np.float32)) for h in hooks()}
    writer.add(pa.table({"example_id": ["e00"], "text": ["new"]}), new)
    writer.replaces = None
    writer.finish()

    move_run, open_table, update, done = overwrite.move_run, delta_read.open_table, DeltaTable.update_incremental, []

    def move_until_activations(store, table, source, target):
        if table == "activations":
            raise _Paused
        move_run(store, table, source, target)

    def swap_while_pinning(location, table):
        delta = open_table(location, table)
        if table == "activations" and "swap" not in done:
            done.append("swap")
            monkeypatch.setattr(overwrite, "move_run", move_until_activations)
            with pytest.raises(_Paused):
                overwrite.swap(store, "r1", SETTINGS, {})
            monkeypatch.setattr(overwrite, "move_run", move_run)
        return delta

    def update_then_a_shard_starts(self, *args, **kwargs):
        update(self, *args, **kwargs)
        if done == ["swap"]:  # another team member's shard logs its start right now
            done.append("start")
            store.log_run_event("r2", "recording", SETTINGS, {}, shard=(0, 2))

    monkeypatch.setattr(delta_read, "open_table", swap_while_pinning)
    monkeypatch.setattr(DeltaTable, "update_incremental", update_then_a_shard_starts)
    with store.query() as session:
        status = session.sql("SELECT status FROM runs WHERE run = 'r1'")["status"].to_pylist()
        texts = session.sql("SELECT text FROM examples WHERE run = 'r1'")["text"].to_pylist()
        values = session.sql("SELECT activation FROM activations WHERE run = 'r1'")["activation"].to_pylist()
    monkeypatch.undo()
    assert done == ["swap", "start"] and texts == ["new"] and len(values) == 18  # mixed rows ...
    assert status == ["failed"]  # ... never shown as a complete run


def test_verify_while_a_teammate_starts_a_run_or_deletes_one_finds_nothing(store, monkeypatch):
    """verify read run_events, then activations, examples and hooks, each at its latest version: a run started
    (its first rows committed) or deleted in between was named as 'rows of run 'r2', which is deleted or was never
    started: `hookpoints store delete STORE --run r2` removes them', sending the user to delete a live recording.
    Runs whose events changed while the tables were read are left to the next verify."""
    from hookpoints.store import catalog
    from hookpoints.store.verify import verify

    record(store, "r1")
    record(store, "r3")
    dataset, moved = catalog.Store.dataset, []
    schema = pa.table({"example_id": ["a"], "text": ["x"]}).schema

    def change_after_run_events(self, name):
        if name == "activations" and not moved:  # verify's integrity check has just read run_events
            moved.append(name)
            writer = open_run(self, "r2", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema)
            rows = {h["hook"]: HookRows(["e00"], np.ones((1, 4), np.float32)) for h in hooks()}
            writer.add(pa.table({"example_id": ["e00"], "text": ["t"]}), rows)
            writer.flush()  # still recording
            self.delete_run("r3")
        return dataset(self, name)

    monkeypatch.setattr(catalog.Store, "dataset", change_after_run_events)
    report = verify(store)
    monkeypatch.undo()
    assert moved
    assert [f.message for f in report.findings if f.level == "error"] == []
    assert [(f.level, f.message) for f in verify(store).findings if f.table == "runs"] == [
        ("warning", "run 'r2' is still recording (or its process was killed)")
    ]


def test_two_records_finishing_the_same_killed_swap_at_once_both_go_on(store, monkeypatch):
    """Two `record --resume` of r1 after a kill during its swap both finish it (each table's move is idempotent):
    the one whose last commit comes second found the first's events, and must not say r1 was deleted."""
    from hookpoints.store import overwrite

    killed_while_swapping(store)
    move_run, raced = overwrite.move_run, []

    def move_and_race(store, table, source, target):
        move_run(store, table, source, target)
        if table == "activations" and not raced:
            raced.append(table)
            assert overwrite.recover(store, "r1")  # the other process, all the way

    monkeypatch.setattr(overwrite, "move_run", move_and_race)
    assert overwrite.recover(store, "r1")
    monkeypatch.undo()
    assert raced and store.run_info("r1").status == "complete" and store.run_info("r1~overwrite") is None
    assert core_rows(store) == {
        table: [{"run": "r1", "n": n}] for table, n in [("hooks", 2), ("examples", 1), ("activations", 2)]
    }
