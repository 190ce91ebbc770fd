"""Counts, Gini, overlaps and neuron lists read from the scores table, against the in-memory ranking."""

from __future__ import annotations

import numpy as np
import pytest
from hookpoints.analyses import gini
from hookpoints.analyses.magnitudes import example_groups
from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
from hookpoints.analyses.selection import (
    ap_summary,
    layer_counts,
    overlap,
    panel_of,
    panel_shares,
    selected_neurons,
    selection_gini,
    stored_sets,
)
from hookpoints.store.catalog import Store
from selectivity_helpers import DECODER, ENCODER, examples_table, hook_rows, write_run

import hookpoints as hp
from hookpoints.errors import UserError

K = 6


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("selection") / "store", create=True)
    speech = examples_table(8, "speech", seed=1, prefix="s")
    text = examples_table(8, "text", seed=2, prefix="t")
    write_run(store, "s2tt", speech, hook_rows("speech_encoder", 3, ENCODER) + hook_rows("text_decoder", 3, DECODER))
    write_run(store, "t2tt", text, hook_rows("text_encoder", 3, ENCODER) + hook_rows("text_decoder", 3, DECODER))
    job = plan_ranking(store, ["s2tt", "t2tt"], presets=["unimodal", "modality"], ks=(K, 2 * K))
    result = rank(store, job)
    write_scores(store, result)
    return store, result


def cells(result, s: int, side: str) -> dict[tuple[int, str], int]:
    """Selected neurons per (layer, submodule), from the ranking arrays (independent of SQL)."""
    chosen = result.selected(s, "text_decoder", K, side)
    counts: dict[tuple[int, str], int] = {}
    for i in chosen:
        hook = result.job.hooks[result.neuron_hook[i]]
        counts[hook.layer, hook.submodule] = counts.get((hook.layer, hook.submodule), 0) + 1
    return counts


def test_counts_per_layer_and_submodule_and_their_gini(ranked):
    store, result = ranked
    names = [ls.name for ls in result.job.masks.label_sets]
    with store.query() as session:
        for s, name in enumerate(names):
            counts = layer_counts(session, "s2tt+t2tt", name, "text_decoder", K)
            assert counts.num_rows == 3 * len(DECODER)  # every cell, also the empty ones
            for side in ("top", "bottom"):
                got = {(r["layer"], r["submodule"]): r[side] for r in counts.to_pylist() if r[side]}
                assert got == cells(result, s, side)
                assert sum(counts[side].to_pylist()) == K
                full = [got.get((layer, sub), 0) for layer in range(3) for sub in DECODER]
                assert selection_gini(counts, side) == pytest.approx(gini(full))
                per_sub = [sum(got.get((layer, sub), 0) for layer in range(3)) for sub in DECODER]
                assert selection_gini(counts, side, "submodule") == pytest.approx(gini(per_sub))
                shares = panel_shares(counts, side, "text_decoder")
                assert sum(shares.values()) == K and set(shares) <= {"attention", "ffn"}
        with pytest.raises(UserError, match="larger than module group"):
            layer_counts(session, "s2tt+t2tt", names[0], "text_decoder", 10_000)


def test_overlap_matrix_equals_set_intersections(ranked):
    store, result = ranked
    names = [ls.name for ls in result.job.masks.label_sets]
    rows = [n for n in names if n.startswith("unimodal/speech/")]
    cols = [n for n in names if n.startswith("unimodal/text/")]
    with store.query() as session:
        for side in ("top", "bottom"):
            got = overlap(session, ("s2tt+t2tt", rows), ("s2tt+t2tt", cols), "text_decoder", K, side)
            for i, a in enumerate(rows):
                for j, b in enumerate(cols):
                    sa = set(result.selected(names.index(a), "text_decoder", K, side))
                    sb = set(result.selected(names.index(b), "text_decoder", K, side))
                    assert got.counts[i, j] == len(sa & sb)
            diagonal = overlap(session, ("s2tt+t2tt", rows), ("s2tt+t2tt", rows), "text_decoder", K, side)
            assert (np.diag(diagonal.counts) == K).all()


