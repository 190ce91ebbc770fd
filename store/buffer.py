"""The run writer's buffer (store/writer.py) and the Arrow rows of one hook that a flush writes from it.

A :class:`Buffer` collects batches until the writer flushes it; a flush turns it into one activations table
(:meth:`Buffer.table`) that store/files.py writes as one file per hook.

Example::

    buffer = Buffer()
    buffer.add(examples, {"h0": HookRows(["a"], np.ones((1, 4), np.float32))})
    rows = buffer.table("r1", ["h0"], float16=True)   # run, hook, example_id, ..., finite, activation_f16_bytes
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from hookpoints.store.schema import ACTIVATIONS
from hookpoints.store.threads import side_by_side

_F16_EXPONENT = 0x7C00  # IEEE half: all exponent bits set means inf or NaN


def default_buffer_bytes() -> int:
    """The run writer's default buffer: 512 MiB of vectors, or a 32nd of the memory this process may use where
    that is less, at least 64 MiB. Every flush writes one Parquet file per hook point, so a small buffer makes
    small files whose fixed cost (writer set-up, statistics, a file per hook) outweighs their values: on the
    H200's host, 720 Seamless hook points at 32 examples per flush wrote 89-119 MB/s (bench/writer_throughput.py).
    Memory: about three buffers (one filling, one being written, and its copy as one table).

    >>> default_buffer_bytes() // 2**20  # on a machine with 16 GiB or more
    512
    """
    total = 0
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not POSIX
        pass
    try:  # a container's memory limit (cgroup v2), where it is lower
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit)) if total else int(limit)
    except OSError:
        pass
    if not total:
        return 64 * 2**20
    return max(64 * 2**20, min(512 * 2**20, total // 32))


DEFAULT_BUFFER_BYTES = default_buffer_bytes()
#: A buffer is also committed once its first rows are this old: a slow recording (a small model on a CPU)
#: that would take long to fill 512 MiB still commits, and resumes from, at most a minute back.
DEFAULT_BUFFER_SECONDS = 60.0


@dataclass
class HookRows:
    """One hook's recorded vectors for a batch: a row per example (pooled) or per position (pooling none)."""

    example_ids: list[str]  # [rows]
    values: np.ndarray  # [rows, width] float32 (float16 accepted for float16 runs: stored as is)
    positions: np.ndarray | None = None  # [rows] int32, only when every position is kept

    def without(self, skip: set[str]) -> HookRows:
        """The rows of examples not in ``skip``."""
        keep = np.array([example not in skip for example in self.example_ids], dtype=bool)
        return HookRows(
            [example for example, kept in zip(self.example_ids, keep, strict=True) if kept],
            self.values[keep],
            None if self.positions is None else self.positions[keep],
        )


