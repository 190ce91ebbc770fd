"""float16 vectors as one blob per vector (schema 3, ``activation_f16_bytes``) beside the list layout of older
stores (``activation_f16``): every reader decodes both, row by row, to what numpy's own float16 gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from hookpoints.analyses.examples import open_runs, select_examples
from hookpoints.analyses.hook_matrix import HookMatrixReader, shared_hooks
from hookpoints.analyses.layers import read_layer, run_settings
from hookpoints.analyses.subsets import select_subset
from hookpoints.store.catalog import Store
from hookpoints.store.schema import ACTIVATIONS, CORE_TABLES
from hookpoints.store.verify import verify
from hookpoints.store.writer import HookRows, open_run

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.manifest import Manifest, read_manifest
from hookpoints.recorder import record

GPT2_HOOK = "blocks.0.hook_resid_post"
HOOK = {"hook": "h", "module": "h", "io": "output", "component": "c", "layer": 0, "submodule": "s", "width": 4,
        "shape": [4], "neuron_axis": 1, "space": "c", "layer_output": True}  # fmt: skip


def _write(store: Store, run: str, x: np.ndarray, dtype: str = "float16") -> None:
    ids = [f"e{i}" for i in range(len(x))]
    examples = pa.table({"example_id": ids})
    settings = {"model": "m", "task": "forward", "pooling": "mean", "dtype": dtype}
    hook = {**HOOK, "width": x.shape[1], "shape": [x.shape[1]]}
    writer = open_run(store, run, settings=settings, config={}, hooks=[hook], examples_schema=examples.schema)
    writer.add(examples, {"h": HookRows(ids, x)})
    writer.finish()


def _sql_matrix(store: Store, run: str, hook: str) -> np.ndarray:
    with store.query() as session:
        rows = session.sql(
            "SELECT activation FROM activations WHERE run = $run AND hook = $hook ORDER BY example_id",
            {"run": run, "hook": hook},
        )
    return np.array(rows["activation"].to_pylist(), np.float32)


def test_sql_decodes_every_kind_of_half_as_numpy_does(tmp_path):
    """Normal, subnormal, signed zeros, the largest half, inf and NaN: the view's FLOAT[] equals numpy's
    float16 -> float32, bit for bit, and the file holds one PLAIN blob column without statistics."""
    store = Store.open(tmp_path / "store", create=True)
    specials = [0.0, -0.0, 6e-8, -6.1e-5, 65504.0, -65504.0, 1e6, -np.inf, np.nan, 1.0, -2.5, 0.333]
    x = np.array(specials + list(np.random.default_rng(1).normal(size=12) * 300), np.float32).reshape(4, 6)
    _write(store, "r", x)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).astype(np.float32)
    got = _sql_matrix(store, "r", "h")
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))  # -0.0 and NaN included
    raw = DeltaTable(store.location.table_uri("activations")).to_pyarrow_table()
    assert raw["activation_f16"].null_count == raw["activation"].null_count == raw.num_rows
    assert raw["finite"].to_pylist() == [bool(np.isfinite(row).all()) for row in expected]
    for path in Path(store.location.uri, "activations").rglob("*.parquet"):
        meta = pq.ParquetFile(path).metadata
        column = next(
            meta.row_group(0).column(i)
            for i in range(meta.num_columns)
            if meta.row_group(0).column(i).path_in_schema == "activation_f16_bytes"
        )
        assert set(column.encodings) <= {"PLAIN", "RLE"} and not column.is_stats_set


def test_a_float16_run_resumed_across_the_upgrade_reads_the_same_everywhere(tmp_path, gpt2_dir, run_cli):
    """A float16 run recorded into a schema-2 store (list layout), migrated, then resumed (blob layout): one run,
    two layouts. SQL, the hook matrix (ap, clusters), read_layer, neuron_stats and verify all read it as the
    same matrix, equal within float16 rounding to a float32 recording of the same examples."""
    rows = [{"id": f"ex{i}", "text": f"a few words, number {i}" + " more" * (i % 3), "lang": "en"} for i in range(6)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = read_manifest(tmp_path / "m.jsonl")
    model = load(gpt2_dir)
    current = Store.open(tmp_path / "current", create=True)
    record(model, Manifest(manifest.path, manifest.table.slice(0, 4)), current, "r", hooks=[GPT2_HOOK], dtype="float16")
    record(model, manifest, current, "r32", hooks=[GPT2_HOOK])
    old = tmp_path / "old"  # the same store as schema 2 wrote it: float16 as list<int16> bit patterns
    for name, spec in CORE_TABLES.items():
        data = current.dataset(name).to_table()
        if name == "run_events":  # r was killed before its end: resumable
            data = data.filter((pc.field("run") != "r") | (pc.field("status") != "complete"))
        if name == "activations":
            bits = [None if blob is None else np.frombuffer(blob, "<i2").tolist() for blob in
                    data["activation_f16_bytes"].to_pylist()]  # fmt: skip
            data = data.set_column(data.schema.get_field_index("activation_f16"), "activation_f16",
                                   pa.array(bits, pa.list_(pa.int16())))  # fmt: skip
            data = data.drop_columns(["activation_f16_bytes"])
        if name == "store_meta":
            meta = dict(zip(data["key"].to_pylist(), data["value"].to_pylist(), strict=True))
            data = pa.table({"key": list(meta), "value": [{"schema_version": "2"}.get(k, v) for k, v in meta.items()]})
        write_deltalake(str(old / name), data, partition_by=list(spec.partition_by) or None)

    code, out, err = run_cli("store", "migrate", str(old))
    assert code == 0 and "activations: added activation_f16_bytes" in out, err
    store = Store.open(old)
    summary = record(model, manifest, store, "r", hooks=[GPT2_HOOK], dtype="float16", if_exists="resume")
    assert (summary.recorded, summary.skipped) == (2, 4)
    raw = DeltaTable(str(old / "activations")).to_pyarrow_table(filters=[("run", "=", "r")])
    lists, blobs = raw["activation_f16"].to_pylist(), raw["activation_f16_bytes"].to_pylist()
    layouts = [(a is not None, b is not None) for a, b in zip(lists, blobs, strict=True)]
    assert sorted(layouts) == [(False, True)] * 2 + [(True, False)] * 4  # 2 blobs, 4 lists

    by_sql = _sql_matrix(store, "r", GPT2_HOOK)  # [examples by id, width]
    reference = _sql_matrix(store, "r32", GPT2_HOOK)
    assert by_sql.shape == reference.shape == (6, 64)
    np.testing.assert_allclose(by_sql, reference, rtol=2e-3, atol=2e-3)  # float16 rounding of the same values
    assert not np.array_equal(by_sql, reference)  # and rounded: the float16 run was not read as float32
    with store.query() as session:
        group = open_runs(session, ["r"])
        examples = select_examples(session, group)
        hook = next(h for h in shared_hooks(session, group.runs, layer_outputs=True) if h.hook == GPT2_HOOK)
        subset = select_subset(session, "r", None, [])
        layer = read_layer(session, subset, hook, run_settings(session, "r"), "mean")
        stats = session.neuron_stats(GPT2_HOOK, stats="avg", run="r").sort_by("neuron")
    matrix = HookMatrixReader(store, examples).read(hook)  # rows by example id, as by_sql
    assert examples.ids("r").to_pylist() == sorted(manifest.ids)
    np.testing.assert_array_equal(matrix, by_sql)
    np.testing.assert_array_equal(layer[np.argsort(np.array(subset.example_ids))], by_sql)
    np.testing.assert_allclose(stats["avg"].to_numpy(), by_sql.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    assert verify(store).ok


def test_a_damaged_blob_is_refused_by_every_reader(tmp_path):
    """A blob of 7 bytes or of 3 values at a width-4 hook (rows appended by another tool): one line from each
    reader, a finding from verify; the healthy rows read as before."""
    x = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    for blob, words in ((b"\x00<" * 3, "3 values"), (b"\x00<" * 3 + b"\x00", "7 bytes")):
        store = Store.open(tmp_path / str(len(blob)), create=True)
        _write(store, "r", x)
        np.testing.assert_array_equal(_sql_matrix(store, "r", "h"), x)
        uri = store.location.table_uri("activations")
        DeltaTable(uri).delete("run = 'r' AND hook = 'h' AND example_id = 'e1'")
        bad = pa.table(
            {"run": ["r"], "hook": ["h"], "example_id": ["e1"], "position": pa.nulls(1, pa.int32()),
             "activation": pa.nulls(1, pa.list_(pa.float32())), "activation_f16": pa.nulls(1, pa.list_(pa.int16())),
             "finite": [True], "activation_f16_bytes": pa.array([blob], pa.binary())},
            schema=ACTIVATIONS,
        )  # fmt: skip
        write_deltalake(uri, bad, mode="append", partition_by=["run", "hook"])
        with store.query() as session:
            group = open_runs(session, ["r"])
            examples = select_examples(session, group)
            hook = shared_hooks(session, group.runs, layer_outputs=True)[0]
        with pytest.raises(UserError, match=rf"^run 'r' stores a vector of {words} at h, not its width 4: .*verify"):
            HookMatrixReader(store, examples).read(hook)
        with (
            store.query() as session,
            pytest.raises(UserError, match=rf"^neuron_stats: run 'r' stores a vector of {words}"),
        ):
            session.neuron_stats("h", stats="avg")
        errors = [f.message for f in verify(store).findings if f.level == "error"]
        assert len(errors) == 1 and "1 vectors are not 4 wide" in errors[0], errors
        if words == "7 bytes":
            with store.query() as session, pytest.raises(UserError, match="odd number of bytes"):
                session.sql("SELECT activation FROM activations")


def test_a_session_left_open_exits_quietly(tmp_path):
    """A notebook that never closes its session: the Python function DuckDB holds for the float16 view is
    released before the interpreter ends (nanobind printed a page of "leaked instance" warnings at exit)."""
    store = Store.open(tmp_path / "store", create=True)
    _write(store, "r", np.ones((2, 4), np.float32))
    script = (
        "from hookpoints.store.catalog import Store\n"
        f"session = Store.open({str(tmp_path / 'store')!r}).query()\n"
        "print(session.sql('SELECT list_sum(activation) AS s FROM activations')['s'].to_pylist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[4.0, 4.0]"
    assert "leak" not in done.stderr, done.stderr


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_hook_of_width_0_verifies_and_reads_as_empty_vectors(tmp_path, dtype):
    """Empty vectors (a hook of width 0): verify found them healthy only after a ValueError ("cannot reshape
    array of size 0 into shape (0)": reshape(-1, 0)); SQL and neuron_stats read them as empty."""
    store = Store.open(tmp_path / "store", create=True)
    _write(store, "r", np.zeros((3, 0), np.float32), dtype=dtype)
    report = verify(store)
    assert report.ok and not [f for f in report.findings if f.level == "error"], report.findings
    assert _sql_matrix(store, "r", "h").shape == (3, 0)
    with store.query() as session:
        assert session.neuron_stats("h", stats="avg").num_rows == 0


def test_a_stream_stopped_by_its_timeout_midway_says_so(tmp_path):
    """``batches`` past its timeout after batches were already read (hookpoints sql --format parquet/arrow):
    DuckDB's interrupt reached the caller through Arrow's stream as ``OSError: INTERRUPT Error: Interrupted!``,
    not the one-line timeout error ``sql`` and ``rows`` give."""
    store = Store.open(tmp_path / "store", create=True)
    _write(store, "r", np.random.default_rng(0).normal(size=(2000, 64)).astype(np.float32))
    query = "SELECT a.activation, r.range FROM activations a, range(10000000) r"
    with store.query() as session:
        read = 0
        with pytest.raises(UserError, match=r"^the query ran past its timeout of 2 s and was stopped"):
            for batch in session.batches(query, timeout=2):
                read += batch.num_rows
        assert 0 < read < 2000 * 10000000  # stopped midway
        assert session.sql("SELECT count(*) AS n FROM activations")["n"].to_pylist() == [2000]


def test_a_flush_of_more_blob_bytes_than_one_arrow_array_holds_is_stored_in_pieces(tmp_path, monkeypatch):
    """A float16 flush of 2 GiB (``max_buffer_bytes`` allows 2**31: ``--buffer-mb 2048``) was refused by every
    flush ("one flush holds 2 GiB of float16 ...": the blobs were one Arrow ``binary`` array, int32 byte offsets),
    so such a recording could commit nothing. The blobs are now cut into arrays of at most BLOB_ARRAY_BYTES;
    here that limit is 20 bytes (2 vectors of 4 halves), and every reader gets numpy's float16 of each vector."""
    from hookpoints.store import buffer

    monkeypatch.setattr(buffer, "BLOB_ARRAY_BYTES", 20)
    store = Store.open(tmp_path / "store", create=True)
    rng = np.random.default_rng(3)
    x = {"h": rng.normal(size=(7, 4)).astype(np.float32), "g": rng.normal(size=(7, 4)).astype(np.float32)}
    ids = [f"e{i}" for i in range(7)]
    examples = pa.table({"example_id": ids})
    settings = {"model": "m", "task": "forward", "pooling": "mean", "dtype": "float16"}
    hooks = [{**HOOK, "hook": name, "module": name} for name in x]
    writer = open_run(store, "r", settings=settings, config={}, hooks=hooks, examples_schema=examples.schema)
    writer.add(examples.slice(0, 3), {name: HookRows(ids[:3], v[:3]) for name, v in x.items()})
    writer.add(examples.slice(3), {name: HookRows(ids[3:], v[3:]) for name, v in x.items()})
    writer.finish()
    rows = buffer.Buffer()
    rows.add(examples, {name: HookRows(ids, v) for name, v in x.items()})
    table = rows.table("r", list(x), float16=True)
    assert [len(chunk) for chunk in table["activation_f16_bytes"].chunks] == [2, 2, 2, 1, 2, 2, 2, 1]
    assert verify(store).ok
    with store.query() as session:
        group = open_runs(session, ["r"])
        examples_ = select_examples(session, group)
        stored = {h.hook: h for h in shared_hooks(session, group.runs, layer_outputs=True)}
        stats = session.neuron_stats("h", stats="avg").sort_by("neuron")
    for name, v in x.items():
        expected = v.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(_sql_matrix(store, "r", name), expected)
        np.testing.assert_array_equal(HookMatrixReader(store, examples_).read(stored[name]), expected)
    np.testing.assert_allclose(stats["avg"].to_numpy(), x["h"].astype(np.float16).astype(np.float64).mean(0))
    assert len(list(Path(store.location.uri, "activations").rglob("*.parquet"))) == 2  # still a file per hook
    monkeypatch.setattr(buffer, "BLOB_ARRAY_BYTES", 7)  # one vector (8 bytes) over the limit: said, not mangled
    with pytest.raises(ValueError, match="one float16 vector holds more than 7 bytes"):
        rows.table("r", list(x), float16=True)


def test_a_blob_column_in_chunks_is_combined_without_int32_offsets():
    """verify reads a file whole: its blob column comes in chunks, which together may hold 2 GiB (a 2 GiB flush of
    one hook, or a compaction) and failed to combine into one ``binary`` array ("offset overflow", checked with
    two chunks of 1 GiB: 2.6 GB of memory, too much for the suite). Combined as ``large_binary`` now; decoded as
    numpy decodes the bytes."""
    from hookpoints.store import vectors

    x = np.random.default_rng(4).normal(size=(5, 3)).astype("<f2")
    column = pa.chunked_array([pa.array([row.tobytes() for row in x[:2]]), pa.array([row.tobytes() for row in x[2:]])])
    assert vectors.as_binary(column).type == pa.large_binary()  # int64 offsets
    values, offsets = vectors.halves(column)
    np.testing.assert_array_equal(values.reshape(5, 3), x)
    assert offsets.tolist() == [0, 3, 6, 9, 12, 15]
