"""Reading float16 runs: one blob per vector (schema 3) against the ``list<int16>`` layout of older stores.

One float16 run (``--examples`` x ``--hooks`` hooks of ``--width``, normal values) is written by the run writer
(blobs); a copy of the store gets the same rows in the list layout (rewritten with deltalake, as a store
written before schema 3 holds them). Each reader then reads every hook of the run, in turn, ``--rounds``
times, interleaved (medians, ns per stored value, wall clock):

- ``sql``: the ``activations`` view in SQL, ``avg(list_avg(activation))`` per hook (what ``magnitudes`` runs):
  blobs through ``f16_bytes_to_float`` (numpy, registered in DuckDB), lists through the ``f16_to_float`` macro;
- ``matrix``: ``HookMatrixReader`` (what ``ap`` and ``clusters`` read), Arrow batches to numpy;
- ``neuron_stats``: ``neuron_stats(hook, stats='avg')``.

Every reader's values are checked equal across the layouts. Run: ``.venv/bin/python bench/f16_reads.py``
(about 2 minutes on 2 cores). Prints a Markdown table (docs/benchmarks.md).
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
from deltalake import DeltaTable, write_deltalake
from hookpoints.analyses.examples import open_runs, select_examples
from hookpoints.analyses.hook_matrix import HookMatrixReader, shared_hooks
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run


def write_run(root: Path, examples: int, hooks: int, width: int) -> Store:
    store = Store.open(root, create=True)
    ids = [f"e{i:06d}" for i in range(examples)]
    table = pa.table({"example_id": ids})
    specs = [
        {"hook": f"h{h:02d}", "module": f"h{h:02d}", "io": "output", "component": "c", "layer": h, "submodule": "s",
         "width": width, "shape": [width], "neuron_axis": 1, "space": "c", "layer_output": True}
        for h in range(hooks)
    ]  # fmt: skip
    settings = {"model": "m", "task": "forward", "pooling": "mean", "dtype": "float16"}
    writer = open_run(store, "r", settings=settings, config={}, hooks=specs, examples_schema=table.schema)
    rng = np.random.default_rng(0)
    for start in range(0, examples, 1000):
        part = table.slice(start, 1000)
        chunk = part["example_id"].to_pylist()
        writer.add(part, {s["hook"]: HookRows(chunk, rng.normal(size=(len(chunk), width))) for s in specs})
    writer.finish()
    return store


def as_lists(source: Path, target: Path) -> Store:
    """A copy of the store whose float16 vectors are ``list<int16>`` bit patterns (the layout before schema 3)."""
    shutil.copytree(source, target)
    uri = str(target / "activations")
    data = DeltaTable(uri).to_pyarrow_table()
    blobs = data["activation_f16_bytes"].combine_chunks()
    offsets = np.frombuffer(blobs.buffers()[1], np.int32, len(blobs) + 1) // 2
    bits = np.frombuffer(blobs.buffers()[2], np.int16, offsets[-1])
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(bits))
    data = data.set_column(data.schema.get_field_index("activation_f16"), "activation_f16", lists)
    data = data.set_column(
        data.schema.get_field_index("activation_f16_bytes"), "activation_f16_bytes", pa.nulls(len(data), pa.binary())
    )
    write_deltalake(uri, data, mode="overwrite", partition_by=["run", "hook"])
    return Store.open(target)


def read_sql(store: Store) -> np.ndarray:
    with store.query() as session:
        result = session.sql(
            "SELECT hook, avg(list_avg(activation)) AS m FROM activations WHERE run = 'r' GROUP BY hook ORDER BY hook"
        )
    return result["m"].to_numpy()


def read_matrix(store: Store) -> np.ndarray:
    with store.query() as session:
        group = open_runs(session, ["r"])
        examples = select_examples(session, group)
        hooks = shared_hooks(session, group.runs, layer_outputs=True)
    reader = HookMatrixReader(store, examples)
    return np.array([reader.read(hook).mean(dtype=np.float64) for hook in hooks])


def read_stats(store: Store) -> np.ndarray:
    with store.query() as session:
        result = session.neuron_stats("h%", stats="avg", run="r").sort_by(
            [("hook", "ascending"), ("neuron", "ascending")]
        )
    return result["avg"].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--hooks", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    readers = {"sql": read_sql, "matrix": read_matrix, "neuron_stats": read_stats}
    values = args.examples * args.hooks * args.width
    with tempfile.TemporaryDirectory() as scratch:
        stores = {"blobs": write_run(Path(scratch) / "blobs", args.examples, args.hooks, args.width)}
        stores["lists"] = as_lists(Path(scratch) / "blobs", Path(scratch) / "lists")
        times: dict = {}
        for _ in range(args.rounds):
            for name, read in readers.items():
                results = {}
                for layout, store in stores.items():
                    started = time.perf_counter()
                    results[layout] = read(store)
                    times.setdefault((name, layout), []).append((time.perf_counter() - started) / values * 1e9)
                np.testing.assert_allclose(results["blobs"], results["lists"], rtol=1e-6, atol=1e-9)
    print(
        f"{args.examples} examples x {args.hooks} hooks x {args.width} float16 values ({values / 1e6:.0f} M); "
        f"medians of {args.rounds} rounds, wall ns per value\n"
    )
    print("| reader | list<int16> (schema 1-2) | one blob per vector (schema 3) | ratio |")
    print("|---|---:|---:|---:|")
    for name in readers:
        lists, blobs = (statistics.median(times[name, layout]) for layout in ("lists", "blobs"))
        print(f"| {name} | {lists:.1f} | {blobs:.1f} | {lists / blobs:.1f}x |")


if __name__ == "__main__":
    main()
