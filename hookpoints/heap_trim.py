"""Giving freed heap memory back to the OS while recording on the CPU (glibc's ``malloc_trim``).

A CPU forward pass allocates and frees large activation tensors from the C heap, while the pooled rows of
each batch (small, kept until the store writer flushes) are allocated between them. glibc then cannot hand
the freed pages back, and the process' resident memory grows with every buffered batch although nothing
leaks: a tiny GPT-2 recording 2,000 examples with a 16 MiB buffer peaked at 1.55 GiB instead of 0.75 GiB
(docs/benchmarks.md, "Recording overhead"). :class:`HeapTrim` calls ``malloc_trim(0)``, which releases the
free pages inside the heap too, whenever the resident size has grown by ``slack`` bytes since it last did.
Elsewhere than Linux with glibc it does nothing.

>>> trim = HeapTrim(slack=128 * 2**20)
>>> trim()  # after each batch: trims only when memory grew by 128 MiB since the last trim
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def resident_bytes() -> int:
    """This process' resident memory in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class HeapTrim:
    """Call after each batch: ``malloc_trim(0)`` once resident memory has grown by ``slack`` bytes since the
    last trim (a /proc read per call, about 20 us; a trim costs a few ms)."""

    def __init__(self, slack: int = 128 * 2**20, trim: Callable[[int], int] | None = None, rss=resident_bytes):
        self.slack = slack
        self.trim = _malloc_trim() if trim is None else trim
        self.rss = rss
        self.trims = 0
        self._floor = rss()

    def __call__(self) -> None:
        if self.trim is None or self.rss() < self._floor + self.slack:
            return
        self.trim(0)
        self.trims += 1
        self._floor = self.rss()
