"""Per-hook cost of recording pooled rows: operations and microseconds per hook point, before and after.

On a GPU a recording of hundreds of hook points is launch-bound: each hook costs Python, dispatcher calls and
kernel launches, whatever its tensor's size. This measures that fixed cost on the CPU, where it can be counted
exactly, for the code of this checkout ("after") and of a git revision ("before", default ``main``), each in
its own subprocess with its models loaded, the parent asking them for one timed call at a time, alternating
between the two versions call by call (so both meet the same load on a shared machine):

- **launch-bound case**: GPT-2 with 24 layers of d_model 16 (364 hook points), 9 texts (padded, 7-31 tokens),
  9 x 24 random tokens (no padding), or the same with the last 4 positions of every example masked ("same",
  as equal-length speech fixed to N frames); the forward's arithmetic is negligible. ``HookedModel.pooled``
  with every hook point against the same call with only the last one (the forward runs as far): the difference
  over 363 hooks is the cost per hook. Operations are counted with :class:`hookpoints.op_count.OpCount`
  (kernels = operations that compute, i.e. kernel launches on a GPU; views; host syncs).
- **realistic CPU case**: GPT-2 6 x 256 (the recording-overhead model), batch 8 x 128 tokens, padded (64-128
  tokens) and not: ms per batch of ``HookedModel.pooled`` (every hook point, mean) and of the bare forward.
- **the floor**: the launch-bound case with the pooling replaced by taking the tensor as it is (the trace and
  its hooks alone; the same code in both, so its difference is the timing's resolution between two processes);
- **the pooling work alone** of the realistic case, in one process: main's and this checkout's pooling
  functions over the same captured activations (separate processes differ by up to 15% on the same code).
- **the copy to the host** (the same in both: emulated on CPU tensors): per hook a buffer and a copy (before)
  against one packed buffer and one copy per batch (:func:`hookpoints.host_copy.pack`, after).
- **values**: the pooled values of both versions on the padded batch, max relative difference.

Run: ``.venv/bin/python bench/hook_cost.py [--before main] [--rounds 15]`` (about 2 minutes on 2 shared
cores; prints Markdown, docs/benchmarks.md has the results). The sizes are fixed and small on purpose: the
launch-bound case is the GPU's regime, measured on its host side; a GPU itself runs ``bench/gpu.py``.
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
    result = {
        "padded": ModelInputs({"input_ids": ids, "attention_mask": mask}, {"input": mask.bool()}),
        "unpadded": ModelInputs({"input_ids": short, "attention_mask": full}, {"input": full.bool()}),
    }
    if not real:  # the same padding in every example (as equal-length speech fixed to N frames): 20 of 24 valid
        same = full.clone()
        same[:, 20:] = 0
        result["same"] = ModelInputs({"input_ids": short, "attention_mask": same}, {"input": same.bool()})
    return result


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


def without_pooling(model, inputs, points) -> None:
    """``model.pooled`` with the pooling replaced by taking the hook's tensor as it is (the hook machinery)."""
    import hookpoints.model
    from hookpoints.probe import first_tensor

    pool = hookpoints.model.pool
    hookpoints.model.pool = lambda value, *args, **kwargs: first_tensor(value)
    try:
        model.pooled(inputs, points, "mean")
    finally:
        hookpoints.model.pool = pool


