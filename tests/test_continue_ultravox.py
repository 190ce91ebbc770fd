"""Ultravox continues its speech prompt (task ``continue``), checked against a greedy loop without cache.

Ultravox places its audio by index (``audio_token_start_idx``), not by a token id as Qwen2-Audio does, so a
left-padded batch must move each example's index with its tokens. The reference here shares neither
``generate``, the KV cache, position ids nor padding with the path under test: each utterance alone, one full
forward pass per new token, the argmax of its last position.
"""

from __future__ import annotations

import pytest
import torch
from hookpoints.store.catalog import Store
from test_continue_audio import speech_manifest, waves

from hookpoints.errors import UserError
from hookpoints.generation import left_padded
from hookpoints.inputs import ModelInputs
from hookpoints.loading import load
from hookpoints.tiny import build_tiny

STEPS = 5
TEMPLATE = "Listen: {audio} Say:"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny("ultravox", tmp_path_factory.mktemp("ultravox-continue"))


def greedy_alone(model, wave, steps: int, hook=None) -> list[int]:
    """Greedy tokens for one utterance: a full forward pass per token (no cache, no padding), optionally with a
    torch forward hook ``(module path, fn)``."""
    one = model.speech_inputs([wave], template=TEMPLATE)
    kwargs = dict(one.kwargs)
    ids = kwargs.pop("input_ids")
    handle = None if hook is None else dict(model.model.named_modules())[hook[0]].register_forward_hook(hook[1])
    new: list[int] = []
    try:
        with torch.inference_mode():
            for _ in range(steps):
                kwargs["attention_mask"] = torch.ones_like(ids)
                logits = model.model(input_ids=ids, use_cache=False, **kwargs).logits  # [1, pos, vocab]
                token = int(logits[0, -1].argmax())
                new.append(token)
                if token == model.model.generation_config.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    finally:
        if handle is not None:
            handle.remove()
    return new


def test_a_padded_batch_of_speech_continues_each_utterance_as_a_greedy_loop_alone(folder):
    model = load(folder, modality="speech")
    assert model.continues
    inputs = model.speech_inputs(waves(), template=TEMPLATE)
    generation = model.generate(inputs, max_new_tokens=STEPS)
    given = inputs.kwargs["audio_token_start_idx"].tolist()
    moved = generation.prompt_inputs.kwargs["audio_token_start_idx"].tolist()
    pads = (~generation.prompt_inputs.masks["input"]).sum(1).tolist()
    assert any(pads) and moved == [g + p for g, p in zip(given, pads, strict=True)]  # right padding moved left
    point = model.hook_points.get("blocks.1.mlp.hook_pre")
    edit = model.edit(point.name, [0, 5], [30.0, -30.0])
    edited = model.generate(inputs, max_new_tokens=STEPS, edits=[edit])

    def replace(module, args, output):  # [batch, pos, d_mlp]
        output = output.clone()
        output[..., [0, 5]] = torch.tensor([30.0, -30.0])
        return output

    for i, wave in enumerate(waves()):
        assert generation.generated(i) == greedy_alone(model, wave, STEPS), f"example {i}"
        assert edited.generated(i) == greedy_alone(model, wave, STEPS, (point.module, replace)), f"example {i}"
    assert any(generation.generated(i) != edited.generated(i) for i in range(3))  # the edit changed text
    assert len({tuple(generation.generated(i)) for i in range(3)}) > 1  # the audio matters


def test_recording_an_ultravox_continuation_equals_hooks_at_every_step(folder):
    model = load(folder, modality="speech")
    names = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_z", "audio_encoder.layers.0.fc1", "audio_projector.act"]
    points = model.select(names)
    inputs = model.speech_inputs(waves(), template=TEMPLATE)
    pooled, generation = model.pooled_generating(inputs, None, points, "mean", STEPS)
    again_inputs = model.speech_inputs(waves(), template=TEMPLATE)
    per_step, again = model.pooled_per_step(again_inputs, None, points, "mean", STEPS)
    assert torch.equal(generation.sequences, again.sequences)
    for point in points:
        torch.testing.assert_close(pooled[point.name], per_step[point.name], atol=2e-5, rtol=2e-5, msg=point.name)
    for i, wave in enumerate(waves()):  # alone, nothing is padded: the batch's rows must not depend on it
        alone, _ = model.pooled_generating(model.speech_inputs([wave], template=TEMPLATE), None, points, "mean", STEPS)
        for point in points:
            torch.testing.assert_close(alone[point.name][0], pooled[point.name][i], atol=2e-5, rtol=2e-5)
    # the audio encoder and projector ran once, over each utterance's own frames: as a forward pass records them
    audio = [model.hook_points.get("audio_encoder.layers.0.fc1"), model.hook_points.get("audio_projector.act")]
    forward = model.pooled(inputs, audio, "mean")
    for point in audio:
        torch.testing.assert_close(pooled[point.name], forward[point.name], msg=point.name)


