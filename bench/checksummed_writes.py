"""Writing activations with Parquet page checksums (store/files.py) against delta-rs' own writer.

One commit of 64 MiB of float32 vectors (4 hooks x 4,096 examples x 1,024 values) to a fresh local store's
activations table, each way, interleaved, 5 rounds; the median seconds and the bytes on disk. Both use zstd
level 1 and the table's row group size; only the checksummed files let ``hookpoints store verify`` find
flipped bytes (docs/hostile-inputs.md).

Run: ``.venv/bin/python bench/checksummed_writes.py [--rounds 5]`` (writes docs/bench-checksummed-writes.md).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from hookpoints.store import files, tables
from hookpoints.store.catalog import Store
from hookpoints.store.schema import ACTIVATIONS, CORE_TABLES

N, WIDTH, HOOKS = 4096, 1024, 4
SPEC = CORE_TABLES["activations"]


def vectors(seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    offsets = pa.array(np.arange(0, (N + 1) * WIDTH, WIDTH, dtype=np.int32))
    pieces = []
    for hook in range(HOOKS):
        values = rng.normal(size=(N, WIDTH)).astype(np.float32)  # [examples, width]
        columns = [
            pa.array(["r"] * N),
            pa.array([f"h{hook}"] * N),
            pa.array([f"e{i}" for i in range(N)]),
            pa.nulls(N, pa.int32()),
            pa.ListArray.from_arrays(offsets, pa.array(values.ravel())),
            pa.nulls(N, ACTIVATIONS.field("activation_f16").type),
            pa.array(np.ones(N, bool)),
            pa.nulls(N, ACTIVATIONS.field("activation_f16_bytes").type),
        ]
        pieces.append(pa.table(columns, schema=ACTIVATIONS))
    return pa.concat_tables(pieces)


def write(root: Path, data: pa.Table, way: str) -> tuple[float, int]:
    shutil.rmtree(root, ignore_errors=True)
    store = Store.open(root, create=True)
    started = time.perf_counter()
    if way == "delta-rs":
        tables.append(store.location, SPEC, data)
    else:
        actions = files.write_files(store.location, SPEC, data)
        delta = tables.open_table(store.location, "activations")
        delta.create_write_transaction(actions, mode="append", schema=delta.schema(), partition_by=["run", "hook"])
    seconds = time.perf_counter() - started
    return seconds, sum(tables.list_files(store.location, "activations").values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    data = vectors()
    times: dict[str, list[float]] = {"delta-rs": [], "checksummed": []}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(rounds):
            for way in times:
                seconds, size = write(Path(scratch) / way, data, way)
                times[way].append(seconds)
                sizes[way] = size
    median = {way: statistics.median(values) for way, values in times.items()}
    mib = data.nbytes / 2**20
    lines = [
        "# Checksummed activation files against delta-rs' writer",
        "",
        f"One commit of {mib:.1f} MiB ({HOOKS} hooks x {N} examples x {WIDTH} float32), fresh local store, "
        f"{rounds} interleaved rounds, median. `bench/checksummed_writes.py`.",
        "",
        "| writer | seconds | MiB/s | MiB on disk |",
        "|---|---|---|---|",
        *(f"| {way} | {median[way]:.2f} | {mib / median[way]:.0f} | {sizes[way] / 2**20:.1f} |" for way in times),
        "",
        f"Ratio checksummed / delta-rs: {median['checksummed'] / median['delta-rs']:.2f}.",
        "",
    ]
    page = Path(__file__).resolve().parent.parent / "docs" / "bench-checksummed-writes.md"
    page.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
