"""``hp.record`` over a manifest file, a DataFrame and a list of dicts, and ``hp.Store``'s notebook calls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import hookpoints as hp
from hookpoints.errors import UserError
from tests.test_fleurs import fleurs  # noqa: F401 - the fixture: a FLEURS folder

ROWS = [
    {"id": "a", "text": "the quick brown fox", "language": "en"},
    {"id": "b", "text": "der schnelle braune Fuchs springt", "language": "de"},
    {"id": "c", "text": "le renard", "language": "fr"},
]
HOOKS = "blocks.*.hook_resid_post"


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    return hp.load(tiny_model_dir("gpt2"))


def test_three_forms_of_data_record_the_same_values(gpt2, tmp_path, write_manifest):
    store = hp.Store.open(tmp_path / "store", create=True)
    hp.record(gpt2, ROWS, store, run="from_list", hooks=HOOKS, progress=False)
    hp.record(gpt2, pd.DataFrame(ROWS), str(tmp_path / "store"), run="from_frame", hooks=HOOKS)
    hp.record(gpt2, write_manifest(ROWS), store, run="from_file", hooks=[HOOKS], pooling="mean", batch_size=2)
    _, cache = gpt2.run_with_cache([row["text"] for row in ROWS], names=HOOKS, pooling="mean")
    for run in ("from_list", "from_frame", "from_file"):
        frame = store.sql(
            "SELECT hook, example_id, activation FROM activations WHERE run = $run ORDER BY hook, example_id",
            {"run": run},
        ).to_pandas()
        assert len(frame) == 2 * len(ROWS)
        for row in frame.itertuples():
            expected = cache[row.hook][["a", "b", "c"].index(row.example_id)].numpy()
            np.testing.assert_allclose(np.asarray(row.activation), expected, atol=1e-5)
    labels = store.sql("SELECT example_id, language FROM examples WHERE run = 'from_frame' ORDER BY 1").to_pylist()
    assert labels == [{"example_id": r["id"], "language": r["language"]} for r in ROWS]
    runs = store.runs().to_pandas()
    assert sorted(runs["run"]) == ["from_file", "from_frame", "from_list"]
    assert set(runs["status"]) == {"complete"} and set(runs["examples"]) == {3}
    info = store.info()
    assert info["schema_version"] is not None and {"activations", "examples"} <= {t["table"] for t in info["tables"]}
    assert isinstance(hp.Store.open(tmp_path / "store"), hp.Store)


def test_record_shows_a_progress_bar(gpt2, tmp_path, capsys):
    summary = hp.record(gpt2, ROWS, tmp_path / "store", run="r1", hooks=HOOKS)
    assert summary.recorded == 3 and summary.hooks == 2
    captured = capsys.readouterr()
    assert "recording r1" in captured.err and captured.out == ""  # a script's stdout stays clean when piped


def test_speech_record_from_a_list_with_audio_paths(tiny_model_dir, tmp_path):
    import soundfile

    from tests.api_helpers import sine

    rows = []
    for i, seconds in enumerate((0.5, 0.8)):
        soundfile.write(tmp_path / f"{i}.wav", sine(seconds, 200.0 + 100 * i), 16_000, subtype="FLOAT")
        rows.append({"id": f"s{i}", "audio": str(tmp_path / f"{i}.wav")})
    model = hp.load(tiny_model_dir("seamless_m4t_v2"), modality="speech")
    hooks = "speech_encoder.layers.*.hook_resid_post"
    hp.record(model, rows, tmp_path / "store", run="speech", hooks=hooks, pooling="mean", progress=False)
    stored = hp.Store.open(tmp_path / "store").sql(
        "SELECT hook, example_id, activation FROM activations ORDER BY hook, example_id"
    )
    _, cache = model.run_with_cache([row["audio"] for row in rows], names=hooks, pooling="mean")
    for row in stored.to_pylist():
        expected = cache[row["hook"]][int(row["example_id"][1])]
        assert torch.allclose(torch.tensor(row["activation"]), expected, atol=1e-4)


def test_record_a_fleurs_folder_with_languages_and_limit(tiny_model_dir, fleurs, tmp_path):  # noqa: F811
    model = hp.load(tiny_model_dir("seamless_m4t_v2"), modality="speech")
    hooks = "speech_encoder.layers.*.hook_resid_post"
    summary = hp.record(model, fleurs, tmp_path / "store", run="f", hooks=hooks, languages=["de_de"], limit=2)
    assert summary.recorded == 2
    rows = hp.Store.open(tmp_path / "store").sql("SELECT example_id, language FROM examples ORDER BY 1").to_pylist()
    assert rows == [{"example_id": "de_de-100100", "language": "de"}, {"example_id": "de_de-100101", "language": "de"}]


@pytest.mark.parametrize(
    ("data", "options", "message"),
    [
        (42, {}, "data must be a manifest path, a FLEURS folder, a pandas DataFrame"),
        ([{"id": "a", "text": "x"}, "b"], {}, "one dict per example"),
        ([], {}, "one dict per example"),
        ([{"text": "x"}], {}, "has no 'id' column"),
        ([{"id": "a", "words": "x"}], {}, "has no 'text' column"),
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], {}, "duplicate ids"),
        ([{"id": "a", "text": ""}], {}, "empty text"),
        ([{"id": "a", "text": "x", "n": 1}, {"id": "b", "text": "y", "n": "two"}], {}, "mix types"),
        (pd.DataFrame({"id": ["a"], "words": ["x"]}), {}, "has no 'text' column"),
        ("no/such/manifest.jsonl", {}, "does not exist"),
        (ROWS, {"hooks": "blocks.*.no_such"}, "matches no recordable hook point"),
        (ROWS, {"hooks": lambda name: "resid" in name}, "hooks must be a glob or a list of globs, not a function"),
        (ROWS, {"hooks": 3}, "hooks must be a glob or a list of globs, not 3"),  # were bare TypeErrors
        (ROWS, {"hooks": ["blocks.0.hook_resid_post", 3]}, "hooks must be a glob or a list of globs"),
        (ROWS, {"pooling": "median"}, "pooling must be one of"),
        (ROWS, {"run": "bad name!"}, "run name 'bad name!' is not allowed"),
        (ROWS, {"task": "t2tt"}, "cannot do task t2tt"),
        (ROWS, {"batch_size": 0}, "batch size must be a whole number of at least 1"),
        (ROWS, {"limit": 2}, "choose recordings of a FLEURS folder"),
    ],
)
def test_bad_record_input_is_a_one_line_user_error(gpt2, tmp_path, data, options, message):
    options = {"run": "r1", **options}
    with pytest.raises(UserError) as caught:
        hp.record(gpt2, data, tmp_path / "store", progress=False, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bad_model_and_store_arguments(gpt2, tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("not a store")
    with pytest.raises(UserError, match="is a file: give a folder"):
        hp.record(gpt2, ROWS, afile, run="r1", progress=False)
    with pytest.raises(UserError, match="store must be a Store, a folder or an s3:// URI"):
        hp.record(gpt2, ROWS, 3, run="r1", progress=False)
    with pytest.raises(UserError, match="needs a model loaded with hp.load"):
        hp.record("gpt2", ROWS, tmp_path / "s", run="r1", progress=False)
    assert not (tmp_path / "s").exists()  # nothing is created for a call that cannot record


def test_nothing_is_written_before_the_checks_pass(gpt2, tmp_path):
    with pytest.raises(UserError):
        hp.record(gpt2, ROWS, tmp_path / "store", run="r1", pooling="median", progress=False)
    with pytest.raises(UserError):
        hp.record(gpt2, ROWS, tmp_path / "store", run="r1", hooks="nope.*", progress=False)
    assert not (tmp_path / "store").exists()
    hp.record(gpt2, ROWS, tmp_path / "store", run="r1", hooks=HOOKS, progress=False)
    with pytest.raises(UserError, match="already"):
        hp.record(gpt2, ROWS, tmp_path / "store", run="r1", hooks=HOOKS, progress=False)
    assert hp.Store.open(tmp_path / "store").sql("SELECT count(*) AS n FROM examples")["n"][0].as_py() == 3


def test_store_sql_is_read_only_and_open_refuses_a_non_store(tmp_path):
    store = hp.Store.open(tmp_path / "store", create=True)
    with pytest.raises(UserError, match="read-only"):
        store.sql("DELETE FROM examples")
    with pytest.raises(UserError, match="SQL failed"):
        store.sql("SELECT nope FROM runs")
    with pytest.raises(UserError, match="is not a hookpoints store"):
        hp.Store.open(tmp_path / "elsewhere")
    assert store.runs().num_rows == 0


def test_rerunning_an_interrupted_record_cell_names_the_python_option_and_resumes(gpt2, tmp_path):
    """A cell interrupted mid-run (KeyboardInterrupt) and run again: the error names ``if_exists`` (it named only
    the CLI's --resume / --overwrite), and resuming records what is missing, the values of an uninterrupted run."""
    rows = [{"id": f"e{i}", "text": f"{ROWS[i % 3]['text']} {i}", "language": "en"} for i in range(6)]
    calls = []

    def interrupt_second_batch(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    assert gpt2.hook_points  # probed now: the probe's forward pass is not a batch
    handle = gpt2.model.transformer.h[1].mlp.register_forward_hook(interrupt_second_batch)  # (a trace stops at h[1])
    try:
        with pytest.raises(KeyboardInterrupt):
            hp.record(gpt2, rows, tmp_path / "store", run="r1", hooks=HOOKS, progress=False, batch_size=2)
    finally:
        handle.remove()
    with pytest.raises(UserError, match=r"if_exists='resume'.*if_exists='overwrite'") as caught:
        hp.record(gpt2, rows, tmp_path / "store", run="r1", hooks=HOOKS, progress=False, batch_size=2)
    assert "\n" not in str(caught.value)
    summary = hp.record(
        gpt2, rows, tmp_path / "store", run="r1", hooks=HOOKS, progress=False, batch_size=2, if_exists="resume"
    )
    assert (summary.recorded, summary.skipped) == (4, 2)
    _, cache = gpt2.run_with_cache([row["text"] for row in rows], names=HOOKS, pooling="mean")
    frame = hp.Store.open(tmp_path / "store").sql("SELECT hook, example_id, activation FROM activations").to_pandas()
    assert len(frame) == 2 * len(rows)
    for row in frame.itertuples():
        expected = cache[row.hook][int(row.example_id[1:])].numpy()
        np.testing.assert_allclose(np.asarray(row.activation), expected, atol=1e-5, rtol=1e-5)
