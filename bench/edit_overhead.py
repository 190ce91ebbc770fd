"""Per-step cost of neuron edits during generation: the edit paths before and after issue 16's changes.

Both paths edit the same tensors from plain torch forward hooks around the transformers ``generate`` (what
``HookedModel.generate_edited`` does when nothing is recorded); "plain generate" is the same call without hooks
(``generate_edited`` with no edit: ``model.generate`` also keeps a logits fingerprint, one more hook per step):

- **before**: main's code up to commit 4195983, kept verbatim below (``legacy_apply_edit``): one hook per edit,
  ``movedim`` + an advanced-indexing ``__setitem__`` (``index_put_``) per call, values cached per edit;
- **hooks**: ``generate_edited(..., fold=False)``: one hook per edited tensor, one in-place ``torch.where`` from a
  mask and values placed once (hookpoints.editing.EditGroup);
- **folded**: ``generate_edited`` now (the default): replacements of ``nn.Linear`` outputs folded into the layers'
  weights for the generation (hookpoints.edit_folding: no hook, no op per step), hooks as above for the rest
  (here the LayerNorm outputs among the Table 1 components);
- **floor**: the same hooks doing nothing: what any torch-hook edit costs before it edits anything.

Model: SeamlessM4T v2 text to text, random weights, 1,000 neurons drawn (seed 1234) over every Table 1 component of
every text-decoder layer, replaced at every step; one sentence, greedy, exactly N new tokens. Two sizes:

- ``tiny`` (launch-bound): 24 decoder layers of d_model 16, FFN 32: the arithmetic is negligible, so the time is
  the per-op and per-hook host cost (on a GPU: Python + kernel launches);
- ``medium`` (a realistic CPU case): 6 decoder layers of the large checkpoint's sizes (d_model 1,024, FFN 8,192).

Reported: this thread's CPU time per new token (``time.thread_time``: torch runs on this one thread, and CPU time
is far steadier than wall time on a shared machine; on a GPU this thread's time is what a launch-bound step
waits for), best and median of interleaved repeats, x plain; wall time too; us per edited hook call ((edited -
plain) / edited hook calls per step); aten ops per edited hook per step counted with OpCount (the difference
of 2 and 6 new tokens, so one-off work cancels); and the ops a generation makes once beyond plain generate's
(2 new tokens less 2 steps' worth: placing masks, folding and restoring rows, the fold's check). All edited runs
(before, hooks, folded, and an independent index-assignment reference) must give the same tokens.

Run: ``.venv/bin/python bench/edit_overhead.py [--tokens 32] [--repeats 11] [--sizes tiny medium]``
(about 3 minutes on 2 shared cores); results in docs/bench-interventions.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hookpoints.adapters.seamless import TEXT_DECODER_SUBMODULES  # noqa: E402
from hookpoints.edit_folding import FoldedEdits  # noqa: E402
from hookpoints.editing import NeuronEdit, groups  # noqa: E402
from hookpoints.loading import load  # noqa: E402
from hookpoints.op_count import OpCount  # noqa: E402
from hookpoints.probe import first_tensor  # noqa: E402
from hookpoints.tiny import build_tiny  # noqa: E402

SIZES = {
    "tiny": {"hidden_size": 16, "encoder_layers": 1, "decoder_layers": 24, "encoder_ffn_dim": 32,
             "decoder_ffn_dim": 32, "encoder_attention_heads": 2, "decoder_attention_heads": 2},
    "medium": {"hidden_size": 1024, "encoder_layers": 1, "decoder_layers": 6, "encoder_ffn_dim": 8192,
               "decoder_ffn_dim": 8192, "encoder_attention_heads": 16, "decoder_attention_heads": 16},
}  # fmt: skip


# -- before: main's edit path at commit 4195983, verbatim (apply_edit and placed of hookpoints/editing.py) --


def legacy_apply_edit(value, edit: NeuronEdit) -> None:
    tensor = first_tensor(value)
    point = edit.point
    if point.time_axis is None:
        view, lead = tensor, 1  # [batch, *neurons]
    else:
        view, lead = tensor.movedim(point.time_axis, 1), 2  # [batch, pos, *neurons] (a view of the tensor)
    coordinates, values = legacy_placed(edit, tuple(view.shape[lead:]), tensor.device, tensor.dtype)
    where = (slice(None),) * lead + coordinates
    if edit.add:
        view[where] = view[where] + values
    else:
        view[where] = values


LEGACY_CACHE: dict = {}


def legacy_placed(edit, shape, device, dtype):
    key = (id(edit), device, dtype, shape)
    if key not in LEGACY_CACHE:
        flat = edit.neurons.to(device)
        if edit.point.part:
            index, count = edit.point.part
            flat = flat + index * (torch.Size(shape).numel() // count)
        coordinates = tuple(torch.unravel_index(flat, shape))  # one [k] index per neuron dimension
        LEGACY_CACHE[key] = (coordinates, edit.values.to(device, dtype))
    return LEGACY_CACHE[key]


# -- the cases --------------------------------------------------------------------------------------------


def with_hooks(model, edits, hook_of):
    """``model.generate`` with one forward hook per edit (``hook_of(edit)``), removed afterwards."""

    def run(inputs, prompt, tokens):
        handles = [model.model.get_submodule(e.point.module).register_forward_hook(hook_of(e)) for e in edits]
        try:
            return model.generate_edited(inputs, prompt, [], tokens)[0]  # HF generate, as the after path runs it
        finally:
            for handle in handles:
                handle.remove()

    return run


def median_replacement(model, layers: int, neurons: int) -> list[NeuronEdit]:
    """``neurons`` decoder neurons drawn uniformly over the Table 1 components of every layer (seed 1234)."""
    names = [f"text_decoder.layers.{i}.{s}" for i in range(layers) for s in TEXT_DECODER_SUBMODULES]
    return random_edits([model.hook_points.get(name) for name in names], neurons)


def random_edits(points, neurons: int, seed: int = 1234) -> list[NeuronEdit]:
    """``neurons`` neurons drawn uniformly over ``points`` (all their neurons pooled), each replaced by a random
    value: one NeuronEdit per hook point drawn from (bench/gpu.py and bench/continue_recording.py use it too)."""
    generator = torch.Generator().manual_seed(seed)
    widths = torch.tensor([p.width for p in points])
    flat = torch.randperm(int(widths.sum()), generator=generator)[:neurons].sort().values
    starts = torch.cumsum(widths, 0) - widths
    which = torch.searchsorted(starts, flat, right=True) - 1
    return [
        NeuronEdit(point, flat[which == i] - starts[i], torch.randn(int((which == i).sum()), generator=generator))
        for i, point in enumerate(points)
        if (which == i).any()
    ]


def measure(size: str, args) -> dict:
    sizes = SIZES[size]
    with tempfile.TemporaryDirectory() as folder:
        path = build_tiny("seamless_m4t_v2", Path(folder) / "m", seed=0, sizes=sizes, vocab_size=2000)
        model = load(path, modality="text")
    inputs = model.source_inputs(["The quick brown fox jumps over the lazy dog near the river bank."], ["eng"])
    prompt = model.decoder_prompt(["deu"])
    edits = median_replacement(model, sizes["decoder_layers"], args.neurons)
    one_per_module = list({edit.point.module: edit for edit in edits}.values())  # the hooks the after path adds
    every_step = model.modules_run_every_step(inputs, prompt)
    hooks_per_step = sum(edit.point.module in every_step for edit in edits)
    left = FoldedEdits(model.model, groups(edits)).rest  # the tensors the folded path still hooks
    hooks_left = sum(path in every_step for path, _ in left)

    def reference_hook(edit):  # independent: an index assignment on [batch, pos, width]
        def hook(module, args_, output):
            tensor = output[0] if isinstance(output, tuple) else output
            tensor[..., edit.neurons] = edit.values.to(tensor.dtype)

        return hook

    cases = {
        "plain generate": lambda i, p, n: model.generate_edited(i, p, [], n)[0],
        "before (per-edit index_put_)": with_hooks(model, edits, lambda e: lambda m, a, out: legacy_apply_edit(out, e)),
        "hooks (fold=False)": lambda i, p, n: model.generate_edited(i, p, edits, n, fold=False)[0],
        "folded (generate_edited)": lambda i, p, n: model.generate_edited(i, p, edits, n)[0],
        "floor: empty hooks, no edit": with_hooks(model, one_per_module, lambda e: lambda m, a, out: None),
    }
    model.model.generation_config.min_new_tokens = args.tokens
    tokens = {name: case(inputs, prompt, args.tokens).sequences for name, case in cases.items()}  # warm up
    reference = with_hooks(model, edits, reference_hook)(inputs, prompt, args.tokens).sequences
    for name in list(cases)[1:4]:
        assert torch.equal(tokens[name], reference), f"{name} generates other tokens than index assignments"
    ops, once = {}, {}
    for name, case in cases.items():  # aten ops per step: 6 tokens minus 2 tokens, over 4 steps
        counts = []
        for n in (2, 6):
            model.model.generation_config.min_new_tokens = n
            with OpCount() as counter:
                case(inputs, prompt, n)
            counts.append(counter.total)
        ops[name] = (counts[1] - counts[0]) / 4
        once[name] = counts[0] - 2 * ops[name]  # what a generation of 2 steps does besides its steps
    model.model.generation_config.min_new_tokens = args.tokens
    times: dict[str, list[float]] = {name: [] for name in cases}  # this thread's CPU seconds per token
    wall: dict[str, list[float]] = {name: [] for name in cases}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, case in cases.items():
            start, cpu = time.perf_counter(), time.thread_time()
            case(inputs, prompt, args.tokens)
            times[name].append((time.thread_time() - cpu) / args.tokens)
            wall[name].append((time.perf_counter() - start) / args.tokens)
    load_after = os.getloadavg()[0]
    return {"size": size, "params_m": sum(p.numel() for p in model.model.parameters()) / 1e6, "edits": len(edits),
            "neurons": sum(len(e.neurons) for e in edits), "hooks_per_step": hooks_per_step, "ops": ops,
            "hooks_left": hooks_left, "once": once,
            "times": times, "wall": wall, "load": (load_before, load_after)}  # fmt: skip


def report(result: dict, args) -> str:
    times, ops = result["times"], result["ops"]
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    wall = {name: statistics.median(values) for name, values in result["wall"].items()}
    plain = "plain generate"
    lines = [
        f"**{result['size']}** ({result['params_m']:,.1f} M parameters): {result['neurons']} neurons in "
        f"{result['edits']} hook points, {result['hooks_per_step']} edited per step ({result['hooks_left']} still "
        f"hooked when folded: LayerNorm outputs); load average "
        f"{result['load'][0]:.1f} before, {result['load'][1]:.1f} after",
        "",
        f"| path | CPU ms per token, best / median of {args.repeats} | x plain (best / median) "
        "| wall ms per token (median) | us per edited hook call (best / median) | aten ops per edited hook per step "
        "| extra aten ops once per generation |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    hooks = max(result["hooks_per_step"], 1)
    for name in times:
        extra = [(chosen[name] - chosen[plain]) / hooks * 1e6 for chosen in (best, median)]
        per_hook = (ops[name] - ops[plain]) / hooks
        once = result["once"][name] - result["once"][plain]
        cells = "- | - | -" if name == plain else f"{extra[0]:.1f} / {extra[1]:.1f} | {per_hook:.2f} | {once:,.0f}"
        lines.append(
            f"| {name} | {best[name] * 1e3:.2f} / {median[name] * 1e3:.2f} "
            f"| {best[name] / best[plain]:.3f}x / {median[name] / median[plain]:.3f}x | {wall[name] * 1e3:.2f} "
            f"| {cells} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--neurons", type=int, default=1000)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=list(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the 2 shared cores; one thread is also the GPU host thread's situation
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{stamp}; torch {torch.__version__}, 1 thread, {os.cpu_count()} cores; {args.tokens} new tokens\n")
    for size in args.sizes:
        print(report(measure(size, args), args), "\n", flush=True)


if __name__ == "__main__":
    main()
