"""Recording and interventions on a GPU: throughput against the bare model, values against CPU float32.

Two models with random weights, built from their configs directly on the device in the chosen precision
(``--dtype``, default auto: bf16 on a GPU that has it):

- **SeamlessM4T v2 large, speech to text**: the large checkpoint's sizes (``SeamlessM4Tv2Config()``
  defaults: d_model 1,024, 24 Conformer speech-encoder layers, 24 text-decoder layers, FFN 8,192 / 4,096,
  16 heads, vocabulary 256,102); speech of 6 s fixed to 300 frames (the paper's setting).
- **a 1 B decoder LM**: Llama 3.2 1B's sizes (d_model 2,048, 16 layers, FFN 8,192, 32 heads / 8 KV heads,
  vocabulary 128,256): 1.24 B parameters.

Timed, interleaved call by call, CUDA-synchronised, medians over ``--rounds``:

- **bare forward**: ``model(**inputs)`` under ``inference_mode``;
- **recording**: every Table 1 hook point (Seamless: speech encoder and text decoder; Llama: every listed
  hook point) mean-pooled on the GPU in float32, rows copied to pinned host memory without blocking, one
  batch behind (hookpoints.recorder's own pipeline: ``start_batch`` / ``one_behind``), on a side stream as
  the recorder copies (against ``copy on the compute stream (before)``, and a bit-equality check of the two
  over a pipelined run); with ``+ store``
  the rows go through the store's run writer too (Delta tables on local disk, float16 storage);
- **plain generate** against **1,000-neuron median replacement** during generation
  (``HookedModel.generate_edited``; Seamless: text decoder, Table 1 components of all 24 layers; the LM, which
  continues its ``--tokens-in`` tokens: q, k, v, z, MLP pre and post of all 16 blocks), exactly
  ``--tokens`` new tokens, batch 1 (the paper's) and batch 8 (Linear replacements folded into the weights,
  hookpoints/edit_folding.py); against the same edits without folding (``fold=False``: one ``EditGroup`` hook
  per edited tensor) and by the edit path before issue 16's change (one hook per edit with ``index_put_``:
  ``legacy_apply_edit`` of bench/edit_overhead.py).

Values: a few examples recorded on the device through ``hookpoints.recorder.record`` (read back from the
store) against the same weights in float32 on the CPU; per hook the relative error ||device - cpu|| / ||cpu||.

``--profile`` adds torch.profiler's busiest operations (host and device time) of one recording call per case,
to tell a launch-bound host from slow pooling kernels. Per case it also counts the aten operations per hook
point of the recording path (:class:`hookpoints.op_count.OpCount`; on a GPU each kernel is a launch).

Run: ``python bench/gpu.py`` on a GPU (about 4 minutes on an H100/H200; prints Markdown, writes
``$OUT/gpu.json`` when ``OUT`` is set or ``--json PATH``); ``python bench/gpu.py --smoke`` on a CPU at tiny
sizes (a check of the script, numbers meaningless). docs/benchmarks.md holds the results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import transformers.configuration_utils as _configuration  # noqa: E402

if not hasattr(_configuration, "SubConfigSpec"):  # transformers < 5.2x (the GPU machine had 5.17): only the

    class SubConfigSpec:  # Ultravox config names it at import, and Ultravox is not benchmarked here
        def __init__(self, config_class, model_type=None, init_kwargs=None, optional=False):
            self.config_class, self.model_type, self.init_kwargs, self.optional = (
                config_class, model_type, init_kwargs, optional,
            )  # fmt: skip

    _configuration.SubConfigSpec = SubConfigSpec

try:  # installed: store/, analyses/, cli/ are hookpoints.store, ... (setuptools package-dir)
    import hookpoints.store  # noqa: F401
except ModuleNotFoundError:  # a bare checkout (the GPU machine): the same mapping by package path
    import hookpoints

    hookpoints.__path__.append(str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from edit_overhead import legacy_apply_edit, random_edits  # noqa: E402  (bench/: the edit path before issue 16's change)
from gpu_models import SAMPLE_RATE, batch_of, build, table1_points, waveforms  # noqa: E402
from hookpoints.store.catalog import Store  # noqa: E402
from hookpoints.store.writer import HookRows, open_run  # noqa: E402

from hookpoints.adapters.seamless import TABLE1  # noqa: E402
from hookpoints.direct import pooled_direct  # noqa: E402
from hookpoints.host_copy import HostCopy, one_behind  # noqa: E402
from hookpoints.inputs import ModelInputs  # noqa: E402
from hookpoints.loading import quiet_transformers  # noqa: E402
from hookpoints.manifest import read_manifest  # noqa: E402
from hookpoints.mask_skips import MaskSkips, check_claims  # noqa: E402
from hookpoints.model import HookedModel  # noqa: E402
from hookpoints.op_count import OpCount  # noqa: E402
from hookpoints.placement import Placement  # noqa: E402
from hookpoints.recorder import record  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(cases: dict, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each case, interleaved call by call after one warm-up each."""
    for case in cases.values():
        case()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            sync(device)
            start = time.perf_counter()
            case()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class Recording:
    """The recorder's pipeline over prepared batches: pooled on the device, copied one batch behind, and
    (with a store) handed to the run writer."""

    def __init__(self, model: HookedModel, points, store: Store | None, batch: int, direct: bool = False,
                 side_stream: bool = True, mask_syncs: bool = False):  # fmt: skip
        self.model, self.points, self.store, self.batch = model, points, store, batch
        self.side_stream = side_stream
        self.mask_syncs = mask_syncs  # before: transformers reads its masks on the host (2 syncs per batch)
        self.values: list[dict[str, np.ndarray]] = []  # with keep=True: every batch's rows, for a check
        self.stats = None  # with a store: the last call's WriteStats (flushes, MB/s, the producer's wait)
        self.keep = False
        self.calls = 0
        # nnsight trace or hooks; the mask skips' check crosses with the rows, as in the recorder
        self.pooled = (lambda *a: pooled_direct(model, *a, defer_check=True)) if direct else (
            lambda *a: model.pooled(*a, defer_check=True))  # fmt: skip

    def __call__(self, batches: list[ModelInputs]) -> None:
        if not self.mask_syncs:
            return self.run(batches)
        answers = MaskSkips.for_batch
        MaskSkips.for_batch = classmethod(lambda cls, inputs: contextlib.nullcontext())  # transformers' own reads
        try:
            return self.run(batches)
        finally:
            MaskSkips.for_batch = answers

    def run(self, batches: list[ModelInputs]) -> None:
        writer = None
        if self.store is not None:
            self.calls += 1
            writer = open_run(
                self.store, f"bench-{self.calls}", settings={"model": self.model.source, "task": "forward",
                "pooling": "mean", "dtype": "float16"}, config={}, hooks=[p.row() for p in self.points],
                examples_schema=pa.schema([("example_id", pa.string())]), if_exists="overwrite",
            )  # fmt: skip

        def started():
            for k, inputs in enumerate(batches):
                pooled = self.pooled(inputs, self.points, "mean")
                storage = None if self.store is None else torch.float16  # as the recorder does for float16 runs
                yield k, HostCopy(pooled, dtype=storage, side_stream=self.side_stream)

        for k, copy_ in one_behind(started(), lambda item: item):
            values = check_claims(copy_.wait())
            if self.keep:
                self.values.append({name: array.copy() for name, array in values.items()})
            if writer is not None:
                ids = [f"{self.calls}-{k}-{i}" for i in range(self.batch)]
                rows = {p.name: HookRows(ids, values[p.name]) for p in self.points}
                writer.add(pa.table({"example_id": ids}), rows)
        if writer is not None:
            writer.finish("complete")
            self.stats = writer.stats


