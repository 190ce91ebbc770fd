"""Per-hook cost of recording pooled rows: operations and microseconds per hook point, before and after.

On a GPU a recording of hundreds of hook points is launch-bound: each hook costs Python, dispatcher calls and
kernel launches, whatever its tensor's size. This measures that fixed cost on the CPU, where it can be counted
exactly, for the code of this checkout ("after") and of a git revision ("before", default ``main``), each in
its own subprocess, the two alternating round by round (one run, interleaved):

- **launch-bound case**: GPT-2 with 24 layers of d_model 16 (364 hook points), 9 texts (padded, 7-31 tokens)
  or 9 x 24 random tokens (no padding); the forward's arithmetic is negligible. ``HookedModel.pooled`` with
  every hook point against the same call with only the last one (the forward runs as far): the difference over
  363 hooks is the cost per hook. Operations are counted with :class:`hookpoints.op_count.OpCount` (kernels =
  operations that compute, i.e. kernel launches on a GPU; views; host syncs).
- **realistic CPU case**: GPT-2 6 x 256 (the recording-overhead model), batch 8 x 128 tokens, padded (64-128
  tokens) and not: ms per batch of ``HookedModel.pooled`` (every hook point, mean) and of the bare forward.
- **the copy to the host** (the same in both: emulated on CPU tensors): per hook a buffer and a copy (before)
  against one packed buffer and one copy per batch (:func:`hookpoints.host_copy.pack`, after).
- **values**: the pooled values of both versions on the padded batch, max relative difference.

Run: ``.venv/bin/python bench/hook_cost.py [--before main] [--rounds 3]`` (about 2 minutes on 2 shared cores;
prints Markdown, docs/benchmarks.md has the results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("mean", "max", "last", "none")
TINY, REAL = "gpt2-24x16", "gpt2-6x256"


def build_models(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from hookpoints.tiny import randomise_norms_and_biases, tiny_tokenizer

    for name, layers, width, heads, vocab in ((TINY, 24, 16, 2, 300), (REAL, 6, 256, 8, 5000)):
        torch.manual_seed(0)
        config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=256,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
        model = GPT2LMHeadModel(config).eval()
        randomise_norms_and_biases(model)
        model.save_pretrained(folder / name)
        tiny_tokenizer().save_pretrained(folder / name)


# -- the child: one version of the code, measured ------------------------------------------------------------


def op_counter():
    """This checkout's :class:`OpCount`, loaded by path (the "before" code may not have it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("op_count", ROOT / "hookpoints" / "op_count.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OpCount


def batches(model, real: bool) -> dict:
    """The padded and the unpadded batch of a case."""
    from hookpoints.inputs import ModelInputs

    generator = torch.Generator().manual_seed(0)
    vocab = model.model.config.vocab_size
    if real:
        ids = torch.randint(4, vocab, (8, 128), generator=generator)
        lengths = torch.linspace(64, 128, 8).long()
    else:
        ids = torch.randint(4, vocab, (9, 31), generator=generator)
        lengths = torch.linspace(7, 31, 9).long()
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    short = ids if real else ids[:, :24]  # the unpadded batch: 8 x 128 or 9 x 24
    full = torch.ones_like(short)
    return {
        "padded": ModelInputs({"input_ids": ids, "attention_mask": mask}, {"input": mask.bool()}),
        "unpadded": ModelInputs({"input_ids": short, "attention_mask": full}, {"input": full.bool()}),
    }


