"""The natural per-neuron GROUP BY over ``neurons`` (store/neuron_rewrite.py) equals numpy, run as neuron_stats.

The store of test_neuron_stats.py (a float32 pooled run with uneven label cells, a float16 run with several
positions per example, every neuron's scale and offset random) plus a run holding NaN and inf. Each natural
query is compared with numpy over the vectors that were written (independent of both SQL paths), and with
DuckDB's own long-form plan (the rewrite turned off) in the same session.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hookpoints.store.catalog import Store
from hookpoints.store.neuron_rewrite import rewrite
from hookpoints.store.writer import HookRows, open_run
from test_neuron_stats import WIDTHS, _write

from hookpoints.errors import UserError

NUMPY = {
    "count": lambda x: np.full(x.shape[1], x.shape[0]),
    "sum": lambda x: x.astype(np.float64).sum(axis=0),
    "avg": lambda x: x.astype(np.float64).mean(axis=0),
    "sd": lambda x: x.astype(np.float64).std(axis=0, ddof=1),
    "var": lambda x: x.astype(np.float64).var(axis=0, ddof=1),
    "lo": lambda x: x.min(axis=0),
    "hi": lambda x: x.max(axis=0),
    "med": lambda x: np.median(x.astype(np.float64), axis=0),
    "p90": lambda x: np.quantile(x.astype(np.float64), 0.9, axis=0),
}
AGGREGATES = (
    "count(*) AS count, sum(n.value) AS sum, avg(n.value) AS avg, stddev(n.value) AS sd, variance(n.value) AS var, "
    "min(n.value) AS lo, max(n.value) AS hi, median(n.value) AS med, quantile_cont(n.value, 0.9) AS p90"
)


@pytest.fixture(scope="module")
def store_data(tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("rewrite") / "store", create=True)
    data = {"f32": _write(store, "f32", "float32", 70, 11, False), "f16": _write(store, "f16", "float16", 40, 12, True)}
    data["bad"] = _write_small(store, "bad", "float32", ["de"] * 6, non_finite=True)
    data["nul"] = _write_small(store, "nul", "float16", ["de", None, "en", None, "de", None], non_finite=False)
    return store, data


def _write_small(store: Store, run: str, dtype: str, language: list, non_finite: bool) -> np.ndarray:
    """One hook of 4 neurons over a few examples (values as stored); NaN, inf and -inf if ``non_finite``."""
    n = len(language)
    x = (np.random.default_rng(len(run)).standard_normal((n, 4)) * [1, 2, 3, 4] + [0, 1, -1, 2]).astype(np.float32)
    if non_finite:  # [examples, neurons]
        x[1, 0], x[2, 1], x[3, 1], x[4, 2] = np.nan, np.inf, -np.inf, np.inf
    ids = [f"{run}{i}" for i in range(n)]
    examples = pa.table({"example_id": ids, "language": pa.array(language, pa.string()), "modality": ["text"] * n})
    hook = {"hook": "enc.layers.0.fc2", "module": "m", "io": "output", "component": "enc", "layer": 0}
    hook |= {"submodule": "fc2", "width": 4, "shape": [4], "neuron_axis": 2, "space": "enc", "layer_output": False}
    settings = {"model": "synthetic", "task": "forward", "pooling": "mean", "dtype": dtype}
    writer = open_run(store, run, settings=settings, config={}, hooks=[hook], examples_schema=examples.schema)
    writer.add(examples, {"enc.layers.0.fc2": HookRows(ids, x, None)})
    writer.finish()
    return x.astype(np.float16).astype(np.float32) if dtype == "float16" else x


def test_null_labels_are_a_group(store_data, run_cli):
    """Examples without a label form their own group, as in GROUP BY (neuron_stats dropped them before)."""
    store, data = store_data
    x, language = data["nul"], np.array(["de", None, "en", None, "de", None], dtype=object)
    sql = (
        "SELECT n.hook, e.language, n.neuron, avg(n.value) AS a, count(*) AS c FROM neurons n "
        "JOIN examples e USING (run, example_id) WHERE n.run = 'nul' GROUP BY ALL ORDER BY ALL"
    )
    with store.query() as session:
        session.sql("SELECT 1 FROM neurons n JOIN examples e USING (run, example_id) LIMIT 0")
        assert "neuron_stats(" in rewrite(session, sql)
        fast = session.sql(sql)
        session.rewrite_neuron_groups = False
        slow = session.sql(sql)
    assert fast.to_pydict()["language"] == slow.to_pydict()["language"] == ["de"] * 4 + ["en"] * 4 + [None] * 4
    for k, label in enumerate(["de", "en", None]):
        rows = x[np.array([value == label for value in language])]
        np.testing.assert_allclose(fast["a"].to_numpy()[4 * k : 4 * k + 4], rows.mean(axis=0, dtype=np.float64))
        np.testing.assert_allclose(slow["a"].to_numpy()[4 * k : 4 * k + 4], rows.mean(axis=0, dtype=np.float64))
        assert fast["c"].to_pylist()[4 * k : 4 * k + 4] == [len(rows)] * 4
    code, out, _ = run_cli("sql", "--store", store.location.uri, "--format", "csv", sql)  # the CLI: same rows
    lines = out.strip().splitlines()
    assert (
        code == 0
        and len(lines) == 13
        and [line.split(",")[4] for line in lines[1:]] == [str(c) for c in fast["c"].to_pylist()]
    )


def _by_key(table: pa.Table, keys: list[str]) -> dict:
    rows = table.to_pylist()
    return {tuple(row[k] for k in keys): row for row in rows}


@pytest.mark.parametrize("run", ["f32", "f16"])
def test_natural_group_by_equals_numpy(store_data, run):
    store, data = store_data
    sql = (
        f"SELECT n.hook, e.language, n.neuron, {AGGREGATES} FROM neurons n JOIN examples e USING (run, example_id) "
        f"WHERE n.run = '{run}' AND n.hook LIKE 'enc.layers.%' GROUP BY ALL"
    )
    with store.query() as session:
        session.sql("SELECT 1 FROM neurons n JOIN examples e USING (run, example_id) LIMIT 0")
        assert "neuron_stats(" in rewrite(session, sql)  # the fast path is the one taken
        fast = session.sql(sql)
        session.rewrite_neuron_groups = False
        slow = session.sql(sql)  # DuckDB's own long-form plan
    assert fast.schema == slow.schema and fast.num_rows == slow.num_rows
    mine, duck = _by_key(fast, ["hook", "language", "neuron"]), _by_key(slow, ["hook", "language", "neuron"])
    assert mine.keys() == duck.keys()
    checked = 0
    for hook, (x, labels) in data[run].items():
        for language in sorted({label[0] for label in labels}):
            rows = x[np.array([label[0] == language for label in labels])]  # [rows of language, width]
            for name, reference in NUMPY.items():
                want = reference(rows)
                got = np.array([mine[hook, language, j][name] for j in range(WIDTHS[hook])], np.float64)
                theirs = np.array([duck[hook, language, j][name] for j in range(WIDTHS[hook])], np.float64)
                float_column = name in ("lo", "hi", "med", "p90")  # FLOAT in DuckDB: compared at float32 precision
                tolerance = {"rtol": 2e-7, "atol": 1e-6} if float_column else {"rtol": 1e-9, "atol": 1e-9}
                np.testing.assert_allclose(got, want, **tolerance)
                np.testing.assert_allclose(theirs, want, **tolerance)
                checked += 1
    assert checked == len(NUMPY) * sum(len({label[0] for label in labels}) for _, labels in data[run].values())


def test_ungrouped_labels_subquery_and_examples_where(store_data):
    """No join (one group per neuron), inside a subquery, and a label predicate: rewritten and equal to numpy."""
    store, data = store_data
    hook = "enc.layers.1.fc1"
    x, labels = data["f32"][hook]
    speech = np.array([label[1] == "speech" for label in labels])
    plain = "SELECT hook, neuron, avg(value) AS avg FROM neurons WHERE run = 'f32' AND hook = 'enc.layers.1.fc1' "
    plain += "GROUP BY 1, 2"
    nested = (
        "SELECT t.neuron, t.m FROM (SELECT n.hook, n.neuron, max(n.value) AS m FROM neurons n JOIN examples e "
        "USING (run, example_id) WHERE n.run = 'f32' AND n.hook = 'enc.layers.1.fc1' AND e.modality = 'speech' "
        "GROUP BY n.hook, n.neuron) t ORDER BY t.neuron"
    )
    with store.query() as session:
        session.sql("SELECT 1 FROM neurons n JOIN examples e USING (run, example_id) LIMIT 0")
        assert "neuron_stats(" in rewrite(session, plain) and "neuron_stats(" in rewrite(session, nested)
        means = session.sql(plain).sort_by("neuron")
        maxima = session.sql(nested)
        last = f"SELECT n.neuron AS j, sum(value) AS s FROM neurons n WHERE run = 'f32' AND hook = '{hook}' "
        last += "GROUP BY hook, j ORDER BY n.neuron DESC LIMIT 3"
        assert "neuron_stats(" in rewrite(session, last)
        last = session.sql(last)
        cte = f"WITH s AS (SELECT hook, neuron, min(value) AS lo FROM neurons WHERE run = 'f32' AND hook = '{hook}' "
        cte += "GROUP BY ALL) SELECT neuron, lo FROM s WHERE neuron < 4 ORDER BY neuron"
        assert "neuron_stats(" in rewrite(session, cte)
        cte = session.sql(cte)
    np.testing.assert_array_equal(cte["lo"].to_numpy(), x.min(axis=0)[:4])
    assert last["j"].to_pylist() == [23, 22, 21]
    np.testing.assert_allclose(last["s"].to_numpy(), x.astype(np.float64).sum(axis=0)[[23, 22, 21]], rtol=1e-9)
    np.testing.assert_allclose(means["avg"].to_numpy(), x.astype(np.float64).mean(axis=0), rtol=1e-9)
    np.testing.assert_array_equal(maxima["m"].to_numpy(), x[speech].max(axis=0))


def test_non_finite_values_run_as_written(store_data):
    """NaN/inf: DuckDB's min/max (NaN sorts last) and numpy's differ, so the query is not rewritten."""
    store, data = store_data
    x = data["bad"]
    sql = "SELECT neuron, count(*) AS c, avg(value) AS a, max(value) AS hi FROM neurons WHERE run = 'bad' GROUP BY ALL"
    with store.query() as session:
        session.sql("SELECT 1 FROM neurons LIMIT 0")
        assert rewrite(session, sql.replace("neuron,", "hook, neuron,")) == sql.replace("neuron,", "hook, neuron,")
        result = session.sql(sql.replace("neuron,", "hook, neuron,")).sort_by("neuron")
    assert result["c"].to_pylist() == [6] * 4
    with np.errstate(invalid="ignore"):
        expected = x.astype(np.float64).mean(axis=0)  # NaN, NaN, inf, finite
    np.testing.assert_array_equal(result["a"].to_numpy(), expected)
    assert np.isnan(result["hi"][0].as_py()) and result["hi"][1].as_py() == np.inf


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT hook, neuron, avg(value) FROM neurons WHERE run = 'f32' GROUP BY ALL ORDER BY avg(value)",
        "SELECT hook, neuron, position, avg(value) FROM neurons WHERE run = 'f16' GROUP BY ALL",  # position
        "SELECT hook, neuron, avg(DISTINCT value) FROM neurons WHERE run = 'f32' GROUP BY ALL",
        "SELECT hook, neuron, avg(value) FROM neurons GROUP BY ALL",  # pools the runs: neuron_stats keeps them apart
        "SELECT hook, neuron, avg(value) FROM neurons WHERE run = 'f32' AND hook = 'enc_layers.0.fc2' GROUP BY ALL",
        "SELECT hook, neuron, avg(value) FROM neurons WHERE run = 'f32' AND neuron < 3 GROUP BY ALL",
        "SELECT hook, neuron, quantile_disc(value, 0.5) FROM neurons WHERE run = 'f32' GROUP BY ALL",
        "SELECT hook, neuron, avg(value) FROM neurons WHERE run = $run GROUP BY ALL",
        "SELECT hook, neuron, avg(value) FROM examples e JOIN neurons n USING (run, example_id) GROUP BY ALL",
    ],
)
def test_other_forms_run_as_written(store_data, sql):
    """Anything not provably equal is left to DuckDB (`hook = 'enc_layers...'`: '_' is a LIKE wildcard)."""
    store, _ = store_data
    with store.query() as session:
        session.sql("SELECT 1 FROM neurons n JOIN examples e USING (run, example_id) LIMIT 0")
        assert rewrite(session, sql) == sql


def test_read_only_and_quoting(store_data):
    """A label predicate with quotes goes through as data; the store's files are unchanged; bad SQL is one line."""
    store, data = store_data
    files = sorted(p for p in Path(store.location.uri).rglob("*") if p.is_file())
    before = {p: hashlib.md5(p.read_bytes()).hexdigest() for p in files}
    sql = (
        "SELECT n.hook, n.neuron, count(*) AS c FROM neurons n JOIN examples e USING (run, example_id) "
        "WHERE n.run = 'f32' AND n.hook = 'enc.layers.0.fc2' AND e.language <> 'x'');DROP TABLE examples;--' "
        "GROUP BY ALL"
    )
    with store.query() as session:
        session.sql("SELECT 1 FROM neurons n JOIN examples e USING (run, example_id) LIMIT 0")
        assert "neuron_stats(" in rewrite(session, sql)
        result = session.sql(sql)
        assert result["c"].to_pylist() == [70] * WIDTHS["enc.layers.0.fc2"]
        for bad in (
            "SELECT hook, neuron, avg(value) FROM neurons WHERE run = 'f32' AND nope = 1 GROUP BY ALL",
            "SELECT hook, neuron, quantile_cont(value, 2) FROM neurons WHERE run = 'f32' AND neuron = 1 GROUP BY ALL",
        ):
            with pytest.raises(UserError) as error:
                session.sql(bad)
            assert "\n" not in str(error.value) and str(error.value).startswith("SQL failed")
    assert {p: hashlib.md5(p.read_bytes()).hexdigest() for p in files} == before


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT hook, neuron, quantile_disc(value, 0.5) FROM neurons WHERE run = 'f32' GROUP BY ALL",
        "SELECT n.example_id, median(n.value) FROM neurons n JOIN examples e USING (run, example_id) GROUP BY ALL",
        "SELECT hook, neuron, list(value) FROM neurons WHERE run = 'f32' GROUP BY ALL",
        "SELECT count(*) FROM (SELECT hook, neuron, mode(value) FROM neurons GROUP BY ALL)",
    ],
)
def test_holistic_over_the_long_form_is_refused(store_data, run_cli, sql):
    """Not rewritten and not restricted to a few neurons: one line that points to neuron_stats (SQL and CLI)."""
    store, _ = store_data
    with store.query() as session, pytest.raises(UserError) as error:
        session.sql(sql)
    assert "keeps every value of each group" in str(error.value) and "neuron_stats(" in str(error.value)
    assert "\n" not in str(error.value)
    code, out, err = run_cli("sql", "--store", store.location.uri, sql)
    assert code == 2 and "neuron_stats(" in err and out == ""


