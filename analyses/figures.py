"""Writing figures: every plot is saved as PNG (for a look) and SVG (for a paper), under a file-safe name, or
turned into PNG bytes for the HTML report (analyses.report). The figure functions of ``figures_*.py`` return a
``matplotlib.figure.Figure`` and never save; this module is the one place figures leave matplotlib.

Example::

    paths = save(measures_figure(maps), Path("plots"), "clusters-r-measures")
"""

from __future__ import annotations

import io
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


def png_bytes(fig: plt.Figure, dpi: int = 110) -> bytes:
    """``fig`` as PNG bytes (closed afterwards), for embedding."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def integer_axis(axis) -> None:
    """Integer ticks only on ``axis`` (layers, counts: no 2.5th layer)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def safe(name: str) -> str:
    """A file-name-safe version of a label set, run or sweep name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")
