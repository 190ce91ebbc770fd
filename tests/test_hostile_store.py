"""Hostile inputs against the store's writers: nothing lost on a failed overwrite, predicates always quoted."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hookpoints.store import tables
from hookpoints.store.catalog import Store
from hookpoints.store.overwrite import staging_name
from hookpoints.store.schema import CORE_TABLES, RUN_EVENTS
from hookpoints.store.verify import verify
from hookpoints.store.writer import HookRows, open_run

from hookpoints.errors import UserError
from tests.hostile_helpers import SETTINGS, checksums, fill, hooks, vectors


@pytest.mark.parametrize("column", ["Text", "RUN", "Example_ID", "Hook", "FINITE"])
def test_overwrite_with_a_column_clashing_by_case_is_refused_before_anything_changes(store, column):
    fill(store, "r1")
    before = checksums(Path(store.location.uri))
    examples = {"example_id": ["a"], column: ["v"]}
    with pytest.raises(UserError, match="case|reserved") as caught:
        open_run(
            store,
            "r1",
            settings=SETTINGS,
            config={},
            hooks=hooks(),
            examples_schema=pa.table(examples).schema,
            if_exists="overwrite",
        )
    assert "\n" not in str(caught.value)
    assert checksums(Path(store.location.uri)) == before


def test_a_failed_overwrite_keeps_the_old_run_and_is_logged_failed(store):
    old = fill(store, "r1", seed=1)
    before = vectors(store, "r1")
    writer = overwrite_r1(store)
    writer.add(pa.table({"example_id": ["a"]}), {h: HookRows(["a"], np.ones((1, 4), np.float32)) for h in old})
    writer.flush()  # some of the new run is committed (aside) ...
    writer.finish("failed", "RuntimeError: the model crashed")  # ... then the recording fails
    assert vectors(store, "r1") == before
    assert store.run_info("r1").status == "complete"
    staged = store.run_info(staging_name("r1"))
    assert staged.status == "failed"
    report = verify(store)
    assert report.ok, report.findings
    assert any("overwrite of run 'r1' failed" in f.message for f in report.findings if f.level == "warning")


def test_a_completed_overwrite_swaps_in_the_new_run_without_copying(store):
    fill(store, "r1", seed=1)
    fill(store, "r2", seed=2)
    r2 = vectors(store, "r2")
    new = fill(store, "r1", seed=3, hook_names=("h0", "h1:input"), if_exists="overwrite")
    got = vectors(store, "r1")
    assert got == {(h, e): pytest.approx(new[h][i].tolist()) for h in new for i, e in enumerate("abc")}
    assert vectors(store, "r2") == r2
    info = store.run_info("r1")
    assert info.status == "complete" and store.run_info(staging_name("r1")) is None
    with store.query() as session:
        assert session.sql("SELECT run FROM runs ORDER BY run")["run"].to_pylist() == ["r1", "r2"]
        assert sorted(session.sql("SELECT hook FROM hooks WHERE run = 'r1'")["hook"].to_pylist()) == ["h0", "h1:input"]
    report = verify(store)
    assert report.ok, report.findings
    # and again: overwrite of an overwritten run, then delete
    fill(store, "r1", seed=4, if_exists="overwrite")
    assert verify(store).ok
    store.delete_run("r1")
    assert vectors(store, "r1") == {} and vectors(store, "r2") == r2


def test_an_overwrite_killed_while_swapping_in_is_finished_by_the_next_record(store):
    from hookpoints.store import overwrite

    fill(store, "r1", seed=1)
    new = fill(store, "r1x", seed=9)  # a bystander run
    writer = overwrite_r1(store)
    writer.add(pa.table({"example_id": ["a"]}), {h: HookRows(["a"], np.full((1, 4), 7, np.float32)) for h in new})
    writer.replaces = None  # simulate a kill right after the staging run was logged complete
    writer.finish()
    writer.replaces = "r1"
    overwrite.move_run(store, "hooks", staging_name("r1"), "r1")  # ... and after the first table's swap
    with pytest.raises(UserError, match="already exists"):
        fill(store, "r1")  # the next record finishes the swap first, then sees the (new) run
    assert vectors(store, "r1") == {(h, "a"): [7.0] * 4 for h in new}
    assert verify(store).ok


def test_a_run_name_with_quotes_deletes_only_itself(store):
    """A crafted store: a run named ``x' OR '1'='1`` (run names are validated only when recording)."""
    fill(store, "keep")
    hostile = "x' OR '1'='1"
    row = {"run": hostile, "status": "complete", "event_at": datetime.now(UTC), "shard": 0, "shards": 1, **SETTINGS}
    tables.append(store.location, CORE_TABLES["run_events"], pa.Table.from_pylist([row], schema=RUN_EVENTS))
    hook_row = pa.Table.from_pylist([{"run": hostile, **hooks()[0]}], CORE_TABLES["hooks"].schema)
    tables.append(store.location, CORE_TABLES["hooks"], hook_row)
    keep = vectors(store, "keep")
    store.delete_run(hostile)
    assert vectors(store, "keep") == keep and len(keep) == 6
    assert Store.open(store.location.uri).run_info("keep").status == "complete"


def overwrite_r1(store):
    schema = pa.table({"example_id": ["a"]}).schema
    return open_run(
        store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists="overwrite"
    )


def test_sql_string_refuses_what_it_cannot_quote():
    assert tables.sql_string("x' OR '1'='1") == "'x'' OR ''1''=''1'"
    with pytest.raises(TypeError):
        tables.sql_string(1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tables.equals("run = 'a' OR 1", "x")


def test_a_predicate_cannot_reach_the_examples_of_runs_not_named(store):
    """The escape that let a ranking count other runs' examples (n_among 2,428 for a run of 396)."""
    from hookpoints.analyses.examples import open_runs, select_examples

    fill(store, "mine", seed=1)
    fill(store, "other", seed=2, columns={"example_id": ["a", "b", "c", "d"], "text": ["x", "y", "z", "w"]})
    with store.query() as session:
        group = open_runs(session, ["mine"])
        escape = "$$'$$) OR run IS NOT NULL OR ($$'$$ = ''"
        with pytest.raises(UserError, match="does not parse"):
            select_examples(session, group, escape)
        with pytest.raises(UserError, match="has no examples"):
            select_examples(session, group, "run = 'other'")
        examples = select_examples(session, group, "run <> '' OR true")
        assert len(examples) == 3 and examples.mask(session, "true", "--among")[0].sum() == 3


