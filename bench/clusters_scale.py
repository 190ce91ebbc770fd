"""Clustering measures at 100,000 examples x 4,096 dimensions (synthetic data written into a store).

Writes a run of N examples (default 100,000) with two labels (language: 8 classes; semantic_id: 1,000 classes
of 100) at L layers of width D (default 2 x 4,096) into a fresh store, then times, in one process:

- reading one layer from the store (DuckDB -> Arrow batches -> numpy), with the peak memory it adds,
- Davies-Bouldin and centroids over every example (hookpoints vs ``sklearn.metrics.davies_bouldin_score``),
- silhouette on a seeded sample of 2,000 and 10,000 (both labels in one pass, vs sklearn's
  ``silhouette_score(..., sample_size=...)`` once per label),
- t-SNE of 2,000 examples with one OpenMP thread (the default) and with every core,
- the whole analysis (``cluster_layers``, default settings: sample 2,000, t-SNE) per layer, and its peak memory.

Run: ``.venv/bin/python bench/clusters_scale.py [--examples N] [--width D] [--layers L] [--root DIR]``
(prints a Markdown report; docs/clusters.md has one). Needs about N x D x L x 4 bytes of disk (3.3 GB by
default) and about 3 x N x D x 4 bytes of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hookpoints.analyses.cluster_measures import centroid_stats, silhouettes  # noqa: E402
from hookpoints.analyses.clusters import ClusterSettings, cluster_layers, sample_rows, tsne_map  # noqa: E402
from hookpoints.analyses.layers import layer_hooks, read_layer, run_settings  # noqa: E402
from hookpoints.analyses.subsets import select_subset  # noqa: E402
from hookpoints.store.catalog import Store  # noqa: E402
from hookpoints.store.writer import HookRows, open_run  # noqa: E402

LANGUAGES, MEANINGS, CHUNK = 8, 1000, 2000


def peak_reset() -> None:
    """Reset the process's peak resident memory (Linux: VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def write_store(root: Path, n: int, width: int, layers: int) -> tuple[Store, float]:
    """A run of n examples at ``layers`` layer outputs: language centres fade, meaning centres grow."""
    rng = np.random.default_rng(0)
    language_centres = rng.normal(size=(LANGUAGES, width)).astype(np.float32)
    meaning_centres = rng.normal(size=(MEANINGS, width)).astype(np.float32)
    store = Store.open(root, create=True)
    hooks = [
        {
            "hook": f"blocks.{layer}.hook_resid_post",
            "module": f"model.layers.{layer}",
            "io": "output",
            "component": "lm",
            "layer": layer,
            "submodule": "hook_resid_post",
            "width": width,
            "shape": [width],
            "neuron_axis": 2,
            "space": "input",
            "layer_output": True,
        }
        for layer in range(layers)
    ]
    schema = pa.schema([("example_id", pa.string()), ("language", pa.string()), ("semantic_id", pa.string())])
    settings = {"model": "synthetic", "task": "forward", "pooling": "last", "dtype": "float32"}
    start = time.perf_counter()
    writer = open_run(store, "big", settings=settings, config={}, hooks=hooks, examples_schema=schema)
    for first in range(0, n, CHUNK):
        rows = np.arange(first, min(first + CHUNK, n))
        language, meaning = rows % LANGUAGES, (rows // LANGUAGES) % MEANINGS
        ids = [f"e{row:07d}" for row in rows]
        examples = pa.table(
            {
                "example_id": ids,
                "language": [f"lang{g}" for g in language],
                "semantic_id": [f"s{m:04d}" for m in meaning],
            },
            schema=schema,
        )
        vectors = {}
        for layer in range(layers):
            weight = layer / max(layers - 1, 1)
            noise = rng.standard_normal((len(rows), width), dtype=np.float32) * 2
            mix = (1 - weight) * language_centres[language] + weight * meaning_centres[meaning]
            vectors[hooks[layer]["hook"]] = HookRows(ids, mix + noise)
        writer.add(examples, vectors)
    writer.finish()
    return store, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("/tmp/hookpoints-bench-clusters"))
    parser.add_argument("--keep", action="store_true", help="Reuse the store at --root if it is there.")
    args = parser.parse_args()
    n, width = args.examples, args.width
    results: dict[str, float] = {}
    store_root = args.root / "store"
    if args.keep and (store_root / "store_meta").exists():
        store = Store.open(store_root)
    else:
        shutil.rmtree(args.root, ignore_errors=True)
        args.root.mkdir(parents=True)
        store, results["write_s"] = write_store(store_root, n, width, args.layers)
    results["disk_gib"] = sum(f.stat().st_size for f in store_root.rglob("*") if f.is_file()) / 2**30

    with store.query() as session:
        settings = run_settings(session, "big")
        subset = select_subset(session, "big", "", ["language", "semantic_id"])
        hook = layer_hooks(session, "big")[-1]
        before = rss_gib()
        peak_reset()
        x, results["read_layer_s"] = timed(lambda: read_layer(session, subset, hook, settings, "last"))
        results["read_layer_peak_added_gib"] = peak_gib() - before
    measure_in_memory(x, subset, results)
    del x

    before = rss_gib()
    peak_reset()
    result, seconds = timed(lambda: cluster_layers(store, "big", ClusterSettings(labels=("language", "semantic_id"))))
    results["analysis_s"] = seconds
    results["analysis_per_layer_s"] = seconds / len(result.layers)
    results["analysis_peak_added_gib"] = peak_gib() - before
    results["analysis_rows"] = len(result.rows)
    for row in result.rows:
        if row["measure"] in ("silhouette", "davies_bouldin"):
            results[f"value_l{row['layer']}_{row['label']}_{row['measure']}_{row['space']}"] = row["value"]

    results.update(examples=n, width=width, layers=args.layers, cpus=os.cpu_count(), load=os.getloadavg()[0])
    (args.root / "results.json").write_text(json.dumps(results, indent=1))
    report(results)


