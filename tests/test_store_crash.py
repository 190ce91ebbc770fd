"""Crash safety: recordings killed with SIGKILL, then resumed, store every example exactly once at every hook.

Real OS processes of the CLI are killed: at random moments while they commit, and at the exact windows that
matter (right after the examples commit of a flush, before its activations commit; with a commit's Parquet
file written but its log entry not; right after an activations commit). Values are then compared with plain
torch forward hooks.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from deltalake import DeltaTable
from hookpoints.store.catalog import Store
from hookpoints.store.schema import SCHEMA_VERSION, TableSpec
from hookpoints.store.verify import verify
from hookpoints.store.writer import HookRows, open_run

from hookpoints.errors import UserError
from hookpoints.loading import load
from tests.store_checks import assert_exactly_once

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
N_EXAMPLES = 40

# Runs the CLI with Delta commits wrapped: on the Nth commit to TABLE, SIGKILL this process right after the
# commit ("after"), or after writing a stray Parquet file but before committing ("mid": what a kill during a
# commit leaves behind).
KILL_AT_COMMIT = """
import os, shutil, signal, sys, uuid
from pathlib import Path
import hookpoints.store.commits as commits
real = commits.write_deltalake
real_files = commits.DeltaTable.create_write_transaction  # fixed-schema appends commit checksummed files
table, nth, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = 0
def commit_then_die(target, commit):
    global seen
    if not target.table_uri.rstrip("/").endswith("/" + table):
        return commit()
    seen += 1
    if seen == nth and when == "mid":
        root = Path(target.table_uri.removeprefix("file://"))
        some = next(root.rglob("*.parquet"))
        shutil.copy(some, some.with_name(f"part-00000-{uuid.uuid4()}-c000.zstd.parquet"))
        os.kill(os.getpid(), signal.SIGKILL)
    commit()
    if seen == nth:
        os.kill(os.getpid(), signal.SIGKILL)
commits.write_deltalake = lambda target, data, **options: commit_then_die(target, lambda: real(target, data, **options))
commits.DeltaTable.create_write_transaction = lambda self, *args, **options: commit_then_die(
    self, lambda: real_files(self, *args, **options)
)
from hookpoints.cli.main import main
main(sys.argv[4:])
"""


@pytest.fixture
def recording(tmp_path, gpt2_dir, texts_manifest):
    manifest = texts_manifest(N_EXAMPLES)
    store_path = tmp_path / "store"
    args = ["record", "--model", str(gpt2_dir), "--data", str(manifest), "--store", str(store_path), "--run", "r"]
    for hook in HOOKS:
        args += ["--hooks", hook]
    args += ["--batch-size", "2", "--buffer-mb", "0"]  # a commit pair per batch: many moments to be killed in
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    texts = [json.loads(line)["text"] for line in manifest.read_text().splitlines()]
    return store_path, args, ids, texts


def _activation_commits(store_path) -> int:
    try:
        return DeltaTable(str(store_path / "activations")).version()
    except Exception:  # noqa: BLE001 - not created yet
        return -1


def test_sigkill_in_each_commit_window_and_at_random_moments_then_resume(recording, cli_process, gpt2_dir):
    store_path, args, ids, texts = recording
    windows = [
        ("examples", 2, "after"),  # examples of a flush committed, its activations not
        ("activations", 2, "mid"),  # a commit's Parquet file written, its log entry not
        ("activations", 3, "after"),  # activations committed, the next flush not started
    ]
    for attempt, (table, nth, when) in enumerate(windows):
        resume = ["--resume"] if attempt else []
        process = subprocess.run(
            [sys.executable, "-c", KILL_AT_COMMIT, table, str(nth), when, *args, *resume],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert process.returncode == -signal.SIGKILL, process.stderr
    store = Store.open(store_path)
    activations = DeltaTable(str(store_path / "activations")).to_pyarrow_dataset().count_rows()
    assert 0 < activations < len(ids) * len(HOOKS)

    rng = random.Random(20261121)
    kills = 0
    for _ in range(2):
        process = cli_process(*args, "--resume")
        # Wait until this process has committed a batch or two, then kill it at a random moment.
        start, wanted = _activation_commits(store_path), rng.randint(1, 2)
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            if _activation_commits(store_path) >= start + wanted:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.25))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 1, "the recordings finished before they could be killed: give them more work"
    assert store.run_info("r").status == "recording"  # killed: nothing said complete

    final = cli_process(*args, "--resume")
    _, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr
    assert_exactly_once(store, "r", ids, len(HOOKS))
    assert store.run_info("r").status == "complete"
    report = verify(store)
    assert report.ok, report.findings
    assert any("not in the current version" in finding.message for finding in report.findings)  # the stray file
    _assert_values_match_torch_hooks(store, gpt2_dir, ids, texts)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def _assert_values_match_torch_hooks(store: Store, model_dir, ids: list[str], texts: list[str]) -> None:
    """Stored mean-pooled block outputs equal plain torch forward hooks, one example at a time."""
    model = load(model_dir)
    blocks = model.model.transformer.h
    with store.query() as session:
        stored = session.sql(
            "SELECT hook, example_id, activation FROM activations WHERE run = 'r' AND example_id IN (SELECT "
            "example_id FROM examples WHERE run = 'r' ORDER BY example_id LIMIT 6)"
        ).to_pylist()
    by_id = dict(zip(ids, texts, strict=True))
    for row in stored:
        layer = int(row["hook"].split(".")[1])
        captured: dict = {}

        def keep(module, args, out, captured=captured):
            captured["value"] = out[0] if isinstance(out, tuple) else out

        handle = blocks[layer].register_forward_hook(keep)
        try:
            inputs = model.text_inputs([by_id[row["example_id"]]])
            with torch.no_grad():
                model.model(**inputs.kwargs)
        finally:
            handle.remove()
        expected = captured["value"][0].mean(0).numpy()  # [d_model]: one example, no padding
        np.testing.assert_allclose(np.array(row["activation"]), expected, rtol=1e-4, atol=1e-5)


# `hookpoints store delete`, SIGKILLed right after its first table's delete commit (the activations').
KILL_IN_DELETE = """
import os, signal, sys
import hookpoints.store.tables as tables
real = tables.delete
def delete_then_die(*args, **options):
    real(*args, **options)
    os.kill(os.getpid(), signal.SIGKILL)
