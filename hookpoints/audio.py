"""Reading speech: mono WAV/FLAC files, checked, resampled to the 16 kHz every supported model expects.

Problems are :class:`UserError` s that name the example and say what to fix. :func:`inspect_audio` reads only
the header (cheap: the recorder checks every file before it writes anything); :func:`load_audio` reads the
samples and resamples them with a polyphase filter (``scipy.signal.resample_poly``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

from hookpoints.errors import UserError

SAMPLE_RATE = 16_000
#: Below this, speech has lost the bands models listen to; upsampling cannot bring them back.
MIN_SAMPLE_RATE = 8_000
#: Shorter recordings give no feature frame (fbank windows are 25 ms).
MIN_SECONDS = 0.05


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says."""

    path: Path
    sample_rate: int
    channels: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def inspect_audio(path: str | Path, example_id: str) -> AudioInfo:
    """Check that ``path`` is a readable mono recording at a usable sample rate, from its header."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"example {example_id!r}: audio file {path} does not exist; fix the manifest's audio column "
            "(paths are relative to the manifest)"
        )
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise UserError(
            f"example {example_id!r}: cannot read audio file {path} ({_one_line(error)}); give a WAV or FLAC file"
        ) from None
    found = AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames))
    declared = _wav_declared_bytes(path)
    if declared is not None and declared[1] < declared[0]:
        raise UserError(
            f"example {example_id!r}: audio file {path} is truncated (its header promises {declared[0]} bytes of "
            f"samples, it holds {declared[1]}): export it again, or remove the example"
        )
    if found.channels != 1:
        raise UserError(
            f"example {example_id!r}: audio file {path} has {found.channels} channels; give mono audio "
            f"(e.g. `sox {path.name} -c 1 mono.wav`)"
        )
    if found.sample_rate < MIN_SAMPLE_RATE:
        raise UserError(
            f"example {example_id!r}: audio file {path} is sampled at {found.sample_rate} Hz; speech models need "
            f"at least {MIN_SAMPLE_RATE} Hz (16000 Hz is best): export it again at 16 kHz"
        )
    if found.frames == 0:
        raise UserError(f"example {example_id!r}: audio file {path} holds no samples; remove the example or fix it")
    if found.seconds < MIN_SECONDS:
        raise UserError(
            f"example {example_id!r}: audio file {path} lasts {found.seconds * 1000:.0f} ms; speech models need at "
            f"least {MIN_SECONDS * 1000:.0f} ms: remove the example"
        )
    return found


def check_window(info: AudioInfo, example_id: str, window: int | None) -> None:
    """Refuse a recording longer than ``window`` samples at 16 kHz: a fixed-window feature extractor (Whisper's:
    30 s) would cut the rest off without a word, so the activations and the transcript would miss it."""
    if window is None or -(-info.frames * SAMPLE_RATE // info.sample_rate) <= window:  # resampled length
        return
    raise UserError(
        f"example {example_id!r}: audio file {info.path} lasts {info.seconds:.1f} s; this model reads at most "
        f"{window / SAMPLE_RATE:g} s (the rest would be cut off): split it into shorter recordings"
    )


def load_audio(path: str | Path, example_id: str) -> np.ndarray:
    """The recording as float32 samples in [-1, 1] at 16 kHz (``[samples]``)."""
    info = inspect_audio(path, example_id)
    try:
        samples, rate = soundfile.read(str(info.path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise UserError(
            f"example {example_id!r}: cannot decode audio file {info.path} ({_one_line(error)}); "
            "the file is damaged: export it again"
        ) from None
    if samples.shape[0] == 0:
        raise UserError(f"example {example_id!r}: audio file {info.path} holds no samples; fix or remove it")
    return resample(samples[:, 0], rate)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` at ``rate`` Hz resampled to ``target`` Hz (22,050 -> 16,000 is up 320, down 441)."""
    if rate == target:
        return np.ascontiguousarray(samples, dtype=np.float32)
    divisor = gcd(rate, target)
    return resample_poly(samples, target // divisor, rate // divisor).astype(np.float32)


def _wav_declared_bytes(path: Path) -> tuple[int, int] | None:
    """(bytes of samples a WAV header declares, bytes present) or None for other formats (libsndfile reads a
    truncated WAV as a shorter recording without a word)."""
    with path.open("rb") as handle:
        if handle.read(12)[8:12] != b"WAVE":
            return None
        size = path.stat().st_size
        while header := handle.read(8):
            if len(header) < 8:
                return None
            chunk, length = header[:4], int.from_bytes(header[4:], "little")
            if chunk == b"data":
                return (length, size - handle.tell()) if length < 0x7FFF0000 else None  # streaming placeholders
            handle.seek(length + (length & 1), 1)
    return None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]
