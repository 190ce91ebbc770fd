"""The CLI: outputs in each format, and one-line errors (a traceback only with --debug)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from hookpoints.errors import UserError

ROWS = [{"id": "a", "text": "Hello there.", "language": "en"}, {"id": "b", "text": "Guten Tag.", "language": "de"}]


def one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected in " ".join(err.split()), err


def test_hooks_json_and_table(tiny_model_dir, run_cli):
    directory = str(tiny_model_dir("seamless_m4t_v2"))
    code, out, err = run_cli("hooks", directory, "--modality", "speech", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert set(rows[0]) == {"name", "component", "layer", "submodule", "width", "bytes_pooled", "bytes_none_max"}
    conv = next(r for r in rows if r["name"] == "speech_encoder.layers.0.conv_module.pointwise_conv1")
    assert conv == {
        "name": "speech_encoder.layers.0.conv_module.pointwise_conv1",
        "component": "speech_encoder",
        "layer": 0,
        "submodule": "conv_module.pointwise_conv1",
        "width": 128,
        "bytes_pooled": 128 * 4,  # float32, one row per example
        "bytes_none_max": 128 * 4 * 256,  # a row per position of the longest input (max_position_embeddings)
    }
    code, out, _ = run_cli("hooks", directory, "--filter", "text_decoder.layers.*.cross_attention.*_proj")
    assert code == 0 and "8 hook points" in out and "cross_attention.k_proj" in out


def test_record_sql_and_store_info(tiny_model_dir, write_manifest, tmp_path, run_cli):
    store = str(tmp_path / "store")
    args = [
        "record",
        "--model",
        str(tiny_model_dir("gpt2")),
        "--data",
        str(write_manifest(ROWS)),
        "--store",
        store,
        "--run",
        "r1",
        "--hooks",
        "blocks.*.hook_resid_post",
    ]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "recorded 2 examples (0 already there) at 2 hook points into run r1" in " ".join(out.split())

    code, out, _ = run_cli(
        "sql",
        "--store",
        store,
        "--format",
        "csv",
        "SELECT hook, count(*) AS n FROM activations GROUP BY hook ORDER BY hook",
    )
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [
        ["hook", "n"],
        ["blocks.0.hook_resid_post", "2"],
        ["blocks.1.hook_resid_post", "2"],
    ]
    code, out, _ = run_cli("sql", "--store", store, "SELECT example_id, language FROM examples ORDER BY 1")
    assert code == 0 and "Guten" not in out and "de" in out and "2 rows" in out
    code, out, _ = run_cli("store", "info", store)
    assert code == 0 and "r1" in out and "activations" in out

    code, _, err = run_cli(*args)
    one_line_error(code, err, "run 'r1' already exists")
    code, out, err = run_cli(*args, "--resume")
    assert code == 0 and "recorded 0 examples (2 already there)" in " ".join(out.split())
    code, _, err = run_cli(*args, "--resume", "--overwrite")
    one_line_error(code, err, "give --resume or --overwrite, not both")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["hooks", "/nowhere/model"], "model path /nowhere/model does not exist"),
        (["hooks", "{gpt2}", "--filter", "blocks.*.mlp.hook_pree"], "matches no recordable hook point; closest:"),
        (
            ["record", "--model", "{gpt2}", "--data", "{bad_manifest}", "--store", "{tmp}/s", "--run", "r"],
            "has no 'text' column",
        ),
        (
            ["record", "--model", "{gpt2}", "--data", "{manifest}", "--store", "{tmp}/file/s", "--run", "r"],
            "cannot write to store folder",
        ),
        (
            ["record", "--model", "{gpt2}", "--data", "{manifest}", "--store", "{tmp}/s", "--run", "a b"],
            "run name 'a b' is not allowed",
        ),
        (["hooks", "{gpt2}", "--all", "--filter", "blocks.*"], "give --filter or --all, not both"),
        (
            ["record", "--model", "{gpt2}", "--data", "{manifest}", "--store", "{tmp}/s", "--run", "r", "--workers=1"],
            "--workers is for --ray",
        ),
        (["sql", "--store", "{tmp}/nostore", "SELECT 1"], "is not a hookpoints store"),
        (["sql", "--store", "{store}", "SELEC 1"], "SQL does not parse"),
        (["sql", "--store", "{store}", "DELETE FROM examples"], "read-only through SQL: DELETE statements are refused"),
        (["store", "info", "{tmp}/nostore"], "is not a hookpoints store"),
    ],
)
def test_bad_input_is_one_line(tiny_model_dir, write_manifest, tmp_path, run_cli, store, args, expected):
    (tmp_path / "file").write_text("x")
    values = {
        "gpt2": str(tiny_model_dir("gpt2")),
        "manifest": str(write_manifest(ROWS)),
        "bad_manifest": str(write_manifest([{"id": "a"}], "bad.jsonl")),
        "tmp": str(tmp_path),
        "store": store.location.uri,
    }
    code, _, err = run_cli(*[arg.format(**values) for arg in args])
    one_line_error(code, err, expected)
    assert not (tmp_path / "s").exists()  # nothing was created for a refused recording


def test_debug_shows_the_traceback(run_cli):
    with pytest.raises(UserError, match="does not exist"):
        run_cli("--debug", "hooks", "/nowhere/model")


@pytest.mark.parametrize("size", ["nanG", "inf", "-infM", "1e400"])
def test_a_max_bytes_that_is_not_a_finite_size_is_one_line(size):
    """`record --max-bytes nanG` failed with "ValueError: cannot convert float NaN to integer" (exit 1)."""
    from hookpoints.sizes import parse_size

    with pytest.raises(UserError, match="--max-bytes must be a finite size more than 0"):
        parse_size(size)
    assert parse_size("1.5K") == 1536


@pytest.mark.parametrize("scale", ["nan", "inf", "0", "-1000"])
def test_magnitudes_scale_must_be_a_positive_finite_number(tmp_path, run_cli, scale):
    """`magnitudes --scale nan` printed a column of NaN headed "deviation xnan"; 0 printed zeros, a negative
    scale flipped the deviations' sign."""
    code, out, err = run_cli("magnitudes", "--store", str(tmp_path / "s"), "--run", "r", "--scale", scale)
    assert code == 2 and "Invalid value for '--scale'" in err and "Traceback" not in err and out == ""


def test_an_error_before_the_progress_bar_starts_prints_only_the_error(tmp_path, capsys):
    """An input refused inside a `counting` block (the clustering checks, before its bar starts) printed a blank
    line before the error on a piped stderr: rich's Progress.stop writes one even for a bar never shown."""
    from hookpoints.cli.console import counting

    with pytest.raises(UserError), counting("clustering r") as (on_start, on_advance):
        raise UserError("refused")
    assert capsys.readouterr().err == ""
    with counting("clustering r") as (on_start, on_advance):
        on_start(2)
        on_advance(2)
    shown = capsys.readouterr().err
    assert "clustering r" in shown and "2/2" in shown
