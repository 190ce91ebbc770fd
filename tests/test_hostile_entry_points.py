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
from hookpoints.errors import UserError
from tests.api_helpers import randomise
from tests.hostile_helpers import checksums

TEXTS = ["the quick brown fox jumps over", "a lazy dog"]
ROWS = [{"id": f"e{i}", "text": text, "language": lang} for i, (text, lang) in enumerate(
    [("hello world", "en"), ("hallo welt", "de"), ("good day", "en"), ("guten tag", "de")])]  # fmt: skip


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    model = hp.load(tiny_model_dir("gpt2"))
    randomise(model)
    return model


@pytest.fixture
def recorded(gpt2, tmp_path):
    """A store holding run r1 (two hooks), with its checksums and runs before anything else."""
    root = tmp_path / "store"
    hp.record(gpt2, ROWS, str(root), run="r1", hooks="blocks.*.mlp.hook_post", progress=False)
    return root, checksums(root)


def runs_of(root: Path) -> list[tuple]:
    rows = hp.Store.open(str(root)).sql("SELECT run, status FROM runs ORDER BY run").to_pylist()
    return [(row["run"], row["status"]) for row in rows]


def one_line_error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


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
        (lambda m: m.edit("blocks.0.mlp.hook_post", [True, False], [0.0, 0.0]), "not torch.bool (a mask"),
        (lambda m: hp.ablate(np.array([True, False])), "for a boolean mask, pass mask.nonzero()"),
        (lambda m: hp.ablate([1.5]), "neuron indices must be whole numbers, not 1.5"),
        # NaN steering made every later activation NaN (NeuronEdit already refused NaN values)
        (lambda m: hp.steer(torch.full((256,), float("nan"))), "must be finite numbers"),
        (lambda m: hp.steer(torch.ones(256), scale=float("inf")), "must be finite numbers"),
        # TypeError / RuntimeError / AttributeError before
        (lambda m: m.edit("blocks.0.mlp.hook_post", None, [0.0]), "neurons must be whole numbers"),
        (lambda m: m.edit("blocks.0.mlp.hook_post", [1], "x"), "values real numbers"),
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
        ({"batch_size": 2.5}, "batch size must be at least 1 (a whole number), not 2.5"),
        ({"batch_size": "8"}, "batch size must be at least 1 (a whole number), not '8'"),
        ({"max_new_tokens": None}, "max new tokens must be at least 1 (a whole number), not None"),
        ({"max_bytes": "1G"}, "max_bytes must be at least 1 (a whole number), not '1G'"),
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


