"""A query session pins every table's version when it opens and registers a table's data only when a
statement names it; small tables are read whole by delta-rs, without pyarrow (a fast CLI start, issue 11)."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hookpoints.store import delta_read, tables
from hookpoints.store.catalog import Store
from selectivity_helpers import examples_table, hook_rows, write_run

from hookpoints.errors import UserError


def _rows(table) -> list[str]:
    return sorted(repr(sorted(row.items())) for row in table.to_pylist())


def _two_runs(tmp_path) -> tuple[Store, dict, dict]:
    store = Store.open(tmp_path / "store", create=True)
    hooks = hook_rows("text_decoder", 2, {"ffn.fc1": 5})
    a = write_run(store, "a", examples_table(2, None, seed=1), hooks, seed=3)
    # a second run with one more example column (schema merge) and float16 storage
    b = write_run(store, "b", examples_table(3, "audio", seed=2, prefix="b-"), hooks, seed=4, dtype="float16")
    return store, a, b


def test_read_small_matches_the_arrow_dataset(tmp_path):
    """delta-rs' own reader (no pyarrow) gives the Arrow dataset's rows, columns and, in DuckDB, types."""
    store, _, _ = _two_runs(tmp_path)
    for name in ["store_meta", *store.table_names()]:
        small = delta_read.read_small(delta_read.open_table(store.location, name))
        whole = pa.RecordBatchReader.from_stream(small).read_all()
        reference = tables.dataset(store.location, name).to_table()
        assert whole.schema.names == reference.schema.names, name
        # DataFusion reads strings as string_view; DuckDB reads both as VARCHAR
        assert [
            str(f.type).replace("string_view", "string").replace("binary_view", "binary") for f in whole.schema
        ] == [str(f.type) for f in reference.schema], name
        assert whole.num_rows == reference.num_rows > 0, name
        assert _rows(whole) == _rows(reference), name
        con = duckdb.connect()
        con.register("small", small)
        con.register("reference", reference)
        assert con.sql("DESCRIBE small").fetchall() == con.sql("DESCRIBE reference").fetchall(), name
        assert con.sql("SELECT * FROM small EXCEPT ALL SELECT * FROM reference").fetchall() == [], name
    examples = pa.RecordBatchReader.from_stream(
        delta_read.read_small(delta_read.open_table(store.location, "examples"))
    ).read_all()
    modality = dict(zip(examples["example_id"].to_pylist(), examples["modality"].to_pylist(), strict=True))
    assert {v for k, v in modality.items() if k.startswith("b-")} == {"audio"}
    assert {v for k, v in modality.items() if not k.startswith("b-")} == {None}  # older files: null, not dropped


def test_tables_are_registered_when_named_and_values_are_right(tmp_path):
    store, a, b = _two_runs(tmp_path)
    with store.query() as session:
        assert session.sql("SELECT 1 AS one")["one"].to_pylist() == [1]
        assert session.datasets == {}  # nothing read for a statement that names no table
        got = session.sql(
            "SELECT hook, example_id, activation FROM activations WHERE run = 'b' ORDER BY hook, example_id"
        ).to_pylist()
        assert set(session.datasets) == {"activations", "run_events"}  # run_events: is any run float16?
        ids = examples_table(3, "audio", seed=2, prefix="b-")["example_id"].to_pylist()
        for row in got:
            expected = b[row["hook"]][ids.index(row["example_id"])].astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(np.asarray(row["activation"], np.float32), expected)
        assert len(got) == len(ids) * len(b)
        total = session.sql("SELECT sum(value) AS s, count(*) AS n FROM neurons WHERE run = 'a'").to_pylist()[0]
        assert total["n"] == sum(v.size for v in a.values())
        np.testing.assert_allclose(total["s"], sum(float(v.astype(np.float64).sum()) for v in a.values()), rtol=1e-5)
        names = set(session.sql("SHOW TABLES")["name"].to_pylist())  # the catalog shows every table and view
        assert {"runs", "hooks", "examples", "activations", "neurons", "_examples"} <= names


def test_a_session_keeps_its_snapshot_for_tables_it_reads_later(tmp_path):
    store, _, _ = _two_runs(tmp_path)
    with store.query() as session:
        write_run(store, "c", examples_table(1, None, seed=5, prefix="c-"), hook_rows("text_decoder", 1, {}))
        runs = session.sql("SELECT DISTINCT run FROM activations ORDER BY run")["run"].to_pylist()
        examples = session.sql("SELECT DISTINCT run FROM examples ORDER BY run")["run"].to_pylist()
        listed = session.sql("SELECT run FROM runs ORDER BY run")["run"].to_pylist()
    assert runs == examples == listed == ["a", "b"]  # registered after the write: still the session's version
    with store.query() as later:
        assert later.sql("SELECT DISTINCT run FROM activations ORDER BY run")["run"].to_pylist() == ["a", "b", "c"]


def test_a_misspelt_name_gets_duckdbs_hint(tmp_path):
    store, _, _ = _two_runs(tmp_path)
    with store.query() as session, pytest.raises(UserError, match='Did you mean "neurons"'):
        session.sql("SELECT * FROM neuron")


def test_neuron_stats_macro_is_defined_when_named_or_listed(tmp_path):
    """`SELECT 1` defines no neuron_stats macro (its module imports numpy); naming it, a catalog look or a
    misspelt name (DuckDB's "Did you mean") still find it."""
    store, _, _ = _two_runs(tmp_path)
    with store.query() as session:
        session.sql("SELECT 1")
        assert not session._macro
        listed = session.sql("SELECT function_name FROM duckdb_functions() WHERE function_name = 'neuron_stats'")
        assert listed["function_name"].to_pylist() == ["neuron_stats"]
    with store.query() as session, pytest.raises(UserError, match='Did you mean "neuron_stats"'):
        session.sql("SELECT * FROM nuron_stats('text_decoder.%')")
    with store.query() as session:
        got = session.sql("SELECT count(*) AS n FROM neuron_stats('text_decoder.layers.0.%', run := 'a')")
        assert got["n"].to_pylist()[0] > 0
    with store.query() as session:  # the float16 decoder is defined when named, too (0x3C00 is 1.0, 0xC000 -2.0)
        assert not session._f16
        got = session.sql("SELECT f16_to_float(15360::SMALLINT) AS one, f16_to_float((-16384)::SMALLINT) AS m2")
        assert (got["one"].to_pylist(), got["m2"].to_pylist()) == ([1.0], [-2.0])
