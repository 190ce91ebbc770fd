"""An audio LLM continues its speech prompt (task ``continue``, Qwen2-Audio): against HF's generate alone.

A batch of utterances of different lengths holds prompts of different numbers of audio tokens: hookpoints
left-pads it (the features stay per example) and each utterance must get exactly the tokens HF's ``generate``
gives it alone, with and without an edit of the language model. Recording the continuation pools the language
model's hook points over the generated steps and the audio encoder's over its frames, equal to hooks at every
step of ``generate``; ``hookpoints record --task continue`` stores it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hookpoints.store.catalog import Store

from hookpoints.loading import load
from hookpoints.tiny import build_tiny

STEPS = 5


def waves(count: int = 3) -> list[np.ndarray]:
    """Tones in noise of 0.55 to 1.5 s: prompts of different numbers of audio tokens."""
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate([24_000, 9_000, 16_000][:count]):
        t = np.arange(n) / 16_000
        out.append((0.3 * np.sin(2 * np.pi * (200 + 70 * i) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return out


def speech_manifest(folder) -> Path:
    """``waves()`` as WAV files u0.wav ... in ``folder`` and a JSONL manifest of them (ids u0 ...)."""
    import json

    import soundfile

    rows = []
    for i, wave in enumerate(waves()):
        soundfile.write(folder / f"u{i}.wav", wave, 16_000)
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav"})
    data = folder / "speech.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny("qwen2_audio", tmp_path_factory.mktemp("qwen2-audio-varied"), sizes={"initializer_range": 0.3})


def hf_alone(model, wave: np.ndarray, hook=None) -> list[int]:
    """HF's greedy generate on one utterance's prompt (no padding), optionally with a torch forward hook."""
    one = model.speech_inputs([wave])
    handle = None if hook is None else dict(model.model.named_modules())[hook[0]].register_forward_hook(hook[1])
    try:
        with torch.inference_mode():
            out = model.model.generate(**one.kwargs, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    finally:
        if handle is not None:
            handle.remove()
    return out[0, one.kwargs["input_ids"].shape[1] :].tolist()


def test_a_padded_batch_of_speech_continues_each_utterance_as_hf_generate_alone(folder):
    model = load(folder, modality="speech")
    assert model.continues
    generation = model.generate(waves(), max_new_tokens=STEPS)
    assert not generation.prompt_inputs.masks["input"].all()  # prompts of different lengths: left-padded
    point = model.hook_points.get("blocks.1.mlp.hook_pre")  # gate_proj's output: folded into its weights
    edited = model.generate(waves(), max_new_tokens=STEPS, edits=[model.edit(point.name, [0, 5], [30.0, -30.0])])

    def replace(module, args, output):  # [batch, pos, d_mlp]
        output = output.clone()
        output[..., [0, 5]] = torch.tensor([30.0, -30.0])
        return output

    for i, wave in enumerate(waves()):
        assert generation.generated(i) == hf_alone(model, wave)[: int(generation.lengths[i])], f"example {i}"
        assert edited.generated(i) == hf_alone(model, wave, (point.module, replace))[: int(edited.lengths[i])]
    assert any(generation.generated(i) != edited.generated(i) for i in range(3))  # the edit changed text


def test_recording_a_speech_continuation_equals_hooks_at_every_step(folder):
    model = load(folder, modality="speech")
    points = model.select(["blocks.*.hook_resid_post", "blocks.0.attn.hook_z", "audio_encoder.layers.0.fc1"])
    pooled, generation = model.pooled_generating(model.speech_inputs(waves()), None, points, "mean", STEPS)
    per_step, again = model.pooled_per_step(model.speech_inputs(waves()), None, points, "mean", STEPS)
    assert torch.equal(generation.sequences, again.sequences)
    for point in points:
        torch.testing.assert_close(pooled[point.name], per_step[point.name], atol=2e-5, rtol=2e-5, msg=point.name)
    # the audio encoder ran once, over each utterance's own frames: as its forward pass records it
    forward = model.pooled(model.speech_inputs(waves()), [model.hook_points.get("audio_encoder.layers.0.fc1")], "mean")
    torch.testing.assert_close(pooled["audio_encoder.layers.0.fc1"], forward["audio_encoder.layers.0.fc1"])


def test_record_continue_on_speech_stores_the_generated_text(run_cli, folder, tmp_path):
    data = speech_manifest(tmp_path)
    store = tmp_path / "store"
    args = ["--model", str(folder), "--data", str(data), "--store", str(store), "--run", "s"]
    code, _, err = run_cli(
        "record", *args, "--task", "continue", "--max-new-tokens", str(STEPS), "--hooks", "blocks.1.hook_resid_post"
    )
    assert code == 0, err
    model = load(folder, modality="speech")
    decoded = model.decode(model.generate(waves(), max_new_tokens=STEPS))
    with Store.open(store).query() as session:
        stored = session.sql("SELECT example_id, task, generated_text FROM examples").to_pylist()
    assert sorted((r["example_id"], r["task"], r["generated_text"]) for r in stored) == [
        (f"u{i}", "continue", text) for i, text in enumerate(decoded)
    ]


def test_a_prompt_template_puts_the_instruction_around_the_audio(folder, tiny_model_dir):
    """``speech_inputs(template=...)``: the instruction's tokens before and after the audio tokens (Qwen2-Audio)
    or placeholders (Ultravox, whose projector then fills the placeholders after them); generation from a
    padded batch of templated prompts equals HF's generate on each alone."""
    template = "Listen: {audio} Generate the caption in English:"
    model = load(folder, modality="speech")
    before = model.tokenizer("Listen: ", add_special_tokens=False)["input_ids"]
    after = model.tokenizer(" Generate the caption in English:", add_special_tokens=False)["input_ids"]
    plain, templated = model.speech_inputs(waves()), model.speech_inputs(waves(), template=template)
    audio = model.model.config.audio_token_id
    for i in range(3):
        ids = templated.kwargs["input_ids"][i][templated.masks["input"][i]].tolist()
        count = plain.kwargs["input_ids"][i].eq(audio).sum().item()
        assert ids == [*before, *[audio] * count, *after], f"example {i}"
    generation = model.generate(templated, max_new_tokens=STEPS)
    for i, wave in enumerate(waves()):
        one = model.speech_inputs([wave], template=template)
        with torch.inference_mode():
            out = model.model.generate(**one.kwargs, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
        assert (
            generation.generated(i)
            == out[0, one.kwargs["input_ids"].shape[1] :].tolist()[: len(generation.generated(i))]
        )

    ultravox = load(tiny_model_dir("ultravox"), modality="speech")
    inputs = ultravox.speech_inputs(waves(2), template=template)
    bos = ultravox.tokenizer("", add_special_tokens=True)["input_ids"]
    start = len(bos) + len(ultravox.tokenizer("Listen: ", add_special_tokens=False)["input_ids"])
    assert inputs.kwargs["audio_token_start_idx"].tolist() == [start, start]
    ids = inputs.kwargs["input_ids"][0].tolist()
    assert (
        ids[: len(bos)] == bos
        and ids[len(bos) : start] == ultravox.tokenizer("Listen: ", add_special_tokens=False)["input_ids"]
    )
    _, cache = ultravox.run_with_cache(inputs, names="blocks.0.hook_resid_pre")
    _, untemplated = ultravox.run_with_cache(ultravox.speech_inputs(waves(2)), names="blocks.0.hook_resid_pre")
    count = int(inputs.kwargs["audio_token_len"][0])  # the projector's rows fill the placeholders after the text
    torch.testing.assert_close(
        cache["blocks.0.hook_resid_pre"][0, start : start + count],
        untemplated["blocks.0.hook_resid_pre"][0, len(bos) : len(bos) + count],
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [("no audio here", "one {audio}"), ("{audio} and {audio}", "one {audio}"), (3, "one {audio}")],
)
def test_bad_prompt_templates_are_one_line(folder, tiny_model_dir, template, message):
    from hookpoints.errors import UserError

    model = load(folder, modality="speech")
    with pytest.raises(UserError, match=message):
        model.speech_inputs(waves(1), template=template)
    whisper = load(tiny_model_dir("whisper"))
    with pytest.raises(UserError, match="applies to audio LLMs"):
        whisper.speech_inputs(waves(1), template="{audio}")


def test_record_with_a_template_stores_what_the_templated_prompt_gives(run_cli, folder, tmp_path):
    """``record --template``: the stored vectors are the templated prompt's (not the audio alone's); the template
    is kept with the run, and a resume with another template, a template without ``{audio}`` or one for a text
    run is refused in one line before anything is written."""
    import json

    import soundfile

    for i, wave in enumerate(waves()):
        soundfile.write(tmp_path / f"u{i}.wav", wave, 16_000)
    data = tmp_path / "speech.jsonl"
    data.write_text("".join(json.dumps({"id": f"u{i}", "audio": f"u{i}.wav", "text": "hi"}) + "\n" for i in range(3)))
    store = tmp_path / "store"
    template = "Listen: {audio} Describe it:"
    name = "blocks.1.hook_resid_post"
    base = ["--data", str(data), "--store", str(store), "--hooks", name, "--pooling", "last"]
    code, _, err = run_cli("record", "--model", str(folder), *base, "--run", "t", "--template", template)
    assert code == 0, err
    model = load(folder, modality="speech")
    want = model.pooled(model.speech_inputs(waves(), template=template), [model.hook_points.get(name)], "last")[name]
    plain = model.pooled(model.speech_inputs(waves()), [model.hook_points.get(name)], "last")[name]
    with Store.open(store).query() as session:
        rows = session.sql(f"SELECT example_id, activation FROM activations WHERE hook = '{name}' ORDER BY 1")
        config = json.loads(session.sql("SELECT config FROM runs").to_pylist()[0]["config"])
    got = torch.tensor(rows.to_pydict()["activation"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3) and config["template"] == template
    for extra, message in (
        (["--run", "t", "--template", "{audio} Other:", "--resume"], "with template={audio} Other:"),
        (["--run", "x", "--template", "no audio"], "one {audio}"),
        (["--run", "x", "--template", "{audio}", "--modality", "text"], "applies to speech input"),
    ):
        code, _, err = run_cli("record", "--model", str(folder), *base, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    with Store.open(store).query() as session:
        assert session.sql("SELECT run FROM runs").to_pylist() == [{"run": "t"}]  # nothing else written
