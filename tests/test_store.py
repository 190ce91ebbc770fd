"""The store: opening, read-only SQL over its views, float16 decoding, and refusing what it cannot do."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run

from hookpoints.errors import UserError

HOOKS = [
    {
        "hook": f"h{i}",
        "module": f"m{i}",
        "io": "output",
        "component": "lm",
        "layer": i,
        "submodule": "mlp",
        "width": 4,
        "shape": [4],
        "neuron_axis": 2,
        "space": "input",
        "layer_output": False,
    }
    for i in range(2)
]
EXAMPLES = pa.table({"example_id": ["a", "b", "c"], "text": ["x", "y", "z"], "language": ["en", "de", "en"]})


def fill(store: Store, run: str, values: np.ndarray, dtype: str = "float32") -> None:
    settings = {"model": "m", "task": "forward", "pooling": "mean", "dtype": dtype}
    writer = open_run(store, run, settings=settings, config={}, hooks=HOOKS, examples_schema=EXAMPLES.schema)
    writer.add(EXAMPLES, {h["hook"]: HookRows(["a", "b", "c"], values + i) for i, h in enumerate(HOOKS)})
    writer.finish()


def test_views_and_the_long_neurons_form(store):
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    fill(store, "r", values)
    with store.query() as session:
        runs = session.sql("SELECT run, status, pooling FROM runs").to_pylist()
        assert runs == [{"run": "r", "status": "complete", "pooling": "mean"}]
        acts = session.sql("SELECT activation FROM activations WHERE hook = 'h1' ORDER BY example_id")
        np.testing.assert_array_equal(np.array(acts["activation"].to_pylist()), values + 1)
        neurons = session.sql(
            "SELECT neuron, value FROM neurons WHERE hook = 'h0' AND example_id = 'b' ORDER BY neuron"
        ).to_pylist()
        assert neurons == [{"neuron": j, "value": float(4 + j)} for j in range(4)]
        joined = session.sql(
            "SELECT e.language, avg(n.value) AS v FROM neurons n JOIN examples e USING (run, example_id) "
            "WHERE n.hook = 'h0' AND n.neuron = 0 GROUP BY e.language ORDER BY e.language"
        ).to_pylist()
        assert joined == [{"language": "de", "v": 4.0}, {"language": "en", "v": 4.0}]


def test_float16_bit_patterns_decode_exactly_in_sql(store):
    special = np.array(
        [0.0, -0.0, 1.0, -2.5, 65504.0, 6e-8, np.inf, -np.inf, 1 / 3, -1e-5, 3.14159, 1e4], dtype=np.float32
    ).reshape(3, 4)
    fill(store, "half", special, dtype="float16")
    with store.query() as session:
        got = session.sql("SELECT activation FROM activations WHERE hook = 'h0' ORDER BY example_id")
    decoded = np.array(got["activation"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(decoded, special.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("CREATE TABLE t (a INT)", "read-only through SQL: CREATE statements are refused"),
        ("DROP VIEW activations", "read-only through SQL: DROP statements are refused"),
        ("COPY (SELECT 1) TO '/tmp/x.csv'", "read-only through SQL: COPY statements are refused"),
        ("INSERT INTO examples VALUES (1)", "read-only through SQL: INSERT statements are refused"),
        ("ATTACH 'other.db'", "read-only through SQL: ATTACH statements are refused"),
        ("SET enable_external_access = true", "read-only through SQL: SET statements are refused"),
        ("SELECT * FROM read_parquet('/etc/hosts')", "file system operations are disabled"),
        ("SELECT 1; SELECT 2", "give exactly one SQL statement"),
        ("PIVOT examples ON example_id USING count(*)", "PIVOT without an IN \\(...\\) list"),  # says the fix
        ("SELEC * FROM runs", "SQL does not parse"),
        ("SELECT * FROM activatons", 'Did you mean "activations"'),
        ("SELECT nonexistent FROM runs", "SQL failed: Binder Error"),
    ],
)
def test_sql_is_read_only_and_errors_are_one_line(store, sql, message):
    fill(store, "r", np.zeros((3, 4), np.float32))
    with store.query() as session, pytest.raises(UserError, match=message) as caught:
        session.sql(sql)
    assert "\n" not in str(caught.value)
    with store.query() as session:  # nothing changed
        assert session.sql("SELECT count(*) AS n FROM activations")["n"][0].as_py() == 6


def test_opening_paths_that_are_not_stores(tmp_path):
    with pytest.raises(UserError, match="is not a hookpoints store"):
        Store.open(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("mine")
    with pytest.raises(UserError, match="folder that is not a hookpoints store and is not empty"):
        Store.open(tmp_path / "notes", create=True)
    assert (tmp_path / "notes" / "readme.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        Store.open(tmp_path / "file", create=True)
    with pytest.raises(UserError, match="cannot write to store folder"):
        Store.open(tmp_path / "file" / "store", create=True)


def test_another_creators_write_probe_is_not_a_foreign_file(tmp_path):
    """Processes creating one new store at once: one saw another's ``.write-test-PID`` (written and removed as it
    checks the folder is writable) and refused the folder as "not a hookpoints store"."""
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / ".write-test-4242").write_bytes(b"")  # another process, between its write and unlink
    assert Store.open(tmp_path / "new", create=True).schema_version() is not None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".write-tests").mkdir()  # the prefix, not a name: mine
    with pytest.raises(UserError, match="folder that is not a hookpoints store and is not empty"):
        Store.open(tmp_path / "other", create=True)


def test_run_names_are_checked(store):
    with pytest.raises(UserError, match="run name 'bad name' is not allowed"):
        fill(store, "bad name", np.zeros((3, 4), np.float32))
    assert store.dataset("run_events").count_rows() == 0


def test_reserved_manifest_columns_are_refused(store):
    bad = EXAMPLES.append_column("hook", pa.array(["x", "y", "z"]))
    with pytest.raises(UserError, match="manifest column 'hook' is reserved"):
        open_run(
            store,
            "r",
            settings={"model": "m", "task": "t", "pooling": "mean", "dtype": "float32"},
            config={},
            hooks=HOOKS,
            examples_schema=bad.schema,
        )


@pytest.mark.parametrize(
    ("where", "message"), [("", "store path is empty"), ("s3://", "names no bucket"), ("s3:///x", "names no bucket")]
)
def test_a_store_uri_without_a_bucket_or_path_is_one_line(run_cli, where, message):
    """`--store s3://` gave "error: DeltaError: Generic error: Unable to recognise URL ..."; `--store ''` opened the
    current folder ("error:  is not a hookpoints store")."""
    with pytest.raises(UserError, match=message):
        Store.open(where)
    code, _, err = run_cli("sql", "--store", where, "SELECT 1")
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
