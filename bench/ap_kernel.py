"""Benchmark of the AP neuron-ranking kernel (analyses/ap.py).

(a) the reference per-neuron sklearn loop vs the kernel, same data, one label set;
(b) the full-scale kernel cost: 491,520 neurons x 12,000 examples x 32 label sets built from
    6 languages x 2 modalities (with "among" subsets), neurons generated chunk by chunk from a
    seeded RNG; only the kernel is timed, generation is reported separately.

    python bench/ap_kernel.py                    # both parts, full scale
    python bench/ap_kernel.py --neurons 32768    # quicker part (b), extrapolated
    python bench/ap_kernel.py --ties float16     # activations rounded through float16 (many ties)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hookpoints.analyses.ap import LabelSetPlan, average_precision  # noqa: E402

N_LANG, N_MOD = 6, 2


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import numba

        nb = numba.__version__
    except ImportError:
        nb = "not installed"
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, numba {nb}, load avg at start {os.getloadavg()[0]:.1f}"
    )


def make_labels(n: int, seed: int):
    """Examples in 6 languages x 2 modalities (uneven cells) and the 32 label sets of the analysis."""
    rng = np.random.default_rng(seed)
    cell_size = rng.integers(600, 1400, N_LANG * N_MOD).astype(float)
    cell = rng.choice(N_LANG * N_MOD, size=n, p=cell_size / cell_size.sum())  # [examples]
    lang, mod = cell // N_MOD, cell % N_MOD
    every = np.ones(n, dtype=bool)
    sets, among, names = [], [], []
    for lg in range(N_LANG):  # 6: language vs all other examples
        sets.append(lang == lg), among.append(every), names.append(f"lang{lg}")
    for md in range(N_MOD):  # 12: language vs other languages, among one modality only
        for lg in range(N_LANG):
            sets.append(lang == lg), among.append(mod == md), names.append(f"lang{lg}|mod{md}")
    for md in range(N_MOD):  # 2: modality vs the other
        sets.append(mod == md), among.append(every), names.append(f"mod{md}")
    for lg in range(N_LANG):  # 12: language x modality cell vs all other examples
        for md in range(N_MOD):
            sets.append((lang == lg) & (mod == md)), among.append(every), names.append(f"lang{lg}&mod{md}")
    return cell, np.array(sets), np.array(among), names


def make_chunk(seed: int, j0: int, m: int, cell: np.ndarray, ties: str) -> np.ndarray:
    """Pooled activations of neurons j0..j0+m, ``[m, examples]`` float32 (neuron-major).

    Gaussian noise, a per-neuron shift for each language x modality cell (so APs spread out),
    and 1 neuron in 8 passed through ReLU (exact zeros: tie runs, as in ReLU layers).
    """
    rng = np.random.default_rng([seed, j0])
    x = rng.standard_normal((m, cell.size), dtype=np.float32)  # [neurons, examples]
    shift = rng.standard_normal((m, N_LANG * N_MOD), dtype=np.float32) * np.float32(0.3)
    x += shift[:, cell]
    relu = np.arange(j0, j0 + m) % 8 == 0
    x[relu] = np.maximum(x[relu], 0)
    if ties == "float16":
        x = x.astype(np.float16).astype(np.float32)
    return x


def part_a(args, cell, sets) -> dict:
    n, m = cell.size, args.sklearn_neurons
    x = make_chunk(args.seed, 0, m, cell, args.ties).T  # [examples, neurons] view
    y = sets[0]
    t0, c0 = time.perf_counter(), cpu_s()
    ref = np.array([average_precision_score(y, x[:, j]) for j in range(m)])
    sk_wall, sk_cpu = time.perf_counter() - t0, cpu_s() - c0
    average_precision(x[:, :64], y, threads=args.threads, backend=args.backend)  # compile / warm up
    t0, c0 = time.perf_counter(), cpu_s()
    got = average_precision(x, y, threads=args.threads, backend=args.backend)
    k_wall, k_cpu = time.perf_counter() - t0, cpu_s() - c0
    res = {
        "examples": n,
        "neurons": m,
        "sklearn_ms_per_neuron": 1e3 * sk_wall / m,
        "sklearn_cpu_ms_per_neuron": 1e3 * sk_cpu / m,
        "kernel_ms_per_neuron": 1e3 * k_wall / m,
        "kernel_cpu_ms_per_neuron": 1e3 * k_cpu / m,
        "speedup_wall": sk_wall / k_wall,
        "max_abs_diff": float(np.abs(got - ref).max()),
        "max_rel_diff": float((np.abs(got - ref) / ref).max()),
    }
    print(
        f"(a) {m} neurons x {n} examples, 1 label set: "
        f"sklearn loop {res['sklearn_ms_per_neuron']:.3f} ms/neuron, "
        f"kernel {res['kernel_ms_per_neuron']:.4f} ms/neuron ({res['speedup_wall']:.0f}x), "
        f"max |diff| {res['max_abs_diff']:.2e}",
        flush=True,
    )
    return res


def part_b(args, cell, sets, among) -> dict:
    n = cell.size
    t0 = time.perf_counter()
    plan = LabelSetPlan(sets, among)
    plan_s = time.perf_counter() - t0
    plan.score(make_chunk(args.seed, 0, 64, cell, args.ties).T, backend=args.backend)  # compile / warm up
    out = np.empty((len(sets), args.neurons))  # [sets, neurons]
    gen_s = kern_s = kern_cpu = 0.0
    checks, max_diff = 0, 0.0
    rng = np.random.default_rng(args.seed + 1)
    for j0 in range(0, args.neurons, args.chunk):
        m = min(args.chunk, args.neurons - j0)
        t0 = time.perf_counter()
        x = make_chunk(args.seed, j0, m, cell, args.ties)  # [neurons, examples]
        gen_s += time.perf_counter() - t0
        scores = x.T if args.layout == "F" else np.ascontiguousarray(x.T)  # [examples, neurons]
        t0, c0 = time.perf_counter(), cpu_s()
        out[:, j0 : j0 + m] = plan.score(scores, threads=args.threads, block=args.block, backend=args.backend)
        kern_s += time.perf_counter() - t0
        kern_cpu += cpu_s() - c0
        if j0 // args.chunk % args.check_every == 0:  # spot check against sklearn, every set
            first_relu = int(np.flatnonzero(np.arange(j0, j0 + m) % 8 == 0)[0])
            for j in (int(rng.integers(m)), first_relu):
                ref = [average_precision_score(sets[s][among[s]], x[j, among[s]]) for s in range(len(sets))]
                max_diff = max(max_diff, float(np.abs(out[:, j0 + j] - ref).max()))
                checks += 1
        del x, scores
    res = {
        "neurons": args.neurons,
        "examples": n,
        "label_sets": len(sets),
        "families": plan.n_families,
        "pairs": plan.n_pairs,
        "atoms": plan.n_atoms,
        "chunk": args.chunk,
        "layout": args.layout,
        "ties": args.ties,
        "threads": args.threads,
        "backend": args.backend,
        "plan_s": plan_s,
        "kernel_wall_s": kern_s,
        "kernel_cpu_s": kern_cpu,
        "kernel_ns_per_neuron_example": 1e9 * kern_s / (args.neurons * n),
        "kernel_cpu_ns_per_neuron_example": 1e9 * kern_cpu / (args.neurons * n),
        "kernel_wall_s_at_491520": kern_s * 491_520 / args.neurons,
        "generation_s": gen_s,
        "peak_rss_mb": peak_rss_mb(),
        "sklearn_checks": checks,
        "sklearn_check_max_abs_diff": max_diff,
    }
    print(
        f"(b) {args.neurons} neurons x {n} examples x {len(sets)} sets ({plan.n_families} families, "
        f"{plan.n_pairs} pairs), chunks of {args.chunk}: kernel {kern_s:.1f} s wall / {kern_cpu:.1f} s CPU "
        f"({res['kernel_cpu_ns_per_neuron_example']:.1f} CPU-ns per neuron x example), "
        f"generation {gen_s:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB, "
        f"{checks} neurons x {len(sets)} sets checked against sklearn, max |diff| {max_diff:.2e}",
        flush=True,
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=12_000)
    ap.add_argument("--neurons", type=int, default=491_520, help="part (b) neurons")
    ap.add_argument("--chunk", type=int, default=4096, help="neurons per streamed chunk")
    ap.add_argument("--sklearn-neurons", type=int, default=2000, help="part (a) neurons; 0 skips (a)")
    ap.add_argument("--skip-full", action="store_true", help="skip part (b)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--backend", default="auto", choices=["auto", "numba", "numpy"])
    ap.add_argument("--layout", default="F", choices=["F", "C"], help="F: neuron columns contiguous")
    ap.add_argument("--ties", default="none", choices=["none", "float16"])
    ap.add_argument("--check-every", type=int, default=8, help="sklearn spot check every k-th chunk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    info = machine()
    print(info, flush=True)
    cell, sets, among, _ = make_labels(args.examples, args.seed)
    results = {"machine": info, "args": vars(args) | {"json": str(args.json)}}
    if args.sklearn_neurons:
        results["a"] = part_a(args, cell, sets)
    if not args.skip_full:
        results["b"] = part_b(args, cell, sets, among)
    results["load_avg_at_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
