"""Recording overhead: bare forward vs plain torch hooks vs hookpoints recording every hook point.

Model: GPT-2 sized down to 6 layers, d_model 256 (8 heads, vocabulary 5,000), batch 8 x 128 tokens, CPU.
- bare: ``model(**inputs)``
- torch hooks: plain forward (pre-)hooks on the same tensors, mean-pooled over positions in the hook
- hookpoints: one nnsight trace saving every hook point pooled (mean), then the rows handed to the store
  writer, which commits to Delta tables every 64 MiB (per batch, the commits spread over the batches of a
  buffer); separately, the cost of one commit of one batch (8 examples x every hook).
The four are timed call by call in turn (round robin), so other jobs on the machine slow them alike.
Also: bytes on disk per stored value (float32 and float16 storage), and peak memory of a recording of N and
10 N examples (bounded by the writer's buffer, not the manifest).

Run: ``.venv/bin/python bench/recording_overhead.py`` (prints a Markdown report; docs/benchmarks.md has one).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hookpoints.store.catalog import Store  # noqa: E402
from hookpoints.store.writer import HookRows, open_run  # noqa: E402

from hookpoints.inputs import ModelInputs  # noqa: E402
from hookpoints.loading import load  # noqa: E402
from hookpoints.pooling import pool, prepare_masks  # noqa: E402
from hookpoints.probe import first_tensor  # noqa: E402
from hookpoints.tiny import build_tiny, tiny_tokenizer  # noqa: E402

BATCH, SEQ, BUFFERS = 8, 128, 1


def build_model(directory: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=6, n_embd=256, n_head=8, vocab_size=5000, n_positions=256)
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def call_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def overhead(directory: Path, scratch: Path) -> dict:
    model = load(directory)
    points = model.select()  # every canonical hook point
    ids = torch.randint(4, 5000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    inputs = ModelInputs({"input_ids": ids, "attention_mask": mask}, {"input": mask.bool()})
    hf = model.model

    def bare():
        with torch.inference_mode():
            hf(**inputs.kwargs)

    def torch_hooks():
        pooled, handles = {}, []
        space = prepare_masks(inputs.masks)["input"]  # once per batch, as the recorder does
        for point in points:
            module = hf.get_submodule(point.module)

            def keep(value, point=point):
                pooled[point.name] = pool(value, point, space, "mean").cpu()

            if point.io == "input":
                handles.append(module.register_forward_pre_hook(lambda m, args, keep=keep: keep(first_tensor(args))))
            else:
                handles.append(module.register_forward_hook(lambda m, args, out, keep=keep: keep(out)))
        with torch.inference_mode():
            hf(**inputs.kwargs)
        for handle in handles:
            handle.remove()
        return pooled

    store = Store.open(scratch / "overhead-store", create=True)
    writer = open_run(
        store,
        "bench",
        settings={"model": "gpt2-6x256", "task": "forward", "pooling": "mean", "dtype": "float32"},
        config={},
        hooks=[p.row() for p in points],
        examples_schema=pa.schema([("example_id", pa.string())]),
        max_buffer_bytes=64 * 2**20,  # the size its numbers were measured at (the default is 512 MiB since)
        max_buffer_seconds=float("inf"),  # commits by size only: the per-commit cost is spread over its batches
        background=False,  # its commits inside add: a background flush would be timed in the other calls
    )

    def hookpoints_pooled():
        return model.pooled(inputs, points, "mean")

    counter = iter(range(10**9))

    def add_batch():  # fresh example ids every batch: the writer drops examples it already holds
        pooled = model.pooled(inputs, points, "mean")
        ids = [f"x{next(counter)}" for _ in range(BATCH)]
        batch = pa.table({"example_id": ids})
        writer.add(batch, {name: HookRows(ids, value.numpy()) for name, value in pooled.items()})

    batch_bytes = BATCH * sum(p.width for p in points) * 4
    batches_per_commit = -(-writer.max_buffer_bytes // batch_bytes)

    def one_commit():
        add_batch()
        start = time.perf_counter()
        writer.flush()
        return (time.perf_counter() - start) * 1000

    # sanity: the three ways record the same numbers
    reference = torch_hooks()
    mine = hookpoints_pooled()
    worst = max(float((reference[p.name] - mine[p.name]).abs().max()) for p in points)

    # Round robin, one call of each in turn: blocks of calls of one kind would each meet different load from
    # other jobs (2 torch threads on 2 shared cores slow down up to 10x when another process wakes up).
    # The buffer starts empty, so the writer commits inside every batches_per_commit-th add_batch.
    calls = {"bare": bare, "torch hooks": torch_hooks, "hookpoints (pooled)": hookpoints_pooled}
    calls["hookpoints + store"] = add_batch
    times = {name: [] for name in calls}
    for _ in range(BUFFERS * batches_per_commit):
        for name, fn in calls.items():
            times[name].append(call_ms(fn))
    timings = {name: statistics.median(values) for name, values in times.items()}
    committing = times["hookpoints + store"][batches_per_commit - 1 :: batches_per_commit]
    buffer_commit_ms = statistics.median(committing) - timings["hookpoints + store"]
    # per batch: the batch without a commit (median), plus its share of one full buffer's commit
    timings["hookpoints + store"] += buffer_commit_ms / batches_per_commit
    commit_ms = statistics.median(one_commit() for _ in range(5))
    writer.finish()
    return {
        "hook_points": len(points),
        "max_abs_diff": worst,
        "ms": timings,
        "commit_ms": commit_ms,
        "buffer_commit_ms": buffer_commit_ms,
        "batches_per_commit": batches_per_commit,
    }


def bytes_per_value(directory: Path, scratch: Path) -> dict:
    from hookpoints.manifest import read_manifest
    from hookpoints.recorder import record

    rows = [{"id": f"x{i}", "text": f"sentence number {i} about the weather"} for i in range(1024)]
    path = scratch / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = load(directory)
    result = {}
    for dtype in ("float32", "float16"):
        store = Store.open(scratch / f"bytes-{dtype}", create=True)
        record(model, read_manifest(path), store, "r", dtype=dtype, batch_size=32)
        files = list((scratch / f"bytes-{dtype}" / "activations").rglob("*.parquet"))
        size = sum(f.stat().st_size for f in files)
        values = len(rows) * sum(p.width for p in model.select())
        result[dtype] = size / values
    return result


MEMORY_CHILD = """  # the tiny GPT-2 (d 64): many examples quickly, several buffer flushes
import json, sys
sys.path.insert(0, {root!r})
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import record
from hookpoints.store.catalog import Store
model = load({model!r})
store = Store.open({store!r}, create=True)
record(model, read_manifest({manifest!r}), store, "r", batch_size=16, max_buffer_bytes=16 * 2**20)
# VmHWM, not getrusage's ru_maxrss: after fork + exec, ru_maxrss keeps the parent's peak (this benchmark's ~4 GB)
print(json.dumps(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))))
"""


def peak_memory(directory: Path, scratch: Path, n: int) -> float:
    """Peak RSS of a process recording ``n`` examples with a 16 MiB buffer."""
    path = scratch / f"memory-{n}.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "text": f"sentence {i} " * 8}) + "\n" for i in range(n)))
    code = MEMORY_CHILD.format(
        root=str(ROOT), model=str(directory), store=str(scratch / f"mem-{n}"), manifest=str(path)
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1]) / 1024  # kB -> MiB


def main() -> None:
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        directory = build_model(scratch / "gpt2-6x256")
        result = overhead(directory, scratch)
        sizes = bytes_per_value(directory, scratch)
        tiny = build_tiny("gpt2", scratch / "tiny-gpt2")
        memory = {n: peak_memory(tiny, scratch, n) for n in (2000, 20000)}
    load_after = os.getloadavg()
    ms = result["ms"]
    before, after = (" / ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after))
    print(f"Load average (1 / 5 / 15 min) before: {before}, after: {after}; {os.cpu_count()} cores\n")
    print(f"## Recording overhead (GPT-2 6 x 256, batch {BATCH} x {SEQ} tokens, {result['hook_points']} hook points)\n")
    print("| | ms per batch | x bare forward |")
    print("|---|---:|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {value / ms['bare']:.2f} |")
    print(
        f"\none commit of one batch ({BATCH} examples x {result['hook_points']} hooks): {result['commit_ms']:.0f} ms; "
        f"the writer commits every {result['batches_per_commit']} batches (64 MiB), "
        f"one commit of a full buffer: {result['buffer_commit_ms']:.0f} ms"
    )
    print(f"\nmax |torch hooks - hookpoints| over all pooled values: {result['max_abs_diff']:.2e}\n")
    print("| storage | bytes on disk per stored value |")
    print("|---|---:|")
    for dtype, value in sizes.items():
        print(f"| {dtype} | {value:.2f} |")
    print("\n| examples recorded (tiny GPT-2, 16 MiB buffer) | peak RSS (MiB) |")
    print("|---:|---:|")
    for n, value in memory.items():
        print(f"| {n} | {value:.0f} |")
    growth = memory[20000] / memory[2000]
    print(f"\n10x the examples: peak memory x{growth:.2f}")


if __name__ == "__main__":
    main()