def test_selected_neurons_and_stored_sets(ranked):
    store, result = ranked
    with store.query() as session:
        sets = stored_sets(session, "s2tt+t2tt", ["modality/*"])
        assert [s.label_set for s in sets] == ["modality/speech", "modality/text"]
        assert sets[0].components == {"text_decoder": sum(DECODER.values()) * 3}
        both = selected_neurons(session, "s2tt+t2tt", "modality/speech", K, side="both")
        s = [ls.name for ls in result.job.masks.label_sets].index("modality/speech")
        expected = set(result.selected(s, "text_decoder", K, "top")) | set(
            result.selected(s, "text_decoder", K, "bottom")
        )
        names = {(result.job.hooks[result.neuron_hook[i]].hook, int(result.neuron_index[i])) for i in expected}
        assert {(r["hook"], r["neuron"]) for r in both.to_pylist()} == names
        with pytest.raises(UserError, match="no ranking of run"):
            stored_sets(session, "s2tt")
        with pytest.raises(UserError, match="matches no label set"):
            stored_sets(session, "s2tt+t2tt", ["multimodal/*"])
        with pytest.raises(UserError, match="side must be top or bottom"):
            selected_neurons(session, "s2tt+t2tt", "modality/speech", K, side="middle")


def test_ap_summary_equals_the_ranking(ranked):
    store, result = ranked
    names = [ls.name for ls in result.job.masks.label_sets]
    with store.query() as session:
        summary = {(r["label_set"], r["component"]): r for r in ap_summary(session, "s2tt+t2tt", names)}
    assert len(summary) == len(names)
    inside = np.flatnonzero(result.component_mask("text_decoder"))
    for s, name in enumerate(names):
        row, ap = summary[name, "text_decoder"], result.ap[s, inside]
        assert (row["max_ap"], row["min_ap"]) == (ap.max(), ap.min())
        assert row["median_ap"] == pytest.approx(np.median(ap))
        best = inside[np.argmax(ap)]  # first of any tie: the hook order breaks ties
        hook = result.job.hooks[result.neuron_hook[best]].hook
        assert row["best_neuron"] == f"{hook}[{result.neuron_index[best]}]"
        assert (row["n_positive"], row["n_among"]) == (result.job.masks.n_positive[s], result.job.masks.n_among[s])


@pytest.mark.parametrize(
    ("submodule", "panel"),
    [
        ("self_attn_layer_norm", "attention"),
        ("cross_attention.k_proj", "attention"),
        ("self_attn.linear_q", "attention"),
        ("ffn1_layer_norm", "ffn"),
        ("ffn.fc1", "ffn"),
        ("ffn2.intermediate_dense", "ffn"),
        ("conv_module.pointwise_conv1", "convolution"),
        ("conv_module.layer_norm", "convolution"),
        ("mlp.hook_pre", "ffn"),
        ("attn.hook_q", "attention"),
        ("hook_resid_pre", "other"),
    ],
)
def test_panels_follow_the_papers_figures(submodule, panel):
    assert panel_of(submodule) == panel


def test_report_components_filter_the_overlaps_and_an_unknown_one_is_refused(tmp_path):
    """--component nope printed an empty summary (0 rows) and the overlaps of every module group; the overlaps
    ignored --component altogether."""
    import pyarrow as pa
    from hookpoints.analyses.ap_report import selectivity_report

    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(4, "speech", seed=1, prefix="s")
    texts = examples_table(4, "text", seed=2, prefix="t")
    both = pa.concat_tables([examples, texts])
    write_run(store, "r", both, hook_rows("text_encoder", 2, ENCODER) + hook_rows("text_decoder", 2, DECODER))
    write_scores(store, rank(store, plan_ranking(store, ["r"], presets=["unimodal"], ks=(3,))))
    names = [f"unimodal/{m}/{lang}" for m in ("speech", "text") for lang in ("de", "en", "ja")]
    every = selectivity_report(store, "r", names, 3)
    assert {o.component for o in every.overlaps} == {"text_encoder", "text_decoder"}
    decoder = selectivity_report(store, "r", names, 3, components=["text_decoder"])
    assert {row.component for row in decoder.rows} == {o.component for o in decoder.overlaps} == {"text_decoder"}
    with store.query() as session:  # the decoder's overlap: intersections of the stored top-3 sets
        rows = session.sql(
            "SELECT label_set, hook, neuron FROM scores WHERE component = 'text_decoder' AND top_rank <= 3"
        ).to_pylist()
    chosen = {name: {(r["hook"], r["neuron"]) for r in rows if r["label_set"] == name} for name in names}
    expected = [[len(chosen[a] & chosen[b]) for b in names[3:]] for a in names[:3]]
    (top,) = [o for o in decoder.overlaps if o.side == "top"]
    assert top.result.counts.tolist() == expected
    with pytest.raises(UserError, match="component 'nope' is not ranked in run.* it has text_encoder, text_decoder"):
        selectivity_report(store, "r", names, 3, components=["nope"])


