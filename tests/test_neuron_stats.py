"""neuron_stats (store/neuron_sql.py) equals numpy; the long form stays bounded; bad input is one line.

A small store written through the run writer: a float32 run (pooled, uneven label cells, one example left
without a label) and a float16 run that keeps positions (several rows per example). Every statistic of
neuron_stats is compared with numpy over the vectors that were written (float16: after the half rounding),
through SQL (the macro), through the CLI, and with a memory budget small enough to force neuron slices.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hookpoints.store.catalog import Store
from hookpoints.store.neuron_sql import neuron_stats
from hookpoints.store.writer import HookRows, open_run

from hookpoints.errors import UserError

#: one hook of width 4 and a float32 run's settings, for runs written by hand
WIDTH4_HOOK = {"hook": "h", "module": "h", "io": "output", "component": "c", "layer": 0, "submodule": "s", "width": 4,
               "shape": [4], "neuron_axis": 1, "space": "c", "layer_output": False}  # fmt: skip
SETTINGS = {"model": "m", "task": "forward", "pooling": "mean", "dtype": "float32"}

WIDTHS = {"enc.layers.0.fc1": 24, "enc.layers.0.fc2": 8, "enc.layers.1.fc1": 24}
LANGUAGES = np.array(["de", "en", "fr"])


def _write(store: Store, run: str, dtype: str, n: int, seed: int, positions: bool, buffer: int = 2**26) -> dict:
    rng = np.random.default_rng(seed)
    ids = [f"{run}-{i:03d}" for i in range(n)]
    language = LANGUAGES[rng.choice(3, size=n, p=[0.5, 0.3, 0.2])]
    modality = np.where(rng.random(n) < 0.5, "speech", "text")
    examples = pa.table({"example_id": ids, "language": language.tolist(), "modality": modality.tolist()})
    hooks = [
        {
            "hook": h,
            "module": h,
            "io": "output",
            "component": "enc",
            "layer": int(h.split(".")[2]),
            "submodule": h.split(".")[-1],
            "width": w,
            "shape": [w],
            "neuron_axis": 2,
            "space": "enc",
            "layer_output": False,
        }
        for h, w in WIDTHS.items()
    ]
    settings = {"model": "synthetic", "task": "forward", "pooling": "none" if positions else "mean", "dtype": dtype}
    writer = open_run(
        store, run, settings=settings, config={}, hooks=hooks, examples_schema=examples.schema, max_buffer_bytes=buffer
    )
    written = {}
    for start in range(0, n, 16):  # several commits, several batches
        stop = min(n, start + 16)
        repeats = rng.integers(1, 4, stop - start) if positions else np.ones(stop - start, int)
        rows_ids = [ids[start + i] for i, r in enumerate(repeats) for _ in range(r)]
        batch = {}
        for h, w in WIDTHS.items():
            x = rng.standard_normal((len(rows_ids), w)) * rng.uniform(0.5, 3, w) + rng.uniform(-2, 2, w)
            x = x.astype(np.float32)  # [rows, width]
            pos = np.concatenate([np.arange(r) for r in repeats]).astype(np.int32) if positions else None
            batch[h] = HookRows(rows_ids, x, pos)
            stored = x.astype(np.float16).astype(np.float32) if dtype == "float16" else x
            written.setdefault(h, []).append((rows_ids, stored))
        writer.add(examples.slice(start, stop - start), batch)
    writer.finish()
    lookup = dict(zip(ids, zip(language, modality, strict=True), strict=True))
    return {
        h: (np.concatenate([x for _, x in parts]), [lookup[e] for ids_, _ in parts for e in ids_])
        for h, parts in written.items()
    }


@pytest.fixture(scope="module")
def stats_store(tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("neurons") / "store", create=True)
    data = {"f32": _write(store, "f32", "float32", 70, 1, False), "f16": _write(store, "f16", "float16", 40, 2, True)}
    return store, data


def _expected(x: np.ndarray, name: str) -> np.ndarray:
    """numpy's statistic over axis 0 of ``x`` ``[rows, neurons]`` (DuckDB's definitions: sample stddev)."""
    return {
        "count": lambda: np.full(x.shape[1], x.shape[0]),
        "sum": lambda: x.astype(np.float64).sum(axis=0),
        "avg": lambda: x.astype(np.float64).mean(axis=0),
        "stddev": lambda: x.astype(np.float64).std(axis=0, ddof=1),
        "variance": lambda: x.astype(np.float64).var(axis=0, ddof=1),
        "min": lambda: x.min(axis=0),
        "max": lambda: x.max(axis=0),
        "median": lambda: np.median(x.astype(np.float64), axis=0),
        "p10": lambda: np.quantile(x.astype(np.float64), 0.1, axis=0),
        "p99.5": lambda: np.quantile(x.astype(np.float64), 0.995, axis=0),
    }[name]()


STATS = "count, sum, avg, stddev, variance, min, max, median, p10, p99.5"


@pytest.mark.parametrize("run", ["f32", "f16"])
@pytest.mark.parametrize("memory_bytes", [256 * 2**20, 4096])
def test_equals_numpy_by_label(stats_store, run, memory_bytes):
    store, data = stats_store
    with store.query() as session:
        result = neuron_stats(
            session, "enc.layers.%", group_by="language, modality", stats=STATS, run=run, memory_bytes=memory_bytes
        )
    assert result.column_names == ["run", "hook", "language", "modality", "neuron", *STATS.replace(" ", "").split(",")]
    checked = 0
    for hook, (x, labels) in data[run].items():
        for language, modality in sorted(set(labels)):
            mine = np.array([label == (language, modality) for label in labels])
            rows = result.filter(
                (pa.compute.field("hook") == hook)
                & (pa.compute.field("language") == language)
                & (pa.compute.field("modality") == modality)
            ).sort_by("neuron")
            assert rows["neuron"].to_pylist() == list(range(WIDTHS[hook]))
            for name in STATS.replace(" ", "").split(","):
                np.testing.assert_allclose(rows[name].to_numpy(), _expected(x[mine], name), rtol=1e-9, atol=1e-9)
                checked += 1
    assert checked == len(STATS.split(",")) * sum(len(set(labels)) for _, labels in data[run].values())


def test_slices_when_the_budget_is_small(stats_store, monkeypatch):
    """A budget smaller than the hook's block takes the medians over spilled neuron slices: same medians."""
    store, data = stats_store
    import hookpoints.store.neuron_sql as module

    calls = []
    original = module._batches
    monkeypatch.setattr(module, "_batches", lambda *a, **k: calls.append(k) or original(*a, **k))
    with store.query() as session:
        result = neuron_stats(session, "enc.layers.1.fc1", stats="median", run="f32", memory_bytes=4096)
        x, _ = data["f32"]["enc.layers.1.fc1"]
        np.testing.assert_allclose(
            result.sort_by("neuron")["median"].to_numpy(), np.median(x.astype(np.float64), axis=0)
        )
    # a count pass (ids only), then one decode for the 6 slices of 4096 // (12 * 70) = 4 neurons
    assert [k.get("decode", True) for k in calls] == [False, True]


