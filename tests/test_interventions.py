"""Intervention sweeps over a real (tiny) recording: selections, values from the store, scores, the command.

One store for the module: the tiny SeamlessM4T v2 records S2TT (12 espeak-ng utterances) and T2TT (6
sentences) of the corpus' first meaning, and the decoder is ranked in the paper's four settings.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hookpoints.analyses.interventions import (
    Selection,
    explicit_selection,
    random_selection,
    replacement_values,
    scored_selection,
)
from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
from hookpoints.analyses.text_scores import corpus_scores, sentence_scores
from hookpoints.store.catalog import Store
from sacrebleu.metrics import BLEU, CHRF

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import record

RANKING = "s2tt+t2tt"


@pytest.fixture(scope="module")
def swept(tiny_model_dir, corpus, tmp_path_factory):
    model_dir = tiny_model_dir("seamless_m4t_v2")
    store = Store.open(tmp_path_factory.mktemp("interventions") / "store", create=True)
    for run, modality, path in (("s2tt", "speech", corpus.speech), ("t2tt", "text", corpus.text)):
        model = load(model_dir, modality=modality)
        manifest = read_manifest(path, required=("audio",) if modality == "speech" else ("text",))
        hooks = ["text_decoder.layers.*.ffn.fc1", "text_decoder.layers.*.cross_attention.v_proj"]
        record(model, manifest, store, run, hooks=hooks, task=run, max_new_tokens=6, batch_size=6)
    write_scores(store, rank(store, plan_ranking(store, ["s2tt", "t2tt"], presets=["all"], ks=(5, 10))))
    return store, model_dir


def _activations(store: Store, run: str, hook: str, where: str = "TRUE") -> np.ndarray:
    with store.query() as session:
        rows = session.sql(
            f"""SELECT a.activation FROM activations a JOIN examples e USING (run, example_id)
                WHERE a.run = '{run}' AND a.hook = '{hook}' AND {where}"""
        )["activation"].to_pylist()
    return np.array(rows, np.float64)  # [examples, width]


def test_scored_selection_is_the_top_k_by_ap(swept):
    store, _ = swept
    with store.query() as session:
        selection = scored_selection(session, RANKING, "unimodal/speech/de", 5, "top")
        scores = session.sql(
            f"SELECT hook, neuron, ap FROM scores WHERE run = '{RANKING}' AND label_set = 'unimodal/speech/de'"
        ).to_pylist()
        both = scored_selection(session, RANKING, "unimodal/speech/de", 5, "both")
    chosen = set(zip(selection.neurons["hook"].to_pylist(), selection.neurons["neuron"].to_pylist(), strict=True))
    inside = [r["ap"] for r in scores if (r["hook"], r["neuron"]) in chosen]
    outside = [r["ap"] for r in scores if (r["hook"], r["neuron"]) not in chosen]
    assert len(inside) == 5 and min(inside) >= max(outside)  # the 5 highest APs (ties broken by hook order)
    assert selection.per_component() == {"text_decoder": 5} and both.neurons.num_rows == 10


def test_medians_and_means_come_from_the_store(swept):
    store, _ = swept
    with store.query() as session:
        selection = scored_selection(session, RANKING, "multimodal/ja", 10, "both")
        medians = replacement_values(session, selection, "median", run="s2tt")
        means_ja = replacement_values(session, selection, "mean", run="s2tt", where="language = 'ja'")
        steer = replacement_values(session, selection, "steer", run="s2tt", where="language = 'ja'", value=2.0)
        assert np.array_equal(replacement_values(session, selection, "zero"), np.zeros(20))
        assert np.array_equal(replacement_values(session, selection, "constant", value=1.5), np.full(20, 1.5))
        with pytest.raises(UserError, match="--stats-where \"langauge = 'ja'\" does not work on the examples"):
            replacement_values(session, selection, "mean", run="s2tt", where="langauge = 'ja'")
    hooks, neurons = selection.neurons["hook"].to_pylist(), selection.neurons["neuron"].to_pylist()
    for i, (hook, neuron) in enumerate(zip(hooks, neurons, strict=True)):
        every = _activations(store, "s2tt", hook)[:, neuron]
        ja = _activations(store, "s2tt", hook, "e.language = 'ja'")[:, neuron]
        assert len(every) == 12 and len(ja) == 2
        assert medians[i] == pytest.approx(np.median(every), rel=1e-6, abs=1e-7)
        assert means_ja[i] == pytest.approx(ja.mean(), rel=1e-6, abs=1e-7)
        assert steer[i] == pytest.approx(2.0 * (ja.mean() - every.mean()), rel=1e-5, abs=1e-6)


def test_random_neurons_match_counts_and_seed(swept):
    store, _ = swept
    with store.query() as session:
        like = scored_selection(session, RANKING, "modality/text", 10, "top")
        a = random_selection(session, RANKING, like, seed=1234)
        b = random_selection(session, RANKING, like, seed=1234)
        c = random_selection(session, RANKING, like, seed=7)
        universe = session.sql(
            f"SELECT hook, neuron FROM scores WHERE run = '{RANKING}' AND label_set = 'modality/text'"
        )
    assert a.per_component() == like.per_component() == {"text_decoder": 10}
    assert a.neurons.equals(b.neurons) and not a.neurons.equals(c.neurons)
    assert a.seed == 1234 and a.matched == "modality/text"
    pairs = list(zip(a.neurons["hook"].to_pylist(), a.neurons["neuron"].to_pylist(), strict=True))
    ranked = set(zip(universe["hook"].to_pylist(), universe["neuron"].to_pylist(), strict=True))
    assert len(set(pairs)) == 10 and set(pairs) <= ranked


def test_bad_selections_are_refused(swept):
    store, _ = swept
    with store.query() as session:
        with pytest.raises(UserError, match="k=5000 is larger than module group text_decoder"):
            scored_selection(session, RANKING, "unimodal/speech/de", 5000, "top")
        with pytest.raises(UserError, match="matches no label set"):
            scored_selection(session, RANKING, "unimodal/speech/xx", 5, "top")
        # a --type names no label set itself: the error says which one it reads and what writes it
        with pytest.raises(UserError, match="--type unimodal reads label set unimodal/speech/xx: .*--preset unimodal"):
            scored_selection(session, RANKING, "unimodal/speech/xx", 5, "top", "unimodal")
        with pytest.raises(UserError, match="has no ranking of run"):
            scored_selection(session, "nope", "unimodal/speech/de", 5, "top")
        selection = scored_selection(session, RANKING, "unimodal/speech/de", 5, "top")
        with pytest.raises(UserError, match="empty subset"):
            replacement_values(session, selection, "median", run="s2tt", where="language = 'xx'")
        with pytest.raises(UserError, match="needs --value"):
            replacement_values(session, selection, "constant")
        with pytest.raises(UserError, match="did not record hook"):
            replacement_values(session, _explicit("text_decoder.layers.0.ffn.fc2:1"), "median", run="s2tt")
    with pytest.raises(UserError, match="out of range for hook .*width 4"):
        explicit_selection(["h.fc1:1,4"], {"h.fc1": ("text_decoder", 4)})
    with pytest.raises(UserError, match="no hook point 'h.fc9'"):
        explicit_selection(["h.fc9:1"], {"h.fc1": ("text_decoder", 4)})
    with pytest.raises(UserError, match="write HOOK:INDICES"):
        explicit_selection(["h.fc1"], {"h.fc1": ("text_decoder", 4)})


def _explicit(spec: str) -> Selection:
    return explicit_selection([spec], {spec.split(":")[0]: ("text_decoder", 128)})


def test_scores_equal_sacrebleu_and_jiwer():
    import jiwer

    refs = ["The cat sat on the mat.", "A dog runs in the park!"]
    hyps = ["the cat sat on a mat", "a dog ran in park"]
    scores = corpus_scores("s2tt", refs, hyps, "eng")
    bleu, chrf = BLEU().corpus_score(hyps, [refs]).score, CHRF().corpus_score(hyps, [refs]).score
    assert scores["bleu"] == pytest.approx(bleu) and scores["chrf"] == pytest.approx(chrf)
    assert scores["score"] == pytest.approx(0.6 * bleu + 0.4 * chrf) and scores["metric"] == "combined"
    asr = corpus_scores("asr", refs, hyps, "en")
    assert asr["metric"] == "wer"
    assert asr["score"] == pytest.approx(jiwer.wer(["the cat sat on the mat", "a dog runs in the park"], hyps))
    zh = corpus_scores("asr", ["今天天气很好。"], ["今天天汽很好"], "zh")
    assert zh["metric"] == "cer" and zh["score"] == pytest.approx(jiwer.cer(["今天天气很好"], ["今天天汽很好"]))
    assert corpus_scores("asr", ["x"], ["x"], "ja_jp")["metric"] == "cer"
    # BCP 47 / Common Voice codes: zh-CN is Mandarin (CER, BLEU tokenised as zh), ja-JP Japanese
    cv = corpus_scores("asr", ["今天天气很好。"], ["今天天汽很好"], "zh-CN")
    assert cv["metric"] == "cer" and cv["score"] == pytest.approx(zh["score"])
    assert corpus_scores("asr", ["x"], ["x"], "ja-JP")["metric"] == "cer"
    zh_refs, zh_hyps = ["今天天气很好。"], ["今天天气不错。"]
    assert corpus_scores("t2tt", zh_refs, zh_hyps, "zh-CN")["bleu"] == pytest.approx(
        BLEU(tokenize="zh").corpus_score(zh_hyps, [zh_refs]).score
    )
    one = sentence_scores("t2tt", refs[0], hyps[0], "eng")
    expected = BLEU(effective_order=True).sentence_score(hyps[0], [refs[0]]).score
    assert one["bleu"] == pytest.approx(expected)


@pytest.mark.parametrize(("language", "metric"), [("en", "wer"), ("zh", "cer")])
def test_a_reference_empty_after_normalisation_counts_its_hypothesis_as_insertions(language, metric):
    """A reference that normalises to nothing ("…", "¿?") was dropped from the corpus WER/CER with its
    hypothesis: a condition that made the model babble on such examples scored as if it had not. jiwer counts
    the hypothesis' words (characters) as insertions over the other references' words; so do the scores now."""
    import jiwer

    refs = ["The cat sat on the mat.", "…", "今天天气很好。"]
    hyps = ["the cat sat on a mat", "and then some words", "今天天汽很好"]
    normalised = ([" ".join(r.lower().strip(".").split()) for r in refs[:1]] + ["", "今天天气很好"], hyps)
    if metric == "cer":
        normalised = tuple([t.replace(" ", "") for t in texts] for texts in normalised)
    expected = (jiwer.cer if metric == "cer" else jiwer.wer)(*normalised)
    scores = corpus_scores("asr", refs, hyps, language)
    assert scores["metric"] == metric and scores["error_rate"] == pytest.approx(expected)
    assert expected > (jiwer.cer if metric == "cer" else jiwer.wer)(normalised[0][::2], normalised[1][::2])
    assert sentence_scores("asr", refs[1], hyps[1], language)["score"] is None  # no rate of one empty reference
    with pytest.raises(UserError, match="every reference is empty after normalisation: nothing to score"):
        corpus_scores("asr", ["…", "?"], hyps[:2], language)


def test_intervene_command_stores_and_plots(swept, run_cli, tmp_path):
    store, model_dir = swept
    args = ["intervene", "--store", str(store.location.uri), "--run", "s2tt", "--run", "t2tt"]
    args += ["--task", "s2tt", "--task", "t2tt", "--type", "unimodal", "--type", "modality", "--type", "random"]
    args += ["--k", "5", "--k", "10", "--language", "de", "--language", "ja", "--max-new-tokens", "6"]
    args += ["--model", str(model_dir), "--sweep", "t", "--plots", str(tmp_path / "plots")]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert (tmp_path / "plots" / "interventions-t.png").is_file()
    with store.query() as session:
        per_condition = session.sql(
            """SELECT task, condition, count(*) AS n, count(DISTINCT language) AS languages, any_value(n_neurons) AS k
               FROM interventions WHERE sweep = 't' GROUP BY ALL ORDER BY ALL"""
        ).to_pylist()
        rows = session.sql(
            "SELECT task, language, reference, generated_text, bleu, chrf, score FROM interventions WHERE sweep = 't'"
        ).to_pylist()
        edited = session.sql(
            """SELECT condition, task, language, count(*) AS n, bool_and(NOT add) AS set
               FROM intervention_neurons WHERE sweep = 't' GROUP BY ALL"""
        ).to_pylist()
        scores = session.sql("SELECT * FROM intervention_scores WHERE sweep = 't'").to_pylist()
    # s2tt: 2 speech utterances per language; t2tt: 1 sentence per language; 7 conditions each
    conditions = {"none", "unimodal/top/k=5", "modality/top/k=5", "random/k=5"}
    conditions |= {c.replace("k=5", "k=10") for c in conditions if c != "none"}
    assert {r["condition"] for r in per_condition} == conditions
    assert {(r["task"], r["n"], r["languages"]) for r in per_condition} == {("s2tt", 4, 2), ("t2tt", 2, 2)}
    assert all(r["k"] == (0 if r["condition"] == "none" else int(r["condition"].split("=")[1])) for r in per_condition)
    for row in rows:  # sentence scores recomputed from the stored texts
        bleu = BLEU(effective_order=True).sentence_score(row["generated_text"], [row["reference"]]).score
        chrf = CHRF().sentence_score(row["generated_text"], [row["reference"]]).score
        assert row["bleu"] == pytest.approx(bleu) and row["score"] == pytest.approx(0.6 * bleu + 0.4 * chrf)
    assert {r["n"] for r in edited if "k=5" in r["condition"]} == {5} and all(r["set"] for r in edited)
    assert len(scores) == 2 * 2 * 7 and {s["seed"] for s in scores if s["neuron_type"] == "random"} == {1234}
    assert "intervention scores (t)" in " ".join(out.split())


def test_intervene_bad_input_writes_nothing(swept, run_cli):
    store, model_dir = swept
    base = ["intervene", "--store", str(store.location.uri), "--run", "s2tt", "--run", "t2tt", "--task", "t2tt"]
    base += ["--model", str(model_dir), "--max-new-tokens", "4", "--language", "de"]
    cases = [
        (["--k", "100000", "--sweep", "b1"], "is larger than module group text_decoder"),
        (["--k", "5", "--stats-where", "language = 'xx'", "--sweep", "b2"], "empty subset"),
        (["--k", "5", "--neurons", "text_decoder.layers.0.ffn.fc1:100000", "--sweep", "b3"], "out of range"),
        (["--k", "5", "--neurons", "text_decoder.layers.9.ffn.fc1:1", "--sweep", "b4"], "no hook point"),
        (["--k", "5", "--type", "random", "--sweep", "b5"], "random neurons match the counts"),
        (["--k", "5", "--language", "xx", "--sweep", "b6"], "no example in language 'xx'"),
        (["--k", "5", "--kind", "constant", "--sweep", "b7"], "needs --value"),
        (["--k", "5", "--sweep", "bad name!"], "label set name|not allowed"),
        (["--k", "5", "--sweep", "b8", "--plots", "/proc/plots"], "cannot write plots to /proc/plots"),  # was: after
    ]
    for extra, message in cases:
        code, _, err = run_cli(*base, *extra)
        assert code != 0 and any(m in err for m in message.split("|")), (extra, err)
        assert "Traceback" not in err
    with store.query() as session:
        if "interventions" in store.table_names():
            names = session.sql("SELECT DISTINCT sweep FROM interventions")["sweep"].to_pylist()
            assert not any(name.startswith("b") for name in names)
    # a sweep name already in the store is refused
    code, _, _ = run_cli(*base, "--k", "5", "--sweep", "dup")
    assert code == 0
    code, _, err = run_cli(*base, "--k", "5", "--sweep", "dup")
    assert code != 0 and "already in the store" in err


def test_a_non_finite_statistics_row_is_refused_not_ranked_into_the_median(tmp_path):
    """An inf in one example's activation made DuckDB's median rank it as the largest value and come out finite."""
    from selectivity_helpers import examples_table, hook_rows, write_run

    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(2, "speech", seed=1)
    hooks = hook_rows("text_decoder", 1, {"ffn.fc1": 3}, layer_output=False)
    hook = hooks[0]["hook"]
    values = np.arange(18, dtype=np.float32).reshape(6, 3)
    values[1, 1] = np.inf
    write_run(store, "r", examples, hooks, values={hook: values})
    bad = examples["example_id"][1].as_py()
    with store.query() as session:
        for kind in ("median", "mean"):
            with pytest.raises(UserError, match=r"holds NaN or infinite activations of .*ffn.fc1\[1\]"):
                replacement_values(session, _explicit(f"{hook}:1,2"), kind, run="r")
        # neuron 2 is finite everywhere, and neuron 1 without the bad example: numpy's median
        assert replacement_values(session, _explicit(f"{hook}:2"), "median", run="r") == pytest.approx(
            [np.median(values[:, 2])]
        )
        kept = replacement_values(session, _explicit(f"{hook}:1"), "median", run="r", where=f"example_id <> '{bad}'")
    assert kept == pytest.approx([np.median(np.delete(values[:, 1], 1))])


def test_default_unimodal_type_finds_a_ranking_without_modality_column(tmp_path):
    """A manifest without a modality column ranks unimodal/{language}; the sweep's default --type unimodal asked
    for unimodal/speech/{language} and stopped with "matches no label set"."""
    from hookpoints.analyses.intervention_sweep import SweepSpec, _conditions
    from selectivity_helpers import examples_table, hook_rows, write_run

    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(4, None, seed=1)  # language only
    hooks = hook_rows("text_decoder", 2, {"ffn.fc1": 6}, layer_output=False)
    values = write_run(store, "fwd", examples, hooks)
    write_scores(store, rank(store, plan_ranking(store, ["fwd"], presets=["unimodal"], ks=(3,))))
    spec = SweepSpec("sw", runs=("fwd",), tasks=("asr",), ks=(3,))
    common = {"stats_run": "fwd", "stats_where": None}
    with store.query() as session:
        conditions = _conditions(session, spec, "fwd", common, "speech", "de", None)
        top = session.sql(
            "SELECT hook, neuron FROM scores WHERE label_set = 'unimodal/de' AND top_rank <= 3 ORDER BY hook, neuron"
        ).to_pylist()
    names = [c.fields["condition"] for c in conditions]
    assert names == ["none", "unimodal/top/k=3", "random/k=3"]
    unimodal = conditions[1]
    assert unimodal.fields["label_set"] == "unimodal/de"
    neurons = unimodal.selection.neurons
    chosen = list(zip(neurons["hook"].to_pylist(), neurons["neuron"].to_pylist(), strict=True))
    assert chosen == [(r["hook"], r["neuron"]) for r in top]
    expected = [np.median(values[hook][:, neuron].astype(np.float64)) for hook, neuron in chosen]
    assert unimodal.values == pytest.approx(expected, rel=1e-6)
    assert conditions[2].selection.per_component() == {"text_decoder": 3}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "constant", "value": float("nan")}, "--value must be a finite number, not nan"),
        ({"kind": "steer", "value": float("inf"), "stats_where": "language = 'de'"}, "--value must be a finite"),
        ({"seed": -1}, "--seed must be a non-negative integer, not -1"),
        ({"frames": 0}, "--frames must be at least 1, not 0"),  # was a RuntimeError from torch's narrow / reshape
        ({"frames": -1}, "--frames must be at least 1, not -1"),
        ({"value": 3.0}, "--value is for --kind constant or steer; --kind median does not use it"),  # was ignored
        ({"kind": "zero", "value": 0.0}, "--kind zero does not use it"),
    ],
)
def test_sweep_options_that_would_edit_with_nan_or_fail_in_numpy_are_refused(options, message):
    """--value nan replaced the neurons with NaN without a word; --seed -1 failed deep in numpy's default_rng
    ("ValueError: expected non-negative integer") after the models were loaded."""
    from hookpoints.analyses.sweep_spec import SweepSpec, check_spec

    with pytest.raises(UserError, match=message):
        check_spec(SweepSpec("sw", runs=("s2tt",), tasks=("s2tt",), ks=(5,), **options))


def test_each_label_set_is_its_own_neuron_type_and_line_of_figure_5(tmp_path):
    """Two --label-set selections were both neuron_type 'label-set' (or both their preset, e.g. 'unimodal' for
    unimodal/speech/{language} and unimodal/text/{language}): Figure 5 and the report averaged them into one line."""
    from hookpoints.analyses.figures_interventions import mean_by_type
    from hookpoints.analyses.intervention_sweep import SweepSpec, _conditions
    from hookpoints.analyses.labels import custom_label_set
    from selectivity_helpers import examples_table, hook_rows, write_run

    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(4, "speech", seed=1)
    write_run(store, "fwd", examples, hook_rows("text_decoder", 2, {"ffn.fc1": 6}, layer_output=False))
    custom = [custom_label_set("language = 'de'", name="is-de"), custom_label_set("language <> 'de'", name="not-de")]
    write_scores(store, rank(store, plan_ranking(store, ["fwd"], presets=["unimodal"], custom=custom, ks=(3,))))
    spec = SweepSpec(
        "sw", runs=("fwd",), tasks=("asr",), ks=(3,), label_sets=("is-de", "not-de", "unimodal/speech/{language}")
    )
    with store.query() as session:
        conditions = _conditions(session, spec, "fwd", {"stats_run": "fwd", "stats_where": None}, "speech", "de", None)
    types = {c.fields["condition"]: c.fields["neuron_type"] for c in conditions}
    assert types == {
        "none": "none",
        "label-set:is-de/top/k=3": "label-set:is-de",
        "label-set:not-de/top/k=3": "label-set:not-de",
        "label-set:unimodal/speech/de/top/k=3": "label-set:unimodal/speech/{language}",
        "random/k=3": "random",
    }
    scores = pa.Table.from_pylist(
        [{"task": "asr", "metric": "wer", "neuron_type": t, "k": 3 if t != "none" else 0, "score": float(i)}
         for i, t in enumerate(types.values())]
    )  # fmt: skip
    lines, none, _ = mean_by_type(scores, "asr")
    assert none == 0.0 and {name: line[3] for name, line in lines.items()} == {
        "label-set:is-de": 1.0, "label-set:not-de": 2.0, "label-set:unimodal/speech/{language}": 3.0, "random": 4.0
    }  # fmt: skip


def test_score_table_averages_a_templated_label_set_over_languages_like_figure_5():
    from hookpoints.analyses.figures_interventions import mean_by_type
    from hookpoints.analyses.sweeps import score_table

    rows = []
    for language, base in (("de", 1.0), ("ja", 3.0)):
        for condition, neuron_type, side, k, shift in (
            ("none", "none", None, 0, 0.0),
            (f"label-set:unimodal/speech/{language}/top/k=5", "label-set:unimodal/speech/{language}", "top", 5, 0.5),
            ("random/k=5", "random", None, 5, 0.25),
        ):
            rows.append({"task": "asr", "condition": condition, "neuron_type": neuron_type, "side": side, "k": k,
                         "n_neurons": k, "metric": "wer", "language": language, "score": base + shift})  # fmt: skip
    table = score_table(pa.Table.from_pylist(rows))
    means = {row["condition"]: row["mean"] for row in table}
    assert means == {"none": 2.0, "label-set:unimodal/speech/{language}/top/k=5": 2.5, "random/k=5": 2.25}
    lines, none, _ = mean_by_type(pa.Table.from_pylist(rows), "asr")
    assert none == 2.0 and lines["label-set:unimodal/speech/{language}"][5] == 2.5 and lines["random"][5] == 2.25


def test_score_table_mean_is_the_rounded_mean_of_the_scores_as_in_the_report():
    """The CLI's mean column averaged the scores after rounding each to 3 decimals: 0.001 for scores whose mean is
    0.0017, where the report (SQL round(avg(score), 3)) and Figure 5 said 0.002."""
    from hookpoints.analyses.sweeps import score_table

    scores = {"de": 0.0014, "es": 0.0014, "ja": 0.0024}
    rows = [
        {"task": "s2tt", "condition": "none", "neuron_type": "none", "side": None, "k": 0, "n_neurons": 0,
         "metric": "combined", "language": language, "score": score}
        for language, score in scores.items()
    ]  # fmt: skip
    (row,) = score_table(pa.Table.from_pylist(rows))
    assert row["mean"] == round(float(np.mean(list(scores.values()))), 3) == 0.002
    assert [row[language] for language in scores] == [0.001, 0.001, 0.002]


def test_a_sweep_stops_before_a_cell_once_its_runs_changed(swept):
    """A run changed during a sweep (a teammate's overwrite, delete or resume: its event count moves) stops it
    before the next cell is stored, in one line that says how many cells are stored; nothing more is written."""
    from hookpoints.analyses.intervention_sweep import SweepSpec, plan_sweep, run_sweep
    from hookpoints.store.run_marks import RunMarks

    store, model_dir = swept
    spec = SweepSpec("marks", runs=("s2tt", "t2tt"), tasks=("t2tt",), ks=(5,), languages=("de", "ja"),
                     max_new_tokens=4, model=str(model_dir))  # fmt: skip
    cells = plan_sweep(store, spec, lambda model, modality: load(model, modality=modality))
    assert len(cells) == 2 and cells[0].marks.changed(store) is None  # planned from the runs as they are
    stale = RunMarks({**cells[1].marks.events, "t2tt": cells[1].marks.events["t2tt"] - 1})  # as if t2tt moved on
    cells[1].marks = stale
    with pytest.raises(UserError, match=r"^run 't2tt' changed during sweep 'marks' .*: 1 of its 2 \(task, language\)"):
        run_sweep(store, spec, cells)
    with store.query() as session:
        stored = session.sql("SELECT DISTINCT language FROM interventions WHERE sweep = 'marks'")["language"]
    assert stored.to_pylist() == [cells[0].language]


def test_an_overwrite_of_a_sweep_whose_runs_changed_since_planning_deletes_nothing(swept):
    """--overwrite deletes the sweep's stored rows before its first cell: a run changed between planning and
    that delete is refused first, so the sweep's earlier rows stay (they had been deleted and nothing stored)."""
    from hookpoints.analyses.intervention_sweep import SweepSpec, plan_sweep, run_sweep
    from hookpoints.store.run_marks import RunMarks

    store, model_dir = swept
    options = {"runs": ("s2tt", "t2tt"), "tasks": ("t2tt",), "ks": (5,), "languages": ("de",), "max_new_tokens": 4}
    spec = SweepSpec("kept", model=str(model_dir), **options)
    run_sweep(store, spec, plan_sweep(store, spec, lambda model, modality: load(model, modality=modality)))

    def stored() -> list[dict]:
        with store.query() as session:
            return session.sql("SELECT * FROM interventions WHERE sweep = 'kept' ORDER BY condition").to_pylist()

    before = stored()
    assert before
    again = SweepSpec("kept", model=str(model_dir), if_exists="overwrite", **options)
    cells = plan_sweep(store, again, lambda model, modality: load(model, modality=modality))
    stale = RunMarks({**cells[0].marks.events, "s2tt": cells[0].marks.events["s2tt"] - 1})  # as if s2tt moved on
    for cell in cells:
        cell.marks = stale
    with pytest.raises(UserError, match=r"^run 's2tt' changed during sweep 'kept' .*: 0 of its 1 \(task, language\)"):
        run_sweep(store, again, cells)
    assert stored() == before