def throughput(model: HookedModel, family: str, args, store: Store, batch: int, with_store: bool) -> dict:
    size = args.frames if family == "seamless" else args.tokens_in
    batches = [batch_of(model, batch, size, seed) for seed in range(args.batches)]
    points = table1_points(model, family)
    # the store's steady state: enough batches that its last flush (which `finish` waits for) is a small part
    long_run = [batches[k % len(batches)] for k in range(args.store_batches)]
    stored = {name: Recording(model, points, store, batch) for name in ("short", "long")}  # their stats kept

    def bare():
        with torch.inference_mode():
            for inputs in batches:
                model.model(**inputs.kwargs)

    def body():  # a causal LM without its head: what recording runs (its trace stops after the last hook)
        with torch.inference_mode():
            for inputs in batches:
                model.model.model(**inputs.kwargs)

    cases = {
        "bare forward": bare,
        **({"bare forward, no LM head": body} if family == "llama" else {}),
        "recording (pooled, to host)": lambda: Recording(model, points, None, batch)(batches),
        "recording, torch hooks (pooled, to host)": lambda: Recording(model, points, None, batch, direct=True)(batches),
        "recording, transformers' mask syncs (before)": lambda: Recording(model, points, None, batch,
                                                                          mask_syncs=True)(batches),
        **({"recording, copy on the compute stream (before)": lambda: Recording(model, points, None, batch,
            side_stream=False)(batches)} if model.device.type == "cuda" else {}),
        **({"recording + store": lambda: stored["short"](batches)} if with_store else {}),
        **({f"recording + store, {len(long_run)} batches": lambda: stored["long"](long_run)}
           if with_store and args.store_batches else {}),
    }  # fmt: skip
    seconds = timed(cases, args.rounds, model.device)
    examples = batch * args.batches
    counted = {name: batch * len(long_run) if name.endswith(" batches") else examples for name in seconds}
    width = sum(p.width for p in points)
    try:  # aten operations (= launches, for kernels) per hook point: all hooks minus the last one only
        counts = []
        for chosen in (points, [max(points, key=lambda p: p.order)]):
            with OpCount() as ops:
                HostCopy(model.pooled(batches[0], chosen, "mean")).wait()
            counts.append(ops)
        per_hook = {kind: (getattr(counts[0], kind) - getattr(counts[1], kind)) / max(len(points) - 1, 1)
                    for kind in ("total", "kernels", "syncs")}  # fmt: skip
    except Exception as error:  # noqa: BLE001 - a count must not cost the device run its timings
        per_hook = {"error": f"{type(error).__name__}: {error}"[:300]}
    profile = None
    if args.profile:  # the recording, then the bare forward: what the recording adds, kernel by kernel
        profile = profiled(lambda: Recording(model, points, None, batch)(batches), model.device)
        profile += "\n\nThe bare forward, the same batches:\n" + profiled(bare, model.device)
    syncs = {name: syncs_per_batch(cases[name], len(batches), model.device) for name in ("bare forward",
             "recording (pooled, to host)", "recording, transformers' mask syncs (before)")}  # fmt: skip
    return {
        "side_stream_check": side_stream_check(model, points, batch, (long_run or batches)[:8]),
        "store_stats": {
            name: {
                "flushes": r.stats.flushes,
                "mb": r.stats.bytes / 1e6,
                "flush_seconds": r.stats.flush_seconds,
                "build_seconds": r.stats.build_seconds,
                "mb_per_second": r.stats.mb_per_second,
                "waited_seconds": r.stats.waited_seconds,
            }
            for name, r in stored.items()
            if r.stats is not None
        },  # fmt: skip
        "profile": profile,
        "ops_per_hook": per_hook,
        "syncs_per_batch": syncs,
        "family": family,
        "parameters": sum(p.numel() for p in model.model.parameters()),
        "hooks": len(points),
        "values_per_example": width,
        "batch": batch,
        "positions": size,
        "examples_per_call": examples,
        "stored_mb_per_call": width * examples * 2 / 1e6,  # float16 storage
        "seconds": seconds,
        "examples_per_second": {name: counted[name] / s for name, s in seconds.items()},
        "x_bare_throughput": {
            name: counted[name] / s / (examples / seconds["bare forward"]) for name, s in seconds.items()
        },
    }


