"""A bad-input matrix over the public entry points (round 4): wrong types, empty lists, numpy / torch values,
odd numbers. Each refusal is one ``UserError`` line naming the fix, and a store is left exactly as it was
(md5 of every file, and its runs); values that should work (numpy and torch indices) are checked against
plain torch hooks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import hookpoints as hp
from tests.api_helpers import randomise
from tests.hostile_helpers import ROWS, checksums, copied_store, one_line_error, recorded_store

TEXTS = ["the quick brown fox jumps over", "a lazy dog"]


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    model = hp.load(tiny_model_dir("gpt2"))
    randomise(model)
    return model


@pytest.fixture(scope="module")
def recorded_once(gpt2, tmp_path_factory):
    return recorded_store(gpt2, tmp_path_factory.mktemp("recorded"))


@pytest.fixture
def recorded(recorded_once, tmp_path):
    """A store holding run r1 (two hooks), with its checksums before anything else: the test's own copy of the
    one recorded for the module (recording it again for each test gave the same files)."""
    return copied_store(recorded_once, tmp_path)


def runs_of(root: Path) -> list[tuple]:
    rows = hp.Store.open(str(root)).sql("SELECT run, status FROM runs ORDER BY run").to_pylist()
    return [(row["run"], row["status"]) for row in rows]


def zeroed_by_torch(model, neurons: list[int]) -> torch.Tensor:
    """Logits with c_proj's input (blocks.0.mlp.hook_post) zeroed at ``neurons``, by a plain torch pre-hook."""
    module = dict(model.model.named_modules())["transformer.h.0.mlp.c_proj"]

    def change(_, args):
        args[0][..., neurons] = 0.0

    handle = module.register_forward_pre_hook(change)
    try:
        with torch.inference_mode():
            return model.model(**model.inputs(TEXTS).kwargs).logits
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "indices",
    [np.array([3, 7]), torch.tensor([3, 7]), (np.int64(3), np.int64(7)), torch.tensor([3, 7]).topk(2)[0], {3, 7}],
)
def test_ablate_takes_numpy_and_torch_indices(gpt2, indices):
    # they were refused as "neuron np.int64(3) is out of range (width 256: 0..255)"
    out = gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.mlp.hook_post", hp.ablate(indices))]).logits
    assert torch.allclose(out, zeroed_by_torch(gpt2, [3, 7]), atol=1e-6)
    _, reference = gpt2.run_with_cache(TEXTS, names="blocks.0.mlp.hook_post")
    mean_out = gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.mlp.hook_post", hp.mean_ablate(reference, indices))])
    plain = gpt2.run_with_hooks(TEXTS).logits
    assert not torch.allclose(mean_out.logits, plain, atol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        # a boolean mask was read as neurons 1 and 0 (model.edit) without a word
        (lambda m: m.edit("blocks.0.mlp.hook_post", [True, False], [0.0, 0.0]), "for a boolean mask, pass mask"),
        (lambda m: hp.ablate(np.array([True, False])), "for a boolean mask, pass mask.nonzero()"),
        (lambda m: hp.ablate([1.5]), "neuron indices must be whole numbers, not 1.5"),
        # NaN steering made every later activation NaN (NeuronEdit already refused NaN values)
        (lambda m: hp.steer(torch.full((256,), float("nan"))), "must be finite numbers"),
        (lambda m: hp.steer(torch.ones(256), scale=float("inf")), "must be finite numbers"),
        # TypeError / RuntimeError / AttributeError before
        (lambda m: m.edit("blocks.0.mlp.hook_post", None, [0.0]), "neurons must be whole numbers"),
        (lambda m: m.edit("blocks.0.mlp.hook_post", [1], "x"), "values must be real numbers"),
        (lambda m: m.edit(None, [1], [0.0]), "a hook point name is a string, not NoneType"),
        (lambda m: m.hook_points.get(["blocks.0.mlp.hook_post"]), "a hook point name is a string, not list"),
        (lambda m: m.select(5), "hook patterns must be a glob or a list of globs, not 5"),
        (lambda m: hp.NeuronEdit("blocks.0.mlp.hook_post", torch.tensor([1]), torch.tensor([0.0])), "model.edit("),
        (
            lambda m: hp.NeuronEdit(m.hook_points.get("blocks.0.mlp.hook_post"), torch.tensor([1.5]), torch.ones(1)),
            "an integer tensor, not torch.float32",
        ),
        (lambda m: hp.mean_ablate(None), "mean_ablate needs a cache from run_with_cache, not NoneType"),
        (lambda m: hp.patch(None), "patch needs a cache from run_with_cache, not NoneType"),
        (lambda m: m.run_with_cache(torch.zeros((1, 0), dtype=torch.long)), "input_ids hold no tokens"),
    ],
)
def test_bad_python_arguments_are_one_line_user_errors(gpt2, call, message):
    assert message in one_line_error(lambda: call(gpt2))