def test_analyses_take_one_name_for_a_list_and_a_store_path(recorded):
    # a string was read letter by letter ("there is no run '1'", "a label is given twice (l, a, n, ...)"), a store
    # path fell over with an AttributeError, and k=2.5 ranked the top 2 without a word
    root, before = recorded
    store = hp.Store.open(str(root))
    listed = hp.plan_ranking(store, ["r1"], presets=["unimodal"], hooks=["blocks.0.*"], ks=(2,))
    named = hp.plan_ranking(str(root), "r1", presets="unimodal", hooks="blocks.0.*", ks=2)
    assert named.group.runs == listed.group.runs == ("r1",) and named.ks == listed.ks == (2,)
    assert (
        [s.name for s in named.masks.label_sets]
        == [s.name for s in listed.masks.label_sets]
        == [
            "unimodal/de",
            "unimodal/en",
        ]
    )
    assert [h.hook for h in named.hooks] == [h.hook for h in listed.hooks] == ["blocks.0.mlp.hook_post"]
    settings = hp.ClusterSettings(labels="language", hooks="blocks.*", examples=("e0", "e1"), tsne=False)
    assert settings.labels == ("language",) and settings.hooks == ("blocks.*",)
    result = hp.cluster_layers(str(root), "r1", settings)
    assert [layer.hook.hook for layer in result.layers] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    with store.query() as session:
        examples = hp.select_examples(session, hp.open_runs(session, "r1"))
        hooks = hp.shared_hooks(session, "r1")
        one = hp.layer_magnitudes(session, examples, hooks, "language").to_pylist()
        assert one == hp.layer_magnitudes(session, examples, hooks, ["language"]).to_pylist()
        # by hand: mean over each language's examples of the mean activation of layer 0
        vectors = store.sql(
            "SELECT e.language, a.activation FROM activations a JOIN examples e USING (run, example_id) "
            "WHERE a.run = 'r1' AND a.hook = 'blocks.0.mlp.hook_post'"
        ).to_pylist()
        for language in ("de", "en"):
            expected = np.mean([np.mean(r["activation"]) for r in vectors if r["language"] == language])
            row = next(r for r in one if r["layer"] == 0 and r["language"] == language)
            assert row["magnitude"] == pytest.approx(expected, rel=1e-5)
    assert checksums(root) == before


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: hp.plan_ranking(s, ["r1"], presets=["unimodal"], ks=(2.5,)), "k must be whole numbers"),
        (lambda s: hp.plan_ranking(s, ["r1"], presets=["unimodal"], ks=("5",)), "k must be whole numbers"),
        (lambda s: hp.plan_ranking(s, ["r1"], custom=["language = 'de'"], ks=(2,)), "made by custom_label_set"),
        (lambda s: hp.plan_ranking(s, [1], presets=["unimodal"]), "runs must be a name or a list of names, not [1]"),
        (lambda s: hp.rank(s, None), "rank takes the job plan_ranking(...) returns, not NoneType"),
        (lambda s: hp.write_scores(s, None), "write_scores takes the ranking rank(...) returns"),
        (lambda s: hp.cluster_layers(s, ["r1"], hp.ClusterSettings(labels=("language",))), "give its name"),
        (lambda s: hp.ClusterSettings(labels=None), "labels must be a name or a list of names, not None"),
        (lambda s: hp.write_report(5), "store must be a Store (hp.Store.open(path)) or its path, not int"),
        (lambda s: hp.plan_ranking("/no/such/store", ["r1"], presets=["unimodal"]), "is not a hookpoints store"),
    ],
)
def test_bad_analysis_arguments_are_one_line_user_errors(recorded, call, message):
    root, before = recorded
    assert message in one_line_error(lambda: call(hp.Store.open(str(root))))
    assert checksums(root) == before


def test_layer_magnitudes_checks_its_group_columns(recorded):
    # an unknown column was a DuckDB Binder Error, an empty list a Parser Error
    root, _ = recorded
    store = hp.Store.open(str(root))
    with store.query() as session:
        examples = hp.select_examples(session, hp.open_runs(session, ["r1"]))
        hooks = hp.shared_hooks(session, ("r1",))
        error = one_line_error(lambda: hp.layer_magnitudes(session, examples, hooks, ["nope"]))
        assert error == "--by 'nope' is not a column of the examples table; it has text, language"
        default = hp.layer_magnitudes(session, examples, hooks, [])  # the default groups, as the CLI's --by
        assert default.to_pylist() == hp.layer_magnitudes(session, examples, hooks, ["language"]).to_pylist()


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


@pytest.fixture(scope="module")
def seamless(tiny_model_dir):
    return hp.load(tiny_model_dir("seamless_m4t_v2"), modality="text")


def test_a_decoder_prompt_names_one_language_as_a_string(seamless):
    # "eng" was read as the languages e, n, g ("unknown target language 'e'")
    assert torch.equal(seamless.decoder_prompt("eng", task="t2tt"), seamless.decoder_prompt(["eng"], task="t2tt"))


