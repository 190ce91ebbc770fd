"""The bad-input matrix of round 4 (tests/test_hostile_entry_points.py), continued: the analyses and generation.
Each refusal is one ``UserError`` line naming the fix, and the store is left as it was (md5 of every file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hookpoints as hp
from tests.api_helpers import randomise
from tests.hostile_helpers import checksums, copied_store, one_line_error, recorded_store


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


@pytest.fixture(scope="module")
def seamless(tiny_model_dir):
    return hp.load(tiny_model_dir("seamless_m4t_v2"), modality="text")


def test_a_decoder_prompt_names_one_language_as_a_string(seamless):
    # "eng" was read as the languages e, n, g ("unknown target language 'e'")
    assert torch.equal(seamless.decoder_prompt("eng", task="t2tt"), seamless.decoder_prompt(["eng"], task="t2tt"))


def test_an_english_only_whisper_knows_english_without_a_language_token(tiny_model_dir):
    """The tiny Whisper (English-only, a hand-made tokenizer without <|en|>) said "unknown target language 'eng'
    ...; it knows: eng", then a KeyError for its missing <|notimestamps|>: its only language is known (the prompt
    of an English-only Whisper names none), and a tokenizer that is not Whisper's is a one-line error."""
    whisper = hp.load(tiny_model_dir("whisper"))
    assert whisper.languages == ["eng"] and whisper.language_token("eng") is None
    assert whisper.knows_language("eng") and not whisper.knows_language("deu")
    with pytest.raises(hp.UserError, match=r"^unknown target language 'deu' for model .*; it knows: eng$"):
        whisper.decoder_prompt(["deu"], task="asr")
    with pytest.raises(hp.UserError, match=r"^this Whisper's tokenizer has no <\|notimestamps\|> token: save"):
        whisper.decoder_prompt(["eng"], task="asr")


@pytest.mark.parametrize(
    "call, message",
    [
        # two prompt rows for one example generated two sequences without a word
        (
            lambda m, i, p: m.generate(i, p.repeat(2, 1), 3),
            "the decoder prompt has 2 rows for 1 examples: give one per example",
        ),
        (lambda m, i, p: m.generate(i, p[0], 3), "must be a [batch, tokens] tensor of token ids"),  # IndexError
        (lambda m, i, p: m.generate(i, p.float(), 3), "must be a [batch, tokens] tensor of token"),  # RuntimeError
        (lambda m, i, p: m.generate(i, p + 10**6, 3), "is out of range for"),  # IndexError
        (lambda m, i, p: m.generate(i, p, 2.5), "max new tokens must be a whole number of at least 1, not 2.5"),
        (lambda m, i, p: m.generate(i, p, None), "max new tokens must be a whole number of at least 1, not None"),
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