def test_holistic_over_a_few_neurons_runs(store_data):
    """median of named neurons (a WHERE on neuron) stays DuckDB's, and equals numpy."""
    store, data = store_data
    x, _ = data["f32"]["enc.layers.0.fc2"]
    sql = "SELECT neuron, median(value) AS m FROM neurons WHERE run = 'f32' AND hook = 'enc.layers.0.fc2' "
    sql += "AND neuron IN (1, 5) GROUP BY neuron ORDER BY neuron"
    with store.query() as session:
        result = session.sql(sql)
    np.testing.assert_allclose(result["m"].to_numpy(), np.median(x[:, [1, 5]].astype(np.float64), axis=0), rtol=1e-6)


def test_explain_shows_the_rewritten_plan(store_data):
    """EXPLAIN [ANALYZE] of a natural query explains what runs; of a refused one, is refused too."""
    store, _ = store_data
    sql = "SELECT hook, neuron, avg(value) FROM neurons WHERE run = 'f32' GROUP BY ALL"
    with store.query() as session:
        plans = [session.sql(f"{prefix} {sql}") for prefix in ("EXPLAIN", "EXPLAIN ANALYZE")]
        with pytest.raises(UserError, match="keeps every value"):
            session.sql("EXPLAIN ANALYZE " + sql.replace("avg(value)", "quantile_disc(value, 0.5)"))
        session.rewrite_neuron_groups = False
        as_written = session.sql(f"EXPLAIN {sql}")
    texts = [" ".join(str(v) for v in plan.column(plan.num_columns - 1).to_pylist()).upper() for plan in plans]
    assert all("UNNEST" not in text and "HASH_GROUP_BY" not in text for text in texts)
    assert "UNNEST" in " ".join(str(v) for v in as_written.column(as_written.num_columns - 1).to_pylist()).upper()