tables.delete = delete_then_die
from hookpoints.cli.main import main
main(["store", "delete", sys.argv[1], "--run", "r1"])
"""


def test_a_delete_killed_half_way_never_leaves_a_complete_run_with_rows_missing(store, run_cli):
    """Killed between its tables, `store delete` left run r1 `complete` with its activations gone and its
    examples there: SQL readers saw a complete run without vectors, and verify named only that symptom. Now
    the run reads `failed` (not complete) from before the first row goes, verify says to delete it again, and
    that finishes it."""
    from tests.hostile_helpers import fill, vectors

    fill(store, "keep", seed=1)
    kept = vectors(store, "keep")
    fill(store, "r1", seed=2)
    process = subprocess.run(
        [sys.executable, "-c", KILL_IN_DELETE, store.location.uri], env=_env(), capture_output=True, text=True
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    with store.query() as session:
        assert session.sql("SELECT count(*) AS n FROM activations WHERE run = 'r1'").to_pylist() == [{"n": 0}]
        assert session.sql("SELECT count(*) AS n FROM examples WHERE run = 'r1'").to_pylist() == [{"n": 3}]
        status = session.sql("SELECT status FROM runs WHERE run = 'r1'")["status"].to_pylist()
    assert status == ["failed"]  # never `complete` with its rows half gone
    findings = [(f.level, f.message) for f in verify(store).findings if f.level != "info"]
    assert findings == [
        (
            "warning",
            "run 'r1' failed: being deleted; if `hookpoints store delete` was interrupted, run it again",
        )
    ]
    code, _, err = run_cli("store", "delete", store.location.uri, "--run", "r1")
    assert code == 0, err
    assert vectors(store, "r1") == {} and vectors(store, "keep") == kept
    assert verify(store).ok and not [f for f in verify(store).findings if f.level != "info"]
    assert store.run_info("r1") is None


# An overwrite of run r1 (new labels, new vectors), SIGKILLed after its swap moved examples, before activations.
KILL_IN_SWAP = """
import os, signal, sys
import numpy as np, pyarrow as pa
import hookpoints.store.overwrite as overwrite
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run
from tests.hostile_helpers import SETTINGS, hooks
real = overwrite.move_run
def move_then_die(store, table, source, target):
    real(store, table, source, target)
    if table == "examples":
        os.kill(os.getpid(), signal.SIGKILL)
overwrite.move_run = move_then_die
store = Store.open(sys.argv[1])
examples = pa.table({"example_id": ["a", "b", "c"], "text": ["new a", "new b", "new c"]})
writer = open_run(store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=examples.schema,
                  if_exists="overwrite")
