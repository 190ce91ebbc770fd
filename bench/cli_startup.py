"""CLI start-up: wall time of ``hookpoints --help``, ``sql --store S "SELECT 1"`` and ``store info S`` against
``python -c "import duckdb, deltalake"`` (the floor: what any command over a store must import).

Each command is a fresh subprocess (the installed console script's interpreter, no warm caches shared but the
OS page cache and the byte code), all run interleaved round by round so that load on a shared machine hits them
alike; the report gives medians and each command's ratio to the floor, all from this one run. Goal (issue 11):
every ratio at most 2.

Byte code: an installed package has its modules compiled (pip writes the .pyc files; an editable install writes
them at the first import). Where ``PYTHONDONTWRITEBYTECODE`` is set (this project's machines set it), hookpoints'
own modules would be compiled from source on every call while the libraries' are not; so the commands run with
byte code written to a scratch ``PYTHONPYCACHEPREFIX`` during the warm-up call, as installed. ``--no-bytecode``
measures the other way (our modules compiled at each call: 5-20 ms by ``-X importtime``, within the noise of
the wall times on the 2-core box).

    .venv/bin/python bench/cli_startup.py             # 15 rounds (about a minute)
    .venv/bin/python bench/cli_startup.py --rounds 40 # steadier medians
    .venv/bin/python bench/cli_startup.py --rounds 8 --baseline fa2bbdf  # and the code of a git revision, same rounds
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]


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


Runs = dict[str, tuple[list[str], dict[str, str]]]  # name -> (argv, environment added)


def baseline_package(revision: str, scratch: Path) -> Path:
    """hookpoints as of git ``revision``, laid out for ``PYTHONPATH`` (store/, analyses/, cli/ inside hookpoints/,
    as pyproject's package-dir maps them), so the old and the new code run in the same rounds."""
    tree = scratch / "baseline-tree"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", revision], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    package = scratch / "baseline" / "hookpoints"
    shutil.copytree(tree / "hookpoints", package)
    for folder in ("store", "analyses", "cli"):
        shutil.copytree(tree / folder, package / folder)
    return package.parent


def commands(store: str, baseline: Path | None) -> Runs:
    """name -> (argv, environment added): the floor, two references, the three commands (and their baseline)."""
    hookpoints = [sys.executable, "-m", "hookpoints.cli"]
    light = {
        "hookpoints --help": ["--help"],
        'hookpoints sql --store S "SELECT 1"': ["sql", "--store", store, "SELECT 1"],
        "hookpoints store info S": ["store", "info", store],
    }
    runs = {
        "import duckdb, deltalake": ([sys.executable, "-c", "import duckdb, deltalake"], {}),
        # references, not goals: what printing an Arrow result with rich imports (pyarrow loads numpy), and what
        # printing with rich from a click command imports at least
        **{
            f"import {modules}": ([sys.executable, "-c", f"import {modules}"], {})
            for modules in (
                "duckdb, deltalake, pyarrow.parquet, click, rich.console",
                "duckdb, deltalake, click, rich.console, rich.table",
            )
        },
        **{name: ([*hookpoints, *argv], {}) for name, argv in light.items()},
    }
    if baseline is not None:
        runs |= {
            f"baseline: {name}": ([*hookpoints, *argv], {"PYTHONPATH": str(baseline)}) for name, argv in light.items()
        }
    return runs


def measure(rounds: int, runs: Runs, env: dict[str, str], cwd: Path) -> dict[str, list[float]]:
    """Wall times of every command, run in ``cwd`` (not the repository: its hookpoints/ would shadow the baseline)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for argv, extra in runs.values():  # once each first: checks the command works, warms the page cache (and byte code)
        subprocess.run(argv, check=True, capture_output=True, env=env | extra, cwd=cwd)
    for _ in range(rounds):
        for name, (argv, extra) in runs.items():
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, env=env | extra, cwd=cwd)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-bytecode", action="store_true", help="Compile our modules from source at each call.")
    parser.add_argument("--baseline", metavar="REV", help="Also time the three commands as of this git revision.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
        if args.no_bytecode:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        else:
            env["PYTHONPYCACHEPREFIX"] = str(Path(scratch) / "pycache")
        baseline = baseline_package(args.baseline, Path(scratch)) if args.baseline else None
        if baseline is not None:  # the baseline's modules, not the installed ones
            where = subprocess.run(
                [sys.executable, "-c", "import hookpoints.cli.main as m; print(m.__file__)"],
                env=env | {"PYTHONPATH": str(baseline)}, cwd=scratch, check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            assert where.startswith(str(baseline)), where
        times = measure(args.rounds, commands(small_store(Path(scratch) / "store"), baseline), env, Path(scratch))
    floor = statistics.median(times["import duckdb, deltalake"])
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    bytecode = "compiled at each call" if args.no_bytecode else "cached, as installed"
    print(f"{args.rounds} interleaved rounds, medians (ratio to the floor; goal: at most 2.0); byte code {bytecode}")
    print(f"load average at the end: {load}" + (f"; baseline: {args.baseline}" if args.baseline else ""))
    print("| command | median wall (s) | min (s) | ratio |\n|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.3f} | {min(values):.3f} | {median / floor:.2f} |")


if __name__ == "__main__":
    main()
