"""CLI start-up: wall time of ``hookpoints --help``, ``sql --store S "SELECT 1"`` and ``store info S`` against
``python -c "import duckdb, deltalake"`` (the floor: what any command over a store must import).

Each command is a fresh subprocess (the installed console script's interpreter, no warm caches shared but the
OS page cache and the byte code), all run interleaved round by round so that load on a shared machine hits them
alike; the report gives medians and each command's ratio to the floor, all from this one run. Goal (issue 11):
every ratio at most 2.

Byte code: an installed package has its modules compiled (pip writes the .pyc files; an editable install writes
them at the first import). Where ``PYTHONDONTWRITEBYTECODE`` is set (this project's machines set it), hookpoints'
own modules would be compiled from source on every call (about 20 ms) while the libraries' are not; so the
commands run with byte code written to a scratch ``PYTHONPYCACHEPREFIX`` during the warm-up call, as installed.
``--no-bytecode`` measures the other way (every module of ours compiled at each call).

    .venv/bin/python bench/cli_startup.py             # 15 rounds (about a minute)
    .venv/bin/python bench/cli_startup.py --rounds 40 # steadier medians
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def small_store(path: Path) -> str:
    """A store with one run (3 examples x 2 hook points), written with the store API only (no model)."""
    from hookpoints.store.catalog import Store
    from hookpoints.store.writer import HookRows, open_run

    store = Store.open(str(path), create=True)
    hooks = [
        {"hook": f"blocks.{i}.hook_resid_post", "module": f"h.{i}", "io": "output", "component": "decoder",
         "layer": i, "submodule": "hook_resid_post", "width": 4, "shape": [4], "neuron_axis": 2, "space": "input",
         "layer_output": True}
        for i in range(2)
    ]  # fmt: skip
    examples = pa.table({"example_id": ["a", "b", "c"], "language": ["de", "fr", "de"]})
    settings = {"model": "none", "task": "forward", "pooling": "mean", "dtype": "float32"}
    writer = open_run(store, "startup-run", settings=settings, config={}, hooks=hooks, examples_schema=examples.schema)
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer.add(examples, {h["hook"]: HookRows(["a", "b", "c"], values) for h in hooks})
    writer.finish("complete")
    return str(path)


def commands(store: str) -> dict[str, list[str]]:
    hookpoints = [sys.executable, "-m", "hookpoints.cli"]
    return {
        "import duckdb, deltalake": [sys.executable, "-c", "import duckdb, deltalake"],
        # a reference, not a goal: what printing an Arrow result costs to import (pyarrow loads numpy)
        "import duckdb, deltalake, pyarrow.parquet, click, rich.console": [
            sys.executable,
            "-c",
            "import duckdb, deltalake, pyarrow.parquet, click, rich.console",
        ],
        # a reference: what printing with rich from a click command imports at least (no pyarrow)
        "import duckdb, deltalake, click, rich.console, rich.table": [
            sys.executable,
            "-c",
            "import duckdb, deltalake, click, rich.console, rich.table",
        ],
        "hookpoints --help": [*hookpoints, "--help"],
        'hookpoints sql --store S "SELECT 1"': [*hookpoints, "sql", "--store", store, "SELECT 1"],
        "hookpoints store info S": [*hookpoints, "store", "info", store],
    }


def measure(rounds: int, store: str, env: dict[str, str]) -> dict[str, list[float]]:
    runs = commands(store)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for argv in runs.values():  # once each first: checks the command works, warms the page cache (and byte code)
        subprocess.run(argv, check=True, capture_output=True, env=env)
    for _ in range(rounds):
        for name, argv in runs.items():
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, env=env)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-bytecode", action="store_true", help="Compile our modules from source at each call.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
        if args.no_bytecode:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        else:
            env["PYTHONPYCACHEPREFIX"] = str(Path(scratch) / "pycache")
        times = measure(args.rounds, small_store(Path(scratch) / "store"), env)
    floor = statistics.median(times["import duckdb, deltalake"])
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    bytecode = "compiled at each call" if args.no_bytecode else "cached, as installed"
    print(f"{args.rounds} interleaved rounds, medians (ratio to the floor; goal: at most 2.0); byte code {bytecode}")
    print(f"load average at the end: {load}")
    print("| command | median wall (s) | min (s) | ratio |\n|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.3f} | {min(values):.3f} | {median / floor:.2f} |")


if __name__ == "__main__":
    main()
