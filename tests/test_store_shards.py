"""Shards of a run, run status over shards, and the writer's fencing and de-duplication (in one process)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hookpoints.store.commits import WriterFenced
from hookpoints.store.runs import in_shard, parse_shard
from hookpoints.store.writer import HookRows, open_run

from hookpoints.errors import UserError
from tests.store_checks import assert_exactly_once

HOOKS = [
    {"hook": f"h{i}", "module": f"m{i}", "io": "output", "component": "lm", "layer": i, "submodule": "mlp",
     "width": 4, "shape": [4], "neuron_axis": 1, "space": "input", "layer_output": False}
    for i in range(2)
]  # fmt: skip
SETTINGS = {"model": "tiny", "task": "forward", "pooling": "mean", "dtype": "float32"}


def _open(store, run="r", **options):
    schema = pa.schema([("example_id", pa.string()), ("text", pa.string())])
    return open_run(store, run, settings=SETTINGS, config={}, hooks=HOOKS, examples_schema=schema, **options)


def _batch(ids: list[str]):
    examples = pa.table({"example_id": ids, "text": [f"text of {i}" for i in ids]})
    values = np.arange(len(ids) * 4, dtype=np.float32).reshape(len(ids), 4)  # [batch, width]
    return examples, {hook["hook"]: HookRows(list(ids), values) for hook in HOOKS}


def test_parse_shard_reads_i_of_n_and_refuses_the_rest():
    assert parse_shard(None) == (0, 1)
    assert parse_shard("2/4") == (2, 4)
    assert parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ["4/4", "1", "-1/2", "a/b", "1/0", "1/2/3", ""]:
        with pytest.raises(UserError, match="shard"):
            parse_shard(bad)


def test_every_example_is_in_exactly_one_shard():
    ids = [f"ex{i}" for i in range(1000)]
    for count in (1, 2, 3, 7):
        owners = [[index for index in range(count) if in_shard(example, (index, count))] for example in ids]
        assert all(len(owner) == 1 for owner in owners)
        sizes = np.bincount([owner[0] for owner in owners], minlength=count)
        assert sizes.min() > 1000 / count * 0.8  # a stable hash spreads them evenly


def test_run_status_is_complete_only_when_every_shard_is(store):
    first = _open(store, shard=(0, 2))
    first.add(*_batch(["a", "b"]))
    first.finish("complete")
    assert (store.run_info("r").status, store.run_info("r").shards_complete) == ("recording", 1)
    second = _open(store, shard=(1, 2))
    second.add(*_batch(["c"]))
    second.finish("failed", "out of memory")
    assert store.run_info("r").status == "failed"
    resumed = _open(store, shard=(1, 2), if_exists="resume")
    assert resumed.done == {"a", "b", "c"}
    resumed.finish("complete")
    info = store.run_info("r")
    assert (info.status, info.shards, info.shards_complete) == ("complete", 2, 2)
    with store.query() as session:
        row = session.sql("SELECT status, shards, shards_complete FROM runs WHERE run = 'r'").to_pylist()[0]
    assert row == {"status": "complete", "shards": 2, "shards_complete": 2}


def test_shard_options_that_do_not_fit_the_run_are_refused_and_change_nothing(store):
    _open(store, shard=(0, 2)).finish()
    versions = _versions(store)
    with pytest.raises(UserError, match="recorded in 2 shards: pass --shard I/2"):
        _open(store, shard=(0, 3))
    with pytest.raises(UserError, match="shard 0/2 of run 'r' already exists.*--resume"):
        _open(store, shard=(0, 2))
    with pytest.raises(UserError, match="--overwrite deletes all of run 'r'"):
        _open(store, shard=(1, 2), if_exists="overwrite")
    with pytest.raises(UserError, match="shard 2/2 does not exist"):
        _open(store, shard=(2, 2))
    assert _versions(store) == versions  # nothing was written
    _open(store, run="whole").finish()
    versions = _versions(store)
    with pytest.raises(UserError, match="recorded without --shard"):
        _open(store, run="whole", shard=(0, 2), if_exists="resume")
    assert _versions(store) == versions
    assert store.run_info("r").shards_complete == 1


def test_a_writer_whose_shard_another_process_took_over_is_fenced(store):
    """Two writers of the same shard: the one that commits second stops instead of writing twice."""
    first = _open(store)
    first.add(*_batch(["a", "b"]))
    first.flush()
    stale = _open(store, if_exists="resume")  # e.g. a second --resume while the first still runs
    first.add(*_batch(["c"]))
    first.flush()  # the first commits again: the stale writer's snapshot is behind now
    stale.add(*_batch(["c", "d"]))  # it would write "c" a second time
    with pytest.raises(WriterFenced, match="another process committed to run 'r'"):
        stale.flush()
    stale.finish("failed", "fenced")  # logs nothing: the shard is not the stale writer's any more
    first.add(*_batch(["d"]))
    first.finish("complete")
    assert_exactly_once(store, "r", ["a", "b", "c", "d"], len(HOOKS))
    assert store.run_info("r").status == "complete"


def test_a_batch_delivered_twice_is_stored_once(store):
    writer = _open(store)
    writer.add(*_batch(["a", "b"]))
    writer.add(*_batch(["b", "c"]))  # "b" again while buffered
    writer.flush()
    writer.add(*_batch(["a", "d"]))  # "a" again after it was committed
    writer.finish()
    assert_exactly_once(store, "r", ["a", "b", "c", "d"], len(HOOKS))


def test_two_runs_starting_at_once_register_their_hooks_once(store):
    """Writers of one run racing to register its hook points: one commit wins, the other finds it."""
    import threading

    errors = []

    def start(index):
        try:
            _open(store, run="race", shard=(index, 4)).finish()
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=start, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.run_hooks("race").num_rows == len(HOOKS)
    assert store.run_info("race").status == "complete"


def _versions(store) -> dict:
    from hookpoints.store import tables

    return {name: tables.open_table(store.location, name).version() for name in store.table_names()}


def test_examples_of_a_shard_hold_the_manifest_labels(store):
    writer = _open(store, shard=(0, 1))
    writer.add(*_batch(["a"]))
    writer.finish()
    with store.query() as session:
        rows = session.sql("SELECT example_id, text FROM examples").to_pylist()
    assert rows == [{"example_id": "a", "text": "text of a"}]
    assert json.loads(json.dumps(rows))  # plain values only


def test_a_commit_that_landed_although_it_reported_an_error_is_not_repeated(store, monkeypatch):
    """E.g. S3 stored the commit but its reply was lost: the writer finds its own commit and goes on."""
    import hookpoints.store.commits as commits

    real, real_files = commits.write_deltalake, commits.DeltaTable.create_write_transaction
    calls = []

    def lands_then_fails(commit, table):
        calls.append(table.table_uri)
        commit()
        if len(calls) == 2:  # the activations commit of the first flush
            raise OSError("connection reset by peer")

    monkeypatch.setattr(
        commits,
        "write_deltalake",
        lambda table, data, **options: lands_then_fails(lambda: real(table, data, **options), table),
    )
    monkeypatch.setattr(
        commits.DeltaTable,
        "create_write_transaction",
        lambda table, *args, **options: lands_then_fails(lambda: real_files(table, *args, **options), table),
    )
    writer = _open(store)
    writer.add(*_batch(["a", "b"]))
    writer.flush()
    writer.add(*_batch(["c"]))
    writer.finish()
    assert_exactly_once(store, "r", ["a", "b", "c"], len(HOOKS))


def test_a_commit_that_failed_reports_its_error(store, monkeypatch):
    import hookpoints.store.commits as commits

    def fails(table, data, **options):
        raise OSError("no space left on device")

    writer = _open(store)
    monkeypatch.setattr(commits, "write_deltalake", fails)
    monkeypatch.setattr(commits.DeltaTable, "create_write_transaction", lambda *args, **options: fails(None, None))
    writer.add(*_batch(["a"]))
    with pytest.raises(OSError, match="no space left"):
        writer.flush()
    monkeypatch.undo()
    writer.flush()  # the buffer is kept: a later flush commits it
    writer.finish()
    assert_exactly_once(store, "r", ["a"], len(HOOKS))


def test_a_shard_starting_as_another_commits_the_runs_first_rows_is_not_refused(store, monkeypatch):
    """A shard that read "no such run" just before another shard started the run finds that shard's hook rows:
    they are the run's own, not rows left of a deleted run, so it records its examples."""
    from hookpoints.store.catalog import Store

    first = _open(store, shard=(0, 2))
    stale, run_info = [True], Store.run_info

    def first_read_stale(self, run):
        if run == "r" and stale:
            return stale.pop() and None  # read before shard 0 logged the run
        return run_info(self, run)

    monkeypatch.setattr(Store, "run_info", first_read_stale)
    second = _open(store, shard=(1, 2))
    monkeypatch.undo()
    ids = [f"e{i}" for i in range(8)]
    for writer, shard in ((first, (0, 2)), (second, (1, 2))):
        writer.add(*_batch([example for example in ids if in_shard(example, shard)]))
        writer.finish()
    assert_exactly_once(store, "r", ids, len(HOOKS))
    assert store.run_info("r").status == "complete"
