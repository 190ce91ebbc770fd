"""The run writer's flush beside a recorder (issue 16): how much each slows the other, CPU contention removed.

A flush (a buffer of every Table 1 hook point of a Seamless-sized model, 720 hooks, or a Llama-1B-sized one,
291 hooks; ``--rows`` pooled rows per hook) is built, written as one Parquet file per hook and committed to
Delta, by:

- ``before``: the writer of a base commit (``--base``, read with ``git show``): one ``pq.write_table`` per hook
  from a pool of ``--workers`` threads;
- ``now``: this tree's (``Buffer.table``, then ``write_dataset`` calls side by side, store/files.py);
- ``one-call`` (with ``--ways``): this tree's with one ``write_dataset`` call at a time (``WRITE_CALLS = 1``),
  as the writer was before the calls ran side by side;
- ``lists`` (with ``--ways``): this tree's writer given the table of ``--lists-base``'s buffer (float16 as
  ``list<int16>``, the layout before schema 3's one blob per vector): the layout's cost alone.

The flush runs in a thread pinned, with every thread it starts, to all cores but the first; a probe that
stands for the recorder runs on the first core alone, so the two meet only at the GIL:

- ``python``: pure Python (the GIL never given back);
- ``torch``: tiny torch operations (the GIL given back and retaken around each, as a launch-bound GPU
  recorder's kernel launches do).

Reported: the flush's seconds alone and beside each probe, and the probe's rate beside the flush as a share
of its rate alone (1.00: the flush costs the recorder nothing). The MB/s of the flush alone on the rest of the
cores is the writer's own ceiling.

Run: ``.venv/bin/python bench/writer_throughput.py [--rounds 2] [--shapes seamless,llama] [--dtypes float16]``
(about 4 minutes on 2 cores: the flush gets one). Needs 2 cores or more. On a 16-core GPU host: ``--workers 8
--rows 256`` (the 512 MiB default buffer). Prints a Markdown table (docs/benchmarks.md, "Run writer").
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
from hookpoints.store import files  # noqa: E402
from hookpoints.store.buffer import Buffer, HookRows  # noqa: E402
from hookpoints.store.commits import FencedAppender  # noqa: E402
from hookpoints.store.location import StoreLocation  # noqa: E402
from hookpoints.store.schema import CORE_TABLES  # noqa: E402
from hookpoints.store.tables import create  # noqa: E402

SHAPES = {  # hook widths: Table 1 of each model (FFN 4,096 / 8,192; d_model 1,024 / 2,048; k/v 512)
    "seamless": [1024] * 600 + [4096] * 120,
    "llama": [2048] * 160 + [8192] * 48 + [512] * 83,
}


def old_store(base: str) -> dict:
    """store/{buffer,files,commits}.py as of commit ``base``, loaded beside today's (each imports the old
    ones loaded before it)."""
    import hookpoints.store as package

    names = ("buffer", "files", "commits")
    saved = {name: sys.modules[f"hookpoints.store.{name}"] for name in names}
    loaded = {}
    try:
        for name in names:
            copied = ROOT / "bench" / "base" / base / f"{name}.py"  # bench/gpu_bundle.sh: a tree without .git
            source = (
                copied.read_text()
                if copied.exists()
                else subprocess.run(
                    ["git", "show", f"{base}:store/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
                ).stdout
            )
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
    return loaded


def buffers(widths: list[int], rows: int, dtype: str, *olds: dict) -> tuple:
    """One flush's rows, as the recorder hands them (float16 for a float16 run: cast where pooled), in this
    tree's buffer and each base's."""
    rng = np.random.default_rng(0)
    pool = {w: rng.normal(size=(rows, w)).astype(dtype) for w in set(widths)}  # [rows, width]
    ids = [f"e{i}" for i in range(rows)]
    chunks = {f"h{i:03d}": HookRows(ids, pool[w]) for i, w in enumerate(widths)}
    made = [Buffer(), *(old["buffer"].Buffer() for old in olds)]
    for buffer in made:
        buffer.add(pa.table({"example_id": ids}), chunks)
    return tuple(made)


class Flusher:
    """Flushes (build, files, Delta commit) on a thread pinned to ``cores``: Arrow's threads and the base
    writer's pool are started from it, so they inherit the pinning."""

    def __init__(self, way: str, buffer, old: dict, cores: set[int], scratch: Path, workers: int):
        self.way, self.buffer, self.old, self.cores, self.scratch = way, buffer, old, cores, scratch
        self.workers, self.times = workers, []

    def run(self, count: int, done: list | None = None) -> None:
        thread = threading.Thread(target=self._flushes, args=(count, done))
        thread.start()
        if done is None:
            thread.join()
        self.thread = thread

    def _flushes(self, count: int, done: list | None) -> None:
        os.sched_setaffinity(threading.get_native_id(), self.cores)
        pool = ThreadPoolExecutor(self.workers) if self.way == "before" else None
        hooks = sorted(self.buffer.rows)
        calls = files.WRITE_CALLS
        files.WRITE_CALLS = 1 if self.way == "one-call" else calls  # (one flush runs at a time)
        try:
            self._flush(count, pool, hooks)
        finally:
            files.WRITE_CALLS = calls
        if pool is not None:
            pool.shutdown()
        if done is not None:
            done.append(True)

    def _flush(self, count: int, pool, hooks: list[str]) -> None:
        for _ in range(count):
            shutil.rmtree(self.scratch, ignore_errors=True)
            location = StoreLocation.parse(self.scratch)
            spec = CORE_TABLES["activations"]
            create(location, spec)
            started = time.perf_counter()
            if self.way == "before":
                appender = self.old["commits"].FencedAppender(location, spec, "bench", what="bench")
                appender.append_parts(self.buffer.parts("r", hooks, float16=self._float16), pool=pool)
            else:
                appender = FencedAppender(location, spec, "bench", what="bench")
                appender.append(self.buffer.table("r", hooks, float16=self._float16))
            self.times.append(time.perf_counter() - started)

    @property
    def _float16(self) -> bool:
        return next(iter(self.buffer.rows.values()))[0].values.dtype == np.float16


