"""Benchmark: a decoder-only LM's generation through hookpoints (not a test; numbers go to docs/benchmarks.md).

On one left-padded batch of unequal texts, greedy, exactly ``--tokens`` new tokens, medians of interleaved rounds:

- **HF generate**: ``model.generate`` on the batch left-padded by the tokenizer (no hookpoints at all);
- **hookpoints generate**: ``HookedModel.generate`` (left padding, the streamer, the LM head's fingerprint);
- **record continue**: ``pooled_generating``, what ``record --task continue`` runs per batch: generate, then one
  teacher-forced traced pass pooling every listed hook point (mean over the generated steps), with the run-time
  logits check;
- **hooks at every step**: ``pooled_per_step`` (nnsight ``tracer.iter`` over ``generate``), the reference the
  teacher-forced pass is tested against; the largest difference between the two is reported;
- **1,000-neuron replacement**: ``generate(..., edits=...)`` replacing 1,000 random neurons of the MLP and
  attention projections of every block (one hook per edited tensor: GPT-2's Conv1D layers are not folded).

Model: a randomly initialised GPT-2 with the sizes below, built locally. Ratios are measured in one run; absolute
times depend on the machine's load.

    python bench/continue_recording.py [--batch 8] [--tokens 32] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hookpoints.corpus import corpus_rows
from hookpoints.loading import load
from hookpoints.tiny import build_tiny

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_overhead import random_edits  # noqa: E402  (bench/)

SIZES = {"n_embd": 256, "n_layer": 6, "n_head": 8, "n_inner": 1024, "initializer_range": 0.3}
EDITED = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "mlp.hook_pre", "mlp.hook_post")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = [row["text"] for row in corpus_rows()][: args.batch]
    with tempfile.TemporaryDirectory() as tmp:
        model = load(build_tiny("gpt2", Path(tmp), sizes=SIZES, texts=texts + ["filler text"] * 4))
        # exactly N new tokens: no EOS (a continuation ignores min_new_tokens, hookpoints.generation_requests)
        model.model.generation_config.eos_token_id = None
        points = model.select()
        edits = random_edits(model.select([f"blocks.*.{name}" for name in EDITED]), 1000)
        tokenizer = model.tokenizer
        left = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        pad = tokenizer.pad_token_id

        def hf():
            with torch.inference_mode():
                return model.model.generate(**left, max_new_tokens=args.tokens, do_sample=False, pad_token_id=pad)

        cases = {
            "HF generate": hf,
            "hookpoints generate": lambda: model.generate(texts, max_new_tokens=args.tokens),
            "record continue (generate + one traced pass)": lambda: model.pooled_generating(
                model.inputs(texts), None, points, "mean", args.tokens
            ),
            "hooks at every step (nnsight tracer.iter)": lambda: model.pooled_per_step(
                model.inputs(texts), None, points, "mean", args.tokens
            ),
            "1,000-neuron replacement": lambda: model.generate(texts, max_new_tokens=args.tokens, edits=edits),
        }
        for call in cases.values():  # warm up (probe, first-call costs)
            call()
        seconds = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, call in cases.items():
                start = time.process_time()
                call()
                seconds[name].append(time.process_time() - start)
        teacher, _ = cases["record continue (generate + one traced pass)"]()
        stepwise, _ = cases["hooks at every step (nnsight tracer.iter)"]()
        difference = max(
            float((teacher[p.name] - stepwise[p.name]).abs().max() / stepwise[p.name].abs().max().clamp(min=1e-12))
            for p in points
        )
        hf_tokens = hf()[:, left["input_ids"].shape[1] :]
        ours = model.generate(texts, max_new_tokens=args.tokens)
        same = all(ours.generated(i) == hf_tokens[i].tolist() for i in range(len(texts)))
        exact = bool((ours.lengths == args.tokens).all())
    parameters = sum(p.numel() for p in model.model.parameters())
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    print(
        f"GPT-2 with random weights, {parameters / 1e6:.1f} M parameters ({SIZES}); batch {args.batch} of unequal "
        f"texts (left-padded), {args.tokens} new tokens, {len(points)} hook points recorded (mean), "
        f"{sum(len(e.neurons) for e in edits)} neurons edited over {len(edits)} hook points; CPU time, "
        f"{args.threads} thread(s), median of {args.rounds} interleaved rounds.\n"
    )
    print("| case | CPU ms per batch | x HF generate |\n|---|---:|---:|")
    for name, value in medians.items():
        print(f"| {name} | {1000 * value:.0f} | {value / medians['HF generate']:.2f} |")
    print(
        f"\nTeacher-forced against every-step recording: largest difference {difference:.2e} (relative to the "
        "hook's largest |value|)."
    )
    print(f"hookpoints generate gives HF generate's tokens for every example: {same}.")
    print(f"Every example generated exactly {args.tokens} tokens: {exact}.")


if __name__ == "__main__":
    main()
