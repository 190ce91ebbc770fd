"""Intervention sweeps of a decoder-only LM's continuation (task ``continue``): the unedited continuation is
every condition's reference, generated first as the ``none`` condition, and each edited continuation is scored
against it (0.6 BLEU + 0.4 chrF, as translation): 100 means the edit changed nothing. Checked against the
model's own ``generate(texts, edits=...)`` and sacrebleu on the stored texts."""

from __future__ import annotations

import dataclasses

import pytest
from hookpoints.analyses.intervention_sweep import SweepSpec, plan_sweep, run_sweep
from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
from hookpoints.analyses.text_scores import bleu_tokenizer
from hookpoints.store.catalog import Store
from sacrebleu.metrics import BLEU, CHRF

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.recorder import record
from tests.intervene_helpers import make_lm_store


@pytest.fixture(scope="module")
def lm_store(tiny_model_dir, tmp_path_factory):
    """A tiny GPT-2 recorded on 8 texts per language, ranked by language (unimodal/{language})."""
    return make_lm_store(tiny_model_dir("gpt2"), tmp_path_factory.mktemp("continue"))


def _spec(name: str, model_dir, **options) -> SweepSpec:
    # constant 8.0 at 16 MLP neurons: enough to move a tiny random GPT-2's argmax (medians of 4 did not)
    return SweepSpec(name, runs=("lm",), tasks=("continue",), ks=(16,), languages=("de", "fr"), limit=3,
                     max_new_tokens=6, model=str(model_dir), kind="constant", value=8.0, **options)  # fmt: skip


def test_a_continuation_sweep_scores_each_edit_against_the_unedited_continuation(lm_store):
    store, model_dir, _ = lm_store
    spec = _spec("c1", model_dir)
    cells = plan_sweep(store, spec, lambda model, modality: load(model, modality=modality))
    assert [(c.task, c.language) for c in cells] == [("continue", "de"), ("continue", "fr")]
    run_sweep(store, spec, cells)
    with store.query() as session:
        rows = session.sql(
            "SELECT language, condition, example_id, reference, generated_text, bleu, chrf, score FROM interventions "
            "WHERE sweep = 'c1' ORDER BY language, condition, example_id"
        ).to_pylist()
        scores = session.sql("SELECT * FROM intervention_scores WHERE sweep = 'c1'").to_pylist()
    assert {r["condition"] for r in rows} == {"none", "unimodal/top/k=16", "random/k=16"}
    changed = [r for r in rows if r["generated_text"] != r["reference"]]
    assert changed and all(r["condition"] != "none" for r in changed)  # the edits moved some continuations
    for cell in cells:
        texts = cell.examples["text"].to_pylist()
        model = cell.model
        plain = model.decode(model.generate(texts, max_new_tokens=6))  # the unedited continuation, independently
        for condition in cell.conditions:
            name = condition.fields["condition"]
            stored = [r for r in rows if r["language"] == cell.language and r["condition"] == name]
            assert [r["reference"] for r in stored] == plain  # every condition's reference
            expected = plain if name == "none" else model.decode(model.generate(texts, max_new_tokens=6,
                                                                               edits=condition.edits))  # fmt: skip
            assert [r["generated_text"] for r in stored] == expected
            hyps = [r["generated_text"] for r in stored]
            (corpus,) = [s for s in scores if s["language"] == cell.language and s["condition"] == name]
            bleu = BLEU(tokenize=bleu_tokenizer(cell.target), effective_order=True).corpus_score(hyps, [plain]).score
            chrf = CHRF().corpus_score(hyps, [plain]).score
            assert corpus["bleu"] == pytest.approx(bleu) and corpus["chrf"] == pytest.approx(chrf)
            assert corpus["score"] == pytest.approx(0.6 * bleu + 0.4 * chrf)
            if name == "none":
                assert corpus["score"] == pytest.approx(100.0)  # unchanged: the continuation itself


def test_the_cli_sweeps_a_continuation_and_refuses_the_wrong_task_in_one_line(lm_store, run_cli, tmp_path):
    store, model_dir, _ = lm_store
    base = ["intervene", "--store", str(store.location.uri), "--run", "lm", "--k", "16", "--language", "de",
            "--limit", "2", "--max-new-tokens", "4", "--model", str(model_dir)]  # fmt: skip
    code, out, err = run_cli(*base, "--task", "continue", "--sweep", "c2", "--plots", str(tmp_path / "plots"))
    assert code == 0, err
    assert "intervention scores (c2)" in " ".join(out.split())
    assert (tmp_path / "plots" / "interventions-c2.png").stat().st_size > 0
    code, _, err = run_cli(*base, "--task", "t2tt", "--sweep", "c3")
    assert code != 0 and "is a decoder-only LM: it continues its input; sweep --task continue" in err
    assert "Traceback" not in err
    code, _, err = run_cli(*base, "--task", "continue", "--reference-column", "text", "--sweep", "c4")
    assert code != 0 and "leave out --reference-column" in err and "Traceback" not in err
    code, _, err = run_cli(*base, "--task", "continue", "--frames", "300", "--sweep", "c5")  # was ignored
    assert code == 2 and "--frames applies to speech input; task continue reads text here" in err
    assert "Traceback" not in err
    with store.query() as session:
        names = session.sql("SELECT DISTINCT sweep FROM interventions")["sweep"].to_pylist()
    assert "c3" not in names and "c4" not in names and "c5" not in names


