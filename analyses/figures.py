"""Writing figures: every plot is saved as PNG (for a look) and SVG (for a paper), under a file-safe name."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402


def save(fig: plt.Figure, folder: Path, stem: str) -> list[Path]:
    """Write ``fig`` as ``folder/stem.png`` and ``.svg``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    for path in paths:
        fig.savefig(path, dpi=130 if path.suffix == ".png" else None, bbox_inches="tight")
    plt.close(fig)
    return paths


def safe(name: str) -> str:
    """A file-name-safe version of a label set, run or sweep name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")
