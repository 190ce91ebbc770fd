"""The bundled corpus and its espeak-ng speech: parallel labels, 16 kHz mono audio, distinct voices, determinism."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import soundfile

from hookpoints import corpus
from hookpoints.corpus import LANGUAGES, VARIANTS, corpus_manifests, corpus_rows
from hookpoints.errors import UserError


def test_corpus_is_parallel_across_six_languages():
    rows = corpus_rows()
    assert Counter(row["language"] for row in rows) == {language: 66 for language in LANGUAGES}
    by_meaning = Counter(row["semantic_id"] for row in rows)
    assert len(by_meaning) == 66 and set(by_meaning.values()) == {6}
    scripts = {row["language"]: row["script"] for row in rows}
    assert scripts == {"en": "latin", "de": "latin", "es": "latin", "fr": "latin", "zh": "non-latin", "ja": "non-latin"}
    assert all(row["text"].strip() and row["speak_text"].strip() for row in rows)


def test_limit_keeps_the_first_meanings_of_every_language():
    rows = corpus_rows(limit=3)
    assert len(rows) == 18 and {row["semantic_id"] for row in rows} == {"s001", "s002", "s003"}


def median_f0(samples: np.ndarray, rate: int) -> float:
    """Median pitch of voiced 40 ms frames, by autocorrelation (an estimate independent of espeak)."""
    frame, pitches = int(0.04 * rate), []
    lags = np.arange(rate // 400, rate // 60)  # 60-400 Hz
    for start in range(0, len(samples) - frame, frame):
        x = samples[start : start + frame] - samples[start : start + frame].mean()
        if np.sqrt(np.mean(x**2)) < 0.02:
            continue
        corr = np.array([np.dot(x[:-lag], x[lag:]) for lag in lags])
        if corr.max() > 0.3 * np.dot(x, x):
            pitches.append(rate / lags[corr.argmax()])
    return float(np.median(pitches))


@pytest.fixture
def manifests(corpus):
    return corpus


def test_speech_manifest_labels_and_audio(manifests):
    rows = [json.loads(line) for line in manifests.speech.read_text().splitlines()]
    assert len(rows) == len(LANGUAGES) * len(VARIANTS) == manifests.speech_rows
    assert {row["modality"] for row in rows} == {"speech"} and {row["voice"] for row in rows} == set(VARIANTS)
    for row in rows:
        info = soundfile.info(str(manifests.speech.parent / row["audio"]))
        assert (info.samplerate, info.channels, info.format) == (16_000, 1, "FLAC")
        assert 1.0 < info.duration < 6.0  # data/README.md: 1.45 - 5.46 s
    text = [json.loads(line) for line in manifests.text.read_text().splitlines()]
    assert {row["modality"] for row in text} == {"text"} and len(text) == len(LANGUAGES)
    assert {row["id"] for row in text} == {row["id"].rsplit("-", 1)[0] for row in rows}


def test_voice_variants_are_different_speakers(manifests):
    rows = [json.loads(line) for line in manifests.speech.read_text().splitlines()]
    pitch = {}
    for row in rows:
        samples, rate = soundfile.read(str(manifests.speech.parent / row["audio"]))
        pitch[row["id"]] = median_f0(samples, rate)
    for language in LANGUAGES:  # data/README.md: about 100 Hz for m3, 205 Hz for f3
        low, high = pitch[f"s001-{language}-m3"], pitch[f"s001-{language}-f3"]
        assert 70 < low < 150 < high < 300, (language, low, high)


def test_synthesis_is_deterministic_and_cached(manifests, tmp_path):
    again = corpus_manifests(tmp_path, limit=1)
    for row in [json.loads(line) for line in again.speech.read_text().splitlines()]:
        first = (manifests.speech.parent / row["audio"]).read_bytes()
        assert first == (tmp_path / row["audio"]).read_bytes()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "audio").iterdir()}
    corpus_manifests(tmp_path, limit=1)  # everything cached: nothing is synthesised again
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "audio").iterdir()} == before


def test_missing_espeak_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="espeak-ng is not installed: run `apt-get install espeak-ng`"):
        corpus_manifests(tmp_path, limit=1)


def test_unknown_corpus_language():
    with pytest.raises(UserError, match="no language 'xx'"):
        corpus_rows(languages=("xx",))


def test_corpus_command_writes_manifests(run_cli, tmp_path):
    code, out, err = run_cli("corpus", "--out", str(tmp_path), "--limit", "1", "--text-only")
    assert code == 0, err
    assert (tmp_path / "text-limit1.jsonl").is_file() and "6 rows" in out
    assert err == ""  # --text-only synthesises nothing: no "speech (espeak-ng) 0/0" bar
    code, _, err = run_cli("corpus", "--out", str(tmp_path), "--limit", "0")
    assert code == 2 and "limit must be at least 1" in err
