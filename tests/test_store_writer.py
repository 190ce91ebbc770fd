"""The run writer's background flush (issue 16) stores exactly what the serial, synchronous writer stored;
errors of a background flush reach the caller; the producer waits only for the flush before the one it
starts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable
from hookpoints.store.commits import FencedAppender, WriterFenced
from hookpoints.store.writer import HookRows, open_run

from hookpoints.errors import UserError
from tests.store_checks import assert_exactly_once

WIDTHS = [3, 16, 7, 64, 5]  # one hook per width
HOOKS = [
    {"hook": f"h{i}", "module": f"m{i}", "io": "output", "component": "lm", "layer": i, "submodule": "mlp",
     "width": w, "shape": [w], "neuron_axis": 1, "space": "input", "layer_output": False}
    for i, w in enumerate(WIDTHS)
]  # fmt: skip
BATCH_BYTES = sum(4 * w for w in WIDTHS)  # float32 values of one example at every hook


def _open(store, *, dtype="float32", run="r", buffer_examples=4, **options):
    settings = {"model": "tiny", "task": "forward", "pooling": "mean", "dtype": dtype}
    schema = pa.schema([("example_id", pa.string()), ("label", pa.string())])
    return open_run(store, run, settings=settings, config={}, hooks=HOOKS, examples_schema=schema,
                    max_buffer_bytes=buffer_examples * BATCH_BYTES, **options)  # fmt: skip


def _batches(count: int, size: int, *, positions: bool = False, seed: int = 0):
    """Random batches: values with a random scale per hook, some beyond float16's range, some NaN/inf."""
    rng = np.random.default_rng(seed)
    for b in range(count):
        ids = [f"e{b}-{i}" for i in range(size)]
        examples = pa.table({"example_id": ids, "label": [f"label {b} {i}" for i in range(size)]})
        rows = {}
        for hook, width in zip(HOOKS, WIDTHS, strict=True):
            repeat = 3 if positions else 1  # pooling none: several positions per example
            values = rng.normal(scale=rng.uniform(0.1, 1e5), size=(size * repeat, width)).astype(np.float32)
            values[rng.random(values.shape) < 0.01] = rng.choice([np.nan, np.inf, -np.inf])
            ids_of_rows = [example for example in ids for _ in range(repeat)]
            where = np.tile(np.arange(repeat, dtype=np.int32), size) if positions else None
            rows[hook["hook"]] = HookRows(ids_of_rows, values, where)
        yield examples, rows


def _stored(store, run: str) -> dict:
    """(hook, example, position) -> (stored vector bits, finite), read straight from the Delta table."""
    delta = DeltaTable(store.location.table_uri("activations"))
    table = delta.to_pyarrow_dataset().to_table(filter=pc.field("run") == run)
    out = {}
    for row in table.to_pylist():
        vector = row["activation"]
        if row["activation_f16_bytes"] is not None:  # float16: the blob's little-endian IEEE halves, as bits
            assert row["activation_f16"] is None
            vector = np.frombuffer(row["activation_f16_bytes"], "<i2").tolist()
        out[row["hook"], row["example_id"], row["position"]] = (vector, row["finite"])
    return out


def _comparable(stored: dict) -> dict:
    """NaN as None (NaN never equals itself)."""
    return {key: ([None if v != v else v for v in vector], finite) for key, (vector, finite) in stored.items()}