def test_a_speech_text_model_cannot_sweep_a_continuation(tiny_model_dir, tmp_path, lm_store):
    store, _, _ = lm_store
    seamless = tiny_model_dir("seamless_m4t_v2")
    spec = _spec("c5", seamless)
    with pytest.raises(UserError, match="cannot continue: a decoder-only LM"):
        plan_sweep(store, spec, lambda model, modality: load(model, modality="text"))


def test_an_empty_continuation_left_empty_by_the_edit_scores_unchanged():
    """An LM that ends a text at once (EOS first) continues it with '': an edit that leaves it so changed nothing
    (100), where sacrebleu scores '' against '' 0; a non-empty text against it, and mixed corpora, are sacrebleu's."""
    from hookpoints.analyses.text_scores import corpus_scores, sentence_scores

    def sacre(hyps, refs):
        bleu = BLEU(tokenize="13a", effective_order=True).corpus_score(hyps, [refs]).score
        return 0.6 * bleu + 0.4 * CHRF().corpus_score(hyps, [refs]).score

    assert sacre([""], [""]) == 0.0  # what the scores were
    assert sentence_scores("continue", "", "", "deu")["score"] == 100.0
    assert corpus_scores("continue", ["", ""], ["", ""], "deu")["score"] == 100.0
    assert sacre(["\n\n"], ["\n\n"]) == 0.0  # GPT-2's paragraph break, unchanged
    assert sentence_scores("continue", "\n\n", "\n\n", "deu")["score"] == 100.0
    assert corpus_scores("continue", ["\n\n", ""], ["\n\n", ""], "deu")["score"] == 100.0
    assert corpus_scores("continue", ["\n", ""], ["\n\n", ""], "deu")["score"] == sacre(["\n\n", ""], ["\n", ""])
    assert corpus_scores("continue", ["", ""], ["", "und"], "deu")["score"] == pytest.approx(
        sacre(["", "und"], ["", ""])
    )
    assert sentence_scores("continue", "", "und", "deu")["score"] == pytest.approx(sacre(["und"], [""]))
    mixed = (["der die das", ""], ["der die das", ""])
    assert corpus_scores("continue", *mixed, "deu")["score"] == pytest.approx(sacre(*mixed))
    assert sentence_scores("t2tt", "", "", "deu")["score"] == 0.0  # translation: a real reference, unchanged rules


@pytest.mark.parametrize("family", ["gpt2", "qwen2_audio", "ultravox"])
def test_a_continuation_sweep_continues_in_the_modality_its_run_was_recorded_in(
    family, tiny_model_dir, corpus, tmp_path
):
    """The bundled corpus (a ``modality`` column): an LM ranked on its texts wrote unimodal/text/{language}, a
    Qwen2-Audio ranked on its speech unimodal/speech/{language}. The sweep looked up unimodal/{language} (and
    continued Qwen2-Audio's transcripts, not its speech): refused with '--label-set ... matches no label set'.
    Now each continues as its run did; checked against the model's own generate on the texts / waves."""
    from hookpoints.audio import load_audio
    from hookpoints.manifest import read_manifest
    from hookpoints.tiny import build_tiny

    speech = family in ("qwen2_audio", "ultravox")
    sizes = {"initializer_range": 0.3} if family == "qwen2_audio" else None
    folder = build_tiny(family, tmp_path / "m", sizes=sizes) if speech else tiny_model_dir(family)
    path, modality = (corpus.speech, "speech") if speech else (corpus.text, "text")
    store = Store.open(tmp_path / "store", create=True)
    manifest = read_manifest(path, required=("audio",) if speech else ("text",))
    model = load(folder, modality=modality)
    record(model, manifest, store, "r", hooks=["blocks.*.mlp.hook_post"], task="continue", max_new_tokens=3)
    write_scores(store, rank(store, plan_ranking(store, ["r"], presets=["unimodal"], ks=(8,))))
    spec = SweepSpec("s", runs=("r",), tasks=("continue",), ks=(8,), languages=("de",), max_new_tokens=4,
                     model=str(folder), kind="constant", value=8.0)  # fmt: skip
    (cell,) = plan_sweep(store, spec, lambda source, modality: load(source, modality=modality))
    run_sweep(store, spec, [cell])
    assert cell.conditions[1].fields["label_set"] == f"unimodal/{modality}/de"
    if speech:
        ids = cell.examples["example_id"].to_pylist()
        inputs = [
            load_audio(manifest.base / a, i) for a, i in zip(cell.examples["audio"].to_pylist(), ids, strict=True)
        ]
    else:
        inputs = cell.examples["text"].to_pylist()
    with store.query() as session:
        rows = session.sql("SELECT condition, generated_text FROM interventions WHERE sweep = 's' ORDER BY example_id")
    for condition in cell.conditions:
        expected = model.decode(model.generate(inputs, max_new_tokens=4, edits=condition.edits or None))
        stored = [r["generated_text"] for r in rows.to_pylist() if r["condition"] == condition.fields["condition"]]
        assert stored == expected


