"""``hookpoints sql --format parquet|arrow --out FILE``: query results written as typed columnar files, so vectors
stay lists of floats (not the strings of csv/json) and nothing is held twice (batches are streamed to the file).

Example::

    hookpoints sql --store S --format parquet --out acts.parquet "SELECT * FROM activations WHERE run = 'r'"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from hookpoints.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

EXPORT_FORMATS = ("parquet", "arrow")


def check_export(fmt: str, out: str | None) -> Path | None:
    """The output file for ``fmt``: required for parquet/arrow, refused for the printed formats."""
    if fmt not in EXPORT_FORMATS:
        if out is not None:
            raise UserError(f"--out is for --format {' or '.join(EXPORT_FORMATS)}; --format {fmt} prints to stdout")
        return None
    if out is None:
        raise UserError(
            f"--format {fmt} writes a file: give it with --out FILE.{'parquet' if fmt == 'parquet' else 'arrow'}"
        )
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {path} is a folder: give a file name")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: folder {path.parent} does not exist")
    return path


def export(batches: pa.RecordBatchReader | pa.Table, fmt: str, path: Path) -> int:
    """Write the result to ``path`` as Parquet (zstd) or an Arrow IPC file; returns the rows written.

    Written to a temporary name first and renamed, so a failed query leaves no half file behind.
    """
    import pyarrow as pa  # here: the printed formats of `hookpoints sql` import no pyarrow

    reader = batches.to_reader() if isinstance(batches, pa.Table) else batches
    partial = path.with_name(f".{path.name}.partial")
    rows = 0
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with pq.ParquetWriter(partial, reader.schema, compression="zstd") as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
        elif fmt == "arrow":
            with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
        else:
            raise UserError(f"unknown export format {fmt!r}: use {' or '.join(EXPORT_FORMATS)}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return rows
