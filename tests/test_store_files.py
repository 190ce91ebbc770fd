"""store/files.py writes one checksummed Parquet file per partition with one ``write_dataset`` call per
``PARTITIONS_PER_CALL`` partitions: each file holds exactly its partition's rows in their order, and its Delta
statistics equal a plain Python computation over those rows."""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hookpoints.store import files
from hookpoints.store.location import StoreLocation
from hookpoints.store.schema import TableSpec

SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("hook", pa.string()),
        ("example_id", pa.string()),
        ("position", pa.int32()),
        ("score", pa.float64()),
        ("finite", pa.bool_()),
        ("vector", pa.list_(pa.float32())),
    ]
)


def _rows(count: int, seed: int = 0) -> pa.Table:
    """Shuffled rows over 2 runs x 9 hooks (names that need quoting), nulls, NaN, infinities, long strings."""
    rng = np.random.default_rng(seed)
    hooks = ["h:a", "h/b", "h c", "z", "blocks.0.hook_resid_post", "ä", "h%", "x=y", "last"]
    scores = rng.normal(size=count)
    scores[rng.random(count) < 0.05] = np.nan
    scores[:2] = [np.inf, -np.inf]
    return pa.table(
        {
            "run": rng.choice(["r1", "r~2"], count).tolist(),
            "hook": rng.choice(hooks, count).tolist(),
            "example_id": [("e" * 40 if i % 50 == 7 else f"e{i % 97}") for i in range(count)],
            "position": pa.array([None if i % 3 else i for i in range(count)], pa.int32()),
            "score": pa.array(scores.tolist()).cast(pa.float64()),
            "finite": pa.array([None if i % 11 == 0 else bool(i % 2) for i in range(count)], pa.bool_()),
            "vector": pa.array([rng.normal(size=int(rng.integers(0, 5))).tolist() for _ in range(count)],
                               pa.list_(pa.float32())),
        }
    )  # fmt: skip


def _expected_stats(rows: list[dict], columns: list[str]) -> dict:
    """Delta's statistics by hand: rows, nulls, min/max of scalar columns (NaN skipped; a column left out where
    an infinity is its bound, or a string bound is over 32 characters, or every value is null)."""
    stats: dict = {"numRecords": len(rows), "minValues": {}, "maxValues": {}, "nullCount": {}}
    for name in columns:
        values = [row[name] for row in rows]
        stats["nullCount"][name] = sum(value is None for value in values)
        present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if name == "vector" or not present:
            continue
        low, high = min(present), max(present)
        if isinstance(low, float) and not (math.isfinite(low) and math.isfinite(high)):
            continue
        if isinstance(low, str) and max(len(low), len(high)) > 32:
            continue
        stats["minValues"][name], stats["maxValues"][name] = low, high
    return stats


@pytest.mark.parametrize("dictionary", [False, True])
def test_each_partition_gets_one_file_with_its_rows_in_order_and_its_statistics(tmp_path, monkeypatch, dictionary):
    monkeypatch.setattr(files, "PARTITIONS_PER_CALL", 4)  # 18 partitions: five write_dataset calls
    spec = TableSpec("t", SCHEMA, ("run", "hook"), row_group_rows=16)
    data = _rows(1500)
    if dictionary:  # as the run writer passes them
        data = data.set_column(0, "run", data["run"].dictionary_encode()).set_column(
            1, "hook", data["hook"].dictionary_encode()
        )
    location = StoreLocation.parse(tmp_path)
    (tmp_path / "t").mkdir()
    actions = files.write_files(location, spec, data)

    expected: dict = {}  # (run, hook) -> rows, in the input's order
    for row in _rows(1500).to_pylist():
        expected.setdefault((row["run"], row["hook"]), []).append(row)
    assert len(actions) == len(expected) == 18
    body = [name for name in SCHEMA.names if name not in ("run", "hook")]
    for action in actions:
        run, hook = action.partition_values["run"], action.partition_values["hook"]
        folder, name = action.path.rsplit("/", 1)
        assert folder == f"run={quote(run, safe='')}/hook={quote(hook, safe='')}"
        path = tmp_path / "t" / action.path
        assert action.size == path.stat().st_size
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        assert max(parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)) <= 16
        stored = parquet.read().to_pylist()
        wanted = [{key: row[key] for key in body} for row in expected[run, hook]]
        assert repr(stored) == repr(wanted)  # repr: NaN equals itself
        assert json.loads(action.stats) == _expected_stats(wanted, body)
    on_disk = sorted(p.relative_to(tmp_path / "t").as_posix() for p in (tmp_path / "t").rglob("*.parquet"))
    assert on_disk == sorted(action.path for action in actions)  # no other file: no partition split in two


