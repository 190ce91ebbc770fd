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

from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **options):
    """``pyplot.subplots`` without pyplot: ``(Figure, axes)``, drawn by Agg when saved. No backend is chosen and
    pyplot does not know the figure, so a notebook's own plots keep its backend (``matplotlib.use("Agg")`` here
    switched the whole process) and Jupyter shows a returned figure once (the inline backend also shows every
    pyplot figure at the end of the cell)."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **options)


def save(fig: Figure, folder: Path, stem: str) -> list[Path]:
    """Write ``fig`` as ``folder/stem.png`` and ``.svg``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    for path in paths:
        fig.savefig(path, dpi=130 if path.suffix == ".png" else None, bbox_inches="tight")
    return paths


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """``fig`` as PNG bytes, for embedding."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def integer_axis(axis) -> None:
    """Integer ticks only on ``axis`` (layers, counts: no 2.5th layer)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def safe(name: str) -> str:
    """A file-name-safe version of a label set, run or sweep name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")