writer.add(examples, {h["hook"]: HookRows(["a", "b", "c"], np.full((3, 4), 7, np.float32)) for h in hooks()})
writer.finish()
"""


def test_an_overwrite_killed_while_swapping_in_is_never_read_as_complete(store):
    """Killed between two tables' swaps, the overwritten run read `complete` with the new recording's examples
    (its labels) and the old recording's vectors: any reader trusting the status mixed the two. Now the run
    reads `failed` ("being overwritten") from before the swap's first table until its last; verify says how to
    finish it, and the next record of the run does."""
    from tests.hostile_helpers import fill, hooks, vectors

    fill(store, "r1", seed=1)
    process = subprocess.run(
        [sys.executable, "-c", KILL_IN_SWAP, store.location.uri], env=_env(), capture_output=True, text=True
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    with store.query() as session:
        assert sorted(session.sql("SELECT text FROM examples WHERE run = 'r1'")["text"].to_pylist()) == [
            "new a", "new b", "new c"
        ]  # fmt: skip
        assert all(v != [7.0] * 4 for v in vectors(store, "r1").values())  # the old vectors, still
        status = session.sql("SELECT status FROM runs WHERE run = 'r1'")["status"].to_pylist()
    assert status == ["failed"]
    findings = [(f.level, f.message) for f in verify(store).findings if f.table == "runs"]
    assert (
        "warning",
        "run 'r1' failed: being overwritten; if it was interrupted, `hookpoints record` of run 'r1' with --resume "
        "and the overwrite's other options finishes it",
    ) in findings
    schema = pa.table({"example_id": ["a"]}).schema
    from hookpoints.store.writer import open_run

    from tests.hostile_helpers import SETTINGS

    again = open_run(store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=schema,
                     if_exists="resume")  # fmt: skip
    again.finish()
    assert vectors(store, "r1") == {(h["hook"], e): [7.0] * 4 for h in hooks() for e in "abc"}
    assert store.run_info("r1").status == "complete"
    report = verify(store)
    assert report.ok and not [f for f in report.findings if f.level != "info"], report.findings


# Opens (or creates) the store at argv[1], SIGKILLed right after it creates table argv[2], before registering it.
KILL_AFTER_CREATE = """
import os, signal, sys
import pyarrow as pa
import hookpoints.store.tables as tables
from hookpoints.store.catalog import Store
from hookpoints.store.schema import TableSpec
SCORES = TableSpec("scores", pa.schema([("run", pa.string()), ("score", pa.float64())]), ("run",))
real = tables.create
def create_then_die(location, spec):
    real(location, spec)
    if spec.name == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)
tables.create = create_then_die
store = Store.open(sys.argv[1], create=True)
store.append(SCORES, pa.table({"run": ["r1"], "score": [1.0]}, schema=SCORES.schema))
"""


SCORES = TableSpec("scores", pa.schema([("run", pa.string()), ("score", pa.float64())]), ("run",))


@pytest.mark.parametrize("table", ["scores", "examples"])
def test_a_table_created_by_a_process_killed_before_registering_it_is_registered_by_the_next(tmp_path, table):
    """Killed between creating a table and registering it in store_meta (an analysis' first write, or the store's
    own creation), the table stayed unregistered for ever: later rows went into it unseen by SQL, `store delete`
    and compaction, and verify called its files unexpected ("remove it"). Now the next writer registers it."""
    where = tmp_path / "store"
    process = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_CREATE, str(where), table], env=_env(), capture_output=True, text=True
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    if table == "scores":  # named as what it is, not as files to remove
        found = [f.message for f in verify(Store.open(where)).findings if f.level == "error"]
        assert found == [
            "folder scores is a Delta table that store_meta does not register (its creator was killed before "
            "registering it?): readers do not see its rows; the next write to that table registers it"
        ]
    else:  # the store's own creation was killed: no schema version yet
        found = [(f.level, f.message) for f in verify(Store.open(where, check_version=False)).findings]
        assert found == [
            (
                "error",
                f"schema version None, this hookpoints checks {SCHEMA_VERSION}: its creation was interrupted (the "
                "process creating it killed?): recording into it finishes it",
            )
        ]
    store = Store.open(where, create=True)
    store.append(SCORES, pa.table({"run": ["r1"], "score": [2.5]}, schema=SCORES.schema))
    assert table in store.table_names() and "scores" in store.table_names()
    with store.query() as session:
        assert session.sql("SELECT run, score FROM scores").to_pylist() == [{"run": "r1", "score": 2.5}]
        assert session.sql("SELECT count(*) AS n FROM examples").to_pylist() == [{"n": 0}]
    report = verify(store)
    assert report.ok and not [f for f in report.findings if f.level != "info"], report.findings


# Records 3 of run r1's 6 examples through the writer, commits them, and is SIGKILLed before finishing.
KILL_AFTER_A_FLUSH = """
import os, signal, sys
import numpy as np, pyarrow as pa
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run
from tests.hostile_helpers import SETTINGS, hooks
store = Store.open(sys.argv[1])
examples = pa.table({"example_id": ["a", "b", "c"], "text": ["x", "y", "z"]})
writer = open_run(store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=examples.schema)
writer.add(examples, {h["hook"]: HookRows(["a", "b", "c"], np.ones((3, 4), np.float32)) for h in hooks()})
writer.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_analysis_of_a_run_killed_mid_recording_is_refused_not_run_on_part_of_it(store, run_cli):
    """A recording killed between two flushes leaves a consistent part of its run (every committed example at
    every hook), `recording` in `runs`: ap, magnitudes and clusters analysed that part as if it were the run,
    without a word, and stored the result under the run's name. Now they refuse a run that is not complete."""
    from hookpoints.analyses.examples import open_runs
    from hookpoints.analyses.layers import run_settings

    from tests.hostile_helpers import fill

    fill(store, "done", seed=1)
    process = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_A_FLUSH, store.location.uri], env=_env(), capture_output=True, text=True
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    message = (
        "run 'r1' is not complete (status recording), so an analysis would see only part of it: finish it with "
        "`hookpoints record ... --resume` (or wait for its recording to end)"
    )
    with store.query() as session:
        assert open_runs(session, ["done"]).runs == ("done",)
        for analysis in (lambda: open_runs(session, ["done", "r1"]), lambda: run_settings(session, "r1")):
            with pytest.raises(UserError) as caught:
                analysis()
            assert str(caught.value) == message
    code, _, err = run_cli("magnitudes", "--store", store.location.uri, "--run", "r1")
    assert code == 2 and err.strip() == f"error: {message}"


