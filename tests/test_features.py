"""The whole-array fbank gives exactly what transformers' SeamlessM4TFeatureExtractor gives, frame by frame."""

from __future__ import annotations

import json

import numpy as np
import soundfile
import torch
from transformers import SeamlessM4TFeatureExtractor, WhisperFeatureExtractor

from hookpoints.features import seamless_features


def test_seamless_features_equal_the_extractor(corpus):
    rows = [json.loads(line) for line in corpus.speech.read_text().splitlines()]
    waves = [soundfile.read(str(corpus.speech.parent / row["audio"]), dtype="float32")[0] for row in rows]
    rng = np.random.default_rng(0)
    waves += [
        (0.1 * rng.standard_normal(n)).astype(np.float32) for n in (801, 1_123, 16_077, 33_333)
    ]  # odd frame counts too
    extractor = SeamlessM4TFeatureExtractor()
    expected = extractor(waves, sampling_rate=16_000, return_tensors="pt", padding=True)
    ours = seamless_features(extractor, waves)
    assert ours["input_features"].shape == expected["input_features"].shape
    torch.testing.assert_close(ours["input_features"], expected["input_features"], atol=1e-6, rtol=1e-6)
    assert torch.equal(ours["attention_mask"], expected["attention_mask"])


def test_other_extractors_are_called_as_they_are():
    wave = np.zeros(16_000, dtype=np.float32)
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    assert seamless_features(extractor, [wave])["input_features"].shape == (1, 80, 100)