def side_stream_check(model: HookedModel, points, batch: int, batches: list[ModelInputs]) -> dict:
    """The side-stream copy's rows against the compute-stream copy's, batch by batch, over a pipelined run
    (batch k + 1's forward pass queued while batch k's copy runs: where a missing stream wait or
    ``record_stream`` would show as changed values). Pooling is deterministic, so they must be equal."""
    runs = {}  # (on the CPU both copy alike: a check of this check)
    for side in (True, False):
        recording = Recording(model, points, None, batch, side_stream=side)
        recording.keep = True
        recording(batches)
        runs[side] = recording.values
    differing = [
        (k, name) for k, (a, b) in enumerate(zip(runs[True], runs[False], strict=True)) for name in a
        if not np.array_equal(a[name], b[name], equal_nan=True)
    ]  # fmt: skip
    worst = max((float(np.nanmax(np.abs(runs[True][k][n] - runs[False][k][n]))) for k, n in differing), default=0.0)
    return {
        "batches": len(batches),
        "hooks": len(points),
        "equal": not differing,
        "differing": len(differing),
        "first_differing": [f"batch {k}: {name}" for k, name in differing[:3]],
        "max_abs_difference": worst,
    }


def syncs_per_batch(call, batches: int, device: torch.device) -> dict:
    """Operations that make the host wait for the GPU (``torch.cuda.set_sync_debug_mode``), per batch of one
    call, with the first few messages: each one drains the GPU's queue, so the host cannot run ahead."""
    if device.type != "cuda":
        return {}
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found = [f"{Path(w.filename).name}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]  # where
    return {"per_batch": len(found) / batches, "first": found[:4]}


def profiled(call, device: torch.device) -> str:
    """torch.profiler's busiest operations of one call (host time, and device time on a GPU): where the
    recording's time goes (launch-bound host, or the pooling kernels themselves)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        call()
        sync(device)
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=15)]
    if device.type == "cuda":
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=30))
    return "\n".join(tables)


#: The LM's counterparts of Table 1's decoder components (attention projections, MLP in and out).
LM_EDITED = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "mlp.hook_pre", "mlp.hook_post")


def interventions(model: HookedModel, family: str, args) -> list[dict]:
    """Plain generate against a 1,000-neuron median replacement (Seamless: the text decoder's Table 1 components;
    the LM, which continues its text: the same components of every block)."""
    if family == "seamless":
        points = model.select([f"text_decoder.layers.*.{sub}" for sub in TABLE1["text_decoder"]])
    else:
        points = model.select([f"blocks.*.{sub}" for sub in LM_EDITED])
    edits = random_edits(points, args.neurons)
    model.model.generation_config.min_new_tokens = args.gen_tokens  # exactly N new tokens
    if model.continues:  # a continuation is the plain argmax (min_new_tokens off): no EOS instead
        model.model.generation_config.eos_token_id = None
    results = []
    for batch in (1, 8):
        if family == "seamless":
            inputs = batch_of(model, batch, args.frames, 100 + batch)
            prompt = model.decoder_prompt(["eng"] * batch)
        else:
            inputs, prompt = batch_of(model, batch, args.tokens_in, 100 + batch), None
        cases = {
            "plain generate": lambda i=inputs, p=prompt: model.generate(i, p, args.gen_tokens),
            "traced, no edit": lambda i=inputs, p=prompt: model.generate_edited(i, p, [], args.gen_tokens),
            "median replacement": lambda i=inputs, p=prompt: model.generate_edited(i, p, edits, args.gen_tokens),
            "same, no folding (one EditGroup hook per tensor)": lambda i=inputs, p=prompt: model.generate_edited(
                i, p, edits, args.gen_tokens, fold=False
            ),
            "before: per-edit index_put_ hooks": lambda i=inputs, p=prompt: hooked_generate(model, i, p, edits, args),
        }
        seconds = timed(cases, args.rounds, model.device)
        edited, hooked = cases["median replacement"]()[0], cases["before: per-edit index_put_ hooks"]()
        same = torch.equal(edited.sequences, hooked.sequences)
        # Where the two differ: does each path repeat its own tokens on the GPU (kernels may differ run to run)?
        repeats = {
            "plain": torch.equal(cases["plain generate"]().sequences, cases["plain generate"]().sequences),
            "edited": torch.equal(edited.sequences, cases["median replacement"]()[0].sequences),
            "before": torch.equal(hooked.sequences, cases["before: per-edit index_put_ hooks"]().sequences),
        }
        results.append({"same_tokens_as_before": same, "repeats": repeats, "family": family,
            "batch": batch, "tokens": args.gen_tokens, "neurons": sum(len(e.neurons) for e in edits),
            "hooks_edited": len(edits), "seconds": seconds,
            "x_plain": {name: s / seconds["plain generate"] for name, s in seconds.items()},
        })  # fmt: skip
    return results


def hooked_generate(model: HookedModel, inputs: ModelInputs, prompt: torch.Tensor, edits, args):
    """Before: the same edits by main's edit path up to 4195983 (one torch hook per edit, ``index_put_``)."""
    handles = []
    for edit in edits:
        module = model.model.get_submodule(edit.point.module)
        if edit.point.io == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a, edit=edit: legacy_apply_edit(a[0], edit)))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, edit=edit: legacy_apply_edit(out, edit)))
    try:
        return model.generate(inputs, prompt, args.gen_tokens)
    finally:
        for handle in handles:
            handle.remove()