@dataclass
class Buffer:
    """Batches not yet committed: manifest rows, every hook's vectors, their example ids and size."""

    examples: list[pa.Table] = field(default_factory=list)
    rows: dict[str, list[HookRows]] = field(default_factory=lambda: defaultdict(list))
    ids: list[str] = field(default_factory=list)
    nbytes: int = 0

    def add(self, examples: pa.Table, rows: dict[str, HookRows]) -> None:
        self.examples.append(examples)
        self.ids.extend(examples["example_id"].to_pylist())
        for hook, chunk in rows.items():
            self.rows[hook].append(chunk)
            self.nbytes += chunk.values.nbytes

    def prepend(self, older: Buffer) -> None:
        """Put ``older`` (a flush that failed) in front of this buffer, to be committed with it."""
        self.examples[:0] = older.examples
        for hook, chunks in older.rows.items():
            self.rows[hook][:0] = chunks
        self.ids[:0] = older.ids
        self.nbytes += older.nbytes

    def table(self, run: str, hooks: list[str], *, float16: bool) -> pa.Table:
        """Every hook's buffered rows as one activations table (``run`` and ``hook`` dictionary-encoded), hook
        after hook, built with a few whole-buffer Arrow and numpy calls: no call per hook that gives the GIL
        back and waits to retake it (store/files.py).

        float16 runs store each vector's IEEE half values as one blob (``activation_f16_bytes``: the flush's
        values buffer, not copied); ``finite`` is false for a row that holds NaN or inf after the cast (values
        beyond float16's range become inf).
        """
        chunks = [(h, chunk) for h, hook in enumerate(hooks) for chunk in self.rows[hook]]
        if not chunks:
            return ACTIVATIONS.empty_table()
        counts = np.array([len(chunk.example_ids) for _, chunk in chunks], np.int64)  # [chunks]
        widths = np.array([chunk.values.shape[1] for _, chunk in chunks], np.int64)  # [chunks]
        if int(counts @ widths) >= 2**31:  # Arrow's int32 offsets of the list values (blobs: per piece below)
            raise ValueError("one flush holds 2**31 values or more: lower max_buffer_bytes")
        values = pa.concat_arrays([_flat(chunk.values, float16) for _, chunk in chunks])  # [values] one copy
        offsets = np.zeros(int(counts.sum()) + 1, np.int32)  # [rows + 1]
        np.cumsum(np.repeat(widths, counts), out=offsets[1:])
        flat = np.frombuffer(values.buffers()[1], np.uint16 if float16 else np.float32, len(values))
        finite = finite_rows(flat, offsets, float16=float16)  # [rows]
        n = len(offsets) - 1
        halves = pa.nulls(n, pa.binary())  # float16: each piece's blobs are set below
        if float16:
            f32 = pa.nulls(n, pa.list_(pa.float32()))
        else:
            f32 = pa.ListArray.from_arrays(pa.array(offsets), values)  # [rows, width]
        ids: dict[int, pa.Array] = {}  # pooled rows share their batch's id list across hooks: built once
        for _, chunk in chunks:
            if id(chunk.example_ids) not in ids:
                ids[id(chunk.example_ids)] = pa.array(chunk.example_ids, pa.string())
        example_ids = pa.concat_arrays([ids[id(chunk.example_ids)] for _, chunk in chunks])
        if all(chunk.positions is None for _, chunk in chunks):
            positions = pa.nulls(n, pa.int32())
        else:
            positions = pa.concat_arrays([_positions(chunk) for _, chunk in chunks])
        hook_codes = np.repeat(np.array([h for h, _ in chunks], np.int32), counts)  # [rows]
        columns = {
            "run": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([run])),
            "hook": pa.DictionaryArray.from_arrays(pa.array(hook_codes), pa.array(hooks, pa.string())),
            "example_id": example_ids,
            "position": positions,
            "activation": f32,
            "activation_f16": pa.nulls(n, pa.list_(pa.int16())),  # schema 1-2's float16 column
            "finite": pa.array(finite, pa.bool_()),
            "activation_f16_bytes": halves,
        }
        batch = pa.record_batch(columns)
        ends = np.cumsum(np.bincount(hook_codes, minlength=len(hooks))).tolist()  # [hooks] each one's last row + 1
        # one chunk per hook: Arrow's dataset writer then files each chunk whole (0.6 s instead of 0.8-1.5 s for
        # 720 Seamless hooks of 32 rows, measured)
        bounds = [(start, stop) for start, stop in zip([0, *ends[:-1]], ends, strict=True) if stop > start]
        if not float16:
            return pa.Table.from_batches([batch.slice(start, stop - start) for start, stop in bounds])
        column = batch.schema.get_field_index("activation_f16_bytes")
        byte_ends = offsets.astype(np.int64) * 2  # [rows + 1] each vector's blob within the values buffer
        pieces = [piece for start, stop in bounds for piece in _blob_pieces(byte_ends, start, stop)]
        data = values.buffers()[1]
        return pa.Table.from_batches(
            [
                batch.slice(a, b - a).set_column(column, "activation_f16_bytes", _blobs(data, byte_ends, a, b))
                for a, b in pieces
            ]
        )


#: Values :func:`finite_rows` checks per call, across its threads: their scratch arrays (48 MiB in all for float16)
#: are reused, where whole-buffer temporaries (3 bytes a value: 805 MB for a 512 MiB float16 flush, 850 MB for
#: the writer bench's 566 MB one) cost 0.2-2 s of fresh pages on one core.
FINITE_BLOCK = 1 << 24
#: Threads :func:`finite_rows` checks its blocks on (numpy gives the GIL back inside each call); None: Arrow's I/O
#: thread count, at most 4. It runs before a flush's files are written side by side, so on one core it was 0.12 s
#: of a GPU-sized Seamless flush's serial part.
FINITE_THREADS: int | None = None