def _activation_commits(store) -> list[int]:
    """For each commit to the activations table that adds files: how many files it adds."""
    log = Path(store.location.uri) / "activations" / "_delta_log"
    counts = []
    for entry in sorted(log.glob("*.json")):
        adds = sum("add" in json.loads(line) for line in entry.read_text().splitlines() if line.strip())
        if adds:
            counts.append(adds)
    return counts


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("positions", [False, True])
def test_the_background_writer_stores_what_the_serial_one_did(tmp_path, dtype, positions):
    from hookpoints.store.catalog import Store

    stored, commits = {}, {}
    for way, options in {"serial": dict(background=False), "background": dict()}.items():
        store = Store.open(tmp_path / way, create=True)
        writer = _open(store, dtype=dtype, buffer_examples=6 * (3 if positions else 1), **options)
        for examples, rows in _batches(7, 3, positions=positions):
            writer.add(examples, rows)  # a flush every second batch, the last one by finish
        writer.finish()
        stored[way], commits[way] = _comparable(_stored(store, "r")), _activation_commits(store)
        rows = store.dataset("activations").count_rows()
        assert rows == len(stored[way]) == 7 * 3 * len(HOOKS) * (3 if positions else 1)  # no row twice
        if not positions:
            assert_exactly_once(store, "r", [f"e{b}-{i}" for b in range(7) for i in range(3)], len(HOOKS))
    assert commits["background"] == commits["serial"] == [len(HOOKS)] * 4  # a commit per flush, a file per hook
    assert stored["background"] == stored["serial"]
    # and both equal numpy's own float32 / float16 rounding of what was added
    expected = {}
    with np.errstate(over="ignore"):  # beyond float16's range: inf, flagged
        for _, rows in _batches(7, 3, positions=positions):
            for hook, chunk in rows.items():
                values = chunk.values.astype(np.float16).view(np.int16) if dtype == "float16" else chunk.values
                for r, example in enumerate(chunk.example_ids):
                    position = None if chunk.positions is None else int(chunk.positions[r])
                    vector = values[r].tolist()
                    finite = bool(np.isfinite(chunk.values[r].astype(np.dtype(dtype))).all())
                    expected[hook, example, position] = (vector, finite)
    assert stored["background"] == _comparable(expected)
    assert {finite for _, finite in expected.values()} == {True, False}


def _on_activations_append(monkeypatch, wrapper):
    """Route every activations commit (``FencedAppender.append`` of the activations table) through
    ``wrapper(commit)``; the examples table's commits go through unchanged."""
    real = FencedAppender.append

    def append(self, data, **options):
        if self.spec.name != "activations":
            return real(self, data, **options)
        return wrapper(lambda: real(self, data, **options))

    monkeypatch.setattr(FencedAppender, "append", append)


def _failing_once(monkeypatch, *, at_call: int, error: Exception):
    """Make the ``at_call``-th activations commit raise ``error`` once, after writing nothing."""
    calls = []

    def fail(commit):
        calls.append(1)
        if len(calls) == at_call:
            raise error
        return commit()

    _on_activations_append(monkeypatch, fail)
    return calls


def test_an_error_of_the_background_flush_is_raised_by_the_next_call_and_nothing_is_lost(store, monkeypatch):
    calls = _failing_once(monkeypatch, at_call=2, error=OSError("no space left on device"))
    writer = _open(store, buffer_examples=3)
    batches = list(_batches(6, 3))
    taken = []  # the example ids of every add that returned
    with pytest.raises(OSError) as caught:
        for examples, rows in batches:
            writer.add(examples, rows)
            taken += examples["example_id"].to_pylist()
        writer.finish()
    assert str(caught.value) == "no space left on device"  # the same error, one line
    assert len(calls) == 2 and len(taken) >= 6
    # the failed flush's rows were kept: finish("failed"), as the recorder calls it, commits them
    writer.finish("failed", "OSError: no space left on device")
    assert store.run_info("r").status == "failed"
    events = store.dataset("run_events").to_table().to_pylist()
    assert [e["message"] for e in events if e["status"] == "failed"] == ["OSError: no space left on device"]
    assert_exactly_once(store, "r", taken, len(HOOKS))
    # resume records the rest exactly once
    writer = _open(store, if_exists="resume")
    assert writer.done == set(taken)
    for examples, rows in _batches(6, 3):
        writer.add(examples, rows)
    writer.finish()
    assert_exactly_once(store, "r", [f"e{b}-{i}" for b in range(6) for i in range(3)], len(HOOKS))
    assert store.run_info("r").status == "complete"


def test_a_failed_background_flush_is_retried_by_the_next_flush(store, monkeypatch):
    _failing_once(monkeypatch, at_call=1, error=OSError("connection reset by peer"))
    writer = _open(store, buffer_examples=3)
    first, second = list(_batches(2, 3))
    writer.add(*first)  # starts the flush that fails
    with pytest.raises(OSError, match="^connection reset by peer$"):
        writer.flush()
    assert _stored(store, "r") == {}
    writer.add(*second)
    writer.finish()
    assert_exactly_once(store, "r", [f"e{b}-{i}" for b in range(2) for i in range(3)], len(HOOKS))