def test_a_sweep_too_long_for_the_models_positions_is_refused_when_planned(lm_store):
    """plan_sweep checked the room for 128 new tokens, not the sweep's --max-new-tokens: 250 on a 256-position
    GPT-2 was planned, then refused at the first generation (after an --overwrite deleted the old rows)."""
    store, model_dir, _ = lm_store
    spec = dataclasses.replace(_spec("c7", model_dir), max_new_tokens=250)
    with pytest.raises(UserError, match=r"with 250 new tokens it runs past the 256 positions"):
        plan_sweep(store, spec, lambda model, modality: load(model, modality=modality))


def test_a_continuation_cell_without_its_none_condition_first_is_refused_before_anything_is_written(lm_store):
    """The none condition's continuation is every condition's reference: a cell whose conditions were filtered
    or reordered (Python API) had no references for the first ones, a zip() traceback after generating."""
    store, model_dir, _ = lm_store
    spec = _spec("c6", model_dir)
    cells = plan_sweep(store, spec, lambda model, modality: load(model, modality=modality))
    cells[1].conditions = cells[1].conditions[1:]
    with pytest.raises(UserError, match=r"^the continuation cell of 'fr' does not start with the none condition"):
        run_sweep(store, spec, cells)
    if "interventions" in store.table_names():  # (not made yet when this test runs alone)
        with store.query() as session:
            assert session.sql("SELECT count(*) AS n FROM interventions WHERE sweep = 'c6'")["n"][0].as_py() == 0


def test_a_sweep_of_a_speech_run_recorded_with_a_template_continues_the_templated_prompt(corpus, tmp_path):
    """An audio LLM's speech run recorded with ``--template`` (its prompt: "Listen: <audio> Say:"): the sweep
    continued the bare audio (the run's template was dropped), a prompt the run never saw, without a word. Now it
    continues the prompt the run recorded; checked against ``generate`` on that prompt."""
    from hookpoints.audio import load_audio
    from hookpoints.manifest import read_manifest
    from hookpoints.tiny import build_tiny

    template = "Listen: {audio} Say:"
    folder = build_tiny("ultravox", tmp_path / "m")
    store = Store.open(tmp_path / "store", create=True)
    manifest = read_manifest(corpus.speech, required=("audio",))
    model = load(folder, modality="speech")
    hooks = ["blocks.*.mlp.hook_post"]
    record(model, manifest, store, "r", hooks=hooks, task="continue", max_new_tokens=3, template=template)
    write_scores(store, rank(store, plan_ranking(store, ["r"], presets=["unimodal"], ks=(8,))))
    spec = SweepSpec("s", runs=("r",), tasks=("continue",), ks=(8,), languages=("de",), max_new_tokens=4,
                     model=str(folder), kind="constant", value=8.0)  # fmt: skip
    (cell,) = plan_sweep(store, spec, lambda source, modality: load(source, modality=modality))
    run_sweep(store, spec, [cell])
    ids = cell.examples["example_id"].to_pylist()
    waves = [load_audio(manifest.base / a, i) for a, i in zip(cell.examples["audio"].to_pylist(), ids, strict=True)]
    with store.query() as session:
        rows = session.sql("SELECT condition, generated_text FROM interventions WHERE sweep = 's' ORDER BY example_id")
    differs = []
    for condition in cell.conditions:
        inputs = model.speech_inputs(waves, template=template)
        expected = model.decode(model.generate(inputs, max_new_tokens=4, edits=condition.edits or None))
        bare = model.decode(model.generate(waves, max_new_tokens=4, edits=condition.edits or None))
        differs.append(expected != bare)
        stored = [r["generated_text"] for r in rows.to_pylist() if r["condition"] == condition.fields["condition"]]
        assert stored == expected, condition.fields["condition"]
    assert differs[0]  # the template matters to this model (unedited): the check above tells the prompts apart
    # --frames (SeamlessM4T's) is refused when planned, as record refuses it, not at the first batch
    with pytest.raises(UserError, match="--frames applies to SeamlessM4T"):
        plan_sweep(store, dataclasses.replace(spec, sweep="f", frames=300), lambda s, m: load(s, modality=m))