def child(code: Path, folder: Path, values_out: Path) -> None:
    """Count operations and save values, print them, then time one call per case named on stdin (in ms)."""
    sys.path.insert(0, str(code))
    import hookpoints

    hookpoints.__path__.append(str(code))  # hookpoints.store from the same checkout (setuptools package-dir)
    from hookpoints.loading import load, quiet_transformers

    assert Path(hookpoints.__file__).resolve().parent == (code / "hookpoints").resolve(), hookpoints.__file__
    quiet_transformers()
    torch.set_num_threads(1)
    OpCount = op_counter()
    result: dict = {"ops": {}}
    values, calls = {}, {}
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
            for name, chosen in (("all", points), ("last", last)):
                calls[f"tiny/{dtype}/{padding}/{name}"] = lambda m=model, i=inputs, c=chosen: m.pooled(i, c, "mean")
                if dtype == "float32" and padding == "padded":  # the floor: the trace and hooks, pooling nothing
                    calls[f"tiny/floor/{name}"] = lambda m=model, i=inputs, c=chosen: without_pooling(m, i, c)
        result["hooks"] = len(points)
    model = load(folder / REAL, device="cpu", dtype="float32")
    points = model.select(None)
    result["real_hooks"] = len(points)
    for padding, inputs in batches(model, real=True).items():

        def bare(inputs=inputs):
            with torch.inference_mode():
                model.model(**inputs.kwargs)

        calls[f"real/{padding}/bare"] = bare
        calls[f"real/{padding}/pooled"] = lambda inputs=inputs: model.pooled(inputs, points, "mean")
    np.savez(values_out, **{f"{key}|{hook}": value for key, pooled in values.items() for hook, value in pooled.items()})
    for call in calls.values():  # warm-up
        call()
    print(json.dumps(result), flush=True)
    for line in sys.stdin:  # the parent names one case per line
        start = time.perf_counter()
        calls[line.strip()]()
        print(f"{(time.perf_counter() - start) * 1000:.4f}", flush=True)


# -- the realistic case's pooling work in one process: the old pooling functions against the new -------------


def pooling_work(folder: Path, old_code: Path, rounds: int) -> dict[str, dict[str, float]] | None:
    """ms to pool (mean) the captured activations of every hook point of the realistic batch, with the
    ``before`` revision's ``pooling.py`` / ``derived.py`` (loaded by path) and this checkout's, interleaved in
    ONE process: separate processes differ by up to 15% on the same code here (an A/A run), this does not.
    None when the old module has another ``pool`` signature than main's (value, point, mask, method, key_mask,
    all_valid)."""
    import importlib.util
    import inspect

    sys.path.insert(0, str(ROOT))
    from hookpoints import pooling
    from hookpoints.loading import load, quiet_transformers

    def module(name: str, path: Path, replace: tuple[str, str] | None = None):
        source = path.read_text()
        if replace:
            source = source.replace(*replace)
        spec = importlib.util.spec_from_loader(name, loader=None)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        exec(compile(source, str(path), "exec"), loaded.__dict__)  # noqa: S102 - the repository's own code
        return loaded

    module("old_derived", old_code / "hookpoints" / "derived.py")
    old = module("old_pooling", old_code / "hookpoints" / "pooling.py",
                 ("from hookpoints.derived import", "from old_derived import"))  # fmt: skip
    if list(inspect.signature(old.pool).parameters)[2:] != ["mask", "method", "key_mask", "all_valid"]:
        return None
    quiet_transformers()
    torch.set_num_threads(1)
    model = load(folder / REAL, device="cpu", dtype="float32")
    points = model.select(None)
    result = {}
    for padding, inputs in batches(model, real=True).items():
        raw: dict = {}
        handles = []
        for point in points:
            hooked = model.model.get_submodule(point.module)
            if point.io == "input":
                hook = hooked.register_forward_pre_hook(lambda m, a, p=point, raw=raw: raw.__setitem__(p.name, a[0]))
            else:
                hook = hooked.register_forward_hook(lambda m, a, o, p=point, raw=raw: raw.__setitem__(p.name, o))
            handles.append(hook)
        with torch.inference_mode():
            model.model(**inputs.kwargs)
        for handle in handles:
            handle.remove()
        mask = inputs.masks["input"]

        def before(mask=mask, raw=raw):
            full = "input" in old.unpadded_spaces({"input": mask}, mask.device)
            for point in points:
                old.pool(raw[point.name], point, mask, "mean", None, full)

        def after(mask=mask, raw=raw):
            space = pooling.prepare_masks({"input": mask})["input"]
            for point in points:
                pooling.pool(raw[point.name], point, space, "mean")

        result[padding] = median_ms({"before": before, "after": after}, rounds)
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