# An overwrite of run r1 that commits example a's new vectors (7s), then is SIGKILLed while recording.
KILL_DURING_OVERWRITE = """
import os, signal, sys
import numpy as np, pyarrow as pa
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run
from tests.hostile_helpers import SETTINGS, hooks
store = Store.open(sys.argv[1])
examples = pa.table({"example_id": ["a"], "text": ["new a"]})
writer = open_run(store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=examples.schema,
                  if_exists="overwrite")
writer.add(examples, {h["hook"]: HookRows(["a"], np.full((1, 4), 7, np.float32)) for h in hooks()})
writer.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_after_an_overwrite_killed_while_recording_continues_the_overwrite(store):
    """`record --overwrite` killed while recording, then `--resume`: the resume continued the old run, found it
    complete, recorded nothing and said the run was done, the old vectors kept under the run's name and the
    overwrite's part left aside as `r1~overwrite`. Now `--resume` continues the overwrite: only the examples it
    had not committed are recorded, and the finished recording is swapped in."""
    from hookpoints.store.overwrite import staging_name
    from hookpoints.store.writer import HookRows, open_run

    from tests.hostile_helpers import SETTINGS, fill, hooks, vectors

    fill(store, "r1", seed=1)
    process = subprocess.run(
        [sys.executable, "-c", KILL_DURING_OVERWRITE, store.location.uri], env=_env(), capture_output=True, text=True
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    examples = pa.table({"example_id": ["a", "b", "c"], "text": ["new a", "new b", "new c"]})
    writer = open_run(store, "r1", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=examples.schema,
                      if_exists="resume")  # fmt: skip
    assert writer.done == {"a"}  # the overwrite's committed example
    new = {h["hook"]: np.arange(12, dtype=np.float32).reshape(3, 4) for h in hooks()}
    writer.add(examples, {hook: HookRows(["a", "b", "c"], values) for hook, values in new.items()})
    writer.finish()
    expected = {(h, e): ([7.0] * 4 if e == "a" else new[h][i].tolist()) for h in new for i, e in enumerate("abc")}
    assert vectors(store, "r1") == expected
    assert store.run_info("r1").status == "complete" and store.run_info(staging_name("r1")) is None
    with store.query() as session:
        texts = session.sql("SELECT text FROM examples WHERE run = 'r1' ORDER BY example_id")["text"].to_pylist()
    assert texts == ["new a", "new b", "new c"]
    report = verify(store)
    assert report.ok and not [f for f in report.findings if f.level != "info"], report.findings


def test_an_intervention_sweep_refuses_statistics_of_a_run_that_is_not_complete(store):
    """Medians from a run still recording (or killed) are medians of part of it: refused like ap's runs."""
    from hookpoints.analyses.intervention_sweep import plan_sweep
    from hookpoints.analyses.sweep_spec import SweepSpec

    from tests.hostile_helpers import SETTINGS, fill, hooks

    fill(store, "done", seed=1)
    examples = pa.table({"example_id": ["a"], "text": ["x"]})
    writer = open_run(store, "partial", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=examples.schema)
    writer.add(examples, {h["hook"]: HookRows(["a"], np.ones((1, 4), np.float32)) for h in hooks()})
    writer.flush()  # committed, still recording
    spec = SweepSpec("sw", runs=("done",), tasks=("s2tt",), stats_runs=("partial",), ks=(1,))
    with pytest.raises(UserError, match="run 'partial' is not complete"):
        plan_sweep(store, spec, lambda model, modality: pytest.fail("no model is loaded for a refused sweep"))
    writer.finish("complete")