def test_a_hook_on_an_input_the_batch_guard_zeroes_acts_on_each_utterance_as_alone(folder):
    """A ``fwd_hooks`` change of ``multi_modal_projector:input`` (the encoder's output) or a conv's input: the
    batch guard zeroes what lies past each utterance there, and ran before the hook, so the hook's change of the
    padding reached the last stacked audio token of a shorter utterance (logits off by 0.6; another continuation),
    without a word. Now the hooks run first (as generate_edited's input edits do), in generate and a forward pass."""
    model = load(folder, modality="speech")
    inputs = model.speech_inputs(waves(), template=TEMPLATE)

    def shift(tensor, hook):
        return tensor + 3.0

    for name in ("multi_modal_projector:input", "audio_tower.conv1:input"):
        module = model.hook_points.get(name).module
        generation = model.generate(inputs, max_new_tokens=STEPS, fwd_hooks=[(name, shift)])
        logits = model.run_with_hooks(inputs, fwd_hooks=[(name, shift)]).logits  # [batch, pos, vocab]
        handle = dict(model.model.named_modules())[module].register_forward_pre_hook(lambda m, a: (a[0] + 3.0,))
        try:
            alone = [greedy_alone(model, wave, STEPS) for wave in waves()]
            with torch.inference_mode():
                each = [model.model(**model.speech_inputs([wave], template=TEMPLATE).kwargs).logits for wave in waves()]
        finally:
            handle.remove()
        for i in range(3):
            assert generation.generated(i) == alone[i], f"{name}: example {i}"
            real = each[i].shape[1]  # right-padded: the example's tokens come first
            torch.testing.assert_close(logits[i, :real], each[i][0], atol=1e-5, rtol=1e-5, msg=f"{name}: {i}")


def test_record_continue_on_ultravox_speech_stores_the_generated_text(run_cli, folder, tmp_path):
    data = speech_manifest(tmp_path)
    store = tmp_path / "store"
    args = ["--model", str(folder), "--data", str(data), "--store", str(store), "--run", "s", "--template", TEMPLATE]
    code, _, err = run_cli(
        "record", *args, "--task", "continue", "--max-new-tokens", str(STEPS), "--hooks", "blocks.1.hook_resid_post"
    )
    assert code == 0, err
    model = load(folder, modality="speech")
    decoded = model.decode(model.generate(model.speech_inputs(waves(), template=TEMPLATE), max_new_tokens=STEPS))
    with Store.open(store).query() as session:
        stored = session.sql("SELECT example_id, task, generated_text FROM examples").to_pylist()
    assert sorted((r["example_id"], r["task"], r["generated_text"]) for r in stored) == [
        (f"u{i}", "continue", text) for i, text in enumerate(decoded)
    ]


def test_left_padding_moves_a_per_example_position_with_its_token():
    ids = torch.tensor([[5, 6, 7, 0], [8, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]]).bool()
    start = torch.tensor([1, 2])  # tokens 6 and 9
    inputs = ModelInputs({"input_ids": ids, "attention_mask": mask.long(), "start": start}, {"input": mask})
    padded = left_padded(inputs, with_positions=False, carried=("start",), moved=("start",))
    new = padded.kwargs["start"]
    assert padded.kwargs["input_ids"].tolist() == [[0, 5, 6, 7], [0, 8, 9, 10]]
    assert [int(padded.kwargs["input_ids"][i, new[i]]) for i in range(2)] == [6, 9]
    assert start.tolist() == [1, 2]  # the caller's tensor is not changed
    for bad, message in (
        (torch.tensor([3, 2]), "example 0's start 3 points at padding"),
        (torch.tensor([1, 4]), "one position per example within its 4 tokens"),
        (torch.tensor([1]), "one position per example"),
        (torch.tensor([1, 0]), "example 1 has padding .* between its tokens after its start 0"),  # 8, _, 9, 10
    ):
        wrong = ModelInputs({**inputs.kwargs, "start": bad}, {"input": mask})
        with pytest.raises(UserError, match=message):
            left_padded(wrong, with_positions=False, carried=("start",), moved=("start",))


