"""Benchmark: recording SeamlessM4T v2 on speech with generation (not a test; numbers go to docs/).

1. Decoder recording during generation: ``generate`` + one teacher-forced traced pass (what ``record`` does)
   against hooks at every decoding step of ``generate`` (nnsight ``tracer.iter``), on one batch at every
   Table 1 component: time, and the largest difference between the two.
2. The speech path batched against batch size 1 (the paper ran batch size 1): ``record --task s2tt`` into a
   store, throughput, and the largest difference between the stored pooled values of the two runs.
   Goal: batched at least 4x the throughput of batch size 1, with identical pooled values.

Model: a randomly initialised SeamlessM4T v2 with benchmark sizes (below), built locally. Data: the bundled
corpus' espeak-ng speech. Ratios are measured in one run; absolute times depend on the machine's load.

    python bench/speech_recording.py [--utterances 96] [--batch-size 32] [--threads 1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hookpoints.store.catalog import Store

from hookpoints.audio import load_audio
from hookpoints.corpus import corpus_manifests, corpus_rows
from hookpoints.loading import load
from hookpoints.manifest import read_data
from hookpoints.recorder import record
from hookpoints.tiny import build_tiny

MODELS = {  # SeamlessM4T v2 large: d=1024, 24 layers per stack, ffn 8192 / 4096
    "d=256, 4 layers per stack, ffn 1024": {
        "hidden_size": 256,
        "encoder_layers": 4,
        "decoder_layers": 4,
        "speech_encoder_layers": 4,
        "encoder_ffn_dim": 1024,
        "decoder_ffn_dim": 1024,
        "speech_encoder_intermediate_size": 1024,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "speech_encoder_attention_heads": 4,
        "initializer_range": 0.02,
    },
    "tiny: d=64, 2 layers per stack, ffn 128": {},
}
TOKENS = (16, 64)  # new tokens at most (random weights: greedy runs to the limit)
DOC = Path(__file__).resolve().parents[1] / "docs" / "recording-speech.md"
MARKER = "<!-- bench:speech-recording:{config}:{edge} -->"  # one section per clock and thread count


CLOCK = time.process_time  # --clock wall: time.perf_counter


def cpu_seconds(work) -> tuple[float, object]:
    """Seconds ``work()`` took on the chosen clock (CPU time by default) and its result.

    With one torch thread, CPU time is far less disturbed by other work on the machine than wall time; with
    more threads only wall time shows what parallel hardware gains.
    """
    started = CLOCK()
    result = work()
    return CLOCK() - started, result


def best_of(repeats: int, works: dict) -> dict[str, tuple[float, object]]:
    """The least CPU time of each of ``works`` over ``repeats`` rounds (taken in turn) and its last result."""
    best: dict[str, tuple[float, object]] = {}
    for _ in range(repeats):
        for name, work in works.items():
            seconds, result = cpu_seconds(work)
            best[name] = (min(seconds, best.get(name, (seconds, None))[0]), result)
    return best


def teacher_forced_vs_per_step(model, manifest, batch: int, tokens: int, repeats: int) -> dict:
    rows = manifest.table.slice(0, batch)
    paths, ids = rows["audio"].to_pylist(), rows["example_id"].to_pylist()
    waves = [load_audio(manifest.audio_path(path), example) for path, example in zip(paths, ids, strict=True)]
    inputs = model.speech_inputs(waves)
    prompt = model.decoder_prompt(["eng"] * batch)
    points = model.select()
    best = best_of(
        repeats,
        {
            "plain": lambda: model.generate(inputs, prompt, tokens),
            # what record does: the encoder once, generate from its output, one teacher-forced decoder pass
            "ours": lambda: model.pooled_generating(inputs, prompt, points, "mean", tokens),
            "steps": lambda: model.pooled_per_step(inputs, prompt, points, "mean", tokens),
        },
    )
    (ours, generation), (steps, stepped) = best["ours"][1], best["steps"][1]
    return {
        "tokens": int(generation.lengths.max()),
        "hook points": len(points),
        "plain": best["plain"][0],
        "ours": best["ours"][0],
        "steps": best["steps"][0],
        "same tokens": bool(torch.equal(generation.sequences, stepped.sequences)),
        "difference": max(float((ours[name] - steps[name]).abs().max()) for name in ours),
    }


def batched_vs_single(model, manifest, store: Store, batch: int, tokens: int) -> dict:
    seconds = {}
    for run, size in (("single", 1), ("batched", batch)):
        seconds[run], _ = cpu_seconds(
            lambda run=run, size=size: record(
                model, manifest, store, run, task="s2tt", max_new_tokens=tokens, batch_size=size
            )  # fmt: skip
        )
    with store.query() as session:
        pairs = session.sql(
            "SELECT b.activation AS batched, s.activation AS single FROM activations b "
            "JOIN activations s USING (hook, example_id) WHERE b.run = 'batched' AND s.run = 'single'"
        ).to_pylist()
        same = session.sql(
            "SELECT count(*) AS n FROM examples b JOIN examples s USING (example_id) "
            "WHERE b.run = 'batched' AND s.run = 'single' AND b.generated_text = s.generated_text"
        ).to_pylist()[0]["n"]
    return {
        "single": seconds["single"],
        "batched": seconds["batched"],
        "vectors": len(pairs),
        "difference": max(float(np.abs(np.subtract(p["batched"], p["single"])).max()) for p in pairs),
        "same text": same,
    }


def markdown(results: dict, args) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, torch {torch.__version__} with "
        f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f} at the end. Times are "
        + ("CPU seconds of the process" if args.clock == "cpu" else "wall-clock seconds")
        + ", the best of several rounds taken in turn. Random weights; greedy; every Table 1 component of the "
        "speech encoder and the decoder; the bundled corpus' espeak-ng speech.",
        "",
        f"Decoder recording during generation, one batch of {args.batch_size} utterances:",
        "",
        "| model | new tokens | plain `generate` | hookpoints: encoder traced once, `generate`, one teacher-forced "
        "decoder pass | hooks at every step of `generate` (nnsight `tracer.iter`) | max difference |",
        "|---|---|---|---|---|---|",
    ]
    for (name, _), step in results["steps"].items():
        lines.append(
            f"| {name} | {step['tokens']} | {step['plain']:.2f} s | {step['ours']:.2f} s "
            f"({step['ours'] / step['plain']:.2f}x) | {step['steps']:.2f} s ({step['steps'] / step['plain']:.2f}x) | "
            f"{step['difference']:.1e}{'' if step['same tokens'] else ' (tokens differ!)'} |"
        )
    lines += [
        "",
        f"The speech path, `record --task s2tt` ({args.utterances} utterances, at most {TOKENS[0]} new tokens) "
        f"into a store, batch size {args.batch_size} against batch size 1 (the paper's):",
        "",
        "| model | batch size 1 | batched | throughput, batched / batch size 1 | stored vectors compared | "
        "max difference | same generated text |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, batching in results["batching"].items():
        lines.append(
            f"| {name} | {batching['single']:.1f} s | {batching['batched']:.1f} s | "
            f"**{batching['single'] / batching['batched']:.1f}x** | {batching['vectors']} | "
            f"{batching['difference']:.1e} | {batching['same text']}/{args.utterances} |"
        )
    return "\n".join(lines)


def write(doc: Path, text: str, config: str) -> None:
    start, end = (MARKER.format(config=config, edge=edge) for edge in ("start", "end"))
    page = doc.read_text(encoding="utf-8")
    if start not in page:
        page += f"\n{start}\n{end}\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    doc.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", page), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/ alone.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    manifest = read_data(corpus_manifests(limit=-(-args.utterances // 12)).speech, required=("audio",))
    manifest.table = manifest.table.slice(0, args.utterances)  # 6 languages x 2 voices per meaning
    texts = [row["text"] for row in corpus_rows()]
    results = {"steps": {}, "batching": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for number, (name, sizes) in enumerate(MODELS.items()):
            folder = Path(scratch) / f"model{number}"
            model = load(
                build_tiny("seamless_m4t_v2", folder, texts=texts, vocab_size=2000, sizes=sizes), modality="speech"
            )
            if sizes:
                for tokens in TOKENS:
                    results["steps"][name, tokens] = teacher_forced_vs_per_step(
                        model, manifest, args.batch_size, tokens, args.repeats
                    )
            store = Store.open(Path(scratch) / f"store{number}", create=True)
            results["batching"][name] = batched_vs_single(model, manifest, store, args.batch_size, TOKENS[0])
    text = markdown(results, args)
    print(text)
    if not args.no_write:
        write(DOC, text, f"{args.clock}-{args.threads}")
        print(f"\nwritten to {DOC}")


if __name__ == "__main__":
    main()
