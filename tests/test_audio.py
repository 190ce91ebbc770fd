"""Audio loading: resampling to 16 kHz keeps pitch and duration; bad files give one-line errors naming the example."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from hookpoints.audio import SAMPLE_RATE, inspect_audio, load_audio
from hookpoints.errors import UserError


def tone(rate: int, seconds: float, hz: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * hz * t).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("rate", [16_000, 22_050, 44_100, 48_000, 8_000])
def test_audio_is_resampled_to_16_khz_keeping_pitch_and_duration(tmp_path, rate):
    path = tmp_path / "tone.flac"
    soundfile.write(path, tone(rate, 1.5), rate, subtype="PCM_16")
    samples = load_audio(path, "ex1")
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 1.5 * SAMPLE_RATE) <= 1
    assert abs(peak_hz(samples, SAMPLE_RATE) - 440.0) < 2.0  # 22,050 -> 16,000 with the wrong ratio gives 880 Hz


def test_missing_audio_file_names_the_example(tmp_path):
    with pytest.raises(UserError, match=r"example 'ex7': audio file .*nope.wav does not exist"):
        inspect_audio(tmp_path / "nope.wav", "ex7")


def test_unreadable_audio_file(tmp_path):
    path = tmp_path / "fake.wav"
    path.write_text("this is not audio")
    with pytest.raises(UserError, match=r"example 'ex1': cannot read audio file .*fake.wav .*WAV or FLAC"):
        inspect_audio(path, "ex1")


def test_stereo_audio_is_refused(tmp_path):
    path = tmp_path / "stereo.wav"
    soundfile.write(path, tone(16_000, 0.5, channels=2), 16_000)
    with pytest.raises(UserError, match=r"example 'ex2': .* has 2 channels; give mono audio"):
        load_audio(path, "ex2")


def test_too_low_sample_rate_is_refused(tmp_path):
    path = tmp_path / "phone.wav"
    soundfile.write(path, tone(4_000, 0.5, hz=300), 4_000)
    with pytest.raises(UserError, match=r"example 'ex3': .* sampled at 4000 Hz; .* at least 8000 Hz"):
        load_audio(path, "ex3")


def test_empty_audio_is_refused(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), 16_000)
    with pytest.raises(UserError, match=r"example 'ex4': .* holds no samples"):
        load_audio(path, "ex4")


@pytest.mark.parametrize("rate", [16_000, 22_050, 44_100, 48_000])
def test_window_check_counts_the_samples_resampling_gives(tmp_path, rate):
    """A fixed window of 2 s at 16 kHz: a file that resamples to exactly 32,000 samples fits, one more does not
    (the count is the resampled length, in integers: a float ratio could refuse an exact fit)."""
    from hookpoints.audio import check_window

    exact = 2 * rate
    for frames, fits in ((exact, True), (exact + rate // 16_000 + 1, False)):
        path = tmp_path / f"{frames}.wav"
        soundfile.write(path, np.zeros(frames, dtype=np.float32), rate)
        info = inspect_audio(path, "e")
        assert (len(load_audio(path, "e")) <= 32_000) == fits
        if fits:
            check_window(info, "e", 32_000)
        else:
            with pytest.raises(UserError, match=r"example 'e': .* lasts 2.0 s; this model reads at most 2 s"):
                check_window(info, "e", 32_000)


@pytest.mark.parametrize("family", ["seamless_m4t_v2", "ultravox"])
def test_a_waveform_shorter_than_a_file_may_be_is_refused(tiny_model_dir, family):
    """Waveforms given to the Python API meet the audio files' 50 ms floor. Below it SeamlessM4T's fbank has
    at most one frame (400-559 samples: NaN features, every frame masked: an all-zero pooled vector, silently;
    under 400: a numpy ValueError) and Ultravox's extractor a torch padding error."""
    from hookpoints.loading import load

    model = load(tiny_model_dir(family), modality="speech")
    fine = (0.1 * np.random.default_rng(0).standard_normal(800)).astype(np.float32)  # 50 ms: the floor
    model.speech_inputs([fine])
    for samples in (300, 500):
        with pytest.raises(UserError, match=f"waveform 1 holds {samples} samples; .* at least 50 ms"):
            model.speech_inputs([fine, fine[:samples]])
        with pytest.raises(UserError, match="at least 50 ms"):
            model.run_with_cache(fine[:samples], names="*.layers.0.hook_resid_post")