def test_a_table_without_partitions_is_one_file_and_no_rows_are_no_file(tmp_path):
    spec = TableSpec("t", SCHEMA.remove(0).remove(0))
    data = _rows(300).drop_columns(["run", "hook"])
    location = StoreLocation.parse(tmp_path)
    (tmp_path / "t").mkdir()
    (action,) = files.write_files(location, spec, data)
    assert "/" not in action.path and action.partition_values == {}
    assert repr(pq.read_table(tmp_path / "t" / action.path).to_pylist()) == repr(data.to_pylist())
    assert json.loads(action.stats) == _expected_stats(data.to_pylist(), data.column_names)
    assert files.write_files(location, spec, data.slice(0, 0)) == []


def test_a_null_partition_value_is_its_own_partition(tmp_path):
    spec = TableSpec("t", pa.schema([("label_set", pa.string()), ("x", pa.int64())]), ("label_set",))
    data = pa.table({"label_set": ["a", None, "a", None], "x": [1, 2, 3, 4]})
    (tmp_path / "t").mkdir()
    actions = files.write_files(StoreLocation.parse(tmp_path), spec, data)
    by_value = {action.partition_values["label_set"]: action for action in actions}
    assert set(by_value) == {"a", None}
    assert by_value[None].path.startswith("label_set=None/")
    assert pq.read_table(tmp_path / "t" / by_value[None].path)["x"].to_pylist() == [2, 4]
    assert pq.read_table(tmp_path / "t" / by_value["a"].path)["x"].to_pylist() == [1, 3]


@pytest.mark.parametrize("float16", [False, True])
def test_a_flush_table_flags_each_row_by_its_own_values_whatever_the_widths(float16):
    """Buffer.table computes ``finite`` for all rows at once: rows of different widths (0 included, first and
    last), NaN/inf at a row's first or last value, and a float32 chunk in a float16 run (cast, overflow -> inf)."""
    from hookpoints.store.buffer import Buffer, HookRows

    dtype = np.float16 if float16 else np.float32
    chunks = {
        "a": HookRows(["x", "y"], np.zeros((2, 0), dtype)),
        "b": HookRows(["x", "y"], np.array([[np.nan, 1, 2], [1, 2, 3]], dtype)),
        "c": HookRows(["x", "y"], np.array([[1.0, 2.0], [3.0, 1e6]], np.float32)),  # 1e6: inf in float16
        "d": HookRows(["x", "y"], np.array([[1, np.inf], [4, 5]], dtype), np.array([7, 9], np.int32)),
        "e": HookRows(["x", "y"], np.zeros((2, 0), dtype)),
    }
    buffer = Buffer()
    buffer.add(pa.table({"example_id": ["x", "y"]}), chunks)
    table = buffer.table("r", list(chunks), float16=float16)

    def width(row: dict) -> int:  # float16: a blob of 2 bytes a value
        return len(row["activation_f16_bytes"]) // 2 if float16 else len(row["activation"])

    got = [(row["hook"], row["example_id"], row["position"], row["finite"], width(row)) for row in table.to_pylist()]
    expected = []
    for hook, chunk in chunks.items():
        with np.errstate(over="ignore"):
            values = chunk.values.astype(dtype)
        for r, example in enumerate(chunk.example_ids):
            position = None if chunk.positions is None else int(chunk.positions[r])
            expected.append((hook, example, position, bool(np.isfinite(values[r]).all()), values.shape[1]))
    assert got == expected
    assert [row["finite"] for row in table.to_pylist()] == [True, True, False, True, True, not float16, False,
                                                            True, True, True]  # fmt: skip
    assert table.num_rows == 10


@pytest.mark.parametrize(("soft", "per_call"), [(256, 128), (1024, 512), (20000, 512), (50, 64)])
def test_a_call_keeps_at_most_half_the_open_file_limit_open(monkeypatch, soft, per_call):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (soft, 2**20))
    assert files._partitions_per_call() == per_call


@pytest.fixture
def two_io_threads():
    """Arrow's I/O threads at 2 (what ``WRITE_CALLS = None`` reads when called), restored afterwards."""
    threads = pa.io_thread_count()
    pa.set_io_thread_count(2)
    yield
    pa.set_io_thread_count(threads)