def test_sql_macro_equals_natural_query_and_cli(stats_store, run_cli):
    store, _ = stats_store
    natural = """SELECT n.hook, e.language, n.neuron, avg(n.value) AS avg, stddev(n.value) AS stddev,
        median(n.value) AS median, quantile_cont(n.value, 0.9) AS p90, min(n.value) AS min, count(*) AS count
        FROM neurons n JOIN examples e USING (run, example_id) WHERE n.run = 'f16' GROUP BY ALL ORDER BY ALL"""
    fast = """SELECT hook, language, neuron, avg, stddev, median, p90, min, count FROM neuron_stats('enc.%',
        group_by := 'language', stats := 'avg, stddev, median, p90, min, count', run := 'f16') ORDER BY ALL"""
    with store.query() as session:
        a, b = session.sql(natural), session.sql(fast)
        again = session.sql(fast.replace("ORDER BY ALL", "WHERE neuron < 3 ORDER BY ALL"))  # cached result
    assert a.num_rows == b.num_rows > 0
    for column in ("avg", "stddev", "median", "p90", "min", "count"):
        np.testing.assert_allclose(b[column].to_numpy(), a[column].to_numpy(), rtol=1e-6, atol=1e-6)
    assert again.num_rows == 3 * 3 * len(WIDTHS)
    code, out, _ = run_cli(
        "sql",
        "--store",
        store.location.uri,
        "--format",
        "csv",
        "SELECT count(*) AS n FROM neuron_stats('enc.layers.0.fc2', run := 'f32')",
    )
    assert code == 0 and out.split() == ["n", "8"]


def test_examples_where(stats_store):
    store, data = stats_store
    with store.query() as session:
        result = neuron_stats(
            session, "enc.layers.1.fc1", run="f32", stats="avg", examples_where="language = 'de' AND modality <> 'text'"
        )
    x, labels = data["f32"]["enc.layers.1.fc1"]
    mine = np.array([label == ("de", "speech") for label in labels])
    np.testing.assert_allclose(result.sort_by("neuron")["avg"].to_numpy(), x[mine].mean(axis=0, dtype=np.float64))


