"""``QuerySession.rows``: the rows ``hookpoints sql`` prints, converted by DuckDB where that gives Arrow's values.

The reference is the Arrow path (``to_pylist`` of DuckDB's Arrow export, what the CLI printed before): for every
type, the values ``rows`` gives must equal it, whether DuckDB converted them (store/query_rows.SAME_AS_ARROW) or
Arrow did (every other type). A type wrongly called the same fails here, not silently in a printed table.
"""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pytest
from hookpoints.store import query_rows
from hookpoints.store.catalog import Store
from selectivity_helpers import examples_table, hook_rows, write_run

from hookpoints.errors import UserError

#: One column per DuckDB type, with edge values (NaN, infinities, -0.0, extremes, NULL, unicode, markup).
SAMPLES = {
    "boolean": "[true, false, NULL]",
    "tinyint": "[(-128)::TINYINT, 127::TINYINT, NULL]",
    "smallint": "[(-32768)::SMALLINT, 32767::SMALLINT]",
    "integer": "[(-2147483648)::INTEGER, 7]",
    "bigint": "[(-9223372036854775808)::BIGINT, 9223372036854775807::BIGINT]",
    "utinyint": "[255::UTINYINT, 0::UTINYINT]",
    "usmallint": "[65535::USMALLINT, 1::USMALLINT]",
    "uinteger": "[4294967295::UINTEGER, 1::UINTEGER]",
    "ubigint": "[18446744073709551615::UBIGINT, 0::UBIGINT]",
    "float": "['nan'::FLOAT, 'inf'::FLOAT, '-inf'::FLOAT, (-0.0)::FLOAT, 0.1::FLOAT, 3.4e38::FLOAT, 1e-45::FLOAT]",
    "double": "['nan'::DOUBLE, '-inf'::DOUBLE, (-0.0)::DOUBLE, 0.1::DOUBLE, 1e308::DOUBLE, 5e-324::DOUBLE]",
    "decimal": "[1.5, -0.001, NULL]",
    "decimal38": "[12345678901234567890123.891::DECIMAL(38,3), (-1)::DECIMAL(38,3)]",
    "varchar": "['', 'ü€😀', '[bold]x[/bold] :-1:', NULL]",
    "json": """['{"a": [1, 2]}'::JSON]""",
    "blob": "['\\xAA\\x00'::BLOB, ''::BLOB]",
    "enum": "['b'::ENUM('a', 'b'), NULL]",
    "list_float": "[[1.5::FLOAT, NULL, 'nan'::FLOAT], NULL, []]",
    "list_list": "[[[1, 2], [3]], [[]]]",
    "struct": "[{'a': 1, 'b': 'x'}, NULL, {'a': NULL, 'b': NULL}]",
    "struct_list": "[{'a': [0.25::FLOAT], 'b': {'c': true}}]",
    # through Arrow (DuckDB's own values differ, or need pytz)
    "hugeint": "[170141183460469231731687303715884105727::HUGEINT]",
    "uhugeint": "[1::UHUGEINT]",
    "timestamptz": "['2024-02-29 12:34:56.123456+00'::TIMESTAMPTZ]",
    "timestamp_ns": "['2024-01-01 01:02:03.456789123'::TIMESTAMP_NS]",
    "timestamp": "['2024-02-29 12:34:56.123456'::TIMESTAMP]",
    "date": "['2024-02-29'::DATE]",
    "time": "['12:34:56.789'::TIME]",
    "interval": "[INTERVAL 1 DAY]",
    "uuid": "['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::UUID]",
    "array": "[[1.0, 2.0]::DOUBLE[2]]",
    "map": "[MAP {'k': 1}]",
    "list_of_map": "[[MAP {'k': 1}]]",
    "struct_of_uuid": "[{'u': 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::UUID}]",
}
#: Types whose values are DuckDB's own (no Arrow) in ``rows``: the classification under test.
FAST = {
    "boolean", "tinyint", "smallint", "integer", "bigint", "utinyint", "usmallint", "uinteger", "ubigint", "float",
    "double", "decimal", "decimal38", "varchar", "json", "blob", "enum", "list_float", "list_list", "struct",
    "struct_list",
}  # fmt: skip


def _arrow_rows(con, query: str) -> list[tuple]:
    """The reference: DuckDB's Arrow export, ``to_pylist`` per column (what `hookpoints sql` printed before)."""
    table = con.sql(query).to_arrow_table()
    return list(zip(*(column.to_pylist() for column in table.columns), strict=True))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store.open(tmp_path_factory.mktemp("rows") / "store", create=True)
    hooks = hook_rows("text_decoder", 1, {"ffn.fc1": 3})
    write_run(store, "a", examples_table(2, None, seed=1), hooks, seed=3)
    write_run(store, "b", examples_table(2, "audio", seed=2, prefix="b-"), hooks, seed=4, dtype="float16")
    return store