def test_store_info_shows_a_failed_recording_and_its_message(store, run_cli):
    fill(store, "r1", seed=1)
    writer = overwrite_r1(store)
    writer.finish("failed", "RuntimeError: out of memory")
    code, out, _ = run_cli("store", "info", store.location.uri)
    assert code == 0
    line = next(line for line in out.splitlines() if "r1~overwrite" in line)
    assert "failed" in line and "overwrite of run 'r1' failed" in out


@pytest.mark.parametrize("damage", ["missing data file", "truncated log entry"])
def test_resume_on_a_damaged_store_says_it_is_damaged(store, damage):
    fill(store, "r1")
    root = Path(store.location.uri)
    if damage == "missing data file":
        next(p for p in (root / "activations").rglob("*.parquet") if "_delta_log" not in p.parts).unlink()
    else:
        entry = sorted((root / "examples" / "_delta_log").glob("*.json"))[-1]
        entry.write_bytes(entry.read_bytes()[:40])
    schema = pa.table({"example_id": ["a"], "text": ["x"]}).schema
    said = r"(is damaged, so run 'r1' cannot be|table 'examples' .* its log is damaged).*hookpoints store verify"
    with pytest.raises(UserError, match=said) as caught:
        open_run(store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists="resume")
    assert "\n" not in str(caught.value) and "<unknown>" not in str(caught.value)