BAD = [
    ("SELECT * FROM neuron_stats('nothing.%')", "no hook"),
    ("SELECT * FROM neuron_stats('enc.%', group_by := 'colour')", "not a column of the examples"),
    ("SELECT * FROM neuron_stats('enc.%', stats := 'mode')", "unknown statistic"),
    ("SELECT * FROM neuron_stats('enc.%', stats := ' , ')", "stats is empty"),
    ("SELECT * FROM neuron_stats('enc.%', examples_where := '1) UNION SELECT (1')", "not one boolean"),
    (
        "SELECT * FROM neuron_stats('enc.%', examples_where := 'no_such_column = 1')",
        "examples_where 'no_such_column = 1' does not work on the examples: SQL failed",
    ),
    ("SELECT * FROM neuron_stats(42)", "quoted string constant"),
    ("SELECT * FROM neuron_stats('enc.%', run := 'f' || '32')", "quoted string constant"),
    ("SELECT * FROM neuron_stats('enc.%', colour := 'x')", "unknown argument"),
    ("SELECT * FROM neuron_stats('enc.%', 'x')", "one hook name"),
    ("SELECT avg(n.value) FROM examples e JOIN neurons n USING (run, example_id)", "put neurons first"),
]


@pytest.mark.parametrize("sql, message", BAD)
def test_bad_input_is_one_line(stats_store, run_cli, sql, message):
    store, _ = stats_store
    before = sorted(p.name for p in Path(store.location.uri).rglob("*"))
    with store.query() as session, pytest.raises(UserError) as error:
        session.sql(sql)
    assert message in str(error.value) and "\n" not in str(error.value)
    code, _, err = run_cli("sql", "--store", store.location.uri, sql)
    assert code != 0 and message in err
    after = sorted(p.name for p in Path(store.location.uri).rglob("*"))
    assert after == before


def test_bad_python_arguments(stats_store):
    store, _ = stats_store
    with store.query() as session:
        with pytest.raises(UserError, match="memory_bytes"):
            neuron_stats(session, "enc.%", memory_bytes=10)
        with pytest.raises(UserError, match="unknown statistic 'avg2'"):
            neuron_stats(session, "enc.%", stats="avg2")


def test_vectors_written_without_dictionary(stats_store):
    """The store's writer settings (store/tables.py): vectors BYTE_STREAM_SPLIT, no dictionary."""
    store, _ = stats_store
    files = sorted(Path(store.location.uri, "activations").rglob("*.parquet"))
    assert files
    for path in files:
        meta = pq.ParquetFile(path).metadata.row_group(0)
        encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
        for column in ("activation.list.element", "activation_f16.list.element"):
            assert "BYTE_STREAM_SPLIT" in encodings[column] and "RLE_DICTIONARY" not in encodings[column]


def test_compaction_keeps_the_vector_encoding(tmp_path):
    """``store compact`` rewrites files with the same per-column settings (store/maintenance.py)."""
    from deltalake import DeltaTable
    from hookpoints.store.maintenance import compact

    store = Store.open(tmp_path / "store", create=True)
    data = _write(store, "small", "float32", 64, 3, False, buffer=1)  # a commit per batch: 4 files per hook
    before = len(list((tmp_path / "store" / "activations").rglob("*.parquet")))
    compact(store)
    live = DeltaTable(str(tmp_path / "store" / "activations")).file_uris()
    assert len(live) == len(WIDTHS) < before
    for uri in live:
        meta = pq.ParquetFile(uri.removeprefix("file://")).metadata.row_group(0)
        encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
        assert "BYTE_STREAM_SPLIT" in encodings["activation.list.element"]
        assert "RLE_DICTIONARY" not in encodings["activation.list.element"]
    with Store.open(tmp_path / "store").query() as session:
        result = neuron_stats(session, "enc.layers.0.fc2", stats="avg").sort_by("neuron")
    np.testing.assert_allclose(result["avg"].to_numpy(), data["enc.layers.0.fc2"][0].mean(axis=0, dtype=np.float64))


