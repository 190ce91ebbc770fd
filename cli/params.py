"""Click option types that refuse NaN and infinities (``click.FloatRange`` lets ``nan`` through).

Example::

    @click.option("--buffer-mb", type=FiniteFloat(minimum=0), default=64)
"""

from __future__ import annotations

import math

import click


class FiniteFloat(click.ParamType):
    """A finite float, at least ``minimum`` (or above it with ``strict``)."""

    name = "number"

    def __init__(self, minimum: float | None = None, *, strict: bool = False):
        self.minimum, self.strict = minimum, strict

    def convert(self, value, param, ctx) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.minimum is not None and (number < self.minimum or (self.strict and number == self.minimum)):
            bound = "more than" if self.strict else "at least"
            self.fail(f"{value!r}: give a number {bound} {self.minimum:g}", param, ctx)
        return number
