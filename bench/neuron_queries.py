"""Benchmark: per-neuron SQL at scale (docs/store.md "Per-neuron statistics", docs/benchmarks.md).

For each size, an AP-benchmark-shaped store (bench/ap_store.py: one text decoder layer = 13 hook points,
20,480 neurons, 6 languages x 2 modalities) is written to a temporary folder, then each query runs in its own
child process (wall time, peak RSS sampled every 20 ms, killed above --cap-mb):

- ``neuron_stats``: ``hookpoints sql "SELECT * FROM neuron_stats(...)"`` through the CLI (start-up included);
- ``numpy``: the same statistics in numpy over the same Arrow data (each hook read into ``[rows, width]``);
- ``natural``: the long-form ``SELECT ... FROM neurons n JOIN examples e ... GROUP BY ALL`` (only at sizes up
  to --natural-max: 2.7-30x numpy on a quiet machine, docs/store.md).

Queries: the issue's per-neuron mean per language over a whole layer; mean and standard deviation of the
8,192-wide ffn.fc1; its median per language (the quantile path: neuron slices in a fixed memory budget).

    python bench/neuron_queries.py --examples 4000 40000            # ~6 min, 3 GB of disk at 40,000
    python bench/neuron_queries.py --encodings --examples 2000      # store size and read cost, before/after

``--natural-memory``: peak memory (VmHWM) of the natural GROUP BY over ``neurons`` against the number of
examples, before (DuckDB's own plan: ``session.rewrite_neuron_groups = False``) and after (rewritten to
neuron_stats, store/neuron_rewrite.py), each query its own child process, on a reduced store (``--hooks``,
default 4 hook points x 1,024 neurons) of each ``--examples`` size:

    python bench/neuron_queries.py --natural-memory --examples 500 2000 8000 32000   # ~3 min

``--encodings``: the Parquet settings before issue 17 (dictionary on the vector columns) against the current
ones (no dictionary, BYTE_STREAM_SPLIT; store/tables.py): bytes per value of bench/recording_overhead.py's
GPT-2 recording (1,024 examples, float32 and float16), and the read cost (``bench/ap_store.py read``: every
hook into its matrix, as the AP ranking reads) of an AP-shaped store of ``--examples`` x one layer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LAYER = "text_decoder.layers.0.%"
FC1 = "text_decoder.layers.0.ffn.fc1"
QUERIES = {
    "layer avg by language": (LAYER, "language", "avg"),
    "fc1 avg, stddev": (FC1, "", "avg, stddev"),
    "fc1 median by language": (FC1, "language", "median"),
}
NATURAL = {
    "layer avg by language": "SELECT n.hook, e.language, n.neuron, avg(n.value) AS avg FROM neurons n "
    f"JOIN examples e USING (run, example_id) WHERE n.hook LIKE '{LAYER}' GROUP BY ALL",
    "fc1 avg, stddev": "SELECT hook, neuron, avg(value) AS avg, stddev(value) AS stddev FROM neurons "
    f"WHERE hook = '{FC1}' GROUP BY ALL",
    "fc1 median by language": "SELECT n.hook, e.language, n.neuron, median(n.value) AS median FROM neurons n "
    f"JOIN examples e USING (run, example_id) WHERE n.hook = '{FC1}' GROUP BY ALL",
}

# numpy over the same Arrow data: each hook's rows copied into one [rows, width] float32 matrix, then
# numpy's reductions per group (float32 in, as a user would write them).
NUMPY = """
import sys, numpy as np, pyarrow.compute as pc
from hookpoints.store.catalog import Store
store, pattern, by, stats = sys.argv[1:5]
s = Store.open(store)
ex = s.dataset("examples").to_table()
hooks = s.dataset("hooks").to_table(columns=["hook", "width"]).to_pylist()
prefix = pattern.rstrip("%")
chosen = [h for h in hooks if (h["hook"].startswith(prefix) if pattern.endswith("%") else h["hook"] == pattern)]
labels = ex[by].to_numpy(zero_copy_only=False) if by else np.zeros(ex.num_rows, np.int8)
names, group_of = np.unique(labels, return_inverse=True)
out = 0
for h in chosen:
    where = pc.field("hook") == h["hook"]
    data = s.dataset("activations")
    x = np.empty((data.count_rows(filter=where), h["width"]), np.float32)  # [rows, width]
    g = np.empty(len(x), np.int64)
    i = 0
    for b in data.to_batches(columns=["example_id", "activation"], filter=where):
        x[i : i + b.num_rows] = b["activation"].values.to_numpy().reshape(b.num_rows, -1)
        g[i : i + b.num_rows] = group_of[pc.index_in(b["example_id"], value_set=ex["example_id"]).to_numpy()]
        i += b.num_rows
    for k in range(len(names)):
        xs = x if len(names) == 1 else x[g == k]  # [rows of group k, width]
        if "avg" in stats:
            out += xs.mean(axis=0).size
        if "stddev" in stats:
            out += xs.std(axis=0, ddof=1).size
        if "median" in stats:
            out += np.median(xs, axis=0).size
    del x
