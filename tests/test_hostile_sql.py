"""Hostile SQL and hostile text in a store: no hang, no escape, everything printed literally, strict JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hookpoints.errors import UserError
from tests.hostile_helpers import checksums, fill

TEXTS = ["[/INST] hi", "[bold red]loud[/bold red]", ":-1: :smile:"]


@pytest.fixture
def texts_store(store):
    fill(store, "r1", columns={"example_id": ["a", "b", "c"], "text": TEXTS})
    return store


def test_text_from_the_store_prints_literally(texts_store, run_cli):
    code, out, err = run_cli("sql", "--store", texts_store.location.uri, "SELECT text FROM examples ORDER BY 1")
    assert code == 0, err
    for text in TEXTS:
        assert text in out
    code, out, _ = run_cli("store", "info", texts_store.location.uri)
    assert code == 0


def test_error_messages_print_literally(texts_store, run_cli):
    code, out, err = run_cli("sql", "--store", texts_store.location.uri, 'SELECT * FROM ":-1: [bold red]x"')
    assert code == 2 and ":-1: [bold red]x" in err and "\n" not in err.strip()


def test_json_output_is_strict_json(texts_store, run_cli):
    query = "SELECT 'nan'::DOUBLE AS x, '-inf'::FLOAT AS y, ['inf'::FLOAT, 1.5] AS l, text FROM examples ORDER BY text"
    code, out, err = run_cli("sql", "--store", texts_store.location.uri, "--format", "json", query)
    assert code == 0, err
    rows = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert rows[0] == {"x": None, "y": None, "l": [None, 1.5], "text": sorted(TEXTS)[0]}


@pytest.mark.parametrize(
    "query",
    [
        "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
        "EXPLAIN (FORMAT json) DELETE FROM hooks",
        "explain analyse insert into x values (1)",
        "CREATE TABLE t AS SELECT 1",
    ],
)
def test_explain_analyze_of_a_statement_that_writes_is_refused(texts_store, run_cli, query):
    before = checksums(Path(texts_store.location.uri))
    code, _, err = run_cli("sql", "--store", texts_store.location.uri, query)
    assert code == 2 and "read-only" in err
    assert checksums(Path(texts_store.location.uri)) == before


def test_a_query_past_its_timeout_is_stopped(texts_store, run_cli):
    started = time.perf_counter()
    code, _, err = run_cli(
        "sql", "--store", texts_store.location.uri, "--timeout", "0.5", "SELECT count(*) FROM range(10000000000000)"
    )
    assert code == 2 and "timeout of 0.5 s" in err
    assert time.perf_counter() - started < 30
    with texts_store.query() as session:
        with pytest.raises(UserError, match="timeout of 0.2 s"):
            session.sql("SELECT count(*) FROM range(10000000000000)", timeout=0.2)
        with pytest.raises(UserError, match="timeout of 0.2 s"):
            for _ in session.batches("SELECT * FROM range(10000000000000) WHERE range % 7 = 99", timeout=0.2):
                pass
        assert session.sql("SELECT 1 AS x")["x"].to_pylist() == [1]  # the session is usable afterwards
        time.sleep(0.3)  # and no timer of a finished query interrupts a later one
        assert session.sql("SELECT count(*) AS n FROM range(3000000)")["n"].to_pylist() == [3000000]
    import hookpoints as hp

    with pytest.raises(UserError, match="timeout of 0.2 s"):
        hp.Store.open(texts_store.location.uri).sql("SELECT count(*) FROM range(10000000000000)", timeout=0.2)


@pytest.mark.parametrize("value", ["nan", "0", "-1", "inf"])
def test_a_bad_timeout_is_refused(texts_store, run_cli, value):
    code, _, err = run_cli("sql", "--store", texts_store.location.uri, "--timeout", value, "SELECT 1")
    assert code == 2 and "timeout" in err.lower()


def test_results_stream_in_batches(texts_store, run_cli):
    with texts_store.query() as session:
        sizes = [batch.num_rows for batch in session.batches("SELECT * FROM range(2000000)", rows=100_000)]
    assert sum(sizes) == 2_000_000 and max(sizes) <= 100_000
    code, out, _ = run_cli("sql", "--store", texts_store.location.uri, "--format", "csv", "SELECT * FROM range(50000)")
    assert code == 0 and out.count("\n") == 50_001
    code, out, _ = run_cli("sql", "--store", texts_store.location.uri, "SELECT * FROM range(5000)")
    assert "first 1000 rows shown" in out
