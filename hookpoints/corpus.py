"""The bundled parallel corpus (66 meanings x 6 languages) as text and espeak-ng speech manifests.

Speech is synthesised on first use with espeak-ng (Debian package ``espeak-ng``; recipe and measurements in
``hookpoints/data/README.md``): every sentence in two voice variants (``m3``, ``f3``) as speaker labels,
resampled from espeak's 22,050 Hz to 16 kHz and kept as FLAC in a cache folder named after the espeak-ng
version (the same version gives byte-identical audio). :func:`corpus_manifests` writes two manifests there:

- ``text`` rows: ``id`` (``s001-de``), ``semantic_id``, ``language``, ``script``, ``text``, ``modality=text``;
- ``speech`` rows: ``id`` (``s001-de-m3``), the same labels, ``text`` (the transcript), ``modality=speech``,
  ``voice`` (``m3``/``f3``) and ``audio`` (a FLAC path relative to the manifest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import soundfile

from hookpoints.audio import SAMPLE_RATE, resample
from hookpoints.errors import UserError

#: espeak-ng voice per corpus language (Mandarin from pinyin, Japanese from kana: see data/README.md).
VOICES = {"en": "en", "de": "de", "es": "es", "fr": "fr", "zh": "cmn-latn-pinyin", "ja": "ja"}
#: Voice variants used as speakers (clearly different: median F0 about 100 Hz for m3, 205 Hz for f3).
VARIANTS = ("m3", "f3")
LANGUAGES = tuple(VOICES)


@dataclass(frozen=True)
class CorpusManifests:
    """Where the written manifests are, and how many rows each holds."""

    text: Path
    speech: Path | None
    text_rows: int
    speech_rows: int


def corpus_rows(*, limit: int | None = None, languages: tuple[str, ...] | None = None) -> list[dict]:
    """The corpus rows (``id, semantic_id, language, text, script, speak_text``); ``limit`` meanings at most."""
    source = resources.files("hookpoints") / "data" / "corpus.jsonl"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    unknown = sorted(set(languages or ()) - set(LANGUAGES))
    if unknown:
        raise UserError(f"the bundled corpus has no language {unknown[0]!r}; it has {', '.join(LANGUAGES)}")
    if languages:
        rows = [row for row in rows if row["language"] in languages]
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be at least 1, not {limit}")
        meanings = sorted({row["semantic_id"] for row in rows})[:limit]
        rows = [row for row in rows if row["semantic_id"] in set(meanings)]
    return rows


def default_cache() -> Path:
    """``$HOOKPOINTS_CACHE``, else ``~/.cache/hookpoints``."""
    return Path(os.environ.get("HOOKPOINTS_CACHE") or Path.home() / ".cache" / "hookpoints").expanduser()


def espeak_version() -> str:
    """The installed espeak-ng's version (``1.51``), or a UserError saying how to install it."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise UserError("espeak-ng is not installed: run `apt-get install espeak-ng` (make setup does this)")
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    words = output.split()
    version = words[words.index("text-to-speech:") + 1] if "text-to-speech:" in words else "unknown"
    return version.strip(" ,")


def synthesise(text: str, language: str, variant: str, path: Path) -> None:
    """Speak ``text`` with espeak-ng and write it to ``path`` as 16 kHz mono FLAC (atomically)."""
    voice = f"{VOICES[language]}+{variant}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        wav = Path(scratch) / "speech.wav"
        done = subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], capture_output=True, check=False)
        if done.returncode != 0 or not wav.is_file():
            message = done.stderr.decode(errors="replace").strip()[:200]
            raise UserError(f"espeak-ng could not speak {text[:40]!r} with voice {voice}: {message}")
        samples, rate = soundfile.read(str(wav), dtype="float32")
        flac = Path(scratch) / "speech.flac"
        soundfile.write(str(flac), resample(samples, rate), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        os.replace(flac, path)  # readers never see a half-written file


def corpus_manifests(
    directory: str | Path | None = None,
    *,
    limit: int | None = None,
    languages: tuple[str, ...] | None = None,
    speech: bool = True,
    on_file: Callable[[int], None] | None = None,
    workers: int = 4,
) -> CorpusManifests:
    """Write the corpus' text and speech manifests, synthesising missing audio (cached, reused across calls).

    ``directory`` defaults to ``<cache>/corpus/espeak-ng-<version>``; ``limit`` keeps the first N meanings
    per language. ``on_file`` is called with 1 after each audio file (for progress bars).
    """
    rows = corpus_rows(limit=limit, languages=languages)
    if directory is None:
        folder = f"espeak-ng-{espeak_version()}" if speech else "text-only"
        directory = default_cache() / "corpus" / folder
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create corpus folder {directory}: {error.strerror or error}") from None
    suffix = (f"-{'+'.join(languages)}" if languages else "") + (f"-limit{limit}" if limit else "")
    labels = ("semantic_id", "language", "script")
    text_rows = [
        {"id": row["id"], **{k: row[k] for k in labels}, "text": row["text"], "modality": "text"} for row in rows
    ]
    text_path = _write_jsonl(directory / f"text{suffix}.jsonl", text_rows)
    if not speech:
        return CorpusManifests(text_path, None, len(text_rows), 0)

    espeak_version()  # a clear error before any work if espeak-ng is missing
    speech_rows, jobs = [], []
    for row in rows:
        for variant in VARIANTS:
            audio = Path("audio") / f"{row['id']}-{variant}.flac"
            speech_rows.append(
                {
                    "id": f"{row['id']}-{variant}",
                    **{k: row[k] for k in labels},
                    "text": row["text"],
                    "modality": "speech",
                    "voice": variant,
                    "audio": audio.as_posix(),
                }
            )
            if not (directory / audio).is_file():
                jobs.append((row["speak_text"], row["language"], variant, directory / audio))
            elif on_file:
                on_file(1)

    def run(job) -> None:
        synthesise(*job)
        if on_file:
            on_file(1)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(run, jobs))  # espeak-ng runs as separate processes: threads are enough
    speech_path = _write_jsonl(directory / f"speech{suffix}.jsonl", speech_rows)
    return CorpusManifests(text_path, speech_path, len(text_rows), len(speech_rows))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path