def test_a_modules_input_and_output_hooks_are_two_cells_of_the_gini(tmp_path):
    """A module's input hook (``...mlp.act:input``, bare module paths) had the module's path as its submodule,
    as its output hook: their selected neurons were summed into one cell (paper 5.2: a cell is layer l x
    submodule m, m one hooked activation)."""
    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(6, "text", seed=4)
    hooks = []
    for layer in range(2):
        for io, width in (("output", 5), ("input", 7)):
            module = f"transformer.h.{layer}.mlp.act"
            hooks += hook_rows("lm", 1, {"mlp.act": width}, layer_output=False)
            hooks[-1].update(hook=module + (":input" if io == "input" else ""), module=module, io=io, layer=layer)
    write_run(store, "r", examples, hooks)
    job = plan_ranking(store, ["r"], presets=["unimodal"], ks=(K,))
    write_scores(store, rank(store, job))
    with store.query() as session:
        scores = session.sql("SELECT label_set, layer, hook, top_rank, bottom_rank FROM scores").to_pandas()
        for name in scores["label_set"].unique():
            counts = layer_counts(session, "r", name, "lm", K)
            assert sorted(counts["submodule"].to_pylist()) == ["mlp.act", "mlp.act", "mlp.act:input", "mlp.act:input"]
            rows = scores[scores["label_set"] == name]
            for side in ("top", "bottom"):
                per_hook = (rows[f"{side}_rank"] <= K).groupby(rows["hook"]).sum().to_numpy(np.float64)  # 4 cells
                x = np.sort(per_hook)
                n = len(x)
                expected = float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * x.sum()))
                assert selection_gini(counts, side) == pytest.approx(expected, abs=1e-12)
                by_submodule = [
                    per_hook[[h.endswith(":input") for h in sorted(rows["hook"].unique())]].sum(),
                    per_hook[[not h.endswith(":input") for h in sorted(rows["hook"].unique())]].sum(),
                ]
                assert selection_gini(counts, side, "submodule") == pytest.approx(gini(by_submodule), abs=1e-12)


def test_label_sets_given_as_one_name_or_unknown_are_not_read_as_nothing(ranked):
    """A string was read letter by letter and an unknown label set, run or component matched no row: ap_summary
    came back [] and overlap a matrix of zeros (one row per letter), without a word."""
    from hookpoints.analyses.ap_report import selectivity_report

    store, result = ranked
    names = [ls.name for ls in result.job.masks.label_sets]
    speech, text = "unimodal/speech/de", "unimodal/text/de"
    with store.query() as session:
        assert ap_summary(session, "s2tt+t2tt", speech) == ap_summary(session, "s2tt+t2tt", [speech])
        one = overlap(session, ("s2tt+t2tt", speech), ("s2tt+t2tt", text), "text_decoder", K, "top")
        listed = overlap(session, ("s2tt+t2tt", [speech]), ("s2tt+t2tt", [text]), "text_decoder", K, "top")
        s, t = names.index(speech), names.index(text)
        expected = len(
            set(result.selected(s, "text_decoder", K, "top")) & set(result.selected(t, "text_decoder", K, "top"))
        )
        assert one.counts.tolist() == listed.counts.tolist() == [[expected]]
        with pytest.raises(UserError, match=r"label set 'nope' is not ranked in run\(s\) 's2tt\+t2tt'; it has "):
            ap_summary(session, "s2tt+t2tt", [speech, "nope"])
        with pytest.raises(UserError, match=r"label set 'nope' is not ranked"):
            overlap(session, ("s2tt+t2tt", ["nope"]), ("s2tt+t2tt", [text]), "text_decoder", K, "top")
        with pytest.raises(UserError, match=r"ranks no neuron of component 'nope'; it ranks "):
            overlap(session, ("s2tt+t2tt", [speech]), ("s2tt+t2tt", [text]), "nope", K, "top")
        with pytest.raises(UserError, match=r"k=100000 is larger than module group text_decoder"):
            overlap(session, ("s2tt+t2tt", [speech]), ("s2tt+t2tt", [text]), "text_decoder", 100_000, "top")
        with pytest.raises(UserError, match=r"a \(run, label sets\) pair"):
            overlap(session, "s2tt+t2tt", ("s2tt+t2tt", [text]), "text_decoder", K, "top")
    report = selectivity_report(store, "s2tt+t2tt", speech, K, components="text_decoder", overlaps=False)
    assert [(row.label_set, row.component) for row in report.rows] == [(speech, "text_decoder")]


