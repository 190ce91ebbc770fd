"""FLEURS on disk as a manifest: ``--data path/to/fleurs`` instead of a manifest file.

The layout of the dataset's repository (google/fleurs), with the audio archives unpacked where they lie::

    fleurs/                      (or fleurs/data/)
      de_de/
        test.tsv                 id, file name, raw transcription, transcription, phonemes, samples, gender
        audio/test/<file name>   (from audio/test.tar.gz)

Each recording becomes an example: ``id`` = ``<language folder>-<file stem>``, ``semantic_id`` = the FLEURS
sentence id (shared by the translations of a sentence), ``language`` (ISO 639-1 where known, ``de``),
``fleurs_language`` (``de_de``), ``text`` (the raw transcription), ``speaker_gender``, ``split``,
``modality=speech`` and ``audio`` (an absolute path).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa

from hookpoints.errors import UserError
from hookpoints.languages import FLEURS_LANGUAGES

SPLITS = ("train", "dev", "test")
_COLUMNS = ("sentence_id", "file_name", "raw_transcription", "transcription", "phonemes", "num_samples", "gender")


def is_fleurs(root: Path) -> bool:
    """Whether ``root`` looks like a FLEURS folder (language folders holding split tsv files)."""
    return bool(_language_folders(root))


def read_fleurs(
    root: str | Path,
    *,
    split: str = "test",
    languages: tuple[str, ...] | None = None,
    limit: int | None = None,
) -> pa.Table:
    """The recordings of ``split`` in ``languages`` (FLEURS folder names or ISO codes; default all), ``limit``
    per language at most, as manifest rows with an ``id`` column (:func:`hookpoints.manifest.read_data` checks
    them)."""
    root = Path(root)
    if split not in SPLITS:
        raise UserError(f"FLEURS split must be one of {', '.join(SPLITS)}, not {split!r}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    folders = _language_folders(root)
    if not folders:
        raise UserError(
            f"{root} is a folder but not in the FLEURS layout (expected LANGUAGE/{split}.tsv with the audio in "
            f"LANGUAGE/audio/{split}/): give a manifest file or a FLEURS folder"
        )
    if languages:
        wanted = {_folder_for(code, folders) for code in languages}
        folders = {name: path for name, path in folders.items() if name in wanted}
    rows = []
    for name, folder in sorted(folders.items()):
        rows.extend(_read_language(name, folder, split, limit))
    if not rows:
        raise UserError(f"FLEURS folder {root} has no {split} recordings for {', '.join(sorted(folders))}")
    return pa.Table.from_pylist(rows)


def _language_folders(root: Path) -> dict[str, Path]:
    base = root / "data" if (root / "data").is_dir() else root
    if not base.is_dir():
        return {}
    return {
        path.name: path
        for path in base.iterdir()
        if path.is_dir() and any((path / f"{split}.tsv").is_file() for split in SPLITS)
    }


def _folder_for(code: str, folders: dict[str, Path]) -> str:
    if code in folders:
        return code
    matches = [name for name in folders if FLEURS_LANGUAGES.get(name) == code]
    if not matches:
        raise UserError(f"FLEURS has no language {code!r} here; present: {', '.join(sorted(folders))}")
    return matches[0]


def _read_language(name: str, folder: Path, split: str, limit: int | None) -> list[dict]:
    tsv = folder / f"{split}.tsv"
    if not tsv.is_file():
        return []
    audio_dirs = [folder / "audio" / split, folder / "audio" / split / split, folder / split, folder / "audio"]
    rows: list[dict] = []
    try:
        _read_rows(name, tsv, split, limit, audio_dirs, rows)
    except UnicodeDecodeError:  # a UnicodeDecodeError (exit 1) before
        for number, line in enumerate(tsv.read_bytes().split(b"\n"), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                byte = line[error.start]
                raise UserError(
                    f"{tsv}, line {number}: not UTF-8 (byte 0x{byte:02x}); save the file as UTF-8"
                ) from None
        raise
    return rows


def _read_rows(name: str, tsv: Path, split: str, limit: int | None, audio_dirs: list[Path], rows: list) -> None:
    with tsv.open(encoding="utf-8", newline="") as lines:
        for number, fields in enumerate(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not fields:
                continue
            if len(fields) < 3:
                raise UserError(f"{tsv}, line {number}: expected tab-separated FLEURS columns, got {len(fields)}")
            record = dict(zip(_COLUMNS, fields, strict=False))
            file_name = record["file_name"]
            audio = next((d / file_name for d in audio_dirs if (d / file_name).is_file()), audio_dirs[0] / file_name)
            rows.append(
                {
                    "id": f"{name}-{Path(file_name).stem}",
                    "semantic_id": record["sentence_id"],
                    "language": FLEURS_LANGUAGES.get(name, name),
                    "fleurs_language": name,
                    "text": record["raw_transcription"],
                    "speaker_gender": (record.get("gender") or "").lower() or None,
                    "split": split,
                    "modality": "speech",
                    "audio": str(audio.resolve()),
                }
            )
            if limit is not None and len(rows) >= limit:
                break