class Child:
    """One version of the code in its own process, timing one call at a time when asked."""

    def __init__(self, code: Path, folder: Path, values_out: Path):
        command = [sys.executable, __file__, "--child", str(code), "--folder", str(folder), "--values", str(values_out)]
        env = {**os.environ, "PYTHONPATH": ""}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                        cwd=folder)  # fmt: skip
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{code}: the child failed (its error is above)")
        self.static = json.loads(line)

    def time(self, case: str) -> float:
        self.process.stdin.write(case + "\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def interleaved(children: dict[str, Child], rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per case and version: every case, call by call, alternating between the versions."""
    cases = [
        f"tiny/{d}/{p}/{n}"
        for d in ("float32", "bfloat16")
        for p in ("padded", "unpadded", "same")
        for n in ("all", "last")
    ]
    cases += ["tiny/floor/all", "tiny/floor/last"]
    cases += [f"real/{p}/{n}" for p in ("padded", "unpadded") for n in ("bare", "pooled")]
    times: dict[str, dict[str, list[float]]] = {name: {case: [] for case in cases} for name in children}
    for k in range(rounds):
        for case in cases:
            for name, child in children.items():
                times[name][case].append(child.time(case))
        print(f"round {k + 1}/{rounds}", file=sys.stderr, flush=True)
    return {name: {case: statistics.median(v) for case, v in per.items()} for name, per in times.items()}


def summary(static: dict, ms: dict[str, float]) -> dict:
    hooks = static["hooks"] - 1
    us = {}
    for dtype in ("float32", "bfloat16"):
        for padding in ("padded", "unpadded", "same"):
            key = f"tiny/{dtype}/{padding}"
            us[f"{dtype}/{padding}/mean"] = (ms[f"{key}/all"] - ms[f"{key}/last"]) * 1000 / hooks
    us["floor"] = (ms["tiny/floor/all"] - ms["tiny/floor/last"]) * 1000 / hooks
    real = {p: {"bare": ms[f"real/{p}/bare"], "pooled": ms[f"real/{p}/pooled"]} for p in ("padded", "unpadded")}
    return {**static, "us_per_hook": us, "real_ms": real}


def checkout(revision: str, folder: Path) -> Path:
    target = folder / "before"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "hookpoints", "store"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


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


def markdown(before: dict, after: dict, tail: dict, diffs: dict, revision: str, loads, work: dict | None) -> str:
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
    lines += ["", f"The hook machinery alone (float32, padded; pooling replaced by taking the tensor as it is): "
              f"{before['us_per_hook']['floor']:.0f} us per hook before, {after['us_per_hook']['floor']:.0f} after "
              "(the same code: a check of the timing)."]  # fmt: skip
    lines += ["", f"Realistic CPU case: GPT-2 6 x 256, {after['real_hooks']} hook points, batch 8 x 128 tokens, "
              "mean, float32 (ms per batch):", "",
              "| padding | bare before | pooled before | x bare | bare after | pooled after | x bare |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for padding, ms in after["real_ms"].items():
        old = before["real_ms"][padding]
        lines.append(f"| {padding} | {old['bare']:.1f} | {old['pooled']:.1f} | {old['pooled'] / old['bare']:.2f} | "
                     f"{ms['bare']:.1f} | {ms['pooled']:.1f} | {ms['pooled'] / ms['bare']:.2f} |")  # fmt: skip
    if work:
        lines += ["", "Its pooling work alone (the captured activations of the 94 hook points pooled by the old and "
                  "the new functions, interleaved in one process; ms per batch):", "",
                  "| padding | before | after |", "|---|---:|---:|"]  # fmt: skip
        for padding, ms in work.items():
            lines.append(f"| {padding} | {ms['before']:.1f} | {ms['after']:.1f} |")
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
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per case and version")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--values", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.values)
        return
    loads = [" / ".join(f"{x:.2f}" for x in os.getloadavg())]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sys.path.insert(0, str(ROOT))
        build_models(folder)
        codes = {"before": checkout(args.before, folder), "after": ROOT}
        children = {name: Child(code, folder, folder / f"{name}.npz") for name, code in codes.items()}
        try:
            ms = interleaved(children, args.rounds)
        finally:
            for each in children.values():
                each.close()
        diffs = value_difference(folder / "before.npz", folder / "after.npz")
        results = {name: summary(children[name].static, ms[name]) for name in children}
        work = pooling_work(folder, codes["before"], args.rounds * 2)
    tail = host_tail(args.rounds * 3)
    loads.append(" / ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(markdown(results["before"], results["after"], tail, diffs, args.before, loads, work))


if __name__ == "__main__":
    main()
