"""Bad input to the AP ranking gets one clear error, before anything is written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hookpoints.analyses.labels import LabelSet, custom_label_set
from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
from hookpoints.store.catalog import Store
from hookpoints.store.schema import CORE_TABLES
from selectivity_helpers import DECODER, ENCODER, examples_table, hook_rows, planted_values, write_run

from hookpoints.errors import UserError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("errors") / "store", create=True)
    speech = examples_table(4, "speech", seed=1, prefix="s")
    text = examples_table(4, "text", seed=2, prefix="t")
    write_run(store, "s2tt", speech, hook_rows("speech_encoder", 1, ENCODER) + hook_rows("text_decoder", 1, DECODER))
    write_run(store, "t2tt", text, hook_rows("text_encoder", 1, ENCODER) + hook_rows("text_decoder", 1, DECODER))
    write_run(store, "positions", text, hook_rows("text_decoder", 1, DECODER), pooling="none")
    write_run(store, "last", text, hook_rows("text_decoder", 1, DECODER), pooling="last")
    nan_hooks = hook_rows("text_decoder", 1, DECODER)
    values = {h["hook"]: planted_values(text, h["width"], 3) for h in nan_hooks}
    values["text_decoder.layers.0.ffn.fc1"][2, 4] = np.nan
    write_run(store, "nan", text, nan_hooks, values=values)
    values = {h["hook"]: planted_values(text, h["width"], 3) for h in nan_hooks}
    values["text_decoder.layers.0.ffn.fc1"][5, 4] = -np.inf
    write_run(store, "inf", text, nan_hooks, values=values)
    unlabelled = hook_rows("text_decoder", 1, DECODER)
    values = {h["hook"]: planted_values(text, h["width"], 4) for h in unlabelled}
    write_run(store, "unlabelled", text.drop_columns(["language", "modality"]), unlabelled, values=values)
    write_run(store, "partial", text, hook_rows("text_decoder", 1, DECODER))
    extra = pa.table({"run": ["partial"], "example_id": ["late"], "text": ["x"], "language": ["de"]})
    store.append(CORE_TABLES["examples"], extra, merge_schema=True)  # an example recorded nowhere
    return store


def positive(text: str, among: str | None = None) -> list[LabelSet]:
    return [custom_label_set(text, among)]


@pytest.mark.parametrize(
    ("runs_given", "kwargs", "message"),
    [
        (["s2tt"], {"custom": positive("language = 'xx'")}, "has no positive examples"),
        (["s2tt"], {"custom": positive("language IS NOT NULL")}, "has no negative examples"),
        (["s2tt"], {"custom": positive("language = 'de'", "language = 'de'")}, "has no negative examples"),
        (["s2tt"], {"custom": positive("language = 'de'", "modality = 'text'")}, "matches no example"),
        (["s2tt"], {"custom": positive("lang = 'de'")}, "lang.* does not work on the examples.*language"),
        (["s2tt"], {"custom": positive("language")}, "not true/false"),
        (["s2tt"], {"custom": positive("language = 'de'"), "where": "nope > 1"}, "--where"),
        (["s2tt"], {"custom": positive("language = 'de'") * 2}, "given twice"),
        (["s2tt"], {}, "no label sets"),
        (["s2tt"], {"presets": ["modality"]}, "shared decoder"),
        (["s2tt"], {"presets": ["nonsense"]}, "unknown preset"),
        (["s2tt"], {"presets": ["unimodal"], "language_column": "lang"}, "--language-column"),
        (["unlabelled"], {"presets": ["unimodal"]}, "column 'language' holds none"),
        (["s2tt", "t2tt"], {"presets": ["multimodal"], "modality_column": "mod"}, "--modality-column"),
        (["s2tt"], {"presets": ["unimodal"], "ks": (1000,)}, "k=1000 is larger than module group speech_encoder"),
        (["s2tt"], {"presets": ["unimodal"], "ks": (0,)}, "at least 1"),
        (["s2tt"], {"presets": ["unimodal"], "hooks": ["nothing.*"]}, "matches no hook point"),
        (["s2tt", "t2tt"], {"presets": ["unimodal"], "components": ["speech_encoder"]}, "saw one modality"),
        (["s2tt"], {"presets": ["unimodal"], "components": ["vision"]}, "not among the hook points"),
        (["nope"], {"presets": ["unimodal"]}, "there is no run 'nope'"),
        ([], {"presets": ["unimodal"]}, "at least one --run"),
        (["positions"], {"presets": ["unimodal"]}, "pooling none"),
        (["s2tt", "last"], {"presets": ["unimodal"]}, "must share their pooling"),
    ],
)
def test_bad_input_is_refused_before_reading(runs, runs_given, kwargs, message):
    with pytest.raises(UserError, match=message):
        plan_ranking(runs, runs_given, **{"ks": (2,), **kwargs})


def test_a_predicate_that_does_not_parse_is_refused_when_given():
    with pytest.raises(UserError, match="--positive .* does not parse as SQL"):
        positive("language = = 'de'")


@pytest.mark.parametrize("run", ["nan", "inf"])
def test_non_finite_activations_name_the_hook_and_nothing_is_written(runs, run):
    job = plan_ranking(runs, [run], presets=["unimodal"], ks=(2,))
    with pytest.raises(UserError, match=r"hook text_decoder.layers.0.ffn.fc1 .* NaN or infinite .*\[4\]"):
        rank(runs, job)
    assert "scores" not in runs.table_names() or runs.dataset("scores").count_rows(filter=pc.field("run") == run) == 0


def test_examples_without_activations_are_named(runs):
    job = plan_ranking(runs, ["partial"], custom=positive("language = 'de'"), ks=(2,))
    with pytest.raises(UserError, match="no activations at .* for 1 of its 13 examples .*'late'.*--resume"):
        rank(runs, job)
    narrowed = plan_ranking(
        runs, ["partial"], custom=positive("language = 'de'"), where="example_id <> 'late'", ks=(2,)
    )
    write_scores(runs, rank(runs, narrowed))
    assert runs.dataset("scores").count_rows() == narrowed.n_neurons
