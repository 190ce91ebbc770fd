"""Benchmark: the whole AP ranking at the paper's scale, from a real store (docs/bench-ap-store.md).

SeamlessM4T v2's text decoder (Table 1): 24 layers x 13 submodules (12 of width 1,024, ffn.fc1 of 8,192)
= 312 hook points, 491,520 neurons; 12,000 examples in 6 languages x 2 modalities (uneven cells); the paper's
four settings over them = 32 label sets. Three steps, each its own process (so peak memory is per step):

    python bench/ap_store.py write --store /tmp/ap-bench          # synthetic activations into a store
    python bench/ap_store.py rank  --store /tmp/ap-bench          # the timed ranking + scores table
    python bench/ap_store.py check --store /tmp/ap-bench          # sklearn loop on a sample: same APs?
    python bench/ap_store.py read  --store /tmp/ap-bench          # reading alone (files and their size matter)
    python bench/ap_store.py formats                             # Parquet decode cost per column encoding
    python bench/ap_store.py write --legacy-encoding ...         # the writer settings before issue 17 (dictionary)

Activations: Gaussian noise plus a per-neuron shift for each language x modality cell (so APs spread), and
1 neuron in 8 through ReLU (exact zeros: long tie runs), written through the recorder's RunWriter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hookpoints.store.catalog import Store  # noqa: E402

LANGUAGES = ["de", "en", "es", "fr", "ja", "zh"]
MODALITIES = ["speech", "text"]
SUBMODULES = {
    "self_attn_layer_norm": 1024,
    "self_attn.q_proj": 1024,
    "self_attn.k_proj": 1024,
    "self_attn.v_proj": 1024,
    "self_attn.out_proj": 1024,
    "cross_attention_layer_norm": 1024,
    "cross_attention.q_proj": 1024,
    "cross_attention.k_proj": 1024,
    "cross_attention.v_proj": 1024,
    "cross_attention.out_proj": 1024,
    "ffn_layer_norm": 1024,
    "ffn.fc1": 8192,
    "ffn.fc2": 1024,
}
RUN = "decoder-synthetic"


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class LoadSampler:
    """Samples the 1-minute load average and this process's resident memory (peak per phase)."""

    def __init__(self, every: float = 0.5):
        self.samples: list[float] = []
        self.peak_rss: dict[str, float] = {}
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        ticks = 0
        while not self._stop.wait(every):
            rss = rss_mb()
            self.peak_rss[self.phase] = max(self.peak_rss.get(self.phase, 0.0), rss)
            ticks += 1
            if ticks % 10 == 0:
                self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        peaks = {f"peak_rss_mb_{phase}": round(mb) for phase, mb in self.peak_rss.items()}
        return {"load_min": min(s), "load_mean": float(np.mean(s)), "load_max": max(s), **peaks}


def hooks(layers: int) -> list[dict]:
    rows = []
    for layer in range(layers):
        for submodule, width in SUBMODULES.items():
            name = f"text_decoder.layers.{layer}.{submodule}"
            rows.append(
                {
                    "hook": name,
                    "module": name,
                    "io": "output",
                    "component": "text_decoder",
                    "layer": layer,
                    "submodule": submodule,
                    "width": width,
                    "shape": [width],
                    "neuron_axis": 2,
                    "space": "decoder",
                    "layer_output": False,
                }
            )
    return rows