def probe_python(stop: list) -> int:
    count = 0
    while not stop:
        sum(range(200))
        count += 1
    return count


def probe_torch(stop: list) -> int:
    import torch

    tensor, count = torch.zeros(16), 0
    while not stop:
        for _ in range(20):
            tensor.add_(1.0)
        count += 1
    return count


def probe_rate(probe, seconds: float = 2.0) -> float:
    stop: list = []
    timer = threading.Timer(seconds, stop.append, args=(True,))
    timer.start()
    started = time.perf_counter()
    return probe(stop) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shapes", default="seamless,llama")
    parser.add_argument("--dtypes", default="float16")
    parser.add_argument("--rows", type=int, default=32, help="pooled rows per hook in one flush")
    parser.add_argument("--flushes", type=int, default=2, help="flushes per measurement (1 beside pure Python)")
    parser.add_argument("--workers", type=int, default=2, help="the 'before' writer's file threads")
    parser.add_argument("--base", default="c455c46", help="the commit whose writer is 'before'")
    parser.add_argument("--ways", default="before,now", help="writers to compare: before, now, one-call, lists")
    parser.add_argument("--lists-base", default="fd80660", help="the commit whose buffer builds 'lists' tables")
    parser.add_argument("--probes", default="python,torch", help="recorders beside the flush: python, torch")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit("writer_throughput.py needs 2 cores or more: one for the probe, the rest for the flush")
    os.sched_setaffinity(threading.get_native_id(), {cores[0]})  # this thread runs the probes
    import torch

    torch.set_num_threads(1)
    old = old_store(args.base)
    lists = old_store(args.lists_base)
    ways = tuple(args.ways.split(","))
    probes = {name: {"python": probe_python, "torch": probe_torch}[name] for name in args.probes.split(",")}
    cases = [(shape, dtype) for shape in args.shapes.split(",") for dtype in args.dtypes.split(",")]
    alone: dict = {}  # (case, way) -> flush seconds
    beside: dict = {}  # (case, probe, way) -> (flush seconds, probe rate / rate alone)
    with tempfile.TemporaryDirectory() as scratch:
        for case in cases:
            made = buffers(SHAPES[case[0]], args.rows, case[1], old, lists)
            made = dict(zip(("now", "before", "lists"), made, strict=True))
            flushers = {
                way: Flusher(way, made.get(way, made["now"]), old, set(cores[1:]), Path(scratch) / way, args.workers)
                for way in ways
            }
            for flusher in flushers.values():
                flusher.run(1)  # warm-up: thread pools started, pages faulted in
            for _ in range(args.rounds):
                for way in ways:
                    flusher = flushers[way]
                    flusher.times = []
                    flusher.run(args.flushes)
                    alone.setdefault((case, way), []).extend(flusher.times)
                    print(f"{case} {way} alone: {flusher.times}", file=sys.stderr, flush=True)
                    for name, probe in probes.items():
                        rate = probe_rate(probe)
                        flusher.times, done = [], []
                        started = time.perf_counter()
                        flusher.run(1 if name == "python" else args.flushes, done)
                        count = probe(done)
                        share = count / (time.perf_counter() - started) / rate
                        flusher.thread.join()
                        beside.setdefault((case, name, way), []).append((statistics.median(flusher.times), share))
                        print(f"{case} {way} {name}: {beside[case, name, way][-1]}", file=sys.stderr, flush=True)
    median = statistics.median
    print(
        f"Flush of {args.rows} rows per hook on {len(cores) - 1} core(s), a probe on its own core; base "
        f"{args.base} with {args.workers} file threads; medians of {args.rounds} rounds x {args.flushes} flushes\n"
    )
    labels = {"python": "beside Python", "torch": "beside torch ops"}
    header = [f"flush alone: {way}" for way in ways]
    for name in probes:
        header += [f"{labels[name]}: {what} {way}" for what in ("flush", "probe's rate") for way in ways]
    print("| shape | dtype | MB per flush | " + " | ".join(header) + " |")
    print("|---|---|---:|" + "---:|" * len(header))
    for shape, dtype in cases:
        megabytes = args.rows * sum(SHAPES[shape]) * (2 if dtype == "float16" else 4) / 1e6
        cells = [f"{median(alone[(shape, dtype), way]):.2f} s ({megabytes / median(alone[(shape, dtype), way]):.0f} "
                 "MB/s)" for way in ways]  # fmt: skip
        for name in probes:
            runs = {way: beside[(shape, dtype), name, way] for way in ways}
            cells += [f"{median(s for s, _ in runs[way]):.2f} s" for way in ways]
            cells += [f"{median(r for _, r in runs[way]):.2f}" for way in ways]
        print(f"| {shape} ({len(SHAPES[shape])} hooks) | {dtype} | {megabytes:.0f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
