"""Concurrent writers: shards of one run and other runs recording into one store at once, with a reader.

Real processes of the CLI; a reader thread takes SQL snapshots all the while and checks that none of them
shows a half-written batch (an example at some hooks only, an activation without its example or hook).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from hookpoints.store.catalog import Store
from hookpoints.store.verify import verify

from hookpoints.errors import UserError
from tests.store_checks import assert_exactly_once

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]


def _record_args(model, manifest, store_path, run, *extra):
    args = ["record", "--model", str(model), "--data", str(manifest), "--store", str(store_path), "--run", run]
    for hook in HOOKS:
        args += ["--hooks", hook]
    return [*args, "--batch-size", "2", "--buffer-mb", "0", *extra]


class SnapshotReader(threading.Thread):
    """Takes read-only SQL snapshots until stopped; records any inconsistency it sees."""

    def __init__(self, store_path):
        super().__init__(daemon=True)
        self.store_path = store_path
        self.stop = threading.Event()
        self.snapshots = 0
        self.partial = 0  # snapshots that caught a run mid-way
        self.problems: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                store = Store.open(self.store_path)
                session = store.query()
            except (UserError, FileNotFoundError, OSError):
                time.sleep(0.05)  # the store is being created
                continue
            with session:
                try:
                    self._check(session)
                except UserError as error:
                    self.problems.append(str(error))
            time.sleep(0.02)

    def _check(self, session) -> None:
        checks = {
            "example at some hooks only": """SELECT a.run, a.example_id FROM activations a
                JOIN (SELECT run, count(*) AS hooks FROM hooks GROUP BY run) h USING (run)
                GROUP BY a.run, a.example_id, h.hooks HAVING count(DISTINCT a.hook) <> h.hooks""",
            "activation without its example": """SELECT run, example_id FROM activations
                ANTI JOIN examples USING (run, example_id)""",
            "activation without its hook": "SELECT run, hook FROM activations ANTI JOIN hooks USING (run, hook)",
            "complete run with missing examples": """SELECT r.run FROM runs r WHERE r.status = 'complete' AND
                (SELECT count(DISTINCT example_id) FROM activations a WHERE a.run = r.run) <> 30""",
        }
        for problem, sql in checks.items():
            rows = session.sql(sql).to_pylist()
            if rows:
                self.problems.append(f"{problem}: {rows[:3]}")
        counts = session.sql("SELECT run, count(DISTINCT example_id) AS n FROM activations GROUP BY run").to_pylist()
        self.snapshots += 1
        self.partial += any(0 < row["n"] < 30 for row in counts)


def test_shards_and_another_run_record_at_once_while_reading(tmp_path, gpt2_dir, texts_manifest, cli_process):
    manifest = texts_manifest(30)
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    store_path = tmp_path / "store"
    reader = SnapshotReader(store_path)
    reader.start()
    processes = [
        cli_process(*_record_args(gpt2_dir, manifest, store_path, "shared", "--shard", "0/2")),
        cli_process(*_record_args(gpt2_dir, manifest, store_path, "shared", "--shard", "1/2")),
        cli_process(*_record_args(gpt2_dir, manifest, store_path, "other")),
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    reader.stop.set()
    reader.join(timeout=60)

    store = Store.open(store_path)
    assert_exactly_once(store, "shared", ids, len(HOOKS))
    assert_exactly_once(store, "other", ids, len(HOOKS))
    info = store.run_info("shared")
    assert (info.status, info.shards, info.shards_complete) == ("complete", 2, 2)
    assert verify(store).ok
    assert not reader.problems, reader.problems
    assert reader.partial >= 1, f"the reader never caught a recording mid-way ({reader.snapshots} snapshots)"


# The CLI, held after its first activations commit until the file argv[1] exists (so that a second
# process is sure to start while this one still has work to commit).
HOLD_AFTER_FIRST_COMMIT = """
import os, sys, time
import hookpoints.store.commits as commits
real = commits.write_deltalake
real_files = commits.DeltaTable.create_write_transaction  # fixed-schema appends commit checksummed files
def hold(target):
    if target.table_uri.rstrip("/").endswith("/activations"):
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.02)
def write_then_hold(target, data, **options):
    real(target, data, **options)
    hold(target)