@pytest.mark.parametrize(
    ("write_calls", "budget", "sizes"), [(3, 512, [6, 6, 6]), (8, 4, [1] * 18), (1, 7, [7, 7, 4]), (None, 512, [9, 9])]
)
def test_calls_side_by_side_keep_within_the_open_file_budget(
    tmp_path, monkeypatch, two_io_threads, write_calls, budget, sizes
):
    """The partitions are shared out over WRITE_CALLS write_dataset calls that run side by side (None: as many as
    Arrow's I/O threads when called, 2 here), never more than PARTITIONS_PER_CALL files open at once across
    them; the files are the same as one call's."""
    monkeypatch.setattr(files, "WRITE_CALLS", write_calls)
    monkeypatch.setattr(files, "PARTITIONS_PER_CALL", budget)
    original, lock, state = files._write, threading.Lock(), {"open": 0, "most": 0, "sizes": []}

    def counted(filesystem, rows, *args, **kwargs):
        partitions = len(set(rows["__folder"].to_pylist()))
        with lock:
            state["open"] += partitions
            state["most"] = max(state["most"], state["open"])
            state["sizes"].append(partitions)
        time.sleep(0.05)  # long enough for the calls of a pool to overlap
        try:
            return original(filesystem, rows, *args, **kwargs)
        finally:
            with lock:
                state["open"] -= partitions

    monkeypatch.setattr(files, "_write", counted)
    spec = TableSpec("t", SCHEMA, ("run", "hook"), row_group_rows=16)
    location = StoreLocation.parse(tmp_path)
    (tmp_path / "t").mkdir()
    actions = files.write_files(location, spec, _rows(1500))
    assert sorted(state["sizes"]) == sorted(sizes)
    assert state["most"] <= budget
    if len(sizes) > 1 and write_calls != 1:
        assert state["most"] > max(sizes)  # they did run side by side
    stored = {a.path.rsplit("/", 1)[0]: pq.read_table(tmp_path / "t" / a.path).num_rows for a in actions}
    expected: dict = {}
    for row in _rows(1500).to_pylist():
        folder = f"run={quote(row['run'], safe='')}/hook={quote(row['hook'], safe='')}"
        expected[folder] = expected.get(folder, 0) + 1
    assert stored == expected


def test_a_failing_call_raises_its_error_once_every_call_has_ended(tmp_path, monkeypatch):
    """One write_dataset call of several fails: write_files raises that call's error (the first one's, where two
    fail) after the other calls have ended, and returns no actions, so nothing is committed."""
    monkeypatch.setattr(files, "WRITE_CALLS", 3)
    monkeypatch.setattr(files, "PARTITIONS_PER_CALL", 6)  # 18 partitions: 9 calls of 2, 3 at a time
    original, ended = files._write, []

    def failing(filesystem, rows, *args, **kwargs):
        folders = set(rows["__folder"].to_pylist())
        time.sleep(0.02)
        bad = sorted(folder for folder in folders if folder.endswith("hook=z"))
        if bad:
            raise OSError(f"disk full at {bad[0]}")
        original(filesystem, rows, *args, **kwargs)
        ended.append(folders)

    monkeypatch.setattr(files, "_write", failing)
    spec = TableSpec("t", SCHEMA, ("run", "hook"), row_group_rows=16)
    (tmp_path / "t").mkdir()
    folders = files._partitions(_rows(1500), ["run", "hook"])[0]  # the calls' order: 2 partitions each
    first = next(folder for folder in folders if folder.endswith("hook=z"))  # 'z' of both runs fails
    with pytest.raises(OSError, match=f"^disk full at {re.escape(first)}$"):
        files.write_files(StoreLocation.parse(tmp_path), spec, _rows(1500))
    assert not [t for t in threading.enumerate() if t.name.startswith("hookpoints-files")]
    assert len(ended) == 7  # the calls that did not fail all ran to their end


@pytest.mark.parametrize(("write_calls", "budget"), [(8, 512), (8, 4), (3, 7), (8, 1)])
def test_calls_side_by_side_write_the_bytes_of_one_call_at_a_time(tmp_path, monkeypatch, write_calls, budget):
    """Each file byte for byte (rows, order, row groups, Parquet statistics, checksums) and each action (name,
    size, partition, Delta statistics) the same as with one write_dataset call at a time."""
    monkeypatch.setattr(files.uuid, "uuid4", lambda: uuid.UUID(int=7))  # the same file names in both
    spec = TableSpec("t", SCHEMA, ("run", "hook"), row_group_rows=16)
    written = {}
    for calls in (1, write_calls):
        monkeypatch.setattr(files, "WRITE_CALLS", calls)
        monkeypatch.setattr(files, "PARTITIONS_PER_CALL", budget if calls > 1 else 512)
        (tmp_path / str(calls) / "t").mkdir(parents=True)
        actions = files.write_files(StoreLocation.parse(tmp_path / str(calls)), spec, _rows(3000, seed=3))
        written[calls] = {
            a.path: ((tmp_path / str(calls) / "t" / a.path).read_bytes(), a.size, a.partition_values, a.stats)
            for a in actions
        }
    assert len(written[1]) == 18
    assert written[write_calls] == written[1]