def test_timeout_stops_the_rewritten_query(store_data, monkeypatch):
    """The session's timeout covers the neuron_stats read a natural query became (checked per batch)."""
    import time

    import hookpoints.store.neuron_sql as module

    store, _ = store_data
    original = module._row_groups
    # each batch outlasts the 0.1 s timeout by far, so a timer thread slowed by a busy machine still fires first
    monkeypatch.setattr(module, "_row_groups", lambda *a: time.sleep(0.6) or original(*a))
    sql = "SELECT hook, neuron, avg(value) FROM neurons WHERE run = 'f16' GROUP BY ALL"
    with store.query() as session:
        with pytest.raises(UserError, match="ran past its timeout") as error:
            session.sql(sql, timeout=0.1)
        assert "\n" not in str(error.value)
        monkeypatch.setattr(module, "_row_groups", original)
        assert session.sql(sql).num_rows == sum(WIDTHS.values())  # no timeout: the next statement runs whole


def test_stddev_of_a_one_example_group_is_null_as_in_duckdb(store_data):
    """A group of one example ('en' in run nul): DuckDB's sample stddev and variance are NULL. The rewritten query
    (and neuron_stats) gave NaN, so `avg(sd)` over the neurons, `sd > 0` or `ORDER BY sd` differed from the plan
    written (NaN poisons an average that NULL leaves out)."""
    store, data = store_data
    sql = (
        "SELECT n.hook, e.language, n.neuron, count(*) AS c, stddev(n.value) AS sd, variance(n.value) AS var "
        "FROM neurons n JOIN examples e USING (run, example_id) WHERE n.run = 'nul' GROUP BY ALL ORDER BY ALL"
    )
    outer = f"SELECT language, avg(sd) AS mean_sd FROM ({sql}) GROUP BY ALL ORDER BY ALL"
    with store.query() as session:
        session.sql("SELECT 1 FROM neurons n JOIN examples e USING (run, example_id) LIMIT 0")
        assert "neuron_stats(" in rewrite(session, sql)
        fast, fast_outer = session.sql(sql), session.sql(outer)
        direct = session.neuron_stats("enc.layers.0.fc2", run="nul", group_by="language", stats="stddev, variance")
        session.rewrite_neuron_groups = False
        slow, slow_outer = session.sql(sql), session.sql(outer)
    x = data["nul"]
    en = fast.filter(pc.equal(fast["language"], "en"))
    assert en["c"].to_pylist() == [1] * 4 and en["sd"].null_count == 4 and en["var"].null_count == 4
    for column in ("sd", "var"):  # NULL where DuckDB's is, equal to float64 rounding elsewhere
        assert fast[column].is_null().to_pylist() == slow[column].is_null().to_pylist()
        np.testing.assert_allclose(fast[column].to_numpy(), slow[column].to_numpy(), rtol=1e-12)
    assert direct.filter(pc.equal(direct["language"], "en"))["stddev"].null_count == 4
    assert fast_outer["mean_sd"].to_pylist()[1] is None  # en: every sd NULL
    de = x[[0, 4]].astype(np.float64).std(axis=0, ddof=1).mean()  # numpy over the two German examples
    np.testing.assert_allclose([fast_outer["mean_sd"][0].as_py(), slow_outer["mean_sd"][0].as_py()], [de, de])