@pytest.mark.parametrize(
    "options, message",
    [
        # a float batch size failed after the run was opened: the run stayed 'recording' for ever
        ({"batch_size": 2.5}, "batch size must be a whole number of at least 1, not 2.5"),
        ({"batch_size": "8"}, "batch size must be a whole number of at least 1, not '8'"),
        ({"max_new_tokens": None}, "max new tokens must be a whole number of at least 1, not None"),
        ({"max_bytes": "1G"}, "max_bytes must be a whole number of at least 1, not '1G'"),
        # shard (0.5, 2) matched no example: a complete run of 0 examples
        ({"shard": (0.5, 2)}, "shard must be two whole numbers (I, N)"),
        ({"shard": "0/2"}, "shard must be two whole numbers (I, N)"),
        ({"if_exists": "replace"}, "if_exists must be error, resume or overwrite, not 'replace'"),
        # an empty list recorded every hook point of the model (run_with_cache refuses names=[])
        ({"hooks": []}, "hooks is empty"),
    ],
)
def test_bad_record_options_leave_the_store_as_it_was(gpt2, recorded, options, message):
    root, before = recorded
    options = {"hooks": "blocks.0.mlp.hook_post", **options}
    error = one_line_error(lambda: hp.record(gpt2, ROWS, str(root), run="r2", progress=False, **options))
    assert message in error
    assert checksums(root) == before and runs_of(root) == [("r1", "complete")]


def test_an_existing_run_without_resume_says_it_exists(gpt2, recorded):
    # it said "cannot resume run 'r1' with other hook points ... pass the same --hooks", though no resume was asked
    root, before = recorded
    error = one_line_error(lambda: hp.record(gpt2, ROWS, str(root), run="r1", hooks="blocks.0.*", progress=False))
    assert "run 'r1' already exists" in error and "if_exists='resume'" in error
    assert checksums(root) == before
    resumed = lambda: hp.record(gpt2, ROWS, str(root), run="r1", hooks="blocks.0.*", progress=False, if_exists="resume")  # noqa: E731
    assert "cannot resume run 'r1' with other hook points" in one_line_error(resumed)


def test_a_model_without_a_tokenizer_is_refused_before_the_store_is_touched(recorded, gpt2_dir, tmp_path, run_cli):
    # the run was opened (hooks written, logged 'recording'), then failed at its first batch
    root, before = recorded
    model = tmp_path / "no-tokenizer"
    shutil.copytree(gpt2_dir, model)
    for path in model.iterdir():
        if "token" in path.name or path.name in ("vocab.json", "merges.txt"):
            path.unlink()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "hello"}\n')
    code, _, err = run_cli(
        "record", "--model", str(model), "--data", str(manifest), "--store", str(root), "--run", "r2"
    )
    assert (
        code == 2
        and err.strip() == f"error: model {model} has no tokenizer: save one next to it (tokenizer.save_pretrained)"
    )
    assert checksums(root) == before and runs_of(root) == [("r1", "complete")]