def check_values(model: HookedModel, family: str, folder: Path, args) -> dict:
    """A few examples through ``record`` on the device (read back from the store) against CPU float32."""
    points = table1_points(model, family)
    manifest_rows = []
    if family == "seamless":
        for i, wave in enumerate(waveforms(args.check, args.frames / 50, 7)):
            path = folder / f"check-{i}.wav"
            soundfile.write(path, wave, SAMPLE_RATE)
            manifest_rows.append({"id": f"x{i}", "audio": str(path)})
    else:
        texts = ["The quick brown fox jumps over the lazy dog.", "Das Wetter ist heute schön.", "Hoy hace sol.",
                 "Il fait beau aujourd'hui, n'est-ce pas ?"]  # fmt: skip
        manifest_rows = [{"id": f"x{i}", "text": texts[i % len(texts)]} for i in range(args.check)]
    path = folder / f"check-{family}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in manifest_rows))
    manifest = read_manifest(path, required=("audio",) if family == "seamless" else ("text",))
    store = Store.open(folder / f"check-store-{family}", create=True)
    record(model, manifest, store, "device", hooks=[p.name for p in points], batch_size=args.check,
           frames=args.frames if family == "seamless" else None)  # fmt: skip
    reference = HookedModel(
        copy.deepcopy(model.model).to("cpu", torch.float32), model.adapter, tokenizer=model.tokenizer,
        processor=model.processor, source=model.source, modality=model.modality,
    )  # fmt: skip
    record(reference, manifest, store, "cpu", hooks=[p.name for p in points], batch_size=1,
           frames=args.frames if family == "seamless" else None)  # fmt: skip
    with store.query() as session:
        rows = session.sql(
            "SELECT d.hook, d.example_id, d.activation AS device, c.activation AS cpu FROM activations d "
            "JOIN activations c ON c.run = 'cpu' AND c.hook = d.hook AND c.example_id = d.example_id "
            "WHERE d.run = 'device'"
        ).to_pylist()
    assert len(rows) == len(points) * args.check, f"{len(rows)} rows compared, expected {len(points) * args.check}"
    errors: dict[str, list[float]] = {}
    for row in rows:
        device, cpu = np.array(row["device"], np.float64), np.array(row["cpu"], np.float64)
        errors.setdefault(row["hook"], []).append(np.linalg.norm(device - cpu) / max(np.linalg.norm(cpu), 1e-12))
    worst = {hook: max(values) for hook, values in errors.items()}
    ranked = sorted(worst.values())
    return {
        "examples": args.check,
        "hooks": len(worst),
        "relative_error_median": ranked[len(ranked) // 2],
        "relative_error_p95": ranked[int(0.95 * (len(ranked) - 1))],
        "relative_error_max": ranked[-1],
        "worst_hook": max(worst, key=worst.get),
    }


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; dtype {report['dtype']}; torch {report['torch']}; {report['date']}", ""]
    lines += ["| model | parameters | hooks | values / example | batch x positions | case | examples/s | x bare |",
              "|---|---:|---:|---:|---|---|---:|---:|"]  # fmt: skip
    for row in report["throughput"]:
        for case, rate in row["examples_per_second"].items():
            lines.append(
                f"| {row['family']} | {row['parameters'] / 1e9:.2f} B | {row['hooks']} | {row['values_per_example']:,} "
                f"| {row['batch']} x {row['positions']} | {case} | {rate:.1f} | {row['x_bare_throughput'][case]:.2f} |"
            )
    for row in report["throughput"]:
        ops = row.get("ops_per_hook", {})
        if "error" in ops:
            lines.append(f"\n{row['family']} batch {row['batch']}: operations not counted ({ops['error']})")
            continue
        lines.append(f"\n{row['family']} batch {row['batch']}: per hook point {ops.get('total', 0):.2f} aten "
                     f"operations, {ops.get('kernels', 0):.2f} kernels, {ops.get('syncs', 0):.2f} host syncs "
                     "(recording, mean, with the copy to the host)")  # fmt: skip
    for row in report["throughput"]:
        for case, found in row.get("syncs_per_batch", {}).items():
            if found:
                lines.append(f"\n{row['family']} batch {row['batch']}, {case}: {found['per_batch']:.1f} host syncs "
                             f"per batch ({'; '.join(found['first'])})")  # fmt: skip
    for row in report["throughput"]:
        for name, found in row.get("store_stats", {}).items():
            lines.append(f"\n{row['family']} batch {row['batch']}, recording + store ({name}, last call): "
                         f"{found['mb']:.1f} MB in {found['flushes']} flushes, {found['flush_seconds']:.2f} s of "
                         f"flushing ({found['mb_per_second']:.0f} MB/s; {found.get('build_seconds', 0):.2f} s of it "
                         "building the tables, on one core); the recorder waited "
                         f"{found['waited_seconds']:.2f} s for the store")  # fmt: skip
    for row in report["throughput"]:
        check = row.get("side_stream_check")
        if check:
            verdict = "EQUAL" if check["equal"] else f"DIFFERENT ({check['differing']}: {check['first_differing']})"
            lines.append(f"\n{row['family']} batch {row['batch']}: side-stream copy against the compute-stream copy, "
                         f"{check['batches']} batches x {check['hooks']} hooks: {verdict}, max |difference| "
                         f"{check['max_abs_difference']:.3g}")  # fmt: skip
    for row in report["throughput"]:
        if row.get("profile"):
            lines += ["", f"Profile, {row['family']} batch {row['batch']} (one recording call):", "```", row["profile"],
                      "```"]  # fmt: skip
    if report.get("interventions"):
        lines += ["", "| model | generation | batch | new tokens | ms per call | x plain generate |",
                  "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for row in report["interventions"]:
            for case, seconds in row["seconds"].items():
                label = f"{case} ({row['neurons']} neurons)" if case == "median replacement" else case
                ms, ratio = 1000 * seconds, row["x_plain"][case]
                lines.append(
                    f"| {row.get('family', 'seamless')} | {label} | {row['batch']} | {row['tokens']} | {ms:.0f} "
                    f"| {ratio:.2f} |"
                )
    for row in report.get("interventions", []):
        same = "the same" if row["same_tokens_as_before"] else "DIFFERENT"
        repeats = ", ".join(f"{path} {'yes' if ok else 'NO'}" for path, ok in row.get("repeats", {}).items())
        lines.append(f"\n{row.get('family', 'seamless')} batch {row['batch']}: the median replacement (folded) and "
                     f"the same edits by one index_put_ hook each generate {same} tokens (each path run twice "
                     f"gives its own tokens again: {repeats}).")  # fmt: skip
    lines += ["", "| values vs CPU float32 | examples | hooks | rel. error median | p95 | max (hook) |",
              "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for family, check in report["values"].items():
        lines.append(
            f"| {family} | {check['examples']} | {check['hooks']} | {check['relative_error_median']:.2e} | "
            f"{check['relative_error_p95']:.2e} | {check['relative_error_max']:.2e} ({check['worst_hook']}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on any device (a check of the script)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=lambda text: [int(b) for b in text.split(",")], default=[32, 128],
                        help="batch sizes, comma-separated (the store is timed at the first)")  # fmt: skip
    parser.add_argument("--batches", type=int, default=3, help="batches per timed call")
    parser.add_argument("--frames", type=int, default=300, help="speech frames per example (the paper: 300)")
    parser.add_argument("--tokens-in", type=int, default=256, help="tokens per LM example")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--neurons", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store-batches", type=int, default=24,
                        help="batches of the steady-state store case (0: leave it out)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of one recording call per case")
    parser.add_argument("--check", type=int, default=4, help="examples compared with CPU float32")
    parser.add_argument("--only", choices=("seamless", "llama"), help="one model only")
    parser.add_argument("--json", type=Path, help="write the report here (default: $OUT/gpu.json if OUT is set)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.batches, args.frames, args.tokens_in, args.gen_tokens = [2, 3], 2, 40, 16, 3
        args.rounds, args.check, args.neurons, args.store_batches = 1, 2, 50, min(args.store_batches, 4)
    quiet_transformers()
    placement = Placement(args.device, args.dtype)
    device = placement.torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "device": name, "dtype": str(placement.torch_dtype()).removeprefix("torch."), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "smoke": args.smoke,
        "throughput": [], "interventions": [], "values": {},
    }  # fmt: skip
    target = args.json or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None)

    def save(stage: str) -> None:  # after every stage: a run cut short keeps what it measured
        print(f"{stage} at {time.perf_counter() - begun:.1f} s", file=sys.stderr, flush=True)
        if target:
            target.write_text(json.dumps(report, indent=2))
            target.with_suffix(".md").write_text(markdown(report) + "\n")

    begun = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = Store.open(folder / "store", create=True)
        for family in ("seamless", "llama"):
            if args.only and family != args.only:
                continue
            model = build(family, folder, placement, args.smoke)
            save(f"{family}: built")
            for k, batch in enumerate(args.batch):
                report["throughput"].append(throughput(model, family, args, store, batch, with_store=k == 0))
            save(f"{family}: throughput")
            report["interventions"] += interventions(model, family, args)
            save(f"{family}: interventions")
            report["values"][family] = check_values(model, family, folder, args)
            save(f"{family}: values")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(markdown(report))


if __name__ == "__main__":
    main()