def files_then_hold(self, *args, **options):
    real_files(self, *args, **options)
    hold(self)
commits.write_deltalake = write_then_hold
commits.DeltaTable.create_write_transaction = files_then_hold
from hookpoints.cli.main import main
main(sys.argv[2:])
"""


def test_two_processes_recording_the_same_shard_never_duplicate(tmp_path, gpt2_dir, texts_manifest, cli_process):
    """A second ``--resume`` while the run is still recording: one of the two is fenced, nothing is doubled."""
    manifest = texts_manifest(30)
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    store_path, go = tmp_path / "store", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD_AFTER_FIRST_COMMIT, str(go), *_record_args(gpt2_dir, manifest, store_path, "r")],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _events(store_path, "recording") and _activation_version(store_path) >= 1)
        second = cli_process(*_record_args(gpt2_dir, manifest, store_path, "r", "--resume"))
        _wait_for(lambda: _events(store_path, "resumed"))  # the second has opened the run
        time.sleep(0.5)
        go.touch()  # both now record what is left
        results = [(*process.communicate(timeout=600), process.returncode) for process in (first, second)]
    finally:
        if first.poll() is None:
            first.kill()
    codes = sorted(code for *_, code in results)
    assert codes == [0, 2], results
    fenced = next(stderr for _, stderr, code in results if code == 2)
    assert "another process committed to run 'r' while this one was recording" in fenced

    store = Store.open(store_path)
    assert_exactly_once(store, "r", ids, len(HOOKS))  # the fenced process wrote nothing twice
    assert store.run_info("r").status == "complete"  # the other finished the run


def _wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _activation_version(store_path) -> int:
    from deltalake import DeltaTable

    try:
        return DeltaTable(str(store_path / "activations")).version()
    except Exception:  # noqa: BLE001 - not created yet
        return -1


def _events(store_path, status: str) -> bool:
    try:
        events = Store.open(store_path).dataset("run_events").to_table(columns=["status"])["status"].to_pylist()
    except (UserError, FileNotFoundError, OSError):
        return False
    return status in events


_LOG_EVENTS = """
import sys
from hookpoints.store.catalog import Store
store, run = Store.open(sys.argv[1]), sys.argv[2]
settings = {"model": "m", "task": "forward", "pooling": "mean", "dtype": "float32"}
for i in range(60):
    store.log_run_event(run, ("recording", "complete")[i % 2], settings, {}, shard=(i % 8, 8))
"""


def test_sessions_pin_once_under_a_stream_of_runs_starting_and_ending(tmp_path, monkeypatch):
    """Four processes log shards starting and ending as fast as they can while sessions open: no session gives
    up ("changed 10 times") or pins again for them (each reads run_events' log once, plus the one check)."""
    from hookpoints.store import delta_read

    store = Store.open(tmp_path / "store", create=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1].parent)}
    loggers = [
        subprocess.Popen([sys.executable, "-c", _LOG_EVENTS, str(tmp_path / "store"), f"r{k}"], env=env)
        for k in range(4)
    ]
    open_table, opened = delta_read.open_table, []
    monkeypatch.setattr(delta_read, "open_table", lambda loc, table: (opened.append(table), open_table(loc, table))[1])
    sessions = 0
    while any(logger.poll() is None for logger in loggers) or not sessions:
        before = len(opened)
        with store.query() as session:
            session.sql("SELECT count(*) FROM runs").to_pylist()
        assert opened[before:].count("run_events") == 1
        sessions += 1
    assert [logger.wait() for logger in loggers] == [0] * 4
    assert sessions > 5, sessions
    assert store.dataset("run_events").count_rows() == 240