@pytest.mark.parametrize("name", list(SAMPLES))
def test_rows_equal_the_arrow_values_for_every_type(store, name):
    query = f"SELECT unnest({SAMPLES[name]}) AS v, 1 AS k"
    reference = _arrow_rows(duckdb.connect(), query)
    con = duckdb.connect()
    kind = con.sql(query).types[0]
    assert query_rows.same_as_arrow(kind) == (name in FAST), (name, str(kind))
    if name in FAST:  # the claim itself: DuckDB's Python values are Arrow's
        assert repr(con.execute(query).fetchall()) == repr(reference), name
    with store.query() as session:
        names, chunks = session.rows(query)
        assert names == ["v", "k"]
        assert repr([row for chunk in chunks for row in chunk]) == repr(reference), name


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM hooks ORDER BY run, hook",
        "SELECT * FROM examples ORDER BY run, example_id",  # a schema merge: run a has no modality
        "SELECT run, hook, example_id, activation FROM activations ORDER BY ALL",  # float16 decoded in b
        "SELECT * FROM runs ORDER BY run",  # TIMESTAMPTZ: through Arrow
        "SELECT run, count(*) AS n, avg(value) AS mean FROM neurons GROUP BY run ORDER BY run",
        "SELECT 1 AS a, 2 AS a, 'x' AS b",  # a repeated name keeps both values
    ],
)
def test_rows_of_store_views_equal_the_arrow_path(store, query):
    with store.query() as session:
        reference = session.sql(query)
        names, chunks = session.rows(query, rows=2)
        got = [row for chunk in chunks for row in chunk]
    assert names == reference.column_names
    assert repr(got) == repr(list(zip(*(c.to_pylist() for c in reference.columns), strict=True)))
    assert len(got) > 0


def test_rows_stream_in_chunks_and_keep_the_timeout(store):
    with store.query() as session:
        names, chunks = session.rows("SELECT * FROM range(250000)", rows=10_000)
        sizes = [len(chunk) for chunk in chunks]
        assert names == ["range"] and sum(sizes) == 250_000 and max(sizes) <= 10_000
        with pytest.raises(UserError, match="timeout of 0.2 s"):
            for _ in session.rows("SELECT * FROM range(10000000000000) WHERE range % 7 = 99", timeout=0.2)[1]:
                pass
        with pytest.raises(UserError, match="timeout of 0.2 s"):
            session.rows("SELECT count(*) FROM range(10000000000000)", timeout=0.2)
        assert session.rows("SELECT 42 AS x")[1].__next__() == [(42,)]  # usable afterwards
        names, chunks = session.rows("SELECT hook FROM hooks WHERE run = $run ORDER BY hook", {"run": "b"})
        got = [row[0] for chunk in chunks for row in chunk]  # read out before the next statement
        reference = session.sql("SELECT hook FROM hooks WHERE run = $run ORDER BY hook", {"run": "b"})
        assert got == reference["hook"].to_pylist() != []
        names, chunks = session.rows("SELECT * FROM range(100000)", rows=10)
        assert next(chunks) == [(i,) for i in range(10)]
        del chunks  # a reader dropped half-way frees the connection for the next statement
        assert session.sql("SELECT 7 AS x")["x"].to_pylist() == [7]
        explain = [row for chunk in session.rows("EXPLAIN SELECT * FROM hooks")[1] for row in chunk]
        reference = session.sql("EXPLAIN SELECT * FROM hooks")
        assert explain == list(zip(*(c.to_pylist() for c in reference.columns), strict=True))
        assert explain[0][0] == "physical_plan" and "layer_output" in explain[0][1]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("DELETE FROM hooks", "read-only"),
        ("SELECT 1; SELECT 2", "exactly one"),
        ("SELEC 1", "does not parse"),
        ("SELECT * FROM hoks", "SQL failed"),
        ("COPY hooks TO '/tmp/x.csv'", "read-only"),
    ],
)
def test_rows_refuses_bad_statements(store, query, message):
    with store.query() as session, pytest.raises(UserError, match=message):
        session.rows(query)


def test_rows_refuses_a_bad_timeout(store):
    with store.query() as session, pytest.raises(UserError, match="timeout"):
        session.rows("SELECT 1", timeout=float("nan"))


def test_printed_formats_load_no_pyarrow(store):
    """csv, json and table output of DuckDB-convertible results import neither pyarrow nor numpy."""
    for fmt in ("table", "csv", "json"):
        code = (
            "from hookpoints.cli.main import main\n"
            f"main(['sql', '--store', {store.location.uri!r}, '--format', {fmt!r}, "
            "'SELECT run, hook, width, shape, layer_output FROM hooks'])\n"
            "import sys; print('MODULES', ' '.join(sys.modules))"
        )
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        shown, modules = out.split("MODULES")
        assert "text_decoder" in shown, fmt
        assert not set(modules.split()) & {"pyarrow", "numpy", "pandas"}, fmt