def test_a_read_only_store_is_refused_before_recording(store, monkeypatch):
    """(Tests run as root here, for whom nothing is read-only: the permission answer is stood in for.)"""
    import os

    fill(store, "r1")
    before = checksums(Path(store.location.uri))
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if "_delta_log" in str(path) else real(path, mode))
    with pytest.raises(UserError, match="is read-only for this user"):
        Store.open(store.location.uri, create=True)
    assert Store.open(store.location.uri).run_info("r1").status == "complete"  # reading is fine
    assert checksums(Path(store.location.uri)) == before


def test_an_overwritten_run_survives_compaction_and_vacuum(store):
    """The swapped-in files keep their staging paths; compaction rewrites them, vacuum keeps what is used."""
    from hookpoints.store.maintenance import compact, vacuum

    fill(store, "r1", seed=1)
    fill(store, "r1", seed=2, if_exists="overwrite")
    fill(store, "r1", seed=3, if_exists="resume")  # nothing left to record: a no-op on the swapped-in run
    expected = vectors(store, "r1")
    compact(store)
    vacuum(store, retention_hours=0, force=True)
    assert vectors(store, "r1") == expected
    report = verify(store)
    assert report.ok, report.findings


def test_an_overwrite_deletes_the_old_runs_analysis_rows(store):
    """`record --overwrite` swapped in the new rows but left the old run's rows in the analysis tables (an AP
    ranking in `scores`): `SELECT ... FROM scores WHERE run = 'r1'` returned the ranking of activations that no
    longer exist, as if it were the new recording's. Now they go, as with `store delete`; other runs' stay."""
    from hookpoints.analyses.ranking import SCORES_SCHEMA, SCORES_TABLE

    fill(store, "r1", seed=1)
    fill(store, "r2", seed=2)
    row = {"label_set": "modality/text", "hook": "h0", "neuron": 0, "ap": 0.9, "n_positive": 1, "n_among": 3}
    rows = [{**row, "run": run, "runs": [run]} for run in ("r1", "r2")]
    store.append(SCORES_TABLE, pa.Table.from_pylist(rows, schema=SCORES_SCHEMA))
    writer = overwrite_r1(store)
    writer.add(
        pa.table({"example_id": ["a"]}), {h["hook"]: HookRows(["a"], np.ones((1, 4), np.float32)) for h in hooks()}
    )
    writer.finish()
    assert vectors(store, "r1") == {(h["hook"], "a"): [1.0] * 4 for h in hooks()}  # the new run is in
    with store.query() as session:
        assert session.sql("SELECT run FROM scores ORDER BY run")["run"].to_pylist() == ["r2"]
    assert verify(store).ok


def test_a_compaction_racing_an_overwrites_swap_does_not_bring_the_old_rows_back(store, monkeypatch):
    """`store compact` committing between the swap's read of the log and its commit rewrote the old run's files
    into new ones the swap's removes did not name: the overwritten run held its old rows next to the new ones
    (20 vectors for 2). The swap now commits only onto the version it read, and retries."""
    from hookpoints.store import maintenance, overwrite

    for seed in range(3):  # three commits: small files that compaction merges
        ids = [f"old{seed}{i}" for i in range(3)]
        fill(store, "r1", seed=seed, if_exists="resume" if seed else "error", columns={"example_id": ids})
    open_table, raced = overwrite.tables.open_table, []

    def compact_first(location, table):
        delta = open_table(location, table)
        if table == "activations" and not raced:  # the swap has read the activations' log: compact now
            raced.append(None)
            raced[0] = maintenance.compact(store)
        return delta

    writer = overwrite_r1(store)
    new = np.random.default_rng(7).normal(size=(1, 4)).astype(np.float32)
    writer.add(pa.table({"example_id": ["a"]}), {h["hook"]: HookRows(["a"], new) for h in hooks()})
    monkeypatch.setattr(overwrite.tables, "open_table", compact_first)
    writer.finish()
    monkeypatch.undo()
    assert raced and any(row["rewritten"] for row in raced[0])  # the compaction did rewrite files meanwhile
    assert vectors(store, "r1") == {(h["hook"], "a"): new[0].tolist() for h in hooks()}
    assert verify(store).ok