@pytest.mark.parametrize(
    "manifest, extra, message",
    [
        ("id,text,text\na,x,y\n", (), "has two columns named 'text': rename or drop one"),  # KeyError, exit 1
        ('{"id": "a", "text": "x"}\n', ("--device", "mps"), "device must be auto, cpu, cuda or cuda:N, not 'mps'"),
    ],
)
def test_cli_bad_inputs_are_one_line(recorded, gpt2_dir, tmp_path, run_cli, manifest, extra, message):
    root, before = recorded
    path = tmp_path / ("m.csv" if manifest.startswith("id,") else "m.jsonl")
    path.write_text(manifest)
    code, _, err = run_cli(
        "record", "--model", str(gpt2_dir), "--data", str(path), "--store", str(root), "--run", "r2", *extra
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert checksums(root) == before


@pytest.mark.parametrize(
    "query, params, message",
    [
        (None, None, "SQL must be a string holding one SELECT, not NoneType"),  # a TypeError listing signatures
        ("SELECT $x", [1], "SQL params must be a dict of $name -> value, not list"),  # "Mixing named and ..."
    ],
)
def test_store_sql_refuses_wrong_types_in_one_line(recorded, query, params, message):
    root, before = recorded
    assert one_line_error(lambda: hp.Store.open(str(root)).sql(query, params)) == message
    assert checksums(root) == before


@pytest.mark.parametrize("run", [None, 5, ["r1"]])
def test_delete_run_takes_one_name(recorded, run):
    root, before = recorded
    error = one_line_error(lambda: hp.Store.open(str(root)).delete_run(run))
    assert error == f"delete_run takes one run name, not {run!r}"  # an Arrow kernel error before
    assert checksums(root) == before and runs_of(root) == [("r1", "complete")]


def test_label_columns_are_stored_as_delta_can_hold_them(gpt2, tmp_path):
    # float16 and uint8 200 failed at the first commit (a Rust backtrace, the run left 'failed'); a pandas
    # categorical or datetime (ns) column was refused once the store held that column (as text, as us)
    import pandas as pd
    import pyarrow as pa

    root = str(tmp_path / "store")
    columns = {
        "language": pa.array(["de", "en"]).dictionary_encode(),
        "h": pa.array(np.array([1.5, 2.0], np.float16)),
        "u8": pa.array([200, 1], pa.uint8()),
        "when": pa.array(pd.to_datetime(["2024-01-01", "2024-01-02"])),
    }
    table = pa.table({"id": ["a", "b"], "text": ["hello world", "hallo welt"], **columns})
    for run in ("r1", "r2"):
        hp.record(gpt2, table, root, run=run, hooks="blocks.0.mlp.hook_post", progress=False)
    assert runs_of(Path(root)) == [("r1", "complete"), ("r2", "complete")]
    rows = hp.Store.open(root).sql('SELECT language, h, u8, "when" FROM examples ORDER BY run, example_id')
    expected = {"language": ["de", "en"], "h": [1.5, 2.0], "u8": [200, 1]}
    for name, values in expected.items():
        assert rows[name].to_pylist() == values * 2
    assert [str(value.date()) for value in rows["when"].to_pylist()] == ["2024-01-01", "2024-01-02"] * 2
    before = checksums(Path(root))
    for name, column, message in [
        ("d", pa.array([1, 2], pa.duration("s")), "column 'd' holds duration[s], which the store (Delta Lake) cannot"),
        ("big", pa.array([2**63, 1], pa.uint64()), "column 'big' holds values over 2**63 - 1: store them as text"),
    ]:
        bad = pa.table({"id": ["a", "b"], "text": ["x", "y"], name: column})
        error = one_line_error(lambda bad=bad: hp.record(gpt2, bad, root, run="r3", progress=False))
        assert message in error
    assert checksums(Path(root)) == before


def test_a_retention_past_the_calendar_is_one_line(recorded, run_cli):
    # a Rust panic (chrono: "TimeDelta::hours out of bounds") with a stack backtrace
    root, before = recorded
    code, _, err = run_cli("store", "vacuum", str(root), "--retention-hours", "99999999999999", "--dry-run")
    assert code == 2 and err.strip() == (
        "error: retention 99999999999999 hours is more than 100 years: give at most 878400"
    ), err
    assert checksums(root) == before


def test_build_tiny_refuses_a_file_and_an_unknown_family(tmp_path):
    # onto a file: save_pretrained only logged it, and the file's path came back as a model folder
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    assert (
        one_line_error(lambda: hp.build_tiny("gpt2", path))
        == f"{path} is a file: give build_tiny a folder to write the model to"
    )
    assert path.read_text() == "keep me"
    assert "build_tiny knows the families gpt2, llama" in one_line_error(lambda: hp.build_tiny("t5", tmp_path / "t5"))


def test_a_fleurs_tsv_that_is_not_utf8_names_its_line(recorded, gpt2_dir, tmp_path, run_cli):
    # a UnicodeDecodeError (exit 1) before
    root, before = recorded
    folder = tmp_path / "fleurs" / "de_de"
    (folder / "audio" / "test").mkdir(parents=True)
    (folder / "test.tsv").write_bytes(b"1\ta.wav\thallo\tx\tp\t16000\tMALE\n2\tb.wav\tcaf\xe9\tx\tp\t16000\tMALE\n")
    args = ["record", "--model", str(gpt2_dir), "--data", str(tmp_path / "fleurs"), "--store", str(root), "--run", "f"]
    code, _, err = run_cli(*args)
    assert (
        code == 2
        and err.strip() == f"error: {folder / 'test.tsv'}, line 2: not UTF-8 (byte 0xe9); save the file as UTF-8"
    )
    assert checksums(root) == before


def test_an_empty_languages_option_is_refused(recorded, gpt2_dir, tmp_path, run_cli):
    # --languages "$LANGS" with LANGS unset recorded every language of the FLEURS folder
    root, before = recorded
    args = ["record", "--model", str(gpt2_dir), "--data", str(tmp_path), "--store", str(root), "--run", "f"]
    code, _, err = run_cli(*args, "--languages", " , ")
    assert code == 2 and err.strip() == (
        "error: --languages is empty: name the FLEURS languages (de_de,ja_jp), or leave it out for all"
    ), err
    assert checksums(root) == before


def test_record_languages_empty_is_refused(gpt2, recorded):
    root, before = recorded
    error = one_line_error(lambda: hp.record(gpt2, ROWS, str(root), run="r2", languages=[], progress=False))
    assert error == "languages is empty: name the FLEURS languages (['de_de']), or leave it out for all"
    assert checksums(root) == before


def test_a_negative_layer_counts_from_the_end_as_in_transformer_lens(gpt2):
    # cache["resid_post", -1] (TransformerLens' last layer) was a KeyError for 'blocks.-1.hook_resid_post'
    from tests.test_api_cache import transformer_lens_gpt2

    reference = transformer_lens_gpt2(gpt2)
    ids = gpt2.inputs([TEXTS[0]]).kwargs["input_ids"]
    with torch.inference_mode():
        _, expected = reference.run_with_cache(ids)
    _, cache = gpt2.run_with_cache(ids, names="blocks.*.hook_resid_post")
    for key in [("resid_post", -1), ("resid_post", -2)]:
        torch.testing.assert_close(cache[key], expected[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.pooled("mean")[key], cache[key].mean(1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "where, options, message",
    [
        (None, None, "a store is a folder or an s3://bucket/prefix URI, not NoneType"),
        (5, None, "a store is a folder or an s3://bucket/prefix URI, not int"),
        ("store", "x", "storage_options must be a dict of option -> value, not str"),  # a ValueError
    ],
)
def test_store_open_refuses_what_is_not_a_path(tmp_path, monkeypatch, where, options, message):
    # Store.open(None, create=True) made a store in a folder named "None"
    monkeypatch.chdir(tmp_path)
    error = one_line_error(lambda: hp.Store.open(where, create=True, storage_options=options))
    assert error == message and list(tmp_path.iterdir()) == []