print(out)
"""


NATURAL_MEMORY = {
    "avg by language (join)": "SELECT n.hook, e.language, n.neuron, avg(n.value) AS avg FROM neurons n "
    "JOIN examples e USING (run, example_id) WHERE n.run = 'decoder-synthetic' GROUP BY ALL",
    "avg, stddev, min, max (no join)": "SELECT hook, neuron, avg(value), stddev(value), min(value), max(value) "
    "FROM neurons WHERE run = 'decoder-synthetic' GROUP BY ALL",
    "median by language (join)": "SELECT n.hook, e.language, n.neuron, median(n.value) AS median FROM neurons n "
    "JOIN examples e USING (run, example_id) WHERE n.run = 'decoder-synthetic' GROUP BY ALL ORDER BY ALL",
}
# One natural query in a session, the rewrite on or off; prints rows, seconds and the peak resident set.
NATURAL_CHILD = """
import json, sys, time
import numpy as np, pyarrow as pa
from hookpoints.store.catalog import Store
store, sql, rewrite = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
t0 = time.perf_counter()
with Store.open(store).query() as session:
    session.rewrite_neuron_groups = rewrite
    table = session.sql(sql)
wall = round(time.perf_counter() - t0, 2)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
sums = {name: float(np.asarray(table[i]).astype(np.float64).sum())
        for i, name in enumerate(table.column_names) if pa.types.is_floating(table.schema[i].type)}
