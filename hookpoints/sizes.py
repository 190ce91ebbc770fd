"""How many bytes a recording writes, estimated before anything is written (``--max-bytes``).

A hook point writes one row of ``width`` values per example when pooled, or per valid position with pooling
``none``; an attention map's row holds ``[head, key_pos]`` (``heads x`` the key space's longest length) per
query position, so a per-position pattern grows with the square of the input's length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from hookpoints.errors import UserError
from hookpoints.points import HookPoint

VALUE_BYTES = {"float32": 4, "float16": 2}


def row_bytes(point: HookPoint, dtype: str = "float32") -> int:
    """Bytes of one stored row (one example pooled, or one position) of ``point``."""
    return (point.width or 0) * VALUE_BYTES[dtype]


def example_bytes(
    points: list[HookPoint], method: Callable[[HookPoint], str], positions: dict[str, int], dtype: str = "float32"
) -> int:
    """Bytes one example writes, with ``positions[space]`` valid positions in each space (``method``: pooling)."""
    total = 0
    for point in points:
        rows = positions.get(point.space, 1) if method(point) == "none" and point.time_axis is not None else 1
        total += rows * row_bytes(point, dtype)
    return total


def check_budget(estimate: int, budget: int | None, examples: int, per_example: int, biggest: HookPoint | None) -> None:
    """Refuse (one line) a recording whose estimated size exceeds ``budget`` bytes."""
    if budget is None or estimate <= budget:
        return
    largest = f"; the largest hook is {biggest.name}" if biggest else ""
    raise UserError(
        f"this recording would write about {human(estimate)} ({examples} examples x up to {human(per_example)} "
        f"each{largest}), over --max-bytes {human(budget)}: record fewer hooks or examples, pool (--pooling mean), "
        "or raise --max-bytes"
    )


def human(size: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def parse_size(text: str) -> int:
    """``'2G'``, ``'500M'``, ``'64k'`` or a plain byte count -> bytes (binary units)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise UserError(f"--max-bytes must be a size like 2G, 500M or 1048576, not {text!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise UserError(f"--max-bytes must be a finite size more than 0, not {text!r}")
    return int(number * units[unit])