@pytest.mark.parametrize(
    "call, message",
    [
        # two prompt rows for one example generated two sequences without a word
        (
            lambda m, i, p: m.generate(i, p.repeat(2, 1), 3),
            "the decoder prompt has 2 rows, the inputs 1 examples: give one prompt row per example",
        ),
        (lambda m, i, p: m.generate(i, p[0], 3), "must be a [batch, tokens] id tensor"),  # IndexError
        (lambda m, i, p: m.generate(i, p.float(), 3), "must be a [batch, tokens] id tensor"),  # torch RuntimeError
        (lambda m, i, p: m.generate(i, p + 10**6, 3), "token ids outside the vocabulary"),  # IndexError
        (lambda m, i, p: m.generate(i, p, 2.5), "max new tokens must be at least 1 (a whole number), not 2.5"),
        (lambda m, i, p: m.generate(i, p, None), "max new tokens must be at least 1 (a whole number), not None"),
        (lambda m, i, p: m.generate(i, p, 3, edits=5), "edits must be a list of NeuronEdit"),  # TypeError
        (lambda m, i, p: m.generate_edited(i, p, None, 3), "edits must be a list of NeuronEdit"),
        (lambda m, i, p: m.decode(None), "decode takes what generate returns, not NoneType"),
        (lambda m, i, p: m.decoder_prompt(["eng"], task="nope"), "task must be one of"),  # accepted before
        (lambda m, i, p: m.decoder_prompt([], task="t2tt"), "decoder_prompt takes a list of target languages"),
        # a string was read letter by letter: three texts 'a', 'b', 'c'
        (lambda m, i, p: m.source_inputs("abc", ["deu"] * 3), "source_inputs takes a list of texts"),
        (lambda m, i, p: m.source_inputs(["a", "b"], ["deu"]), "source_inputs takes a list of texts"),  # ValueError
        (lambda m, i, p: m.source_inputs(["a"], ["xx"]), "unknown source language 'xx'"),  # RuntimeError
    ],
)
def test_bad_generation_arguments_are_one_line_user_errors(seamless, call, message):
    inputs = seamless.source_inputs(["Das Wetter ist schön."], ["deu"])
    prompt = seamless.decoder_prompt(["eng"], task="t2tt")
    assert message in one_line_error(lambda: call(seamless, inputs, prompt))


def test_a_bad_sweep_name_is_named_as_such(recorded, run_cli):
    # it said "label set name 'a b' is not allowed", an option the command was not given
    root, before = recorded
    args = ["intervene", "--store", str(root), "--run", "r1", "--task", "t2tt", "--type", "unimodal"]
    code, _, err = run_cli(*args, "--sweep", "a b")
    assert code == 2 and err.startswith("error: sweep name (--sweep) 'a b' is not allowed: use letters"), err
    assert len(err.strip().splitlines()) == 1 and checksums(root) == before


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


def test_a_sweep_spec_takes_one_name_for_a_list():
    # runs="r1" was read as runs "r" and "1" (the ranking key "1+r"), tasks="t2tt" as tasks t, 2, t, t
    spec = hp.SweepSpec("sw", runs="r1", tasks="t2tt", neuron_types="unimodal", languages="de", ks=5)
    listed = hp.SweepSpec("sw", runs=("r1",), tasks=("t2tt",), neuron_types=("unimodal",), languages=("de",), ks=(5,))
    assert spec == listed
    assert "runs must be a name or a list of names, not None" in one_line_error(
        lambda: hp.SweepSpec("sw", runs=None, tasks=("t2tt",))
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda s: hp.selected_neurons(s, "r1", "unimodal/de", 5),
        lambda s: hp.layer_counts(s, "r1", "unimodal/de", "lm", 5),
        lambda s: hp.ap_summary(s, "r1", ["unimodal/de"]),
        lambda s: hp.overlap(s, ("r1", ["unimodal/de"]), ("r1", ["unimodal/en"]), "lm", 5, "top"),
    ],
)
def test_selections_of_a_store_never_ranked_say_so(recorded, call):
    # "SQL failed: Catalog Error: Table with name scores does not exist! Did you mean "hooks"?"
    root, _ = recorded
    with hp.Store.open(str(root)).query() as session:
        error = one_line_error(lambda: call(session))
    assert error == "this store has no scores table yet: rank neurons first with hookpoints ap"


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
