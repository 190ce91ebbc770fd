"""AP ranking over the store: APs equal sklearn's per neuron, ranks within module groups, the scores table."""

from __future__ import annotations

import numpy as np
import pytest
from hookpoints.analyses import ranking as ranking_module
from hookpoints.analyses.hook_matrix import neuron_slices
from hookpoints.analyses.labels import LabelSet, custom_label_set
from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
from hookpoints.store.catalog import Store
from selectivity_helpers import DECODER, ENCODER, examples_table, hook_rows, write_run
from sklearn.metrics import average_precision_score

from hookpoints.errors import UserError

SUMMARY = "SELECT label_set, count(*) AS n, max(ks) AS ks, max(computed_at) AS at FROM scores GROUP BY label_set"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A speech run (speech encoder + decoder, float32, tied values) and a text run (text encoder + decoder,
    float16): the decoder is what they share."""
    store = Store.open(tmp_path_factory.mktemp("ranking") / "store", create=True)
    speech = examples_table(12, "speech", seed=1, prefix="s")
    text = examples_table(10, "text", seed=2, prefix="t")
    speech_hooks = hook_rows("speech_encoder", 2, ENCODER) + hook_rows("text_decoder", 3, DECODER)
    text_hooks = hook_rows("text_encoder", 2, ENCODER) + hook_rows("text_decoder", 3, DECODER)
    values = {
        "s2tt": (speech, write_run(store, "s2tt", speech, speech_hooks, seed=0, ties=True)),
        "t2tt": (text, write_run(store, "t2tt", text, text_hooks, seed=50, dtype="float16")),
    }
    return store, values


def matrix(values, job, hook: str) -> np.ndarray:
    """The hook's activations ``[examples, width]`` in the job's example order, from what was written."""
    rows = []
    table = job.examples.table
    for run, example_id in zip(table["run"].to_pylist(), table["example_id"].to_pylist(), strict=True):
        examples, written = values[run]
        vector = written[hook][examples["example_id"].to_pylist().index(example_id)]
        rows.append(vector.astype(np.float16).astype(np.float32) if run == "t2tt" else vector)
    return np.array(rows)


def test_aps_equal_sklearn_for_every_neuron_and_label_set(two_runs):
    store, values = two_runs
    custom = custom_label_set("language = 'ja' OR example_id LIKE 's%'", "language <> 'en'", "ja-or-speech")
    job = plan_ranking(store, ["t2tt", "s2tt"], presets=["all"], custom=[custom], ks=(5, 10))
    assert job.group.key == "s2tt+t2tt"
    assert {h.component for h in job.hooks} == {"text_decoder"}  # the hooks both runs share
    assert len(job.examples) == 3 * 12 + 3 * 10
    assert len(job.masks.label_sets) == 1 + 6 + 3 + 2 + 6
    result = rank(store, job, memory_bytes=4 * 66 * 2)  # two neurons per slice: many reads per hook
    offset = 0
    for hook in job.hooks:
        x = matrix(values, job, hook.hook)
        for s in range(len(job.masks.label_sets)):
            among, positive = job.masks.among[s], job.masks.positive[s]
            expected = [average_precision_score(positive[among], x[among, j]) for j in range(hook.width)]
            np.testing.assert_allclose(result.ap[s, offset : offset + hook.width], expected, rtol=1e-12)
        offset += hook.width


def test_ranks_are_global_within_each_module_group(two_runs):
    store, _ = two_runs
    job = plan_ranking(store, ["s2tt"], presets=["unimodal"], ks=(5, 20))
    assert [c for c in job.components] == ["speech_encoder", "text_decoder"]
    result = rank(store, job)
    for component in job.components:
        inside = np.flatnonzero(result.component_mask(component))
        for s in range(len(job.masks.label_sets)):
            ap = result.ap[s, inside]
            # independent ranking: by AP, ties by position (hook order, then neuron)
            top = np.empty(len(inside), int)
            top[sorted(range(len(inside)), key=lambda i: (-ap[i], i))] = np.arange(1, len(inside) + 1)
            bottom = np.empty(len(inside), int)
            bottom[sorted(range(len(inside)), key=lambda i: (ap[i], i))] = np.arange(1, len(inside) + 1)
            np.testing.assert_array_equal(result.top_rank[s, inside], top)
            np.testing.assert_array_equal(result.bottom_rank[s, inside], bottom)
            chosen = result.selected(s, component, 5, "top")
            assert len(chosen) == 5 and ap.max() == result.ap[s, chosen].max()
            assert result.ap[s, chosen].min() >= np.sort(ap)[-5]


def test_scores_table_rows_and_atomic_replacement(two_runs, monkeypatch):
    store, _ = two_runs
    job = plan_ranking(store, ["s2tt"], presets=["unimodal"], ks=(5, 20))
    result = rank(store, job)
    write_scores(store, result)
    with store.query() as session:
        rows = session.sql(
            "SELECT * FROM scores WHERE run = 's2tt' AND label_set = 'unimodal/speech/de' "
            "ORDER BY component, hook, neuron"
        ).to_pylist()
        s = [ls.name for ls in job.masks.label_sets].index("unimodal/speech/de")
        hook_names = np.array([job.hooks[i].hook for i in result.neuron_hook])
        order = np.lexsort((result.neuron_index, hook_names, result.component_mask("text_decoder")))
        assert len(rows) == job.n_neurons
        np.testing.assert_array_equal([r["ap"] for r in rows], result.ap[s, order])
        np.testing.assert_array_equal([r["top_rank"] for r in rows], result.top_rank[s, order])
        first = rows[0]
        assert first["runs"] == ["s2tt"] and first["preset"] == "unimodal" and first["ks"] == [5, 20]
        assert first["n_positive"] == 12 and first["n_among"] == 36 and first["among"] == "\"modality\" = 'speech'"
        for r in rows:
            expected_top = 5 if r["top_rank"] <= 5 else 20 if r["top_rank"] <= 20 else None
            assert r["top_k"] == expected_top
            assert r["group_size"] == sum(h.width for h in job.hooks if h.component == r["component"])
        counts = session.sql(
            "SELECT component, count(*) AS n FROM scores WHERE run = 's2tt' AND label_set = 'unimodal/speech/de' "
            "AND bottom_rank <= 20 GROUP BY component ORDER BY component"
        ).to_pylist()
        assert counts == [{"component": "speech_encoder", "n": 20}, {"component": "text_decoder", "n": 20}]
        before = session.sql(SUMMARY).sort_by("label_set")

    # a failed re-run (here: the writer dies after the first label set) leaves every old row in place
    monkeypatch.setattr(ranking_module, "score_batches", _failing_after_one(ranking_module.score_batches))
    with pytest.raises(Exception, match="disk full"):
        write_scores(store, result)
    monkeypatch.undo()
    with store.query() as session:
        assert session.sql(SUMMARY).sort_by("label_set").equals(before)

    # ranking one label set again replaces its rows only
    again = plan_ranking(store, ["s2tt"], custom=[LabelSet("unimodal/speech/de", "language = 'de'")], ks=(5,))
    write_scores(store, rank(store, again))
    with store.query() as session:
        after = {r["label_set"]: r for r in session.sql(SUMMARY).to_pylist()}
        old = {r["label_set"]: r for r in before.to_pylist()}
        assert after["unimodal/speech/de"]["n"] == job.n_neurons and after["unimodal/speech/de"]["ks"] == [5]
        assert after["unimodal/speech/de"]["at"] > old["unimodal/speech/de"]["at"]
        assert after["unimodal/speech/en"]["at"] == old["unimodal/speech/en"]["at"]


def _failing_after_one(original):
    def batches(ranking, computed_at=None):
        stream = original(ranking, computed_at)
        yield next(stream)
        raise RuntimeError("disk full")

    return batches


def test_where_narrows_the_examples(two_runs):
    store, values = two_runs
    custom = [custom_label_set("language = 'de'")]
    job = plan_ranking(store, ["s2tt"], where="language <> 'ja'", custom=custom, ks=(3,))
    assert len(job.examples) == 24
    result = rank(store, job)
    hook = job.hooks[0]
    x = matrix(values, job, hook.hook)
    expected = [average_precision_score(job.masks.positive[0], x[:, j]) for j in range(hook.width)]
    np.testing.assert_allclose(result.ap[0, : hook.width], expected, rtol=1e-12)


def test_a_hook_wider_than_the_memory_budget_is_read_in_neuron_slices(tmp_path):
    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(7, "text", seed=3)
    values = write_run(store, "wide", examples, hook_rows("lm", 1, {"mlp.hook_post": 40}, layer_output=False))
    job = plan_ranking(store, ["wide"], presets=["unimodal"], ks=(3,))
    whole = rank(store, job)
    budget = 2 * 4 * len(job.examples) * 16  # two 16-neuron slices in memory
    assert [(p.start, p.stop) for p in neuron_slices(40, len(job.examples), budget // 2)] == [
        (0, 16),
        (16, 32),
        (32, 40),
    ]
    sliced = rank(store, job, memory_bytes=budget)
    np.testing.assert_array_equal(sliced.ap, whole.ap)
    x = values["lm.layers.0.mlp.hook_post"]
    order = np.argsort(examples["example_id"].to_numpy(zero_copy_only=False))  # the job's example order
    for s in range(len(job.masks.label_sets)):
        y = job.masks.positive[s]
        expected = [average_precision_score(y, x[order, j]) for j in range(40)]
        np.testing.assert_allclose(sliced.ap[s], expected, rtol=1e-12)


def test_presets_skip_a_language_missing_from_one_modality(two_runs):
    """X -> English translation data has no English text: the unimodal and language-modality presets used to
    build unimodal/text/en anyway and refuse the whole ranking ("has no positive examples")."""
    store, values = two_runs
    where = "NOT (language = 'en' AND modality = 'text')"
    job = plan_ranking(store, ["s2tt", "t2tt"], presets=["all"], where=where, ks=(5,))
    names = [ls.name for ls in job.masks.label_sets]
    assert "unimodal/text/en" not in names and "language-modality/text/en" not in names
    assert {"unimodal/speech/en", "language-modality/speech/en", "multimodal/en", "unimodal/text/de"} <= set(names)
    assert len(names) == 5 + 3 + 2 + 5  # unimodal, multimodal, modality, language-modality
    ranking = rank(store, job)
    assert len(job.examples) == 3 * 12 + 2 * 10
    table = job.examples.table
    language = {
        (run, i): lang
        for run, (examples, _) in values.items()
        for i, lang in zip(examples["example_id"].to_pylist(), examples["language"].to_pylist(), strict=True)
    }
    runs, ids = table["run"].to_pylist(), table["example_id"].to_pylist()
    labels = np.array([run == "t2tt" and language[run, i] == "de" for run, i in zip(runs, ids, strict=True)])
    among = np.array([run == "t2tt" for run in runs])
    hook = job.hooks[0].hook
    x = matrix(values, job, hook)
    s = names.index("unimodal/text/de")
    for j in range(x.shape[1]):
        assert ranking.ap[s, j] == pytest.approx(average_precision_score(labels[among], x[among, j]), abs=1e-12)


def test_preset_languages_skip_nulls_even_beside_a_manifest_column_named_v(tmp_path):
    """The distinct languages were filtered with the alias ``v IS NOT NULL``, which a manifest column ``v``
    shadows: a null language became a label set ``language = 'None'`` (multimodal/none) and the ranking was
    refused."""
    import pyarrow as pa

    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(3, "speech", seed=1)
    languages = examples["language"].to_pylist()
    languages[0] = None
    examples = examples.set_column(2, "language", pa.array(languages)).append_column("v", pa.array(["x"] * 9))
    hooks = hook_rows("text_decoder", 1, DECODER)
    rng = np.random.default_rng(0)
    write_run(store, "r", examples, hooks, values={h["hook"]: rng.normal(size=(9, h["width"])) for h in hooks})
    job = plan_ranking(store, ["r"], presets=["unimodal"], ks=(3,))
    names = [ls.name for ls in job.masks.label_sets]
    assert names == ["unimodal/speech/de", "unimodal/speech/en", "unimodal/speech/ja"]
    with store.query() as session:  # what multimodal / language-modality build their sets from
        assert job.examples.values(session, "language") == ["de", "en", "ja"]


def test_preset_languages_skip_nulls_under_a_where_with_or(tmp_path):
    """The distinct languages (and language x modality pairs) were read with ``... IS NOT NULL AND {where}``:
    a --where with OR bound looser than the AND, so a null language came back, became a label set
    ``language = 'None'`` (unimodal/speech/none) and the ranking was refused."""
    import pyarrow as pa

    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(3, "speech", seed=1)
    languages = examples["language"].to_pylist()
    languages[0] = None
    examples = examples.set_column(2, "language", pa.array(languages))
    hooks = hook_rows("text_decoder", 1, DECODER)
    rng = np.random.default_rng(0)
    write_run(store, "r", examples, hooks, values={h["hook"]: rng.normal(size=(9, h["width"])) for h in hooks})
    where = "language <> 'ja' OR modality = 'speech'"  # every example, the null-language one included
    job = plan_ranking(store, ["r"], presets=["unimodal"], where=where, ks=(3,))
    assert [ls.name for ls in job.masks.label_sets] == [
        "unimodal/speech/de",
        "unimodal/speech/en",
        "unimodal/speech/ja",
    ]
    with store.query() as session:
        assert job.examples.values(session, "language") == ["de", "en", "ja"]
        assert job.examples.pairs(session, "language", "modality") == {
            ("de", "speech"),
            ("en", "speech"),
            ("ja", "speech"),
        }


def test_unimodal_without_a_modality_column_refuses_runs_of_both_modalities(tmp_path):
    """Examples without a modality column from a speech run and a text run: --preset unimodal ranked
    unimodal/{language} over both at once (the multimodal setting under a unimodal name), silently."""
    from hookpoints.store.writer import HookRows, open_run

    store = Store.open(tmp_path / "store", create=True)
    hooks = hook_rows("text_decoder", 1, DECODER)
    rng = np.random.default_rng(0)
    for run, modality in (("s2tt", "speech"), ("t2tt", "text")):
        examples = examples_table(3, None, seed=1, prefix=run)  # language only
        writer = open_run(
            store, run, settings={"model": "m", "task": run, "pooling": "mean", "dtype": "float32"},
            config={"modality": modality}, hooks=hooks, examples_schema=examples.schema,
        )  # fmt: skip
        ids = examples["example_id"].to_pylist()
        writer.add(
            examples, {h["hook"]: HookRows(ids, rng.normal(size=(9, h["width"])).astype(np.float32)) for h in hooks}
        )
        writer.finish()
    with pytest.raises(UserError, match=r"s2tt \(speech\), t2tt \(text\) read different modalities.*one --run"):
        plan_ranking(store, ["s2tt", "t2tt"], presets=["unimodal"], ks=(3,))
    job = plan_ranking(store, ["s2tt"], presets=["unimodal"], ks=(3,))  # one run: one modality, as before
    assert [ls.name for ls in job.masks.label_sets] == ["unimodal/de", "unimodal/en", "unimodal/ja"]