class _Gate:
    """Holds every activations commit until released; counts how many run at once."""

    def __init__(self, monkeypatch):
        self.open, self.running, self.most, self.started = threading.Event(), 0, 0, threading.Event()

        def held(commit):
            self.running += 1
            self.most = max(self.most, self.running)
            self.started.set()
            try:
                assert self.open.wait(30), "the gate was never opened"
                return commit()
            finally:
                self.running -= 1

        _on_activations_append(monkeypatch, held)


def test_add_returns_while_its_flush_runs_and_waits_only_for_the_previous_one(store, monkeypatch):
    gate = _Gate(monkeypatch)
    writer = _open(store, buffer_examples=3)
    batches = list(_batches(3, 3))
    writer.add(*batches[0])  # the buffer is full: its flush starts in the background, held by the gate
    assert gate.started.wait(30)
    assert _stored(store, "r") == {}  # add returned while the flush is still running
    retry = _batches(1, 3)  # the same example ids again, while their flush is in flight
    writer.add(*next(retry))  # dropped: never stored twice
    second = threading.Thread(target=writer.add, args=batches[1])
    second.start()  # fills the buffer again: must wait for the flush in flight
    second.join(0.5)
    assert second.is_alive()
    gate.open.set()
    second.join(30)
    assert not second.is_alive()
    writer.add(*batches[2])
    writer.finish()
    assert gate.most == 1  # at most one flush in flight
    assert_exactly_once(store, "r", [f"e{b}-{i}" for b in range(3) for i in range(3)], len(HOOKS))


def test_a_writer_fenced_in_the_background_stops_and_logs_nothing(store):
    first = _open(store, buffer_examples=3)
    batches = list(_batches(4, 3))
    first.add(*batches[0])
    first.flush()
    stale = _open(store, if_exists="resume", buffer_examples=3)  # a second writer of the same shard
    first.add(*batches[1])
    first.flush()  # the stale writer's snapshot is behind now
    events = len(store.dataset("run_events").to_table().to_pylist())
    stale.add(*batches[1])  # committed by the first since the stale one started: its flush is fenced
    with pytest.raises(WriterFenced, match="another process committed") as caught:
        stale.add(*batches[2])
        stale.finish()
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)
    stale.finish("failed", "fenced")  # logs nothing: the shard is not the stale writer's any more
    assert len(store.dataset("run_events").to_table().to_pylist()) == events
    first.add(*batches[2])
    first.add(*batches[3])
    first.finish()
    assert_exactly_once(store, "r", [f"e{b}-{i}" for b in range(4) for i in range(3)], len(HOOKS))
    assert store.run_info("r").status == "complete"


@pytest.mark.parametrize("size", [-1, 2**31 + 1, 1.5, True, "64"])
def test_a_bad_buffer_size_is_refused_before_anything_is_written(store, size):
    settings = {"model": "tiny", "task": "forward", "pooling": "mean", "dtype": "float32"}
    schema = pa.schema([("example_id", pa.string())])
    with pytest.raises(UserError, match=r"max_buffer_bytes must be a whole number of bytes from 0 .* to 2\*\*31"):
        open_run(store, "r", settings=settings, config={}, hooks=HOOKS, examples_schema=schema, max_buffer_bytes=size)
    assert store.run_info("r") is None


@pytest.mark.parametrize("failing", [2, 4])  # a flush in the middle, the last one (its error reaches finish)
def test_a_recording_whose_background_flush_fails_says_so_in_one_line_and_resumes(
    run_cli, gpt2_dir, texts_manifest, tmp_path, monkeypatch, failing
):
    """Through the recorder and the CLI: the flush error is the command's one-line error, the run is logged
    failed, what was committed stays, and --resume records the rest exactly once."""
    from hookpoints.store.catalog import Store

    manifest = texts_manifest(12)
    where = tmp_path / "store"
    args = ["record", "--model", str(gpt2_dir), "--data", str(manifest), "--store", str(where), "--run", "r",
            "--hooks", "blocks.0.hook_resid_post", "--hooks", "blocks.1.hook_mlp_out", "--batch-size", "3",
            "--buffer-mb", "0"]  # fmt: skip
    _failing_once(monkeypatch, at_call=failing, error=OSError("no space left on device"))
    code, _, err = run_cli(*args)  # 12 examples, batches of 3: 4 flushes
    assert code != 0 and "no space left on device" in err
    assert "Traceback" not in err
    store = Store.open(where)
    assert store.run_info("r").status == "failed"
    before = store.recorded_example_ids("r", 2)
    assert before  # the first flush's examples were committed and stay
    monkeypatch.undo()
    code, out, err = run_cli(*args, "--resume")
    assert code == 0, err
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    assert_exactly_once(store, "r", ids, 2)
    assert store.run_info("r").status == "complete"


