"""SeamlessM4T's speech features, computed with whole-array numpy instead of one frame at a time.

``SeamlessM4TFeatureExtractor`` (transformers) computes its Kaldi-style fbank frame by frame in Python: about
30 ms per utterance, half the time of recording a batch of speech. :func:`seamless_features` does the same
arithmetic on all frames at once (same float64 frames, same complex64 spectrum, same float32 normalisation)
and gives the extractor's output (``tests/test_features.py`` compares them; the mel projection keeps the
extractor's operand order, which keeps the result bit-identical); the extractor's settings (mel
filters, window) are read from the extractor itself, and any other extractor class is called as it is.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

FRAME, HOP, FFT = 400, 160, 512  # 25 ms windows every 10 ms at 16 kHz, a 512-point FFT
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07


def seamless_features(processor, waveforms: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """``input_features`` ``[batch, frames, 160]`` and ``attention_mask`` ``[batch, frames]``, as ``processor``
    (a SeamlessM4TFeatureExtractor) returns for ``waveforms`` with ``padding=True``."""
    if type(processor).__name__ != "SeamlessM4TFeatureExtractor" or processor.stride != 2:
        batch = processor(
            waveforms, sampling_rate=16_000, return_tensors="pt", padding=True, return_attention_mask=True
        )
        return {"input_features": batch["input_features"], "attention_mask": batch["attention_mask"]}
    banks = [_normalised(_fbank(wave, processor)) for wave in waveforms]  # [frames_i, 80] float32
    width = max(len(bank) for bank in banks)
    width += width % 2  # pad_to_multiple_of=2
    padded = np.full((len(banks), width, banks[0].shape[1]), processor.padding_value, dtype=np.float32)
    mask = np.zeros((len(banks), width), dtype=np.int64)
    for i, bank in enumerate(banks):
        padded[i, : len(bank)] = bank
        mask[i, : len(bank)] = 1
    stacked = padded.reshape(len(banks), width // 2, -1)  # two consecutive frames side by side
    return {"input_features": torch.from_numpy(stacked), "attention_mask": torch.from_numpy(mask[:, 1::2])}


def _fbank(waveform: np.ndarray, processor) -> np.ndarray:
    samples = (np.squeeze(waveform).astype(np.float32) * 2**15).astype(np.float64)  # Kaldi: 16-bit range
    count = 1 + (len(samples) - FRAME) // HOP
    frames = sliding_window_view(samples, FRAME)[::HOP][:count]  # [frames, 400] float64
    frames = frames - frames.mean(axis=1, keepdims=True)  # remove the DC offset
    emphasised = frames.copy()
    emphasised[:, 1:] -= PREEMPHASIS * frames[:, :-1]
    emphasised[:, 0] *= 1 - PREEMPHASIS
    emphasised *= processor.window.astype(np.float64)
    spectrum = np.fft.rfft(emphasised, n=FFT, axis=1).astype(np.complex64)  # as stored by transformers
    power = np.abs(spectrum, dtype=np.float64) ** 2  # [frames, 257]
    mel = np.maximum(MEL_FLOOR, np.dot(processor.mel_filters.T, power.T))  # [80, frames], as transformers does
    return np.asarray(np.log(mel), dtype=np.float32).T  # [frames, 80]


def _normalised(bank: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per mel bin over the utterance (torch's ddof=1)."""
    return (bank - np.expand_dims(bank.mean(0), 0)) / np.sqrt(np.expand_dims(bank.var(0, ddof=1), 0) + 1e-7)
