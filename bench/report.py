"""Benchmark: ``hookpoints report`` on a store of the AP benchmark's shape (docs/report.md).

The store comes from bench/ap_store.py (SeamlessM4T v2's text decoder: 13 submodules per layer, ffn.fc1 8,192
wide, 6 languages x 2 modalities, the paper's four settings = 32 label sets), written and ranked first:

    python bench/ap_store.py write --store /tmp/ap-bench --examples 600 --layers 4
    python bench/ap_store.py rank  --store /tmp/ap-bench --examples 600 --layers 4
    python bench/report.py --store /tmp/ap-bench                 # the report, with and without magnitudes

Full scale (the 23.6 GB store): drop --examples/--layers (12,000 examples, 24 layers).
Prints one JSON line: seconds per step, the activation bytes, peak memory, the report's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hookpoints.analyses.report import write_report  # noqa: E402
from hookpoints.store.catalog import Store  # noqa: E402


def sql_timings(store: Store) -> dict:
    """The aggregates alone (what grows with the store), without drawing: seconds per query."""
    from hookpoints.analyses.examples import open_runs, select_examples
    from hookpoints.analyses.hook_matrix import shared_hooks
    from hookpoints.analyses.magnitudes import group_columns, layer_magnitudes
    from hookpoints.analyses.report_selectivity import _layer_counts, rankings

    timings = {}
    with store.query() as session:
        for ranking in rankings(session, None):
            started = time.perf_counter()
            counts = _layer_counts(session, ranking["ranking"], min(ranking["ks"]))
            timings["scores_layer_counts_s"] = round(time.perf_counter() - started, 2)
            timings["label_sets_x_components"] = len(counts)
            scores = session.sql("SELECT count(*) AS n FROM scores")["n"][0].as_py()
            timings["scores_rows"] = scores
            started = time.perf_counter()
            group = open_runs(session, ranking["runs"])
            examples = select_examples(session, group)
            hooks = shared_hooks(session, group.runs)
            layer_magnitudes(session, examples, hooks, group_columns(session, examples, None))
            timings["magnitudes_s"] = round(time.perf_counter() - started, 2)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="/tmp/ap-bench-store")
    parser.add_argument("--out", default="/tmp/report-bench.html")
    args = parser.parse_args()
    store = Store.open(args.store)
    activations = sum(f.stat().st_size for f in Path(args.store, "activations").rglob("*.parquet"))
    result: dict = {"activation_bytes": activations}
    for magnitudes in (False, True):
        steps: dict[str, float] = {}
        last = [time.perf_counter(), "start"]

        def step(name: str, steps=steps, last=last) -> None:
            now = time.perf_counter()
            steps[last[1]] = steps.get(last[1], 0.0) + now - last[0]
            last[:] = [now, name.split(" ")[0]]

        started = time.perf_counter()
        path = write_report(store, out=args.out, magnitudes=magnitudes, on_step=step)
        step("end")
        key = "with_magnitudes" if magnitudes else "without_magnitudes"
        result[key] = {
            "seconds": round(time.perf_counter() - started, 1),
            "steps": {k: round(v, 1) for k, v in steps.items() if k != "start"},
            "html_bytes": path.stat().st_size,
        }
    result["sql"] = sql_timings(store)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