@pytest.mark.parametrize(
    "call, message",
    [  # each was an AttributeError / TypeError / IndexError before
        (lambda st, s, j: hp.custom_label_set(5), "--positive must be a SQL boolean expression (a string), not int"),
        (lambda st, s, j: hp.custom_label_set("language = 'de'", ["x"]), "--among must be a SQL boolean expression"),
        (lambda st, s, j: hp.custom_label_set("language = 'de'", name=5), "label set name 5 is not allowed"),
        (lambda st, s, j: hp.custom_label_set("language = 'de'", name="x" * 200), "at most 128 characters"),
        (lambda st, s, j: hp.plan_ranking(st, ["s2tt"], presets=["unimodal"], where=5), "--where must be a SQL"),
        (
            lambda st, s, j: hp.plan_ranking(st, ["s2tt"], presets=["unimodal"], language_column=None),
            "language_column must be the name of an examples column, not None",
        ),
        (lambda st, s, j: hp.plan_ranking(st, ["s2tt"], custom=5), "custom takes label sets made by custom_label_set"),
        (lambda st, s, j: hp.rank(st, j, memory_bytes=None), "memory_bytes must be a whole number of at least 1"),
        (lambda st, s, j: hp.rank(st, j, threads="2"), "threads must be a whole number of at least 1, not '2'"),
        (lambda st, s, j: hp.shared_hooks(s, []), "give at least one run"),
        (
            lambda st, s, j: hp.activation_gini(
                st, j.examples, j.hooks, example_groups(s, j.examples, []), memory_bytes=None
            ),
            "memory_bytes must be a whole number of at least 1, not None",
        ),
        (lambda st, s, j: hp.select_hooks(j.hooks, None, "of run 'r'"), "hook patterns must be a name or a list"),
        (lambda st, s, j: hp.selected_neurons(s, "s2tt+t2tt", None, K), "label_set must be the name of a ranked"),
        (
            lambda st, s, j: hp.overlap(
                s, ("s2tt+t2tt", ["modality/speech"]), ("s2tt+t2tt", ["modality/text"]), [], K, "top"
            ),
            "component must be the name of a module group",
        ),
    ],
)
def test_arguments_of_the_wrong_type_are_one_line_user_errors(ranked, call, message):
    store, result = ranked
    with store.query() as session, pytest.raises(UserError) as caught:
        call(store, session, result.job)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_wrong_table_given_to_a_figure_or_summary_names_the_function_that_makes_the_right_one(ranked):
    """Each was a KeyError ('Field "top" does not exist in schema'), and a component the magnitudes table lacks
    drew an empty figure without a word."""
    import pyarrow as pa

    store, _ = ranked
    with store.query() as session:
        listed = selected_neurons(session, "s2tt+t2tt", "modality/speech", K)
        counts = layer_counts(session, "s2tt+t2tt", "modality/speech", "text_decoder", K)
    magnitudes = pa.table(
        {"component": ["lm"], "layer": [0], "language": ["de"], "magnitude": [1.0], "deviation": [0.0]}
    )
    cases = [
        (lambda: selection_gini(listed, "top"), "no column 'top': pass the table layer_counts(...) returns"),
        (lambda: selection_gini(counts.drop(["submodule"]), "top", "submodule"), "no column 'submodule'"),
        (lambda: hp.distribution_figure(listed, "text_decoder", K, "t"), "pass the table layer_counts(...) returns"),
        (lambda: hp.distribution_figure(None, "text_decoder", K, "t"), "not NoneType"),
        (lambda: hp.magnitude_figure(counts, ["language"], "lm", 1.0, "t"), "layer_magnitudes(...) returns"),
        (lambda: hp.magnitude_figure(magnitudes, "modality", "lm", 1.0, "t"), "no column 'modality'"),
        (
            lambda: hp.magnitude_figure(magnitudes, ["language"], "nope", 1.0, "t"),
            "no rows of component 'nope'; it has lm",
        ),
        (lambda: hp.activation_gini_figure(magnitudes, ["language"], "lm", "t"), "no column 'gini'"),
        (lambda: hp.score_table(counts), "pass the table run_sweep(...) or sweep(...) returns"),
        (lambda: hp.figure5(counts, "t"), "pass the table run_sweep(...) or sweep(...) returns"),
    ]
    for call, message in cases:
        with pytest.raises(UserError) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value)
    assert selection_gini(counts, "top") == pytest.approx(gini(np.array(counts["top"].to_pylist(), float)))
