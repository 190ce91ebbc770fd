"""``hookpoints sql --format parquet|arrow --out FILE``: typed results (vectors stay lists of floats, float16 runs
decoded), bad combinations refused in one line; terminal tables never break a name in the middle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from clusters_helpers import clustered, write_run
from rich.console import Console


@pytest.fixture
def runs(store):
    examples, vectors = clustered(layers=2)
    write_run(store, "r32", examples, vectors)
    write_run(store, "r16", examples, vectors, dtype="float16")
    return store, examples, vectors


QUERY = "SELECT example_id, activation FROM activations WHERE run = '{run}' AND hook = 'blocks.1.hook_resid_post'"


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
@pytest.mark.parametrize("run", ["r32", "r16"])
def test_export_keeps_vectors_as_float_lists(runs, tmp_path, run_cli, fmt, run):
    store, examples, vectors = runs
    target = tmp_path / f"out.{fmt}"
    code, out, err = run_cli(
        "sql", "--store", store.location.uri, "--format", fmt, "--out", str(target), QUERY.format(run=run)
    )
    assert code == 0, err
    if fmt == "parquet":
        table = pq.read_table(target)
    else:
        with pa.memory_map(str(target)) as source:
            table = pa.ipc.open_file(source).read_all()
    assert pa.types.is_floating(table.schema.field("activation").type.value_type)
    ids = [e["example_id"] for e in examples]
    got = dict(zip(table["example_id"].to_pylist(), table["activation"].to_pylist(), strict=True))
    expected = vectors["blocks.1.hook_resid_post"].astype(np.float32)
    if run == "r16":
        expected = expected.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.array([got[i] for i in ids], np.float32), expected)
    assert f"{len(ids)} rows" in err
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "parquet"], "--format parquet writes a file: give it with --out"),
        (["--format", "csv", "--out", "{tmp}/x.csv"], "--out is for --format parquet or arrow"),
        (["--format", "arrow", "--out", "{tmp}/missing/x.arrow"], "does not exist"),
        (["--format", "parquet", "--out", "{tmp}"], "is a folder"),
    ],
)
def test_bad_export_options_are_one_line_errors(runs, tmp_path, run_cli, args, message):
    store = runs[0]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run_cli("sql", "--store", store.location.uri, *args, "SELECT 1 AS one")
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_failing_query_leaves_no_file(runs, tmp_path, run_cli):
    target = tmp_path / "x.parquet"
    code, out, err = run_cli(
        "sql",
        "--store",
        runs[0].location.uri,
        "--format",
        "parquet",
        "--out",
        str(target),
        "SELECT no_such_column FROM hooks",
    )
    assert code == 2 and not target.exists() and not list(tmp_path.glob(".*partial"))


HOOK = "speech_encoder.encoder.layers.23.conv_module.pointwise_conv1"


@pytest.mark.parametrize("width", [60, 100, 160])
def test_terminal_tables_never_break_a_name(monkeypatch, width):
    import hookpoints.cli.console as console

    monkeypatch.setattr(console, "out", Console(width=width, record=True, force_terminal=False))
    path = "/home/someone/projects/speech/stores/team-store-2026/activations/run=a/hook=b/part-00001.parquet"
    console.render([{"hook": HOOK, "path": path, "note": "free text may wrap over lines as it likes"}] * 2)
    text = console.out.export_text()
    assert text.count(HOOK) == 2, text
    short = console.shorten_middle(path)
    assert len(short) <= console.PATH_LIMIT and short.startswith("/home/") and short.endswith("part-00001.parquet")
    assert text.count(short) == 2, text


def test_shorten_middle_leaves_names_and_short_paths():
    from hookpoints.cli.console import shorten_middle

    assert shorten_middle(HOOK + HOOK) == HOOK + HOOK  # no '/': a name, never shortened
    assert shorten_middle("runs/a.parquet") == "runs/a.parquet"
    short = shorten_middle("/x" * 50 + "/file.parquet", 20)
    assert len(short) == 20 and short.count("…") == 1 and short.endswith("/file.parquet")


def test_csv_keeps_nan_and_infinities_inside_vectors(store, run_cli):
    """csv printed a vector's NaN, inf and -inf all as null (strict JSON's rule), while the scalars of the same
    file print nan/inf: a stored inf could not be told from NaN. Now each cell reads back (json.loads) as stored."""
    import csv
    import io
    import json

    from hookpoints.store.writer import HookRows, open_run

    x = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)  # [examples, neurons]
    x[0, 1], x[1, 2], x[2, 3] = np.nan, np.inf, -np.inf
    examples = pa.table({"example_id": ["a", "b", "c"]})
    hook = {"hook": "h", "module": "h", "io": "output", "component": "c", "layer": 0, "submodule": "s", "width": 4,
            "shape": [4], "neuron_axis": 1, "space": "c", "layer_output": False}  # fmt: skip
    settings = {"model": "m", "task": "forward", "pooling": "mean", "dtype": "float32"}
    writer = open_run(store, "r", settings=settings, config={}, hooks=[hook], examples_schema=examples.schema)
    writer.add(examples, {"h": HookRows(["a", "b", "c"], x)})
    writer.finish()
    query = "SELECT example_id, activation FROM activations ORDER BY example_id"
    code, out, err = run_cli("sql", "--store", store.location.uri, "--format", "csv", query)
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))[1:]
    got = np.array([json.loads(cell) for _, cell in rows], np.float32)
    np.testing.assert_array_equal(got, x)  # NaN where NaN, inf and -inf where they were


@pytest.mark.parametrize("inside", ["results.parquet", "store_meta/_delta_log/00000000000000000000.json"])
def test_an_export_into_the_store_is_refused(runs, run_cli, inside):
    """`--out STORE/store_meta/_delta_log/00000000000000000000.json` replaced the store's first log entry with a
    Parquet file: the store could no longer be opened. `--out STORE/results.parquet` made verify fail."""
    from tests.hostile_helpers import checksums

    store, _, _ = runs
    root = Path(store.location.uri)
    before = checksums(root)
    code, _, err = run_cli("sql", "--store", str(root), "--format", "parquet", "--out", str(root / inside), "SELECT 1")
    assert code == 2 and "is inside the store" in err and len(err.strip().splitlines()) == 1, err
    assert checksums(root) == before
    code, out, _ = run_cli("sql", "--store", str(root), "--format", "csv", "SELECT count(*) AS n FROM runs")
    assert code == 0 and out.split() == ["n", "2"]


def test_csv_lines_end_with_lf_and_parse_back(store, run_cli, capsys):
    """csv output ended every line with CRLF (Python's csv default) while DuckDB's COPY and pandas write LF: awk
    and grep saw a trailing \\r in the last column. Quoting stays as it was; the rows read back with csv."""
    import csv
    import io

    from hookpoints.cli.console import render

    query = "SELECT * FROM (VALUES ('a,b', 'say \"hi\"', 'two\nlines', 1.5), ('c', '', 'x', 2.0)) t(p, q, r, s)"
    code, out, err = run_cli("sql", "--store", store.location.uri, "--format", "csv", query)
    assert code == 0, err
    assert "\r" not in out and out.endswith("2.0\n")
    expected = [["p", "q", "r", "s"], ["a,b", 'say "hi"', "two\nlines", "1.5"], ["c", "", "x", "2.0"]]
    assert list(csv.reader(io.StringIO(out, newline=""))) == expected
    render([dict(zip(expected[0], row, strict=True)) for row in expected[1:]], "csv")  # selection, neurons, ...
    out = capsys.readouterr().out
    assert "\r" not in out and list(csv.reader(io.StringIO(out, newline=""))) == expected