@pytest.mark.parametrize("first", [True, False])
def test_an_infinity_gives_what_numpy_gives_wherever_it_is(tmp_path, first):
    """A +inf (a float16 overflow) among a neuron's values: numpy's mean and sum are inf. neuron_stats gave NaN
    when the inf was in a group's first batch (its shift, the batch mean, was inf: inf - inf), inf otherwise.
    The inf - inf of the variance also leaked numpy's RuntimeWarning to the user."""
    store = Store.open(tmp_path / "store", create=True)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 4)).astype(np.float32)  # [examples, neurons]: three batches of 1,024 rows
    x[5 if first else 2500, 0] = np.inf
    x[7 if first else 2600, 1] = -np.inf
    x[9 if first else 2700, 1] = np.inf  # inf - inf: NaN in numpy too
    ids = [f"e{i:04d}" for i in range(len(x))]
    examples = pa.table({"example_id": ids})
    writer = open_run(store, "r", settings=SETTINGS, config={}, hooks=[WIDTH4_HOOK], examples_schema=examples.schema)
    writer.add(examples, {"h": HookRows(ids, x)})
    writer.finish()
    with store.query() as session, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "invalid value" warnings leaked to users
        got = session.neuron_stats("h", stats="sum, avg, stddev, min, max, variance").sort_by("neuron")
    d = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        expected = {"sum": d.sum(0), "avg": d.mean(0), "stddev": d.std(0, ddof=1), "min": d.min(0), "max": d.max(0),
                    "variance": d.var(0, ddof=1)}  # fmt: skip
    for name, values in expected.items():
        np.testing.assert_allclose(got[name].to_numpy(), values, rtol=1e-9, err_msg=name)


def test_examples_where_stays_one_predicate_over_the_run(tmp_path):
    """``a') OR ('b`` in examples_where closed the parentheses it was put in, so `run = 'a' AND (...) OR (...)`
    chose the examples of every run: run a's rows were averaged under run b's labels (the same ids). A trailing
    ``-- comment`` was refused. Both are now read as DuckDB parses them, over the run's own examples."""
    store = Store.open(tmp_path / "store", create=True)
    ids = [f"e{i}" for i in range(6)]
    x = np.random.default_rng(5).normal(size=(6, 4)).astype(np.float32)  # [examples, neurons]
    for run, languages in (("a", ["de", "en", "en", "en", "en", "en"]), ("b", ["fr"] * 6)):
        examples = pa.table({"example_id": ids, "language": languages})
        writer = open_run(
            store, run, settings=SETTINGS, config={}, hooks=[WIDTH4_HOOK], examples_schema=examples.schema
        )
        writer.add(examples, {"h": HookRows(ids, x)})
        writer.finish()
    with store.query() as session:
        escaped = session.neuron_stats(
            "h", run="a", stats="count, avg", examples_where="language = 'de') OR (language = 'fr'"
        )
        commented = session.neuron_stats("h", run="a", stats="count, avg", examples_where="language = 'de' -- German")
    for result in (escaped, commented):  # run a: only e0 is de (none is fr)
        assert result["count"].to_pylist() == [1] * 4
        np.testing.assert_allclose(result.sort_by("neuron")["avg"].to_numpy(), x[0].astype(np.float64))


@pytest.mark.parametrize("stats", ["avg", "median"])
def test_vectors_of_another_length_than_the_hook_are_refused(tmp_path, stats):
    """Rows appended by another tool (deltalake, as docs/reading-the-store.md shows) with vectors of 3 and 5
    values at a hook of width 4: reshaped to [rows, 4], they passed as two vectors of 4 and entered the
    statistics silently. Now one line names the hook and says to run verify."""
    from deltalake import write_deltalake
    from hookpoints.store.schema import ACTIVATIONS

    store = Store.open(tmp_path / "store", create=True)
    x = np.random.default_rng(4).normal(size=(4, 4)).astype(np.float32)
    ids = [f"e{i}" for i in range(4)]
    examples = pa.table({"example_id": ids})
    writer = open_run(store, "r", settings=SETTINGS, config={}, hooks=[WIDTH4_HOOK], examples_schema=examples.schema)
    writer.add(examples, {"h": HookRows(ids, x)})
    writer.finish()
    with store.query() as session:
        healthy = session.neuron_stats("h", stats=stats)
    ragged = pa.table(
        {"run": ["r", "r"], "hook": ["h", "h"], "example_id": ["e0", "e1"], "position": pa.nulls(2, pa.int32()),
         "activation": pa.array([[9.0] * 3, [9.0] * 5], pa.list_(pa.float32())),
         "activation_f16": pa.nulls(2, pa.list_(pa.int16())), "finite": [True, True],
         "activation_f16_bytes": pa.nulls(2, pa.binary())},
        schema=ACTIVATIONS,
    )  # fmt: skip
    write_deltalake(store.location.table_uri("activations"), ragged, mode="append", partition_by=["run", "hook"])
    expected = np.quantile(x.astype(np.float64), 0.5, axis=0) if stats == "median" else x.mean(0, dtype=np.float64)
    np.testing.assert_allclose(healthy.sort_by("neuron")[stats].to_numpy(), expected)
    refused = "^neuron_stats: run 'r' stores a vector of 3 values at h, not its width 4"
    with store.query() as session, pytest.raises(UserError, match=refused):
        session.neuron_stats("h", stats=stats)
