"""A store on S3-compatible storage: a real HTTP server (moto) on 127.0.0.1, started and stopped here.

Every command works the same on ``s3://bucket/prefix`` as on a local folder (same values, same answers);
shards commit side by side through S3's conditional writes (tests/test_store_concurrency.py runs writer
processes on a local store); a damaged object is found and named.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pytest
from hookpoints.store.catalog import Store
from hookpoints.store.runs import in_shard
from hookpoints.store.verify import verify
from hookpoints.store.writer import HookRows, open_run

from tests.moto_server import BUCKET, moto_server, s3_client
from tests.store_checks import assert_exactly_once

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]


@pytest.fixture(scope="module")
def s3_server():
    with moto_server() as env:
        yield env


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The server's AWS environment, set for this process (the CLI run in-process reads it)."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


def _record(run_cli, model, manifest, where, *extra):
    args = ["record", "--model", str(model), "--data", str(manifest), "--store", where, "--run", "r"]
    for hook in HOOKS:
        args += ["--hooks", hook]
    return run_cli(*args, "--batch-size", "3", "--buffer-mb", "0", *extra)


def test_every_command_works_the_same_on_s3_and_on_a_local_folder(s3, run_cli, gpt2_dir, texts_manifest, tmp_path):
    manifest = texts_manifest(9)
    answers = {}
    for where in (f"s3://{BUCKET}/team/store", str(tmp_path / "store")):
        code, _, err = _record(run_cli, gpt2_dir, manifest, where)
        assert code == 0, err
        code, out, err = _record(run_cli, gpt2_dir, manifest, where, "--resume")
        assert code == 0 and "recorded 0 examples (9 already there)" in out.replace("\n", " "), err
        query = "SELECT hook, example_id, activation FROM activations ORDER BY hook, example_id"
        code, out, err = run_cli("sql", "--store", where, "--format", "json", query)
        assert code == 0, err
        answers[where] = json.loads(out)
        for command in (["info"], ["verify"], ["compact"], ["vacuum", "--dry-run"], ["verify"]):
            code, out, err = run_cli("store", command[0], where, *command[1:])
            assert code == 0, (command, err)
        code, out, _ = run_cli("sql", "--store", where, "--format", "json", "SELECT status, shards FROM runs")
        assert json.loads(out) == [{"status": "complete", "shards": 1}]
    s3_answer, local_answer = answers.values()
    assert len(s3_answer) == 9 * len(HOOKS)
    assert s3_answer == local_answer
    keys = [item["Key"] for item in s3_client(s3).list_objects_v2(Bucket=BUCKET, Prefix="team/store/")["Contents"]]
    assert any(key.startswith("team/store/activations/run=r/hook=blocks.0.hook_resid_post/") for key in keys)
    assert not [key for key in keys if key.endswith("/")]  # no zero-byte directory markers


def test_shards_commit_into_s3_at_once(s3):
    """Four writers (shards of one run) commit side by side through S3's conditional writes."""
    where = f"s3://{BUCKET}/shards/store"
    store = Store.open(where, create=True)
    ids = [f"ex{i}" for i in range(40)]
    hooks = [{"hook": f"h{i}", "width": 3, "layer": i} for i in range(2)]
    settings = {"model": "m", "task": "forward", "pooling": "mean", "dtype": "float32"}
    errors = []

    def shard(index: int) -> None:
        try:
            writer = open_run(store, "r", settings=settings, config={}, hooks=hooks, shard=(index, 4),
                              examples_schema=pa.schema([("example_id", pa.string())]), max_buffer_bytes=0)  # fmt: skip
            mine = [example for example in ids if in_shard(example, (index, 4))]
            for first in range(0, len(mine), 2):
                batch = mine[first : first + 2]
                values = np.full((len(batch), 3), index, np.float32)  # [batch, width]
                writer.add(pa.table({"example_id": batch}), {h["hook"]: HookRows(batch, values) for h in hooks})
            writer.finish()
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=shard, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert_exactly_once(store, "r", ids, len(hooks))
    info = store.run_info("r")
    assert (info.status, info.shards_complete) == ("complete", 4)


def test_a_truncated_object_on_s3_is_found_and_named(s3, run_cli, gpt2_dir, texts_manifest):
    where = f"s3://{BUCKET}/damaged/store"
    code, _, err = _record(run_cli, gpt2_dir, texts_manifest(6), where)
    assert code == 0, err
    client = s3_client(s3)
    key = next(
        item["Key"]
        for item in client.list_objects_v2(Bucket=BUCKET, Prefix="damaged/store/activations/run=r/")["Contents"]
    )
    data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=key, Body=data[:100])
    errors = [finding.message for finding in verify(Store.open(where)).findings if finding.level == "error"]
    path = key.removeprefix("damaged/store/activations/")
    assert errors == [f"file activations/{path} is damaged: 100 bytes, the log recorded {len(data)} (truncated?)"]
    code, out, _ = run_cli("store", "verify", where)
    assert code == 1 and path in out


def test_s3_locations_that_cannot_be_used_are_clear_errors(s3, run_cli, monkeypatch, gpt2_dir, texts_manifest):
    code, _, err = run_cli("sql", "--store", f"s3://{BUCKET}/nothing/here", "SELECT 1")
    assert code == 2 and "is not a hookpoints store" in err
    code, _, err = _record(run_cli, gpt2_dir, texts_manifest(2), "s3://no-such-bucket/store")
    assert code == 2 and "cannot reach store s3://no-such-bucket/store: The specified bucket does not exist" in err
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    code, _, err = run_cli("store", "info", f"s3://{BUCKET}/team/store")
    assert code == 2 and "cannot reach store" in err and "Connection refused" in err


def test_an_overwrite_on_s3_swaps_in_with_the_files_statistics(s3, run_cli, gpt2_dir, texts_manifest):
    """The swap's last commit is made onto the run_events version it checked (store/overwrite.py): on S3 too, and
    the files it re-adds keep their statistics, so a reader filtering on example_id skips the others."""
    from hookpoints.store import tables

    where = f"s3://{BUCKET}/team/overwritten"
    manifest = texts_manifest(9)
    assert _record(run_cli, gpt2_dir, manifest, where)[0] == 0
    code, _, err = _record(run_cli, gpt2_dir, manifest, where, "--overwrite")
    assert code == 0, err
    store = Store.open(where)
    assert store.run_info("r").status == "complete" and store.run_info("r~overwrite") is None
    actions = tables.open_table(store.location, "activations").get_add_actions(flatten=True)
    assert None not in actions.column("min.example_id").to_pylist()
    with store.query() as session:
        assert session.sql("SELECT count(*) AS n FROM activations WHERE example_id = 'ex0004'")["n"][0].as_py() == 2
    assert verify(store).ok