def test_ultravox_refuses_audio_placed_on_padding(folder):
    """A hand-built start index that puts audio tokens on padding would shift the audio without a word."""
    model = load(folder, modality="speech")
    inputs = model.speech_inputs(waves(2), template=TEMPLATE)
    kwargs = dict(inputs.kwargs)
    short = int(inputs.masks["input"].sum(1).argmin())
    kwargs["audio_token_start_idx"] = kwargs["audio_token_start_idx"].clone()
    real, count = int(inputs.masks["input"][short].sum()), int(kwargs["audio_token_len"][short])
    kwargs["audio_token_start_idx"][short] = real - count + 1  # its last audio token on the first padding
    with torch.inference_mode(), pytest.raises(ValueError, match=f"example {short}'s .* not all real tokens"):
        model.model(**kwargs)


def test_ultravox_refuses_audio_tokens_it_does_not_make_and_missing_placement(folder):
    """A hand-built ``audio_token_len`` short of what an utterance makes placed only its first tokens and left the
    other placeholders as text (EOS embeddings), without a word; a missing ``audio_token_start_idx`` was a
    TypeError ('NoneType' object is not subscriptable). Each is now a one-line ValueError, in generate too."""
    model = load(folder, modality="speech")
    inputs = model.speech_inputs(waves(2), template=TEMPLATE)
    short = {**inputs.kwargs, "audio_token_len": inputs.kwargs["audio_token_len"] - torch.tensor([0, 1])}
    missing = {k: v for k, v in inputs.kwargs.items() if k != "audio_token_start_idx"}
    count = int(inputs.kwargs["audio_token_len"][1])
    for kwargs, message in (
        (short, f"example 1's audio makes {count} audio tokens, but audio_token_len says {count - 1}"),
        (missing, "audio_values needs audio_token_start_idx and audio_token_len"),
    ):
        with torch.inference_mode(), pytest.raises(ValueError, match=message) as caught:
            model.model(**kwargs)
        assert "\n" not in str(caught.value)
        with pytest.raises(ValueError, match=message):
            model.generate(ModelInputs(kwargs, dict(inputs.masks)), max_new_tokens=2)


def test_ultravox_on_text_continues_as_its_language_model_alone(folder):
    """Text input: no audio, so Ultravox is its LLaMA; each text of a padded batch against the LLaMA's own
    ``generate`` on that text alone."""
    model = load(folder, modality="text")
    texts = ["the cat sat on the mat today", "a dog", "hello there"]
    generation = model.generate(texts, max_new_tokens=STEPS)
    for i, text in enumerate(texts):
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.model.language_model.generate(ids, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
        assert generation.generated(i) == out[0, ids.shape[1] :].tolist()[: int(generation.lengths[i])], text


def test_bad_ultravox_generation_requests_are_one_line(folder):
    model = load(folder, modality="speech")
    speech = model.speech_inputs(waves(2))
    for call, message in (
        (lambda: model.generate(speech, max_new_tokens=10_000), "runs past the 256 positions"),
        (lambda: model.generate(speech, 5), "takes no decoder prompt"),
        (lambda: model.generate(speech, max_new_tokens=0), "max new tokens must be a whole number"),
    ):
        with pytest.raises(UserError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_a_hook_point_holding_the_lm_head_records_a_continuation(folder):
    """Ultravox's ``language_model`` holds its LM head, whose logits the alignment check reads: the check was
    requested after the point, out of execution order (nnsight's OutOfOrderError)."""
    model = load(folder, modality="speech")
    points = model.select(["language_model", "blocks.1.hook_resid_post"])
    pooled, _ = model.pooled_generating(model.speech_inputs(waves()), None, points, "mean", STEPS)
    per_step, _ = model.pooled_per_step(model.speech_inputs(waves()), None, points, "mean", STEPS)
    for point in points:
        torch.testing.assert_close(pooled[point.name], per_step[point.name], atol=2e-5, rtol=2e-5, msg=point.name)