def test_rows_left_of_a_deleted_run_can_be_deleted(store, run_cli):
    """Rows of a run whose log says deleted (a process that went on writing before deletes fenced it, a swap
    racing a compaction): verify reported them, and `store delete --run` said there was no such run, so no
    command could remove them. Now it removes them, and verify says so."""
    fill(store, "keep")
    fill(store, "r1")
    store.log_run_event("r1", "deleted", SETTINGS, {}, shard=None)  # the log says deleted; the rows stay
    found = [finding.message for finding in verify(store).findings if finding.level == "error"]
    assert found == [
        "rows of run 'r1', which is deleted or was never started: `hookpoints store delete STORE --run r1` removes them"
    ]
    code, _, err = run_cli("store", "delete", store.location.uri, "--run", "r1")
    assert code == 0, err
    assert verify(store).ok
    assert vectors(store, "r1") == {} and len(vectors(store, "keep")) == 6
    code, _, err = run_cli("store", "delete", store.location.uri, "--run", "r1")
    assert code == 2 and "there is no run 'r1'" in err


def test_verify_says_how_to_finish_an_overwrite_killed_while_swapping_in(store):
    """Killed between two tables' swaps, readers saw the old run's vectors under the new run's labels and verify
    listed only dangling rows of `r1~overwrite`. It now says what finishes the swap, and that does."""
    from hookpoints.store import overwrite

    fill(store, "r1", seed=1)
    writer = overwrite_r1(store)
    new = np.random.default_rng(3).normal(size=(1, 4)).astype(np.float32)
    writer.add(pa.table({"example_id": ["a"]}), {h["hook"]: HookRows(["a"], new) for h in hooks()})
    writer.replaces = None  # killed right after the staging run was logged complete ...
    writer.finish()
    overwrite.move_run(store, "hooks", staging_name("r1"), "r1")  # ... and after the first table's swap
    found = [finding.message for finding in verify(store).findings if finding.table == "runs"]
    assert found == [
        "the overwrite of run 'r1' was killed while swapping in its new rows (complete as run 'r1~overwrite'): "
        "`hookpoints record` of run 'r1' with --resume and the overwrite's other options finishes it"
    ]
    schema = pa.table({"example_id": ["a"]}).schema
    again = open_run(
        store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema, if_exists="resume"
    )
    again.add(pa.table({"example_id": ["a"]}), {h["hook"]: HookRows(["a"], new) for h in hooks()})  # already there
    again.finish()
    assert vectors(store, "r1") == {(h["hook"], "a"): new[0].tolist() for h in hooks()}
    assert verify(store).ok


def _rankings(store, keys):
    """Rows in `scores` under each run key (a ranking of several runs together is stored as `r1+r2`)."""
    from hookpoints.analyses.ranking import SCORES_SCHEMA, SCORES_TABLE

    row = {"label_set": "modality/text", "hook": "h0", "neuron": 0, "ap": 0.9, "n_positive": 1, "n_among": 3}
    rows = [{**row, "run": key, "runs": key.split("+")} for key in keys]
    store.append(SCORES_TABLE, pa.Table.from_pylist(rows, schema=SCORES_SCHEMA))


def _scored(store):
    with store.query() as session:
        return session.sql("SELECT run FROM scores ORDER BY run")["run"].to_pylist()


KEYS = ["r1", "r1+r2", "r0+r1+r2", "r10+r2", "r2", "r1.x+r2"]  # the last three do not hold run r1


