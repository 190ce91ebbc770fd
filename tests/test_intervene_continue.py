"""Intervention sweeps of a decoder-only LM's continuation (task ``continue``): the unedited continuation is
every condition's reference, generated first as the ``none`` condition, and each edited continuation is scored
against it (0.6 BLEU + 0.4 chrF, as translation): 100 means the edit changed nothing. Checked against the
model's own ``generate(texts, edits=...)`` and sacrebleu on the stored texts."""

from __future__ import annotations

import pytest
from hookpoints.analyses.intervention_sweep import SweepSpec, plan_sweep, run_sweep
from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
from hookpoints.analyses.text_scores import bleu_tokenizer
from hookpoints.store.catalog import Store
from sacrebleu.metrics import BLEU, CHRF

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.recorder import record

WORDS = {
    "de": "der die das und ist nicht ein eine mit von zu auf".split(),
    "en": "the a and is not one with of to on in at".split(),
    "fr": "le la les et est pas un une avec de sur dans".split(),
}


@pytest.fixture(scope="module")
def lm_store(tiny_model_dir, tmp_path_factory):
    """A tiny GPT-2 recorded on 8 texts per language, ranked by language (unimodal/{language})."""
    folder = tmp_path_factory.mktemp("continue")
    rows = [
        {"id": f"{lang}{i}", "text": " ".join(words[(i + j) % len(words)] for j in range(4 + i % 3)), "language": lang}
        for lang, words in WORDS.items()
        for i in range(8)
    ]
    import json

    manifest = folder / "texts.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model_dir = tiny_model_dir("gpt2")
    store = Store.open(folder / "store", create=True)
    from hookpoints.manifest import read_manifest

    record(load(model_dir), read_manifest(manifest, required=("text",)), store, "lm", hooks=["blocks.*.mlp.hook_post"])
    write_scores(store, rank(store, plan_ranking(store, ["lm"], presets=["unimodal"], ks=(16,))))
    return store, model_dir, manifest


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
    with store.query() as session:
        names = session.sql("SELECT DISTINCT sweep FROM interventions")["sweep"].to_pylist()
    assert "c3" not in names and "c4" not in names


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
