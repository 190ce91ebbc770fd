"""Scores of generated text against references (seeds/seamless-m4t-v2-neurons.txt, section 3.3).

- ASR: word error rate (jiwer) for space-delimited languages, character error rate for Mandarin and Japanese
  (and other languages written without spaces). Both after lower-casing, removing punctuation and
  collapsing white space (for CER: removing it). A reference left empty ("…") counts its hypothesis as
  insertions, as jiwer does.
- Translation (S2TT, T2TT): BLEU and chrF (sacrebleu, default settings; BLEU tokenised for the target
  language) and the paper's combined score ``0.6 * BLEU + 0.4 * chrF`` (Singh et al., 2025).

:func:`corpus_scores` scores a set of generations as one corpus (what the sweep's tables compare);
:func:`sentence_scores` scores one generation (kept with every generated text).
"""

from __future__ import annotations

import unicodedata

import jiwer
from sacrebleu.metrics import BLEU, CHRF

from hookpoints.errors import UserError

#: Languages scored by characters (CER; BLEU tokenised by characters): ISO 639-1 and SeamlessM4T codes.
CHARACTER_LANGUAGES = frozenset({"zh", "ja", "cmn", "cmn_Hant", "jpn", "yue", "zho", "th", "tha"})
BLEU_WEIGHT, CHRF_WEIGHT = 0.6, 0.4
TRANSLATION_TASKS = ("s2tt", "t2tt")
#: Scored like translation, against the unedited continuation (the intervention sweep's ``none`` condition).
CONTINUATION_TASKS = ("continue",)
RECOGNITION_TASKS = ("asr",)


def error_metric(language: str) -> str:
    """``cer`` for languages written without spaces between words (zh, ja), else ``wer``."""
    return "cer" if _base(language) in CHARACTER_LANGUAGES else "wer"


def normalise(text: str, metric: str) -> str:
    """Lower-cased, punctuation removed, white space collapsed (removed for ``cer``)."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = "".join(" " if unicodedata.category(ch).startswith(("P", "S")) else ch for ch in text)
    words = text.split()
    return "".join(words) if metric == "cer" else " ".join(words)


def error_rate(references: list[str], hypotheses: list[str], metric: str) -> float:
    """Corpus WER or CER: edits over all examples divided by the references' words (characters).

    A reference empty after normalisation ("…") adds its hypothesis' words (characters) as insertions and
    nothing to the divisor, as jiwer counts it; if every reference is empty there is nothing to divide by.
    """
    refs = [normalise(r, metric) for r in references]
    hyps = [normalise(h, metric) for h in hypotheses]
    kept = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    if not kept:
        raise UserError("every reference is empty after normalisation: nothing to score")
    # the empty references' insertions counted here: jiwer 3 refuses an empty reference, jiwer 4 counts them so
    extra = sum(len(h) if metric == "cer" else len(h.split()) for r, h in zip(refs, hyps, strict=True) if not r)
    process = jiwer.process_characters if metric == "cer" else jiwer.process_words
    edits = process([r for r, _ in kept], [h for _, h in kept])
    errors = edits.substitutions + edits.deletions + edits.insertions + extra
    return errors / (edits.substitutions + edits.deletions + edits.hits)


def bleu_tokenizer(target: str) -> str:
    """sacrebleu's tokeniser for a target language: zh for Mandarin, char for Japanese/Thai, else 13a."""
    base = _base(target)
    if base in ("zh", "cmn", "zho", "yue", "cmn_Hant"):
        return "zh"
    return "char" if base in CHARACTER_LANGUAGES else "13a"


def combined_score(bleu: float, chrf: float) -> float:
    """The paper's combined score: 0.6 * BLEU + 0.4 * chrF (both on sacrebleu's 0-100 scale)."""
    return BLEU_WEIGHT * bleu + CHRF_WEIGHT * chrf


def corpus_scores(task: str, references: list[str], hypotheses: list[str], target: str) -> dict[str, float | None]:
    """Scores of the generations as one corpus: ``metric`` (wer/cer/combined), ``score`` and the parts.

    ``target``: the language the text is in (ASR: the speech's own; translation: the target language).
    """
    if len(references) != len(hypotheses) or not references:
        raise UserError(f"{len(references)} references for {len(hypotheses)} generations: nothing to score")
    if task in RECOGNITION_TASKS:
        metric = error_metric(target)
        rate = error_rate(references, hypotheses, metric)
        return {"metric": metric, "score": rate, "error_rate": rate, "bleu": None, "chrf": None}
    if task in TRANSLATION_TASKS or task in CONTINUATION_TASKS:
        # a continuation of a few tokens may have no 4-gram: BLEU's orders with nothing to count are left out
        # (as sentence BLEU does), so an unchanged continuation scores 100, not 0
        effective = task in CONTINUATION_TASKS
        if effective and hypotheses == references and not any(r.strip() for r in references):  # all blank, kept
            return _unchanged()
        bleu = BLEU(tokenize=bleu_tokenizer(target), effective_order=effective).corpus_score(hypotheses, [references])
        bleu = bleu.score
        chrf = CHRF().corpus_score(hypotheses, [references]).score
        return {
            "metric": "combined",
            "score": combined_score(bleu, chrf),
            "error_rate": None,
            "bleu": bleu,
            "chrf": chrf,
        }
    raise UserError(f"task {task!r} has no score: scores exist for asr, s2tt, t2tt and continue")


def sentence_scores(task: str, reference: str, hypothesis: str, target: str) -> dict[str, float | None]:
    """One generation's scores (sentence BLEU with effective order; WER/CER of the sentence)."""
    if task in RECOGNITION_TASKS:
        metric = error_metric(target)
        if not normalise(reference, metric):
            return {"metric": metric, "score": None, "error_rate": None, "bleu": None, "chrf": None}
        rate = error_rate([reference], [hypothesis], metric)
        return {"metric": metric, "score": rate, "error_rate": rate, "bleu": None, "chrf": None}
    if task in CONTINUATION_TASKS and hypothesis == reference and not reference.strip():  # sacrebleu: 0 for it
        return _unchanged()
    bleu = BLEU(tokenize=bleu_tokenizer(target), effective_order=True).sentence_score(hypothesis, [reference]).score
    chrf = CHRF().sentence_score(hypothesis, [reference]).score
    return {"metric": "combined", "score": combined_score(bleu, chrf), "error_rate": None, "bleu": bleu, "chrf": chrf}


def _unchanged() -> dict[str, float | None]:
    """A continuation left empty (EOS first) or blank ('\\n\\n') by the edit as it was unedited: unchanged, so 100,
    where sacrebleu, with no token to count, scores it 0 (each example's row; a cell of only such examples)."""
    return {"metric": "combined", "score": 100.0, "error_rate": None, "bleu": 100.0, "chrf": 100.0}


def _base(language: str) -> str:
    """``de_de`` and ``de-DE`` -> ``de`` (FLEURS and BCP 47 / Common Voice forms: ``zh-CN`` is Mandarin);
    SeamlessM4T codes (``cmn``) and ``cmn_Hant`` are kept."""
    language = str(language or "")
    return language if language in CHARACTER_LANGUAGES else language.replace("-", "_").split("_")[0].lower()