def median_ms(calls: dict, reps: int) -> dict[str, float]:
    """Median ms per call of each, interleaved call by call after one warm-up each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def timed_pooling(model, inputs, selections: dict, reps: int) -> dict[str, float]:
    """Median ms of ``model.pooled`` (mean) for each selection of hook points, interleaved."""
    calls = {name: lambda chosen=chosen: model.pooled(inputs, chosen, "mean") for name, chosen in selections.items()}
    return median_ms(calls, reps)


def child(code: Path, folder: Path, reps: int, values_out: Path | None) -> dict:
    sys.path.insert(0, str(code))
    import hookpoints

    hookpoints.__path__.append(str(code))  # hookpoints.store from the same checkout (setuptools package-dir)
    from hookpoints.loading import load, quiet_transformers

    assert Path(hookpoints.__file__).resolve().parent == (code / "hookpoints").resolve(), hookpoints.__file__
    quiet_transformers()
    torch.set_num_threads(1)
    OpCount = op_counter()
    result: dict = {"ops": {}, "us_per_hook": {}, "real_ms": {}}
    values = {}
    for dtype in ("float32", "bfloat16"):
        model = load(folder / TINY, device="cpu", dtype=dtype)
        points = model.select(None)
        last = [max(points, key=lambda p: p.order)]
        for padding, inputs in batches(model, real=False).items():
            for method in METHODS:
                counts = []
                for chosen in (points, last):
                    with OpCount() as ops:
                        pooled = model.pooled(inputs, chosen, method)
                    counts.append(ops)
                    if chosen is points and padding == "padded":
                        values[f"{dtype}/{method}"] = {k: v.float().numpy() for k, v in pooled.items()}
                many, one = counts
                per = {kind: (getattr(many, kind) - getattr(one, kind)) / (len(points) - 1)
                       for kind in ("total", "kernels", "views", "allocations", "syncs")}  # fmt: skip
                result["ops"][f"{dtype}/{padding}/{method}"] = per
            ms = timed_pooling(model, inputs, {"all": points, "last": last}, reps)
            result["us_per_hook"][f"{dtype}/{padding}/mean"] = (ms["all"] - ms["last"]) * 1000 / (len(points) - 1)
        result["hooks"] = len(points)
    model = load(folder / REAL, device="cpu", dtype="float32")
    points = model.select(None)
    result["real_hooks"] = len(points)
    for padding, inputs in batches(model, real=True).items():

        def bare(inputs=inputs):
            with torch.inference_mode():
                model.model(**inputs.kwargs)

        ms = median_ms({"bare": bare, "pooled": lambda inputs=inputs: model.pooled(inputs, points, "mean")}, reps)
        result["real_ms"][padding] = ms
    if values_out:
        np.savez(
            values_out, **{f"{key}|{hook}": value for key, pooled in values.items() for hook, value in pooled.items()}
        )
    return result


# -- the copy to the host, emulated on CPU tensors (the same in both runs) ---------------------------------------


def host_tail(reps: int) -> dict:
    """Per hook a buffer and a copy (HostCopy before) against one pack, one buffer and one copy (after)."""
    sys.path.insert(0, str(ROOT))
    from hookpoints.host_copy import pack

    OpCount = op_counter()
    torch.set_num_threads(1)  # as the children (a CPU cat of many small tensors loses to threads' start-up)
    generator = torch.Generator().manual_seed(0)
    pooled = {f"h{i}": torch.randn(9, 16 if i % 4 else 64, generator=generator) for i in range(364)}

    def before():
        for tensor in pooled.values():
            torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.detach())

    def after():
        flat, _ = pack(pooled)
        torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)

    result = {}
    for name, call in (("before", before), ("after", after)):
        with OpCount() as ops:
            call()
        result[name] = {"total": ops.total / len(pooled), "kernels": ops.kernels / len(pooled),
                        "allocations": ops.allocations / len(pooled)}  # fmt: skip
    ms = median_ms({"before": before, "after": after}, reps)
    for name in ("before", "after"):
        result[name]["us_per_hook"] = ms[name] * 1000 / len(pooled)
    return result


# -- the parent ---------------------------------------------------------------------------------------------------


def run_child(code: Path, folder: Path, reps: int, values_out: Path | None) -> dict:
    command = [sys.executable, __file__, "--child", str(code), "--folder", str(folder), "--reps", str(reps)]
    if values_out:
        command += ["--values", str(values_out)]
    env = {**os.environ, "PYTHONPATH": ""}
    output = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
    if output.returncode:
        raise RuntimeError(f"{code}: {output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def checkout(revision: str, folder: Path) -> Path:
    target = folder / "before"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "hookpoints", "store"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def merged(results: list[dict]) -> dict:
    """Medians over rounds of every timing (operation counts are the same every round)."""
    out = json.loads(json.dumps(results[0]))
    for key in out["us_per_hook"]:
        out["us_per_hook"][key] = statistics.median(r["us_per_hook"][key] for r in results)
    for padding, calls in out["real_ms"].items():
        for name in calls:
            calls[name] = statistics.median(r["real_ms"][padding][name] for r in results)
    return out


def value_difference(before: Path, after: Path) -> dict[str, float]:
    """Max over hooks of max |after - before| / max(max |before|, 1e-6), per dtype and method."""
    a, b = np.load(before), np.load(after)
    assert set(a.files) == set(b.files), "the two versions pooled different hook points"
    worst: dict[str, float] = {}
    for key in a.files:
        group = key.split("|")[0]
        scale = max(float(np.abs(a[key]).max()), 1e-6)
        worst[group] = max(worst.get(group, 0.0), float(np.abs(a[key] - b[key]).max()) / scale)
    return worst


def markdown(before: dict, after: dict, tail: dict, diffs: dict, revision: str, loads) -> str:
    lines = [f"Load average (1/5/15 min) before: {loads[0]}, after: {loads[1]}; {os.cpu_count()} cores; "
             f"before = `{revision}`, after = this checkout", ""]  # fmt: skip
    lines += [f"Launch-bound case: GPT-2 24 x 16, {after['hooks']} hook points, batch 9; per hook point "
              "(difference between all hook points and the last one only, over the hooks between):", "",
              "| dtype | padding | pooling | ops before | ops after | kernels before | kernels after | "
              "syncs before | syncs after | us before | us after |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for key, ops in after["ops"].items():
        old = before["ops"][key]
        us_b, us_a = before["us_per_hook"].get(key), after["us_per_hook"].get(key)
        timing = f"{us_b:.0f} | {us_a:.0f}" if us_a is not None else " | "
        dtype, padding, method = key.split("/")
        lines.append(f"| {dtype} | {padding} | {method} | {old['total']:.2f} | {ops['total']:.2f} | "
                     f"{old['kernels']:.2f} | {ops['kernels']:.2f} | {old['syncs']:.2f} | {ops['syncs']:.2f} | "
                     f"{timing} |")  # fmt: skip
    lines += ["", f"Realistic CPU case: GPT-2 6 x 256, {after['real_hooks']} hook points, batch 8 x 128 tokens, "
              "mean, float32 (ms per batch):", "",
              "| padding | bare before | pooled before | x bare | bare after | pooled after | x bare |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for padding, ms in after["real_ms"].items():
        old = before["real_ms"][padding]
        lines.append(f"| {padding} | {old['bare']:.1f} | {old['pooled']:.1f} | {old['pooled'] / old['bare']:.2f} | "
                     f"{ms['bare']:.1f} | {ms['pooled']:.1f} | {ms['pooled'] / ms['bare']:.2f} |")  # fmt: skip
    lines += ["", "Copy to the host, per hook point (364 pooled [9, 16-64] tensors, emulated on CPU tensors):", "",
              "| | ops | kernels | allocations | us |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in tail.items():
        lines.append(f"| {name} | {row['total']:.2f} | {row['kernels']:.2f} | {row['allocations']:.2f} | "
                     f"{row['us_per_hook']:.1f} |")  # fmt: skip
    lines += ["", "Values, padded batch, max |after - before| / max |before| over hook points: "
              + ", ".join(f"{k} {v:.1e}" for k, v in sorted(diffs.items()))]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="main", help="git revision of the code to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=7, help="timed calls per case and round")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--values", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.reps, args.values)))
        return
    loads = [" / ".join(f"{x:.2f}" for x in os.getloadavg())]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sys.path.insert(0, str(ROOT))
        build_models(folder)
        old_code = checkout(args.before, folder)
        results: dict[str, list[dict]] = {"before": [], "after": []}
        for k in range(args.rounds):
            for name, code in (("before", old_code), ("after", ROOT)):
                values = folder / f"{name}.npz" if k == 0 else None
                results[name].append(run_child(code, folder, args.reps, values))
                print(f"round {k + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
        diffs = value_difference(folder / "before.npz", folder / "after.npz")
    tail = host_tail(args.reps * 5)
    loads.append(" / ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(markdown(merged(results["before"]), merged(results["after"]), tail, diffs, args.before, loads))


if __name__ == "__main__":
    main()
