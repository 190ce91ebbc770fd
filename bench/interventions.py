"""Median replacement of 1,000 neurons during generation vs plain generation of the same length.

Model: SeamlessM4T v2 (text to text) with the large checkpoint's text encoder and decoder sizes (24 + 24 layers,
d_model 1,024, FFN 8,192, 16 heads) and random weights; a 2,000-token vocabulary instead of 256k (the
embedding and LM head are not what is measured). One sentence, greedy, exactly N new tokens (``min_new_tokens``),
batch 1 as in the paper (Appendix G). Timed, interleaved, best of R:

- plain: ``model.generate`` (no tracing),
- traced, no edit: ``HookedModel.generate_edited`` with no edits (the nnsight trace's own cost),
- median replacement: 1,000 decoder neurons spread over every Table 1 component of the 24 decoder layers
  (312 hook points), set at every position and step, through nnsight,
- torch hooks: the same replacement with plain forward hooks (what the ad hoc scripts do).

Run: ``.venv/bin/python bench/interventions.py [--small] [--tokens N] [--repeats R]``; docs/bench-interventions.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hookpoints.adapters.seamless import TEXT_DECODER_SUBMODULES  # noqa: E402
from hookpoints.editing import NeuronEdit  # noqa: E402
from hookpoints.loading import load  # noqa: E402
from hookpoints.tiny import build_tiny  # noqa: E402

LARGE = {
    "hidden_size": 1024,
    "encoder_layers": 24,
    "decoder_layers": 24,
    "encoder_ffn_dim": 8192,
    "decoder_ffn_dim": 8192,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
}
SMALL = {**LARGE, "hidden_size": 256, "encoder_layers": 6, "decoder_layers": 6, "encoder_ffn_dim": 1024,
         "decoder_ffn_dim": 1024, "encoder_attention_heads": 4, "decoder_attention_heads": 4}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="6 + 6 layers of d_model 256 (a quick check)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--neurons", type=int, default=1000)
    args = parser.parse_args()
    sizes = SMALL if args.small else LARGE
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        path = build_tiny("seamless_m4t_v2", Path(folder) / "m", seed=0, sizes=sizes, vocab_size=2000)
        model = load(path, modality="text")
        built = time.perf_counter() - started
    model.model.generation_config.min_new_tokens = args.tokens  # every run generates exactly N tokens
    inputs = model.source_inputs(["The quick brown fox jumps over the lazy dog near the river bank."], ["eng"])
    prompt = model.decoder_prompt(["deu"])
    layers = sizes["decoder_layers"]
    points = [
        model.hook_points.get(f"text_decoder.layers.{i}.{s}") for i in range(layers) for s in TEXT_DECODER_SUBMODULES
    ]
    generator = torch.Generator().manual_seed(1234)
    widths = torch.tensor([p.width for p in points])
    flat = torch.randperm(int(widths.sum()), generator=generator)[: args.neurons].sort().values
    starts = torch.cumsum(widths, 0) - widths
    which = torch.searchsorted(starts, flat, right=True) - 1
    edits = []
    for i, point in enumerate(points):
        chosen = flat[which == i] - starts[i]
        if len(chosen):
            edits.append(NeuronEdit(point, chosen, torch.randn(len(chosen), generator=generator)))
    n_edited = sum(len(e.neurons) for e in edits)

    def plain():
        return model.generate(inputs, prompt, args.tokens).sequences

    # generate_edited without ``record`` edits with plain torch hooks (since ed3fc2a); recording one cheap point
    # sends it through the nnsight trace, which is what these two rows measure (as bench/whisper_interventions.py)
    def traced():
        return model.generate_edited(inputs, prompt, [], args.tokens, record=points[:1])[0].sequences

    def replaced():
        return model.generate_edited(inputs, prompt, edits, args.tokens, record=points[:1])[0].sequences

    def hooks():
        handles = []
        for edit in edits:

            def replace(module, inputs_, output, edit=edit):
                output = output[0] if isinstance(output, tuple) else output
                output[..., edit.neurons] = edit.values

            handles.append(model.model.get_submodule(edit.point.module).register_forward_hook(replace))
        try:
            return plain()
        finally:
            for handle in handles:
                handle.remove()

    cases = {"plain generate": plain, "traced, no edit": traced, "median replacement (nnsight)": replaced,
             "same replacement (torch hooks)": hooks}  # fmt: skip
    for case in cases.values():  # warm up (and the one-off step probe of generate_edited)
        case()
    times: dict[str, list[float]] = {name: [] for name in cases}
    lengths = {}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            sequences = case()
            times[name].append(time.perf_counter() - start)
            lengths[name] = sequences.shape[1] - prompt.shape[1]
    load_after = os.getloadavg()
    assert torch.equal(replaced(), hooks()), "nnsight and torch hooks disagree"
    base = min(times["plain generate"])
    params = sum(p.numel() for p in model.model.parameters()) / 1e6
    scale = "small" if args.small else "large sizes"
    print(f"model: {params:,.0f} M parameters ({scale}), built in {built:.0f} s; {n_edited} neurons in {len(edits)}")
    print(f"hook points; {args.tokens} new tokens; torch threads {torch.get_num_threads()}; load average")
    print(f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print()
    print(f"| generation | tokens | best of {args.repeats} | median | vs plain (best) |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        best, median = min(values), statistics.median(values)
        print(f"| {name} | {lengths[name]} | {best * 1000:,.0f} ms | {median * 1000:,.0f} ms | {best / base:.3f}x |")


if __name__ == "__main__":
    main()