def test_float16_values_are_stored_as_given(store):
    """A recorder may cast to float16 on its device: the writer stores those bits, the same as its own cast."""
    from hookpoints.store.catalog import Store

    runs = {}
    for name, given in (("given", set(WIDTHS)), ("cast", set()), ("mixed", {3, 7})):  # widths given as float16
        writer = _open(store, dtype="float16", run=name)
        for examples, rows in _batches(2, 3):
            with np.errstate(over="ignore"):
                rows = {
                    h: HookRows(r.example_ids, r.values.astype(np.float16)) if r.values.shape[1] in given else r
                    for h, r in rows.items()
                }
            writer.add(examples, rows)
        writer.finish()
        runs[name] = _comparable(_stored(Store.open(store.location.uri), name))
    assert runs["given"] == runs["cast"] == runs["mixed"] and len(runs["given"]) == 2 * 3 * len(HOOKS)


@pytest.mark.parametrize("background", [True, False])
def test_a_buffer_is_committed_once_its_first_rows_are_max_buffer_seconds_old(store, background):
    """A slow recording commits (and can resume) at most ``max_buffer_seconds`` back, whatever its buffer size."""
    batches = list(_batches(4, 3))
    every = _open(store, run="every", buffer_examples=10**6, max_buffer_seconds=0, background=background)
    for batch in batches:
        every.add(*batch)
        every._settle(block=True)
    assert len(_activation_commits(store)) == 4  # one commit per batch: each buffer was old enough at once
    every.finish()
    never = _open(store, run="never", buffer_examples=10**6, max_buffer_seconds=3600, background=background)
    for batch in batches:
        never.add(*batch)
    never._settle(block=True)
    assert len(_activation_commits(store)) == 4  # the large buffer, an hour young: nothing committed yet
    never.finish()
    assert len(_activation_commits(store)) == 5
    for run in ("every", "never"):
        assert_exactly_once(store, run, [f"e{b}-{i}" for b in range(4) for i in range(3)], len(HOOKS))


@pytest.mark.parametrize("seconds", [-1, float("nan"), "60", True, None])
def test_a_bad_buffer_age_is_refused_before_anything_is_written(store, seconds):
    with pytest.raises(UserError, match="max_buffer_seconds must be a number of seconds, 0 or more"):
        _open(store, max_buffer_seconds=seconds)
    assert store.run_info("r") is None


def test_a_hook_listed_twice_is_refused_before_anything_is_written(store):
    """open_run (docs/reading-the-store.md) with the same hook twice in ``hooks`` wrote it twice to the hooks table,
    its rows twice into one partition of two codes (one file overwrote the other), and `store verify` then called
    the new run damaged ("hook 'h0' of run 'r' is stored 2 times")."""
    settings = {"model": "tiny", "task": "forward", "pooling": "mean", "dtype": "float32"}
    schema = pa.schema([("example_id", pa.string())])
    hooks = [HOOKS[0], HOOKS[1], HOOKS[0]]
    with pytest.raises(UserError, match=r"^hooks lists 'h0' twice: give each hook point once$"):
        open_run(store, "r", settings=settings, config={}, hooks=hooks, examples_schema=schema)
    assert store.run_info("r") is None
    assert store.dataset("hooks").count_rows() == 0


