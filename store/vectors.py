"""A batch of stored activation rows as one numpy matrix, whichever of the store's vector columns holds them.

float32 runs store ``activation`` (``list<float32>``); float16 runs store ``activation_f16_bytes`` (schema 3: one
blob of little-endian IEEE halves per vector) or, written before schema 3, ``activation_f16`` (``list<int16>``
bit patterns). A float16 run recorded before ``hookpoints store migrate`` and resumed after it holds both, so
each row is read from the column that holds it. Example::

    from hookpoints.store import vectors
    x = vectors.matrix(batch, 512, run="r", hook="blocks.0.hook_resid_post")  # [rows, 512] float16 or float32
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pyarrow as pa

from hookpoints.errors import UserError

#: The store's vector columns, newest float16 layout last (store/schema.py).
VECTOR_COLUMNS = ("activation", "activation_f16", "activation_f16_bytes")
#: IEEE half, little-endian: how ``activation_f16_bytes`` lays out each value whatever the machine's byte order.
HALF = np.dtype("<f2")


def present(names: Collection[str]) -> list[str]:
    """The vector columns among ``names`` (a dataset's or batch's columns), in :data:`VECTOR_COLUMNS` order."""
    return [name for name in VECTOR_COLUMNS if name in names]


def matrix(batch: pa.RecordBatch, width: int, *, run: str, hook: str) -> np.ndarray:
    """The batch's vectors as ``[rows, width]``: float32 (a zero-copy view of ``activation``) or float16.

    Every row must hold exactly one vector of ``width`` values without nulls inside; anything else is a
    damaged run, refused in one line (a vector of 3 and one of 5 at width 4 would reshape into two wrong rows).
    """
    rows = batch.num_rows
    held = [(name, batch.column(name)) for name in present(batch.schema.names)]
    held = [(name, column) for name, column in held if column.null_count < rows]
    if rows and not held:
        raise UserError(f"run {run!r} stores empty vectors at {hook}: the run is damaged (record it again)")
    if len(held) <= 1:
        if held and held[0][1].null_count:
            raise UserError(f"run {run!r} stores empty vectors at {hook}: the run is damaged (record it again)")
        return _dense(*held[0], width, run=run, hook=hook) if held else np.empty((0, width), np.float32)
    # rows in two layouts (a float16 run resumed across a schema upgrade): each row from its own column
    out = np.empty((rows, width), np.float32 if any(name == "activation" for name, _ in held) else np.float16)
    covered = np.zeros(rows, bool)  # [rows]
    for name, column in held:
        valid = column.is_valid().to_numpy(zero_copy_only=False)  # [rows]
        if (covered & valid).any():
            raise UserError(
                f"run {run!r} stores two vectors in one row at {hook}: the run is damaged; run hookpoints store verify"
            )
        out[valid] = _dense(name, column.filter(pa.array(valid)), width, run=run, hook=hook)
        covered |= valid
    if not covered.all():
        raise UserError(f"run {run!r} stores empty vectors at {hook}: the run is damaged (record it again)")
    return out


def halves(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A blob column's values and offsets, without a copy: (``[values]`` float16, ``[rows + 1]`` value offsets
    into them). Nulls read as empty blobs; a blob of an odd number of bytes is refused (a damaged store)."""
    column = as_binary(column)
    kind = np.int32 if column.type == pa.binary() else np.int64
    offsets = np.frombuffer(column.buffers()[1], kind, len(column) + 1, column.offset * np.dtype(kind).itemsize)
    data = column.buffers()[2]
    if (offsets & 1).any():
        raise UserError("a float16 vector of an odd number of bytes: the store is damaged; run hookpoints store verify")
    start, stop = (int(offsets[0]), int(offsets[-1])) if len(column) else (0, 0)
    values = np.empty(0, HALF)  # [values]
    if data is not None and stop > start:
        values = np.frombuffer(data, HALF, (stop - start) // 2, start)
    return values, (offsets - start) // 2


def as_binary(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A blob column as one ``binary`` or ``large_binary`` array (a binary view, as delta-rs' reader and
    DuckDB's results may give, is cast: Arrow's kernels and the offsets read here need one of those two)."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks > 1 and column.type != pa.large_binary():  # together they may hold 2 GiB or more:
            column = column.cast(pa.large_binary())  # too many for binary's int32 offsets ("offset overflow")
        column = column.combine_chunks()
    if column.type not in (pa.binary(), pa.large_binary()):
        column = column.cast(pa.large_binary())
    return column


def float_lists(column: pa.Array) -> pa.Array:
    """A blob column as ``list<float32>`` (DuckDB's ``f16_bytes_to_float``, store/query.py); nulls stay null.

    >>> float_lists(pa.array([b"\\x00<\\x00\\xc0", None])).to_pylist()
    [[1.0, -2.0], None]
    """
    column = as_binary(column)
    values, offsets = halves(column)
    mask = pa.array(column.is_null()) if column.null_count else None
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values.astype(np.float32)), mask=mask)


def _dense(name: str, column: pa.Array, width: int, *, run: str, hook: str) -> np.ndarray:
    """``[rows, width]`` of one column whose rows all hold a vector."""
    import pyarrow.compute as pc  # 40 ms to import: not for a session's SQL decoding (query.py)

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    rows = len(column)
    if name == "activation_f16_bytes":
        column = as_binary(column)
        lengths = pc.binary_length(column).to_numpy(zero_copy_only=False)  # [rows] bytes
        _check_lengths(lengths, 2 * width, run=run, hook=hook, unit=2)
        return halves(column)[0].reshape(rows, width)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)  # [rows]
    _check_lengths(lengths, width, run=run, hook=hook, unit=1)
    values = pc.list_flatten(column)
    if values.null_count:  # to_numpy would make them NaN, and turn float16 bit patterns into their integers
        raise UserError(
            f"run {run!r} stores {values.null_count} null value(s) inside its vectors at {hook}: the run is "
            "damaged; run hookpoints store verify"
        )
    flat = values.to_numpy(zero_copy_only=False)
    return (flat.view(np.float16) if flat.dtype == np.int16 else flat).reshape(rows, width)


def _check_lengths(lengths: np.ndarray, expected: int, *, run: str, hook: str, unit: int) -> None:
    wrong = lengths != expected
    if wrong.any():
        found = int(lengths[wrong][0])
        size = f"{found // unit} values" if found % unit == 0 else f"{found} bytes"
        raise UserError(
            f"run {run!r} stores a vector of {size} at {hook}, not its width {expected // unit}: the run is "
            "damaged; run hookpoints store verify"
        )