def test_deleting_a_run_deletes_the_rankings_it_took_part_in(store, run_cli):
    """A ranking of runs r1 and r2 together is stored under run = 'r1+r2'; `store delete --run r1` removed the
    rows of run = 'r1' only, so the joint ranking stayed and read as current. Now every key naming r1 goes."""
    for run in ("r1", "r2"):
        fill(store, run)
    _rankings(store, KEYS)
    code, _, err = run_cli("store", "delete", store.location.uri, "--run", "r1")
    assert code == 0, err
    assert _scored(store) == ["r1.x+r2", "r10+r2", "r2"]
    # A joint ranking left of a run deleted before (by an older version) can be removed the same way.
    _rankings(store, ["r1+r2"])
    code, _, err = run_cli("store", "delete", store.location.uri, "--run", "r1")
    assert code == 0, err
    assert _scored(store) == ["r1.x+r2", "r10+r2", "r2"]


def test_an_overwrite_deletes_the_rankings_the_old_run_took_part_in(store):
    fill(store, "r1", seed=1)
    fill(store, "r2", seed=2)
    _rankings(store, KEYS)
    writer = overwrite_r1(store)
    writer.add(
        pa.table({"example_id": ["a"]}), {h["hook"]: HookRows(["a"], np.ones((1, 4), np.float32)) for h in hooks()}
    )
    writer.finish()
    assert _scored(store) == ["r1.x+r2", "r10+r2", "r2"]
    assert verify(store).ok


def test_a_new_run_is_refused_where_rows_of_a_deleted_run_of_its_name_remain(store, run_cli):
    """Rows left of a deleted run r1 (a writer that raced the delete): a new recording named r1 was accepted and
    mixed with them, complete with every example stored twice, the old hooks' rows taken for its own (its hook
    h2 missing from `hooks`) and the old vectors at h1. Now it is refused before anything is written, saying what
    removes them; after that the new recording holds exactly its own rows."""
    fill(store, "r1", seed=1)
    store.log_run_event("r1", "deleted", SETTINGS, {}, shard=None)  # the log says deleted; the rows stay
    before = checksums(Path(store.location.uri))
    with pytest.raises(UserError) as caught:
        fill(store, "r1", seed=2, hook_names=("h0", "h2"))
    uri = store.location.uri
    assert str(caught.value) == (
        f"store {uri} still holds hooks rows of an earlier run 'r1' that was deleted: remove them with "
        f"`hookpoints store delete {uri} --run r1`, then record again"
    )
    assert checksums(Path(uri)) == before
    code, _, err = run_cli("store", "delete", uri, "--run", "r1")
    assert code == 0, err
    new = fill(store, "r1", seed=2, hook_names=("h0", "h2"))
    assert vectors(store, "r1") == {(h, e): pytest.approx(new[h][i].tolist()) for h in new for i, e in enumerate("abc")}
    assert verify(store).ok


def test_a_process_still_recording_the_old_run_stops_at_the_overwrites_swap(store):
    """`record --overwrite` of a run another process still records (one thought dead): that process went on
    committing into the new run after the swap, example b then stored twice (old and new vectors) in a run
    logged complete. The swap now fences the old run's writers, as `store delete` does."""
    from hookpoints.store.commits import WriterFenced

    schema = pa.table({"example_id": ["a"], "text": ["old"]}).schema
    old = open_run(store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema,
                   max_buffer_bytes=0, background=False)  # fmt: skip
    zeros = np.zeros((1, 4), np.float32)
    old.add(pa.table({"example_id": ["a"], "text": ["old"]}), {h["hook"]: HookRows(["a"], zeros) for h in hooks()})
    new = fill(store, "r1", seed=3, if_exists="overwrite")
    with pytest.raises(WriterFenced, match="another process committed to run 'r1'"):
        old.add(pa.table({"example_id": ["b"], "text": ["old"]}), {h["hook"]: HookRows(["b"], zeros) for h in hooks()})
    old.finish()  # fenced: logs nothing
    assert vectors(store, "r1") == {(h, e): pytest.approx(new[h][i].tolist()) for h in new for i, e in enumerate("abc")}
    assert store.run_info("r1").status == "complete"
    report = verify(store)
    assert report.ok and not [f for f in report.findings if f.level == "error"], report.findings
