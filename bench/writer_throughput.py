"""The run writer's throughput (issue 16): stored value bytes per second through ``add`` + ``finish``.

Every Table 1 hook point of a Seamless-sized model (720 hooks, 1,105,920 values per example) or a
Llama-1B-sized one (291 hooks, 763,904 values per example), batches of 32 pooled examples, the default
64 MiB buffer (so every batch is one flush, as in bench/gpu.py; ``--buffer-mb`` to change it), on a fresh
local store. Writers compared in one run, interleaved round by round:

- ``before``: the writer of a base commit, the one before the change (``--base``, read with ``git show``):
  synchronous, one Parquet file after the other;
- ``serial``: this writer with ``workers=1, background=False`` (same work, no threads);
- ``bg w1`` / ``bg wN``: flushes in a background thread, per-hook files written by 1 / N threads.

Then a producer slower than the writer (it sleeps ``--produce`` seconds per batch, as a recorder waits on its
GPU; default 1.5x the ``before`` writer's time per batch): the seconds ``add`` blocked it, summed, for
``before`` and the last ``bg`` writer, and the seconds ``finish`` waited for the last flush.

Run: ``.venv/bin/python bench/writer_throughput.py [--rounds 2] [--shapes seamless,llama] [--dtypes float16]
[--batches 3] [--workers 2]`` (about 2 minutes on 2 cores). At full scale (a 16-core GPU machine):
``--batches 20 --workers 8,16``. Prints a Markdown table (docs/benchmarks.md, "Run writer").
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
try:  # installed: store/ is hookpoints.store (setuptools package-dir)
    import hookpoints.store  # noqa: F401
except ModuleNotFoundError:  # a bare tree (the GPU machine, bench/gpu_bundle.sh): the same mapping by path
    sys.path.insert(0, str(ROOT))
    import hookpoints

    hookpoints.__path__.append(str(ROOT))
from hookpoints.store.catalog import Store  # noqa: E402
from hookpoints.store.writer import HookRows, open_run  # noqa: E402

BATCH = 32
SHAPES = {  # hook widths: Table 1 of each model (FFN 4,096 / 8,192; d_model 1,024 / 2,048; k/v 512)
    "seamless": [1024] * 600 + [4096] * 120,
    "llama": [2048] * 160 + [8192] * 48 + [512] * 83,
}
BUFFER_MB = 64  # --buffer-mb; the runs in docs/benchmarks.md (the default is 512 MiB since, store.writer)


def old_writer(base: str):
    """store/writer.py (with its files.py and commits.py) as of commit ``base``, loaded beside today's."""
    import hookpoints.store as package

    names = ("files", "commits", "writer")
    saved = {name: sys.modules[f"hookpoints.store.{name}"] for name in names}
    loaded = {}
    try:
        for name in names:  # each old module imports the old ones loaded before it
            copied = ROOT / "bench" / "base" / base / f"{name}.py"  # bench/gpu_bundle.sh: a tree without .git
            source = copied.read_text() if copied.exists() else subprocess.run(
                ["git", "show", f"{base}:store/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
            spec = importlib.util.spec_from_loader(f"hookpoints.store.{name}", loader=None)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            setattr(package, name, module)
            exec(compile(source, f"{base}:store/{name}.py", "exec"), module.__dict__)  # noqa: S102 - our own git
            loaded[name] = module
    finally:
        for name, module in saved.items():
            sys.modules[f"hookpoints.store.{name}"] = module
            setattr(package, name, module)
    return loaded["writer"]


def hooks_of(widths: list[int]) -> list[dict]:
    return [
        {"hook": f"h{i:03d}", "module": f"m{i}", "io": "output", "component": "c", "layer": i, "submodule": "s",
         "width": w, "shape": [w], "neuron_axis": 1, "space": "input", "layer_output": False}
        for i, w in enumerate(widths)
    ]  # fmt: skip


def batches(widths: list[int], count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pool = {w: rng.normal(size=(BATCH, w)).astype(np.float32) for w in set(widths)}  # [batch, width]
    for b in range(count):
        ids = [f"{b}-{i}" for i in range(BATCH)]
        yield pa.table({"example_id": ids}), {f"h{i:03d}": HookRows(ids, pool[w]) for i, w in enumerate(widths)}


def run_once(way: str, old, widths, dtype: str, count: int, scratch: Path, produce: float = 0.0) -> tuple:
    """(seconds through add + finish, seconds ``add`` blocked the producer, seconds ``finish`` took, CPU
    seconds of the process meanwhile: every thread's, less the producer's sleep)."""
    folder = scratch / "store"
    shutil.rmtree(folder, ignore_errors=True)
    store = Store.open(folder, create=True)
    options = dict(settings={"model": "m", "task": "forward", "pooling": "mean", "dtype": dtype}, config={},
                   hooks=hooks_of(widths), examples_schema=pa.schema([("example_id", pa.string())]))  # fmt: skip
    if way == "before":
        writer = old.open_run(store, "r", **options, max_buffer_bytes=BUFFER_MB * 2**20)
    else:
        workers = 1 if way == "serial" else int(way.removeprefix("bg w"))
        background = way != "serial"
        writer = open_run(
            store, "r", workers=workers, background=background, max_buffer_bytes=BUFFER_MB * 2**20, **options
        )
    blocked = 0.0
    started, cpu = time.perf_counter(), time.process_time()
    for examples, rows in batches(widths, count):
        if produce:
            time.sleep(produce)  # the GPU computing the next batch (the GIL is free meanwhile)
        at = time.perf_counter()
        writer.add(examples, rows)
        blocked += time.perf_counter() - at
    at = time.perf_counter()
    writer.finish()
    seconds = time.perf_counter() - started
    finishing = time.perf_counter() - at
    cpu = time.process_time() - cpu
    rows = store.dataset("activations").count_rows()
    if rows != count * BATCH * len(widths):
        raise RuntimeError(f"{way}: {rows} activation rows stored, {count * BATCH * len(widths)} expected")
    return seconds, blocked, finishing, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shapes", default="seamless,llama")
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--batches", type=int, default=3, help="batches of 32 examples per writer (a flush each)")
    parser.add_argument("--workers", default="2", help="thread counts to compare besides 1, comma-separated")
    parser.add_argument(
        "--produce",
        type=float,
        default=0.0,
        help="producer seconds per batch (default: 1.5x the 'before' writer's seconds per batch)",
    )
    parser.add_argument("--base", default="4195983", help="the commit whose writer is 'before'")
    parser.add_argument("--buffer-mb", type=int, default=64, help="the writer's buffer (MiB of float32 values)")
    args = parser.parse_args()
    global BUFFER_MB
    BUFFER_MB = args.buffer_mb
    old = old_writer(args.base)
    ways = ["before", "serial", "bg w1", *(f"bg w{n}" for n in args.workers.split(",") if n.strip() != "1")]
    cases = [(shape, dtype) for shape in args.shapes.split(",") for dtype in args.dtypes.split(",")]
    times: dict = {(case, way): [] for case in cases for way in ways}
    cpus: dict = {(case, way): [] for case in cases for way in ways}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.rounds):
            for case in cases:
                for way in ways:
                    seconds, _, _, cpu = run_once(way, old, SHAPES[case[0]], case[1], args.batches, Path(scratch))
                    times[case, way].append(seconds)
                    cpus[case, way].append(cpu)
                    print(f"{case} {way}: {seconds:.2f} s", file=sys.stderr, flush=True)
        blocked, case = {}, cases[0]
        produce = args.produce or 1.5 * statistics.median(times[case, "before"]) / args.batches
        for way in ("before", ways[-1]) * args.rounds:
            blocked.setdefault(way, []).append(
                run_once(way, old, SHAPES[case[0]], case[1], args.batches, Path(scratch), produce)
            )
    print(f"| shape | dtype | MB per batch | {' | '.join(ways)} |")
    print("|---|---|---:|" + "---:|" * len(ways))
    for shape, dtype in cases:
        megabytes = BATCH * sum(SHAPES[shape]) * (2 if dtype == "float16" else 4) / 1e6
        base = statistics.median(times[(shape, dtype), "before"])
        cells = []
        for way in ways:
            seconds = statistics.median(times[(shape, dtype), way])
            cells.append(f"{megabytes * args.batches / seconds:.0f} MB/s ({base / seconds:.2f}x)")
        print(f"| {shape} ({len(SHAPES[shape])} hooks) | {dtype} | {megabytes:.0f} | {' | '.join(cells)} |")
    print("\nCPU seconds per GB of values (all threads; less is less work, whatever the load):\n")
    print(f"| shape | dtype | {' | '.join(ways)} |")
    print("|---|---|" + "---:|" * len(ways))
    for shape, dtype in cases:
        gigabytes = args.batches * BATCH * sum(SHAPES[shape]) * (2 if dtype == "float16" else 4) / 1e9
        base = statistics.median(cpus[(shape, dtype), "before"])
        cells = [f"{statistics.median(cpus[(shape, dtype), way]) / gigabytes:.1f} "
                 f"({statistics.median(cpus[(shape, dtype), way]) / base:.2f}x)" for way in ways]  # fmt: skip
        print(f"| {shape} | {dtype} | {' | '.join(cells)} |")
    print(f"\nA producer slower than the writer ({produce:.2f} s per batch; {case[0]}, {case[1]}), medians:\n")
    print("| writer | seconds in all | add blocked the producer | per batch | finish |")
    print("|---|---:|---:|---:|---:|")
    for way, results in blocked.items():
        total, waits, finishing, _ = (statistics.median(column) for column in zip(*results, strict=True))
        print(f"| {way} | {total:.1f} | {waits:.2f} s | {waits / args.batches:.2f} s | {finishing:.2f} s |")


if __name__ == "__main__":
    main()