def examples(n: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    cells = len(LANGUAGES) * len(MODALITIES)
    size = rng.integers(600, 1400, cells).astype(float)
    cell = rng.choice(cells, size=n, p=size / size.sum())  # [examples]
    table = pa.table(
        {
            "example_id": [f"ex{i:06d}" for i in range(n)],
            "text": [""] * n,
            "language": [LANGUAGES[c // len(MODALITIES)] for c in cell],
            "modality": [MODALITIES[c % len(MODALITIES)] for c in cell],
        }
    )
    return table, cell


def activations(hook_index: int, width: int, cell: np.ndarray, rows: slice, seed: int) -> np.ndarray:
    """``[rows, width]`` float32 for one hook: the same per-neuron cell shifts in every batch."""
    shift = np.random.default_rng([seed, hook_index, 0]).standard_normal((12, width), dtype=np.float32)
    shift *= np.float32(0.3)
    rng = np.random.default_rng([seed, hook_index, 1 + rows.start])
    x = rng.standard_normal((rows.stop - rows.start, width), dtype=np.float32)
    x += shift[cell[rows]]
    relu = np.arange(width) % 8 == 0
    x[:, relu] = np.maximum(x[:, relu], 0)
    return x


def legacy_writer_properties(spec=None, schema=None):
    """The store's Parquet settings before issue 17: zstd 1, dictionary on every column (vectors included)."""
    from deltalake import WriterProperties
    from hookpoints.store import tables

    rows = (spec.row_group_rows if spec is not None else None) or tables.ROW_GROUP_ROWS
    return WriterProperties(max_row_group_size=rows, compression="ZSTD", compression_level=1)


def legacy_pyarrow_encodings(schema=None) -> dict:
    """The same for pyarrow's writer (store/files.py, which writes the activation files): its defaults,
    dictionary on every column."""
    return {}


def write(args) -> dict:
    from hookpoints.store import tables
    from hookpoints.store.writer import HookRows, open_run

    if args.legacy_encoding:
        tables.writer_properties = legacy_writer_properties
        tables.pyarrow_encodings = legacy_pyarrow_encodings  # the run writer's activation files (store/files.py)

    store = Store.open(args.store, create=True)
    table, cell = examples(args.examples, args.seed)
    rows_meta = hooks(args.layers)
    settings = {"model": "synthetic SeamlessM4T v2 text decoder", "task": "forward", "pooling": "mean"}
    settings["dtype"] = args.dtype
    writer = open_run(
        store,
        RUN,
        settings=settings,
        config={"bench": "ap_store", "seed": args.seed},
        hooks=rows_meta,
        examples_schema=table.schema,
        if_exists="overwrite",
        max_buffer_bytes=2**31,  # the most open_run takes; flushed explicitly, once per batch of examples
        max_buffer_seconds=float("inf"),
    )
    ids = table["example_id"].to_pylist()
    t0, c0 = time.perf_counter(), cpu_s()
    for start in range(0, args.examples, args.flush_rows):
        rows = slice(start, min(args.examples, start + args.flush_rows))
        batch = {
            h["hook"]: HookRows(ids[rows], activations(i, h["width"], cell, rows, args.seed))
            for i, h in enumerate(rows_meta)
        }
        writer.add(table.slice(rows.start, rows.stop - rows.start), batch)
        del batch
        writer.flush()
        print(
            f"  wrote examples {rows.start}-{rows.stop} ({time.perf_counter() - t0:.0f} s, load {load()})", flush=True
        )
    writer.finish()
    size = sum(f.stat().st_size for f in Path(args.store, "activations").rglob("*.parquet"))
    files = sum(1 for _ in Path(args.store, "activations").rglob("*.parquet"))
    result = {
        "examples": args.examples,
        "hooks": len(rows_meta),
        "neurons": sum(h["width"] for h in rows_meta),
        "dtype": args.dtype,
        "encoding": "legacy (dictionary)" if args.legacy_encoding else "current",
        "flush_rows": args.flush_rows,
        "files": files,
        "bytes": size,
        "write_wall_s": time.perf_counter() - t0,
        "write_cpu_s": cpu_s() - c0,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(result, indent=1))
    return result


def rank(args) -> dict:
    from hookpoints.analyses.ranking import plan_ranking, rank, write_scores

    store = Store.open(args.store)
    load_start = load()
    with LoadSampler() as sampler:
        t0, c0 = time.perf_counter(), cpu_s()
        u0, s0 = os.times().user, os.times().system
        sampler.phase = "plan"
        job = plan_ranking(store, [RUN], presets=["all"], ks=(500, 1000, 2500, 5000))
        plan_s = time.perf_counter() - t0
        sampler.phase = "rank"
        done = [0]

        def progress(n: int) -> None:
            done[0] += n
            if done[0] % 65536 < n:
                elapsed = time.perf_counter() - t0
                print(f"  {done[0]:,} neurons, {elapsed:.0f} s, load {load()}", flush=True)

        ranking = rank(store, job, memory_bytes=int(args.memory_gb * 2**30), threads=args.threads, on_progress=progress)
        t1 = time.perf_counter()
        sampler.phase = "write_scores"
        write_scores(store, ranking)
        write_s = time.perf_counter() - t1
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    result = {
        "neurons": job.n_neurons,
        "examples": len(job.examples),
        "label_sets": len(job.masks.label_sets),
        "cpu_user_s": os.times().user - u0,
        "cpu_sys_s": os.times().system - s0,
        "wall_s": wall,
        "cpu_s": cpu,
        "plan_s": plan_s,
        **{k: v for k, v in ranking.timings.items()},
        "write_scores_s": write_s,
        "peak_rss_mb": peak_rss_mb(),
        "load_at_start": load_start,
        **sampler.summary(),
        "threads": args.threads,
        "memory_gb": args.memory_gb,
    }
    print(json.dumps(result, indent=1))
    return result


def read(args) -> dict:
    """Reading alone: every hook of the run into its ``[examples, neurons]`` matrix (no kernel)."""
    from hookpoints.analyses.examples import open_runs, select_examples
    from hookpoints.analyses.hook_matrix import HookMatrixReader, shared_hooks

    store = Store.open(args.store)
    with store.query() as session:
        group = open_runs(session, [RUN])
        chosen = select_examples(session, group)
        hook_list = shared_hooks(session, group.runs)
    reader = HookMatrixReader(store, chosen)
    files = sum(1 for _ in Path(args.store, "activations").rglob("*.parquet"))
    buffer = np.empty(len(chosen) * max(h.width for h in hook_list), np.float32)
    t0, c0 = time.perf_counter(), cpu_s()
    for hook in hook_list:
        reader.read(hook, out=buffer)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    values = len(chosen) * sum(h.width for h in hook_list)
    result = {
        "files": files,
        "values": values,
        "read_wall_s": wall,
        "read_cpu_s": cpu,
        "wall_ns_per_value": 1e9 * wall / values,
        "cpu_ns_per_value": 1e9 * cpu / values,
        "load": load(),
    }
    print(json.dumps(result, indent=1))
    return result


def formats(args) -> dict:
    """Decode cost of one [1000, 8192] float32 block stored as Parquet in a few encodings (single thread)."""
    import tempfile

    import pyarrow.parquet as pq

    x = np.random.default_rng(args.seed).standard_normal((1000, 8192), dtype=np.float32)
    offsets = pa.array(np.arange(0, 1001 * 8192, 8192, dtype=np.int32))
    tables = {
        "list<float32>": pa.table({"a": pa.ListArray.from_arrays(offsets, pa.array(x.ravel()))}),
        "binary blob": pa.table({"a": pa.array([row.tobytes() for row in x], pa.binary())}),
    }
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "block.parquet"
        for (name, table), compression in [(t, c) for t in tables.items() for c in ("zstd", "lz4", "none")]:
            level = 1 if compression == "zstd" else None
            pq.write_table(table, path, compression=compression, compression_level=level, row_group_size=1024)
            best = min(_timed(lambda: pq.read_table(path, use_threads=False)) for _ in range(5))
            result[f"{name}, {compression}"] = {
                "ns_per_value": round(1e9 * best / x.size, 2),
                "bytes_per_value": round(path.stat().st_size / x.size, 2),
            }
    print(json.dumps(result, indent=1))
    return result


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def check(args) -> dict:
    """The per-neuron sklearn loop (as ml-selfcond / lang_neuron do) on a sample of neurons: time and APs."""
    from hookpoints.analyses.examples import label_masks, open_runs, select_examples
    from hookpoints.analyses.hook_matrix import HookMatrixReader, shared_hooks
    from hookpoints.analyses.ranking import preset_sets
    from sklearn.metrics import average_precision_score

    store = Store.open(args.store)
    rng = np.random.default_rng(args.seed + 7)
    with store.query() as session:
        group = open_runs(session, [RUN])
        chosen = select_examples(session, group)
        label_sets = []
        for preset in ("unimodal", "multimodal", "modality", "language-modality"):
            label_sets += preset_sets(session, chosen, preset, "language", "modality")
        masks = label_masks(session, chosen, label_sets)
        all_hooks = shared_hooks(session, group.runs)
        picked = rng.choice(len(all_hooks), size=args.sample_hooks, replace=False)
        hook_list = [all_hooks[i] for i in sorted(picked)]
        stored = {}
        for hook in hook_list:
            table = session.sql(
                "SELECT label_set, neuron, ap FROM scores WHERE run = $run AND hook = $hook",
                {"run": RUN, "hook": hook.hook},
            )
            for row in table.to_pylist():
                stored[row["label_set"], hook.hook, row["neuron"]] = row["ap"]
    reader = HookMatrixReader(store, chosen)
    max_diff, n_checked, sk_cpu, sk_wall, sk_calls = 0.0, 0, 0.0, 0.0, 0
    for hook in hook_list:
        x = reader.read(hook)  # [examples, width]
        neurons = rng.choice(hook.width, size=args.sample_neurons, replace=False)
        for j in neurons:
            for s, ls in enumerate(masks.label_sets):
                among = masks.among[s]
                t0, c0 = time.perf_counter(), cpu_s()
                ref = average_precision_score(masks.positive[s][among], x[among, j])
                sk_wall += time.perf_counter() - t0
                sk_cpu += cpu_s() - c0
                sk_calls += 1
                max_diff = max(max_diff, abs(ref - stored[ls.name, hook.hook, int(j)]))
                n_checked += 1
    neurons_total = sum(h.width for h in all_hooks)
    result = {
        "checked_aps": n_checked,
        "hooks_sampled": [h.hook for h in hook_list],
        "max_abs_diff": max_diff,
        "sklearn_ms_per_call": 1e3 * sk_wall / sk_calls,
        "sklearn_cpu_ms_per_call": 1e3 * sk_cpu / sk_calls,
        "sklearn_full_scale_cpu_hours": sk_cpu / sk_calls * neurons_total * len(masks.label_sets) / 3600,
        "sklearn_full_scale_wall_hours": sk_wall / sk_calls * neurons_total * len(masks.label_sets) / 3600,
        "load": load(),
    }
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["write", "rank", "read", "check", "formats"])
    parser.add_argument("--store", default="/tmp/ap-bench-store")
    parser.add_argument("--examples", type=int, default=12000)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--flush-rows", type=int, default=500, help="examples per commit when writing")
    parser.add_argument("--memory-gb", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sample-hooks", type=int, default=6)
    parser.add_argument("--sample-neurons", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--legacy-encoding", action="store_true", help="write with the settings before issue 17")
    parser.add_argument("--json", help="append the result to this JSON-lines file")
    args = parser.parse_args()
    print(f"{args.step}: load average {load()}, {len(os.sched_getaffinity(0))} cores", flush=True)
    steps = {"write": write, "rank": rank, "read": read, "check": check, "formats": formats}
    result = steps[args.step](args)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"step": args.step, **result}) + "\n")


if __name__ == "__main__":
    main()
