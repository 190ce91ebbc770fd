"""The run writer's buffer (store/writer.py) and the Arrow rows of one hook that a flush writes from it.

A :class:`Buffer` collects batches until the writer flushes it; a flush turns it into one
``(run, hook)`` partition per hook (:meth:`Buffer.parts`), each built by a function the file-writing threads
call (store/files.py ``write_parts``), so the float16 casts run in parallel with the Parquet encoding.

Example::

    buffer = Buffer()
    buffer.add(examples, {"h0": HookRows(["a"], np.ones((1, 4), np.float32))})
    parts = buffer.parts("r1", ["h0"], float16=True)   # [(("r1", "h0"), build)], build() -> pa.Table
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from hookpoints.store.schema import ACTIVATIONS

#: An activations file's columns: the table's, less the partition columns (run, hook).
BODY = pa.schema([column for column in ACTIVATIONS if column.name not in ("run", "hook")])
_F16_EXPONENT = 0x7C00  # IEEE half: all exponent bits set means inf or NaN


def default_buffer_bytes() -> int:
    """The run writer's default buffer: 512 MiB of vectors, or a 32nd of the memory this process may use where
    that is less, at least 64 MiB. Every flush writes one Parquet file per hook point, so a small buffer makes
    small files whose fixed cost (writer set-up, statistics, a file per hook) outweighs their values: on the
    H200's host, 720 Seamless hook points at 32 examples per flush wrote 89-119 MB/s (bench/writer_throughput.py).
    Memory: about two buffers (one filling, one being written).

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

    def parts(self, run: str, hooks: list[str], *, float16: bool) -> list[tuple[tuple, Callable[[], pa.Table]]]:
        """One ``((run, hook), build)`` per hook; ``build()`` returns the hook's rows as :data:`BODY`."""
        ids: dict[tuple, pa.Array] = {}  # the example ids of chunks shared by every hook (pooled) built once
        parts = []
        for hook in hooks:
            chunks = self.rows[hook]
            key = tuple(id(chunk.example_ids) for chunk in chunks)
            if key not in ids:
                ids[key] = pa.array([example for chunk in chunks for example in chunk.example_ids], pa.string())
            parts.append(((run, hook), _builder(chunks, ids[key], float16)))
        return parts


def _builder(chunks: list[HookRows], ids: pa.Array, float16: bool) -> Callable[[], pa.Table]:
    return lambda: hook_table(chunks, ids, float16=float16)


def hook_table(chunks: list[HookRows], ids: pa.Array, *, float16: bool) -> pa.Table:
    """One hook's buffered rows as an activations file's columns (:data:`BODY`), without Python per row.

    float16 runs store the IEEE half bit patterns (``activation_f16``); ``finite`` is false for a row that
    holds NaN or inf after the cast (values beyond float16's range become inf).
    """
    parts = [chunk.values for chunk in chunks]
    values = parts[0] if len(parts) == 1 else np.concatenate(parts)  # [rows, width]
    n, width = values.shape
    if n * width >= 2**31:
        raise ValueError("one flush holds more than 2**31 values: lower max_buffer_bytes")
    if len(ids) != n:
        raise ValueError(f"{n} rows of vectors but {len(ids)} example ids")
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    if float16:
        if values.dtype != np.float16:
            with np.errstate(over="ignore"):  # values beyond float16's range become inf (and are flagged)
                values = values.astype(np.float32, copy=False).astype(np.float16)
        bits = np.ascontiguousarray(values).view(np.int16)  # [rows, width]
        finite = ((bits.view(np.uint16) & _F16_EXPONENT) != _F16_EXPONENT).all(axis=1)
        f32 = pa.nulls(n, BODY.field("activation").type)
        f16 = pa.ListArray.from_arrays(offsets, pa.array(bits.ravel()))
    else:
        values = np.ascontiguousarray(values, dtype=np.float32)
        finite = np.isfinite(values).all(axis=1)
        f32 = pa.ListArray.from_arrays(offsets, pa.array(values.ravel()))
        f16 = pa.nulls(n, BODY.field("activation_f16").type)
    positions = [chunk.positions for chunk in chunks]
    position = (
        pa.nulls(n, pa.int32())
        if positions[0] is None
        else pa.array(np.concatenate(positions).astype(np.int32, copy=False))
    )
    return pa.table([ids, position, f32, f16, pa.array(finite, pa.bool_())], schema=BODY)