def finite_rows(flat: np.ndarray, offsets: np.ndarray, *, float16: bool) -> np.ndarray:
    """[rows] whether each vector ``flat[offsets[i]:offsets[i + 1]]`` holds no inf or NaN (an empty one: True).

    ``flat``: float16 bit patterns (uint16) or float32 values. Checked in blocks (:data:`FINITE_BLOCK` values
    across :data:`FINITE_THREADS` threads) with reused scratch arrays, a few numpy calls per block (each gives
    the GIL back once, not once per hook).

    >>> finite_rows(np.array([1, 2, np.inf, 4], np.float32), np.array([0, 2, 4, 4]), float16=False).tolist()
    [True, False, True]
    """
    finite = np.ones(len(offsets) - 1, bool)  # [rows]
    threads = FINITE_THREADS or min(4, pa.io_thread_count())
    block = max(1, min(FINITE_BLOCK // threads, len(flat)))
    starts = range(0, len(flat), block)
    hits: list[tuple[int, int, np.ndarray]] = []  # (first row, last row + 1, which of them hold a bad value)
    local = threading.local()  # each thread's scratch, reused block after block

    def check(start: int) -> None:
        if not hasattr(local, "bad"):
            local.scratch = np.empty(block, np.uint16) if float16 else None  # [block] exponent bits
            local.bad = np.empty(block, bool)  # [block]
        part = flat[start : start + block]
        bad = local.bad[: len(part)]
        if float16:
            np.bitwise_and(part, _F16_EXPONENT, out=local.scratch[: len(part)])
            np.equal(local.scratch[: len(part)], _F16_EXPONENT, out=bad)
        else:
            np.isfinite(part, out=bad)
            np.logical_not(bad, out=bad)
        if bad.any():  # each row the block holds part of: is any of its values there bad?
            first = int(np.searchsorted(offsets, start, side="right")) - 1  # the row of value `start`
            last = int(np.searchsorted(offsets, start + len(part)))  # rows [first, last) begin in or before it
            hit = np.logical_or.reduceat(bad, np.maximum(offsets[first:last], start) - start)
            hit &= offsets[first:last] != offsets[first + 1 : last + 1]  # an empty one (reduceat read a neighbour)
            hits.append((first, last, hit))

    side_by_side(check, starts, threads, name="hookpoints-finite")
    for first, last, hit in hits:  # rows split across blocks: applied here, one thread
        finite[first:last] &= ~hit
    return finite


def _flat(values: np.ndarray, float16: bool) -> pa.Array:
    """A chunk's vectors as one flat Arrow array without a copy: float16 bit patterns (int16) or float32; a chunk
    of another dtype is cast first (values beyond float16's range become inf, flagged by ``finite``)."""
    wanted = np.float16 if float16 else np.float32
    if values.dtype != wanted:
        with np.errstate(over="ignore"):
            values = values.astype(np.float32, copy=False).astype(wanted, copy=False)
    flat = np.ascontiguousarray(values).reshape(-1)  # [rows * width]
    kind = pa.int16() if float16 else pa.float32()
    return pa.Array.from_buffers(kind, len(flat), [None, pa.py_buffer(flat)])


#: Bytes of float16 blobs one Arrow ``binary`` array holds (int32 offsets): a flush's hook holding more (a 2 GiB
#: buffer, the most ``max_buffer_bytes`` allows) is stored as several pieces of its rows, each one array.
BLOB_ARRAY_BYTES = 2**31 - 1


def _blob_pieces(byte_ends: np.ndarray, start: int, stop: int) -> list[tuple[int, int]]:
    """Rows ``[start, stop)`` cut into consecutive ranges whose blobs hold at most :data:`BLOB_ARRAY_BYTES`
    (``byte_ends``: ``[rows + 1]`` byte offsets); one range unless the hook's rows hold more."""
    if byte_ends[stop] - byte_ends[start] <= BLOB_ARRAY_BYTES:
        return [(start, stop)]
    pieces = []
    while start < stop:
        end = min(int(np.searchsorted(byte_ends, byte_ends[start] + BLOB_ARRAY_BYTES, side="right")) - 1, stop)
        if end <= start:
            raise ValueError(f"one float16 vector holds more than {BLOB_ARRAY_BYTES} bytes")
        pieces.append((start, end))
        start = end
    return pieces


def _blobs(data: pa.Buffer, byte_ends: np.ndarray, start: int, stop: int) -> pa.Array:
    """Rows ``[start, stop)`` as blobs of their IEEE halves: a view of the flush's values buffer ``data``."""
    first = int(byte_ends[start])
    offsets = (byte_ends[start : stop + 1] - first).astype(np.int32)  # [rows + 1]
    return pa.Array.from_buffers(
        pa.binary(), stop - start, [None, pa.py_buffer(offsets), data.slice(first, int(byte_ends[stop]) - first)]
    )


def _positions(chunk: HookRows) -> pa.Array:
    """A chunk's positions, or nulls for pooled rows (a per-step run pools its encoder's hooks only)."""
    if chunk.positions is None:
        return pa.nulls(len(chunk.example_ids), pa.int32())
    return pa.array(np.asarray(chunk.positions, np.int32))