def test_partitions_group_rows_as_a_python_dict_does():
    """files._partitions (an int64 key per row, key by key) against grouping the rows' values in Python: nulls,
    a dictionary-encoded and a plain column, URL-quoted folders."""
    from hookpoints.store import files

    rng = np.random.default_rng(3)
    n = 5000
    codes = rng.integers(0, 4, n).astype(np.int32)
    run = pa.DictionaryArray.from_arrays(pa.array(codes, mask=rng.random(n) < 0.1), pa.array(["a", "b", "c", "d"]))
    hook = pa.array(rng.choice(["h1", "h/2", "h 3", None], n).tolist())
    table = pa.table({"run": run, "hook": hook})
    folders, values, group = files._partitions(table, ["run", "hook"])
    rows = list(zip(table["run"].to_pylist(), table["hook"].to_pylist(), strict=True))
    assert [(values[g]["run"], values[g]["hook"]) for g in group.tolist()] == rows
    assert sorted((v["run"] or "", v["hook"] or "") for v in values) == sorted({(r or "", h or "") for r, h in rows})
    assert len(set(folders)) == len(folders) == len(values)
    assert all("/" not in folder.split("/", 1)[1].removeprefix("hook=") for folder in folders)  # quoted


@pytest.mark.parametrize("index_type", [pa.int32(), pa.uint8()])
def test_a_dictionary_that_holds_a_value_twice_is_one_partition_of_all_its_rows(tmp_path, index_type):
    """Partition columns in a dictionary that names a value twice (``["a", "b", "a"]``: a run writer given the
    same hook twice) or holds a null: each code was its own partition, two partitions shared the folder and the
    file name, one file overwrote the other and its rows were lost, committed twice under one path. Now one
    partition per value, every row in it, in order; unsigned indices (a valid Arrow dictionary) too."""
    spec = TableSpec("t", pa.schema([("k", pa.string()), ("x", pa.int64())]), ("k",))
    indices = pa.array([0, 1, 2, 0, 2, None, 3, 1], index_type)
    k = pa.DictionaryArray.from_arrays(indices, pa.array(["a", "b", "a", None]))
    data = pa.table({"k": k, "x": list(range(8))})
    (tmp_path / "t").mkdir()
    actions = files.write_files(StoreLocation.parse(tmp_path), spec, data)
    expected: dict = {}  # grouped in Python
    for value, x in zip(k.to_pylist(), range(8), strict=True):
        expected.setdefault(value, []).append(x)
    stored = {a.partition_values["k"]: pq.read_table(tmp_path / "t" / a.path)["x"].to_pylist() for a in actions}
    assert len(actions) == len({a.path for a in actions}) == 3
    assert stored == expected == {"a": [0, 2, 3, 4], "b": [1, 7], None: [5, 6]}
    assert {a.partition_values["k"]: json.loads(a.stats)["numRecords"] for a in actions} == {"a": 4, "b": 2, None: 2}


def test_folders_that_differ_only_in_case_get_files_of_different_names(tmp_path):
    """Hooks H0 and h0 are one folder on a case-insensitive file system (macOS): with one file name for every
    partition of a call, the second file replaced the first there and a hook's rows were lost. Each such
    partition now gets its own name; the rows read back per hook, on this (case-sensitive) file system."""
    spec = TableSpec("t", SCHEMA, ("run", "hook"), row_group_rows=16)
    rows = _rows(60)
    hooks = ["H0", "h0", "x"] * 20
    rows = rows.set_column(rows.schema.get_field_index("hook"), "hook", pa.array(hooks))
    (tmp_path / "t").mkdir()
    actions = files.write_files(StoreLocation.parse(tmp_path), spec, rows)
    by_hook = {a.partition_values["hook"]: a.path for a in actions if a.partition_values["run"] == "r1"}
    assert len({path.casefold() for path in by_hook.values()}) == len(by_hook) >= 3
    for action in actions:
        stored = pq.read_table(tmp_path / "t" / action.path)
        expected = [r for r in rows.to_pylist() if (r["run"], r["hook"]) == tuple(action.partition_values.values())]
        assert stored.num_rows == len(expected) > 0