def measure_in_memory(x: np.ndarray, subset, results: dict) -> None:
    """Davies-Bouldin, silhouette and t-SNE on one layer's matrix, hookpoints against scikit-learn."""
    from sklearn.metrics import davies_bouldin_score, silhouette_score

    n = len(x)
    results["layer_gib"] = x.nbytes / 2**30
    codes = {}
    for name in ("language", "semantic_id"):
        column = subset.table[name].to_numpy(zero_copy_only=False)
        _, codes[name] = np.unique(column, return_inverse=True)

    for name, label in codes.items():
        ours, results[f"db_{name}_s"] = timed(lambda label=label: centroid_stats(x, label).davies_bouldin)
        theirs, results[f"db_{name}_sklearn_s"] = timed(lambda label=label: davies_bouldin_score(x, label))
        results[f"db_{name}_abs_diff"] = abs(ours - theirs)

    for size in (2000, 10_000):
        rows = sample_rows(n, size, 0)
        sample = x[rows]
        stats, results[f"sil{size}_both_labels_s"] = timed(
            lambda sample=sample, rows=rows: silhouettes(sample, [codes["language"][rows], codes["semantic_id"][rows]])
        )
        total = 0.0
        for i, (name, label) in enumerate(codes.items()):
            theirs, seconds = timed(lambda label=label, sample=sample, rows=rows: silhouette_score(sample, label[rows]))
            total += seconds
            results[f"sil{size}_{name}_abs_diff"] = abs(stats[i].silhouette - theirs)
        results[f"sil{size}_both_labels_sklearn_s"] = total

    sample = x[sample_rows(n, 2000, 0)]
    _, results["tsne2000_1_thread_s"] = timed(lambda: tsne_map(sample, 30.0, 0, threads=1))
    _, results["tsne2000_all_threads_s"] = timed(lambda: tsne_map(sample, 30.0, 0, threads=None))


def report(r: dict) -> None:
    n, width = r["examples"], r["width"]
    print(f"## Clustering at {n:,} examples x {width:,} dimensions ({r['layers']} layers, {r['cpus']} CPUs)\n")
    print(f"load average at the end: {r['load']:.1f}\n")
    print("| step | hookpoints | scikit-learn | ratio |")
    print("|---|---|---|---|")
    if "write_s" in r:
        print(f"| write the run into the store ({r['disk_gib']:.2f} GiB on disk) | {r['write_s']:.1f} s | | |")
    print(
        f"| read one layer from the store ({r['layer_gib']:.2f} GiB matrix; peak memory added "
        f"{r['read_layer_peak_added_gib']:.2f} GiB) | {r['read_layer_s']:.1f} s | | |"
    )
    for name, classes in (("language", LANGUAGES), ("semantic_id", MEANINGS)):
        ours, theirs = r[f"db_{name}_s"], r[f"db_{name}_sklearn_s"]
        print(
            f"| Davies-Bouldin + centroids, all {n:,} examples, {name} ({classes} classes) | {ours:.1f} s | "
            f"{theirs:.1f} s | {theirs / ours:.1f}x |"
        )
    for size in (2000, 10_000):
        ours, theirs = r[f"sil{size}_both_labels_s"], r[f"sil{size}_both_labels_sklearn_s"]
        print(
            f"| silhouette, sample {size:,}, both labels (hookpoints: one pass) | {ours:.1f} s | {theirs:.1f} s | "
            f"{theirs / ours:.1f}x |"
        )
    print(f"| t-SNE of 2,000 examples, 1 OpenMP thread (default) | {r['tsne2000_1_thread_s']:.1f} s | | |")
    print(f"| t-SNE of 2,000 examples, every core | {r['tsne2000_all_threads_s']:.1f} s | | |")
    print(
        f"| whole analysis per layer (2 labels, sample 2,000, t-SNE; peak memory added "
        f"{r['analysis_peak_added_gib']:.2f} GiB) | {r['analysis_per_layer_s']:.1f} s | | |"
    )
    diffs = [value for key, value in r.items() if key.endswith("_abs_diff")]
    print(f"\nlargest difference from scikit-learn's value: {max(diffs):.1e}")


if __name__ == "__main__":
    main()