@pytest.mark.parametrize(
    ("memory", "limit", "mib"),
    [(64 << 30, None, 512), (8 << 30, None, 256), (1 << 30, None, 64), (64 << 30, str(4 << 30), 128), (None, None, 64)],
)
def test_the_default_buffer_is_a_32nd_of_memory_between_64_and_512_mib(monkeypatch, memory, limit, mib):
    from hookpoints.store import buffer

    def sysconf(name):
        if memory is None:
            raise ValueError(name)
        return 4096 if name == "SC_PAGE_SIZE" else memory // 4096

    def read_text(self, *args, **kwargs):
        if limit is None:
            raise OSError("no cgroup")
        return limit + "\n"

    monkeypatch.setattr(buffer.os, "sysconf", sysconf)
    monkeypatch.setattr(buffer.Path, "read_text", read_text)
    assert buffer.default_buffer_bytes() == mib << 20


@pytest.mark.parametrize("committed_before", [True, False])
def test_deleting_a_run_that_is_being_recorded_stops_its_writer(store, committed_before):
    """`store delete` while the run records (another machine, a process thought dead): the writer went on, and
    the run came back `complete` with only the rows committed after the delete and no hook points. Now its
    next commit is fenced; the run stays deleted, and a new recording of the same name stores everything."""
    from hookpoints.store.catalog import Store

    batches = list(_batches(2, 3))
    writer = _open(store, buffer_examples=0, background=False)
    if committed_before:
        writer.add(*batches[0])
    Store.open(store.location.uri).delete_run("r")
    with pytest.raises(WriterFenced, match="or the run deleted"):
        writer.add(*batches[1])
    writer.finish()  # fenced: logs nothing
    with store.query() as session:
        assert session.sql("SELECT run FROM runs").num_rows == 0
        assert session.sql("SELECT * FROM activations").num_rows == 0
        assert session.sql("SELECT * FROM examples").num_rows == 0
    again = _open(store, buffer_examples=0, background=False)
    for examples, rows in batches:
        again.add(examples, rows)
    again.finish()
    ids = [example for examples, _ in batches for example in examples["example_id"].to_pylist()]
    assert_exactly_once(store, "r", ids, len(HOOKS))
    expected = {
        (hook, example, None) for _, rows in batches for hook, chunk in rows.items() for example in chunk.example_ids
    }
    stored = _stored(store, "r")
    assert set(stored) == expected
    for _, rows in batches:
        for hook, chunk in rows.items():
            for example, vector in zip(chunk.example_ids, chunk.values, strict=True):
                np.testing.assert_array_equal(np.array(stored[hook, example, None][0], np.float32), vector)
    assert store.run_info("r").status == "complete"


_ENDS_MID_FLUSH = """
import json, sys, time
import concurrent.futures.thread as executors
import numpy as np, pyarrow as pa
from hookpoints.store import files
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run

hooks, write_files = json.loads(sys.argv[2]), files.write_files

def after_the_exit_hooks(*args):  # the flush writes its files once concurrent.futures' exit hook has run
    while not executors._shutdown:
        time.sleep(0.01)
    return write_files(*args)

store = Store.open(sys.argv[1], create=True)
settings = {"model": "tiny", "task": "forward", "pooling": "mean", "dtype": "float32"}
schema = pa.schema([("example_id", pa.string())])
writer = open_run(store, "r", settings=settings, config={}, hooks=hooks, examples_schema=schema, max_buffer_bytes=1)
files.write_files = after_the_exit_hooks
ids = ["a", "b"]
rows = {hook["hook"]: HookRows(ids, np.full((2, hook["width"]), 1.5, np.float32)) for hook in hooks}
writer.add(pa.table({"example_id": ids}), rows)  # full: its flush starts in the background
"""  # then the script ends with the flush in flight, without finish()


def test_a_flush_in_flight_when_the_main_thread_ends_still_commits(tmp_path):
    """The flush's files are written by several write_dataset calls side by side; from a ThreadPoolExecutor,
    which refuses work once the main thread has ended, so the flush of a script that ended without finish()
    failed silently and its rows were lost (the serial writer committed them)."""
    import subprocess
    import sys

    from hookpoints.store.catalog import Store

    where = tmp_path / "store"
    done = subprocess.run([sys.executable, "-c", _ENDS_MID_FLUSH, str(where), json.dumps(HOOKS)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    stored = Store.open(where).dataset("activations").to_table().to_pylist()
    assert sorted((row["hook"], row["example_id"]) for row in stored) == sorted(
        (hook["hook"], example) for hook in HOOKS for example in ["a", "b"]
    )
    assert all(row["activation"] == [1.5] * len(row["activation"]) for row in stored)
