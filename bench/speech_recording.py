"""Benchmark: recording SeamlessM4T v2 on speech with generation (not a test; numbers go to docs/).

1. Decoder recording during generation: ``generate`` + one teacher-forced traced pass (what ``record`` does)
   against hooks at every decoding step of ``generate`` (nnsight ``tracer.iter``), on one batch at every
   Table 1 component: time, and the largest difference between the two.
2. The speech path batched against batch size 1 (the paper ran batch size 1): ``record --task s2tt`` into a
   store, throughput, and the largest difference between the stored pooled values of the two runs.
   Goal: batched at least 4x the throughput of batch size 1, with identical pooled values.

Model: a randomly initialised SeamlessM4T v2 with benchmark sizes (below), built locally. Data: the bundled
corpus' espeak-ng speech. Ratios are measured in one run; absolute times depend on the machine's load.

    python bench/speech_recording.py [--utterances 96] [--batch-size 16] [--threads 1] [--no-write]
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

from hookpoints.audio import load_audio
from hookpoints.corpus import corpus_manifests, corpus_rows
from hookpoints.loading import load
from hookpoints.manifest import read_data
from hookpoints.recorder import record
from hookpoints.tiny import build_tiny
from store.catalog import Store

SIZES = {  # SeamlessM4T v2 large: d=1024, 24 layers per stack, ffn 8192 / 4096
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
}
MAX_NEW_TOKENS = 16
DOC = Path(__file__).resolve().parents[1] / "docs" / "recording-speech.md"
START, END = "<!-- bench:speech-recording:start -->", "<!-- bench:speech-recording:end -->"


def best_of(repeats: int, work) -> tuple[float, object]:
    """The fastest of ``repeats`` runs of ``work()`` (seconds) and its last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return min(times), result


def teacher_forced_vs_per_step(model, manifest, batch: int, repeats: int) -> dict:
    rows = manifest.table.slice(0, batch)
    paths, ids = rows["audio"].to_pylist(), rows["example_id"].to_pylist()
    waves = [load_audio(manifest.audio_path(path), example) for path, example in zip(paths, ids, strict=True)]
    inputs = model.speech_inputs(waves)
    prompt = model.decoder_prompt(["eng"] * batch)
    points = model.select()

    def teacher_forced():
        generation = model.generate(inputs, prompt, MAX_NEW_TOKENS)
        return model.pooled(generation.teacher_forced(inputs), points, "mean"), generation

    def per_step():
        return model.pooled_per_step(inputs, prompt, points, "mean", MAX_NEW_TOKENS)

    plain_seconds, _ = best_of(repeats, lambda: model.generate(inputs, prompt, MAX_NEW_TOKENS))
    tf_seconds, (tf_values, tf_generation) = best_of(repeats, teacher_forced)
    step_seconds, (step_values, step_generation) = best_of(repeats, per_step)
    difference = max(float((tf_values[n] - step_values[n]).abs().max()) for n in tf_values)
    return {
        "batch": batch,
        "hook points": len(points),
        "steps": int(tf_generation.lengths.max()),
        "same tokens": bool(torch.equal(tf_generation.sequences, step_generation.sequences)),
        "plain generate s": plain_seconds,
        "teacher-forced s": tf_seconds,
        "per-step s": step_seconds,
        "max |difference|": difference,
    }


def batched_vs_single(model, manifest, store: Store, batch: int) -> dict:
    results = {}
    for run, size in (("batched", batch), ("single", 1)):
        started = time.perf_counter()
        record(model, manifest, store, run, task="s2tt", max_new_tokens=MAX_NEW_TOKENS, batch_size=size)
        results[run] = time.perf_counter() - started
    with store.query() as session:
        pairs = session.sql(
            "SELECT b.activation AS batched, s.activation AS single FROM activations b "
            "JOIN activations s USING (hook, example_id) WHERE b.run = 'batched' AND s.run = 'single'"
        ).to_pylist()
        texts = session.sql(
            "SELECT count(*) AS n FROM examples b JOIN examples s USING (example_id) "
            "WHERE b.run = 'batched' AND s.run = 'single' AND b.generated_text = s.generated_text"
        ).to_pylist()[0]["n"]
    difference = max(float(np.abs(np.subtract(p["batched"], p["single"])).max()) for p in pairs)
    return {
        "utterances": len(manifest),
        "batch": batch,
        "batched s": results["batched"],
        "batch size 1 s": results["single"],
        "speed-up": results["single"] / results["batched"],
        "values compared": len(pairs),
        "max |difference|": difference,
        "same generated text": f"{texts}/{len(manifest)}",
    }


def markdown(step: dict, batching: dict, threads: int) -> str:
    load = os.getloadavg()[0]
    return "\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, torch {torch.__version__} with "
            f"{threads} thread(s), load average {load:.1f} while running (other work on the machine: absolute "
            "times are noisy, ratios less so). Model: SeamlessM4T v2 with d=256, 4 layers per stack, ffn 1024 "
            f"(random weights); greedy, at most {MAX_NEW_TOKENS} new tokens; every Table 1 component.",
            "",
            "| decoder recording (one batch) | seconds | vs plain generate |",
            "|---|---|---|",
            f"| plain `generate`, no hooks | {step['plain generate s']:.3f} | 1.00x |",
            f"| `generate` + teacher-forced traced pass (hookpoints) | {step['teacher-forced s']:.3f} | "
            f"{step['teacher-forced s'] / step['plain generate s']:.2f}x |",
            f"| hooks at every step of `generate` (nnsight `tracer.iter`) | {step['per-step s']:.3f} | "
            f"{step['per-step s'] / step['plain generate s']:.2f}x |",
            "",
            f"Batch of {step['batch']} utterances, {step['hook points']} hook points, {step['steps']} decoding steps; "
            f"same tokens: {step['same tokens']}; largest difference between the two recordings: "
            f"{step['max |difference|']:.1e}.",
            "",
            "| speech path, `record --task s2tt` | seconds | utterances / s |",
            "|---|---|---|",
            f"| batch size 1 (the paper's) | {batching['batch size 1 s']:.1f} | "
            f"{batching['utterances'] / batching['batch size 1 s']:.2f} |",
            f"| batch size {batching['batch']} | {batching['batched s']:.1f} | "
            f"{batching['utterances'] / batching['batched s']:.2f} |",
            "",
            f"{batching['utterances']} utterances: batched is **{batching['speed-up']:.1f}x** the throughput of "
            f"batch size 1; {batching['values compared']} stored pooled vectors compared, largest difference "
            f"{batching['max |difference|']:.1e}; same generated text for {batching['same generated text']}.",
        ]
    )


def write(doc: Path, text: str) -> None:
    page = doc.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    doc.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", page), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/ alone.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        texts = [row["text"] for row in corpus_rows()]
        source = build_tiny("seamless_m4t_v2", Path(scratch) / "model", texts=texts, vocab_size=2000, sizes=SIZES)
        per_language = -(-args.utterances // 12)  # 6 languages x 2 voices
        manifests = corpus_manifests(limit=per_language)
        manifest = read_data(manifests.speech, required=("audio",))
        manifest.table = manifest.table.slice(0, args.utterances)
        model = load(source, modality="speech")
        step = teacher_forced_vs_per_step(model, manifest, args.batch_size, args.repeats)
        batching = batched_vs_single(model, manifest, Store.open(Path(scratch) / "store", create=True), args.batch_size)
    text = markdown(step, batching, args.threads)
    print(text)
    if not args.no_write:
        write(DOC, text)
        print(f"\nwritten to {DOC}")


if __name__ == "__main__":
    main()