print(json.dumps({"rows": table.num_rows, "wall_s": wall, "peak_rss_mb": int(hwm) // 1024, "sums": sums}))
"""
# A reduced AP-shaped store: the chosen hook points of decoder layer 0 (bench/ap_store.py's activations).
REDUCED_STORE = """
import sys
sys.path.insert(0, "bench")
import ap_store
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run
path, n, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
table, cell = ap_store.examples(n, 0)
meta = [h for h in ap_store.hooks(1) if h["submodule"] in keep]
settings = {"model": "synthetic", "task": "forward", "pooling": "mean", "dtype": "float32"}
writer = open_run(Store.open(path, create=True), ap_store.RUN, settings=settings, config={}, hooks=meta,
                  examples_schema=table.schema, max_buffer_bytes=2**31, max_buffer_seconds=float("inf"))
ids = table["example_id"].to_pylist()
for start in range(0, n, 1000):
    rows = slice(start, min(n, start + 1000))
    x = {h["hook"]: ap_store.activations(i, h["width"], cell, rows, 0) for i, h in enumerate(meta)}
    batch = {hook: HookRows(ids[rows], values) for hook, values in x.items()}
    writer.add(table.slice(rows.start, rows.stop - rows.start), batch)
    writer.flush()
writer.finish()
"""


def natural_memory(args) -> list[dict]:
    """Peak memory of the natural GROUP BY before/after the rewrite, per size (interleaved in one run)."""
    rows = []
    for n in args.examples:
        store = Path(tempfile.mkdtemp(prefix=f"neuron-natural-{n}-", dir=args.tmp))
        try:
            subprocess.run([sys.executable, "-c", REDUCED_STORE, str(store), str(n), args.hooks], check=True, cwd=ROOT)
            for name, sql in NATURAL_MEMORY.items():
                row = {"examples": n, "query": name}
                for label, flag in (("before", "0"), ("after", "1")):
                    if label not in args.sides:
                        continue
                    process = subprocess.run(
                        [sys.executable, "-c", NATURAL_CHILD, str(store), sql, flag],
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                        timeout=args.child_timeout,
                    )
                    lines = process.stdout.strip().splitlines()
                    row[label] = json.loads(lines[-1]) if process.returncode == 0 and lines else process.stderr[-300:]
                if all(isinstance(row.get(k), dict) for k in ("before", "after")):  # the two paths must agree
                    a, b = row["before"], row["after"]
                    same = a["rows"] == b["rows"] and a["sums"].keys() == b["sums"].keys()
                    if not same or any(
                        abs(a["sums"][k] - b["sums"][k]) > 1e-6 * (1 + abs(a["sums"][k])) for k in a["sums"]
                    ):
                        raise SystemExit(f"{name}: the rewritten query disagrees with DuckDB's plan: {a} vs {b}")
                for side in ("before", "after"):
                    if isinstance(row.get(side), dict):
                        row[side].pop("sums", None)
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            shutil.rmtree(store, ignore_errors=True)
    small, large = min(args.examples), max(args.examples)
    for name in NATURAL_MEMORY:
        a, b = (next(r for r in rows if r["examples"] == n and r["query"] == name) for n in (small, large))
        ratios = {
            label: round(b[label]["peak_rss_mb"] / a[label]["peak_rss_mb"], 2)
            for label in ("before", "after")
            if isinstance(a.get(label), dict) and isinstance(b.get(label), dict)
        }
        print(f"{name}: {large / small:.0f}x the examples -> peak memory x{ratios}", flush=True)
    return rows


def child(command: list[str], cap_mb: float) -> dict:
    """Run ``command``; its wall time and peak RSS (sampled), killed above ``cap_mb``."""
    t0 = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    watched, peak, killed = psutil.Process(process.pid), 0.0, False
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            break
        if peak > cap_mb:
            process.kill()
            killed = True
        time.sleep(0.02)
    out, err = process.communicate()
    if process.returncode and not killed:
        raise SystemExit(f"{' '.join(command[:3])} failed: {err.strip()[-500:]}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak), "killed": killed}


def sql_command(store: Path, sql: str) -> list[str]:
    return [str(ROOT / ".venv/bin/hookpoints"), "sql", "--store", str(store), "--format", "csv", sql]


def measure(store: Path, examples: int, args) -> list[dict]:
    rows = []
    for name, (pattern, by, stats) in QUERIES.items():
        if args.queries and name not in args.queries:
            continue
        group = f", group_by := '{by}'" if by else ""
        sql = f"SELECT count(*) FROM neuron_stats('{pattern}'{group}, stats := '{stats}')"
        numpy = [sys.executable, "-c", NUMPY, str(store), pattern, by, stats]
        fast, reference = child(sql_command(store, sql), args.cap_mb), child(numpy, args.cap_mb)
        row = {"examples": examples, "query": name, "neuron_stats": fast, "numpy": reference}
        row["time_ratio"] = round(fast["wall_s"] / reference["wall_s"], 2)
        if examples <= args.natural_max:
            row["natural"] = child(sql_command(store, f"SELECT count(*) FROM ({NATURAL[name]})"), args.cap_mb)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def encodings(args) -> list[dict]:
    sys.path.insert(0, str(ROOT / "bench"))
    import ap_store
    import recording_overhead
    from hookpoints.store import tables

    settings = {
        "dictionary (before)": (ap_store.legacy_writer_properties, ap_store.legacy_pyarrow_encodings),
        "byte_stream_split (now)": (tables.writer_properties, tables.pyarrow_encodings),
    }
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        scratch = Path(folder)
        model = recording_overhead.build_model(scratch / "gpt2")
        for i, (name, (properties, encodings)) in enumerate(settings.items()):
            tables.writer_properties = properties  # the writers look it up in the module at each commit
            tables.pyarrow_encodings = encodings  # and the run writer's activation files (store/files.py)
            (scratch / f"gpt2-{i}").mkdir()
            sizes = recording_overhead.bytes_per_value(model, scratch / f"gpt2-{i}")
            rows.append({"encoding": name, **{f"{k} bytes/value": round(v, 2) for k, v in sizes.items()}})
        for n in args.examples:
            stores = {name: scratch / f"ap-{i}-{n}" for i, name in enumerate(settings)}
            for store, legacy in zip(stores.values(), (True, False), strict=True):
                write = ["bench/ap_store.py", "write", "--store", str(store), "--examples", str(n), "--layers", "1"]
                write += ["--flush-rows", "1000"] + (["--legacy-encoding"] if legacy else [])
                subprocess.run([sys.executable, *write], check=True, cwd=ROOT, capture_output=True)
            reads = {name: [] for name in stores}
            for _ in range(3):  # interleaved: the machine's load moves
                for name, store in stores.items():
                    out = subprocess.run(
                        [sys.executable, "bench/ap_store.py", "read", "--store", str(store)],
                        check=True,
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                    ).stdout
                    reads[name].append(json.loads(out[out.index("{") :]))
            for name, store in stores.items():
                size = sum(f.stat().st_size for f in (store / "activations").rglob("*.parquet"))
                best = min(reads[name], key=lambda r: r["read_cpu_s"])
                values = best["values"]
                rows.append(
                    {
                        "encoding": name,
                        "ap store examples": n,
                        "bytes/value": round(size / values, 2),
                        "read cpu ns/value (best of 3)": round(best["cpu_ns_per_value"], 2),
                        "read wall ns/value (best of 3)": round(best["wall_ns_per_value"], 2),
                    }
                )
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, nargs="+", default=[4000, 40000])
    parser.add_argument("--natural-max", type=int, default=4000, help="run the long-form query up to this size")
    parser.add_argument("--cap-mb", type=float, default=4096, help="kill a child above this resident size")
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--queries", nargs="+", choices=list(QUERIES), help="only these queries (default: all)")
    parser.add_argument("--encodings", action="store_true", help="store size and read cost before/after issue 17")
    parser.add_argument("--json", help="append the rows to this JSON-lines file")
    parser.add_argument("--natural-memory", action="store_true", help="natural GROUP BY memory, before/after rewrite")
    parser.add_argument("--hooks", default="self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,ffn.fc2")
    parser.add_argument("--child-timeout", type=float, default=300)
    parser.add_argument("--sides", nargs="+", choices=["before", "after"], default=["before", "after"])
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}, {len(os.sched_getaffinity(0))} cores", flush=True)
    if args.natural_memory:
        rows = natural_memory(args)
        print(f"load average {os.getloadavg()}")
        if args.json:
            with open(args.json, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return
    if args.encodings:
        rows = encodings(args)
        print(f"load average {os.getloadavg()}")
        if args.json:
            with open(args.json, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return
    rows = []
    for n in args.examples:
        store = Path(tempfile.mkdtemp(prefix=f"neuron-queries-{n}-", dir=args.tmp))
        try:
            write = [sys.executable, "bench/ap_store.py", "write", "--store", str(store), "--examples", str(n)]
            subprocess.run([*write, "--layers", "1", "--flush-rows", "1000"], check=True, cwd=ROOT, capture_output=True)
            size = sum(f.stat().st_size for f in (store / "activations").rglob("*.parquet"))
            print(f"{n} examples: {size / 2**20:.0f} MiB of activations", flush=True)
            rows += measure(store, n, args)
        finally:
            shutil.rmtree(store, ignore_errors=True)
    if len(args.examples) > 1:
        small, large = min(args.examples), max(args.examples)
        for name in args.queries or QUERIES:
            a, b = (next(r for r in rows if r["examples"] == n and r["query"] == name) for n in (small, large))
            ratio = b["neuron_stats"]["peak_rss_mb"] / a["neuron_stats"]["peak_rss_mb"]
            print(f"{name}: {large / small:.0f}x the examples -> neuron_stats peak memory x{ratio:.2f}")
    print(f"load average {os.getloadavg()}")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
