"""``hookpoints store verify``: a consistent store passes; each kind of damage is found and named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from hookpoints.store import tables
from hookpoints.store.catalog import Store
from hookpoints.store.schema import ACTIVATIONS, CORE_TABLES
from hookpoints.store.verify import verify

from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import record

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, gpt2_dir):
    """A store with one complete run (12 examples, 2 hooks, a commit per batch), recorded once."""
    folder = tmp_path_factory.mktemp("verify")
    rows = [{"id": f"ex{i}", "text": f"sentence number {i} " * (1 + i % 3)} for i in range(12)]
    (folder / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = Store.open(folder / "store", create=True)
    record(load(gpt2_dir), read_manifest(folder / "m.jsonl"), store, "r", hooks=HOOKS, batch_size=4, max_buffer_bytes=0)
    return folder / "store"


@pytest.fixture
def copy(recorded, tmp_path):
    """A fresh copy of the recorded store, to damage."""
    target = tmp_path / "store"
    shutil.copytree(recorded, target)
    return target


def _activation_file(store_path) -> str:
    table = DeltaTable(str(store_path / "activations"))
    return pa.table(table.get_add_actions(flatten=True))["path"][0].as_py()


def _append_activation(store, example="ex0", hook=HOOKS[0], values=None, finite=True):
    values = np.zeros(64, np.float32) if values is None else values
    row = {"run": "r", "hook": hook, "example_id": example, "position": None, "activation": values.tolist(),
           "activation_f16": None, "finite": finite}  # fmt: skip
    tables.append(store.location, CORE_TABLES["activations"], pa.Table.from_pylist([row], schema=ACTIVATIONS))


def test_a_consistent_store_passes(copy, run_cli):
    code, out, _ = run_cli("store", "verify", str(copy))
    assert code == 0
    assert "store is consistent" in out


def test_a_truncated_parquet_file_is_found_and_named(copy, run_cli):
    path = _activation_file(copy)
    data = (copy / "activations" / path).read_bytes()
    (copy / "activations" / path).write_bytes(data[: len(data) // 2])
    code, out, err = run_cli("store", "verify", str(copy))
    assert code == 1
    assert f"error activations: file activations/{path} is damaged" in out
    report = verify(Store.open(copy))
    assert [f.message for f in report.findings if f.level == "error"] == [
        f"file activations/{path} is damaged: {len(data) // 2} bytes, the log recorded {len(data)} (truncated?)"
    ]


def test_a_file_overwritten_with_garbage_of_the_same_size_is_found(copy):
    path = _activation_file(copy)
    size = (copy / "activations" / path).stat().st_size
    (copy / "activations" / path).write_bytes(b"\x00" * size)
    errors = [f.message for f in verify(Store.open(copy)).findings if f.level == "error"]
    assert len(errors) == 1 and errors[0].startswith(f"file activations/{path} is damaged:")


def test_a_missing_file_is_found(copy):
    path = _activation_file(copy)
    (copy / "activations" / path).unlink()
    errors = [f.message for f in verify(Store.open(copy)).findings if f.level == "error"]
    assert errors == [f"file activations/{path} is missing (the log refers to it)"]


def test_files_that_are_not_parquet_or_delta_logs_are_refused(copy):
    (copy / "model.pkl").write_bytes(b"\x80\x04K\x01.")  # a pickle next to the tables
    (copy / "examples" / "notes.npy").write_bytes(b"\x93NUMPY")
    errors = [f.message for f in verify(Store.open(copy)).findings if f.level == "error"]
    assert any(e.startswith("unexpected file model.pkl") for e in errors)
    assert any(e.startswith("unexpected file notes.npy") for e in errors)


def test_nan_is_an_error_unless_the_writer_flagged_it(copy):
    store = Store.open(copy)
    bad = np.zeros(64, np.float32)
    bad[3] = np.nan
    _append_activation(store, "ex0", HOOKS[0], bad, finite=True)  # NaN the writer did not flag
    errors = [f.message for f in verify(store).findings if f.level == "error"]
    assert any("1 vectors hold NaN or inf the writer did not flag" in e for e in errors)


def test_flagged_nan_is_a_warning(tmp_path, gpt2_dir):
    from hookpoints.store.writer import HookRows, open_run

    store = Store.open(tmp_path / "store", create=True)
    hooks = [{"hook": "h", "width": 2, "layer": 0}]
    writer = open_run(
        store, "r", settings={"model": "m", "task": "t", "pooling": "mean", "dtype": "float16"}, config={},
        hooks=hooks, examples_schema=pa.schema([("example_id", pa.string())]),
    )  # fmt: skip
    values = np.array([[1.0, 2.0], [np.inf, 1.0], [1e6, 0.0]], np.float32)  # 1e6 overflows float16
    writer.add(pa.table({"example_id": ["a", "b", "c"]}), {"h": HookRows(["a", "b", "c"], values)})
    writer.finish()
    report = verify(store)
    assert report.ok, report.findings
    assert [f.message for f in report.findings if f.level == "warning"] == [
        "run 'r', hook 'h': 2 vectors hold NaN or inf (flagged)"
    ]


def test_a_vector_of_the_wrong_width_is_found(copy):
    store = Store.open(copy)
    _append_activation(store, "ex0", HOOKS[1], np.zeros(63, np.float32))
    errors = [f.message for f in verify(store).findings if f.level == "error"]
    assert any("1 vectors are not 64 wide" in e for e in errors)


def test_duplicates_and_dangling_rows_are_found(copy):
    store = Store.open(copy)
    stored = store.dataset("activations").to_table(filter=(pa.compute.field("example_id") == "ex5")).to_pylist()
    _append_activation(store, "ex5", stored[0]["hook"], np.array(stored[0]["activation"], np.float32))
    _append_activation(store, "ghost", HOOKS[0])
    _append_activation(store, "ex1", "blocks.9.hook_resid_post")
    errors = [f.message for f in verify(store).findings if f.level == "error"]
    assert f"example 'ex5' (position None) at hook '{stored[0]['hook']}' of run 'r' is stored 2 times" in errors
    assert "activations of example 'ghost' in run 'r', which is not in examples" in errors
    assert "activations at hook 'blocks.9.hook_resid_post' in run 'r', which is not in hooks" in errors


def test_a_complete_run_missing_an_example_at_a_hook_is_found(copy):
    DeltaTable(str(copy / "activations")).delete(f"example_id = 'ex3' AND hook = '{HOOKS[1]}'")
    errors = [f.message for f in verify(Store.open(copy)).findings if f.level == "error"]
    assert errors == ["run 'r' is complete but 1 of its examples are not recorded at every hook"]


def test_verify_of_a_path_that_is_no_store_is_a_clear_error(tmp_path, run_cli):
    code, _, err = run_cli("store", "verify", str(tmp_path))
    assert code == 2
    assert "is not a hookpoints store" in err
