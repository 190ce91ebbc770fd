"""HeapTrim: trims only once resident memory grew by its slack, and the trim really returns fragmented heap."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest

from hookpoints import heap_trim
from hookpoints.heap_trim import HeapTrim, resident_bytes


def test_trims_only_after_growing_by_the_slack():
    rss = iter([100, 150, 199, 200, 120, 150, 219, 220, 90]).__next__  # floor 100; trims at 200 and 220
    calls = []
    trim = HeapTrim(slack=100, trim=calls.append, rss=rss)
    for _ in range(4):
        trim()  # 150, 199: below 100 + 100; 200: trims, the floor becomes 120 (read after the trim)
    assert calls == [0] and trim.trims == 1
    for _ in range(2):
        trim()  # 219: below 120 + 100; 220: trims
    assert calls == [0, 0] and trim.trims == 2


def test_does_nothing_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(heap_trim, "_malloc_trim", lambda: None)
    trim = HeapTrim(slack=0)
    trim()
    assert trim.trim is None and trim.trims == 0


@pytest.mark.skipif(heap_trim._malloc_trim() is None, reason="glibc's malloc_trim only")
def test_malloc_trim_returns_freed_pages_between_live_blocks():
    """What a CPU recording does to the heap: blocks freed between blocks that stay (pooled rows kept until a
    flush). free() cannot give back pages whose neighbours live; the trim does."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 1024  # below the mmap threshold: on the heap, one after the other
    blocks = []
    for _ in range(3000):  # 188 MiB
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)  # resident
        blocks.append(block)
    freed, kept = blocks[::2], blocks[1::2]
    for block in freed:
        libc.free(block)
    held = resident_bytes()
    HeapTrim(slack=0)()
    released = held - resident_bytes()
    for block in kept:
        libc.free(block)
    assert released > 60 * 2**20  # most of the 94 MiB freed between live blocks
