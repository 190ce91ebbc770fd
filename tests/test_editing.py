"""Neuron edits: exact values at every position and generation step, nothing else touched, and the same
output as plain torch forward hooks doing the same replacement."""

from __future__ import annotations

import pytest
import torch

from hookpoints.editing import NeuronEdit, apply_edit
from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.points import HookPoint
from hookpoints.pooling import positions_first


def _point(**kw) -> HookPoint:
    return HookPoint(**{"name": "h", "module": "m", **kw})


@pytest.mark.parametrize(
    ("shape", "point"),
    [
        ((2, 5, 8), _point(width=8, neuron_axis=2, time_axis=1)),  # [batch, pos, width]
        ((2, 8, 5), _point(width=8, neuron_axis=1, time_axis=2)),  # Conformer conv: [batch, channels, time]
        ((2, 5, 4, 2), _point(width=8, neuron_axis=2, time_axis=1, heads=4)),  # [batch, pos, heads, d_head]
        ((2, 5, 24), _point(width=8, neuron_axis=2, time_axis=1, part=(1, 3))),  # GPT-2's fused qkv: k
        ((2, 8), _point(width=8, neuron_axis=1)),  # one vector per example
    ],
)
def test_apply_edit_sets_exactly_the_chosen_neurons(shape, point):
    tensor = torch.randn(shape)
    whole = tensor.clone()
    before = positions_first(tensor, point).clone()  # [batch, pos, width]
    neurons, values = torch.tensor([6, 1, 3]), torch.tensor([10.0, -2.0, 0.5])
    apply_edit(tensor, NeuronEdit(point, neurons, values))
    after = positions_first(tensor, point)
    assert torch.equal(after[..., neurons], values.expand(*after.shape[:2], 3))
    others = [i for i in range(8) if i not in (6, 1, 3)]
    assert torch.equal(after[..., others], before[..., others])
    if point.part:  # the other slices of a fused tensor are untouched
        assert torch.equal(tensor[..., :8], whole[..., :8]) and torch.equal(tensor[..., 16:], whole[..., 16:])


def test_steering_adds_and_tuples_are_edited_in_place():
    point = _point(width=4, neuron_axis=2, time_axis=1)
    tensor = torch.zeros(1, 3, 4)
    apply_edit((tensor, None), NeuronEdit(point, torch.tensor([2]), torch.tensor([1.5]), add=True))
    apply_edit((tensor, None), NeuronEdit(point, torch.tensor([2]), torch.tensor([1.5]), add=True))
    assert torch.equal(tensor[0, :, 2], torch.full((3,), 3.0)) and tensor[..., [0, 1, 3]].abs().sum() == 0


def test_bad_edits_are_refused():
    point = _point(name="text_decoder.layers.0.ffn.fc1", width=8, neuron_axis=2, time_axis=1)
    with pytest.raises(UserError, match="neuron 8 is out of range for hook .*width 8"):
        NeuronEdit(point, torch.tensor([1, 8]), torch.tensor([0.0, 0.0]))
    with pytest.raises(UserError, match="2 neuron indices but 1 values"):
        NeuronEdit(point, torch.tensor([1, 2]), torch.tensor([0.0]))
    with pytest.raises(UserError, match="names a neuron twice"):
        NeuronEdit(point, torch.tensor([1, 1]), torch.tensor([0.0, 0.0]))


@pytest.fixture(scope="module")
def seamless_text(tiny_model_dir):
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    inputs = model.source_inputs(["hello world this is a test", "guten tag"], ["eng", "deu"])
    return model, inputs, model.decoder_prompt(["fra", "fra"])


def _agreeing_steps(a: torch.Tensor, b: torch.Tensor, prompt: int) -> int:
    """Steps whose decoder input is the same in both generations (step s reads tokens before prompt + s)."""
    n = min(a.shape[1], b.shape[1])
    same = (a[:, :n] == b[:, :n]).all(0)
    first_diff = int((~same).nonzero()[0]) if (~same).any() else n
    return first_diff - prompt + 1


def test_no_edit_gives_plain_generation(seamless_text):
    model, inputs, prompt = seamless_text
    plain = model.generate(inputs, prompt, 10)
    traced, _ = model.generate_edited(inputs, prompt, [], 10)
    assert torch.equal(traced.sequences, plain.sequences)
    assert torch.equal(traced.lengths, plain.lengths)


def test_edits_hold_at_every_step_and_touch_nothing_else(seamless_text):
    model, inputs, prompt = seamless_text
    names = [
        "text_encoder.layers.1.ffn.fc1",  # runs once (the encoder)
        "text_decoder.layers.0.cross_attention.k_proj",  # runs once (step 0; the KV cache keeps it)
        "text_decoder.layers.0.ffn.fc1",  # runs at every step
        "text_decoder.layers.1.self_attn.v_proj",
    ]
    points = [model.hook_points.get(name) for name in names]
    neurons = torch.tensor([0, 3, 17])
    values = torch.tensor([0.25, -0.5, 1.0])
    edits = [NeuronEdit(point, neurons, values) for point in points]
    steps = 6
    base, unedited = model.generate_edited(inputs, prompt, [], steps, record=points)
    generation, edited = model.generate_edited(inputs, prompt, edits, steps, record=points)
    calls = {name: len(tensors) for name, tensors in edited.items()}
    taken = generation.steps
    assert calls == {names[0]: 1, names[1]: 1, names[2]: taken, names[3]: taken}
    for name, tensors in edited.items():
        for step, tensor in enumerate(tensors):  # [batch, pos, width]: every position of the call
            if name.startswith("text_decoder") and "cross" not in name:
                assert tensor.shape[1] == (prompt.shape[1] if step == 0 else 1)
            assert torch.equal(tensor[..., neurons], values.expand(*tensor.shape[:2], 3)), (name, step)
    # Untouched neurons equal the unedited run's: the encoder hook's (nothing before it was edited) here; a
    # decoder hook's with a decoder-only edit below (at the steps whose input tokens agree).
    others = [i for i in range(points[0].width) if i not in neurons.tolist()]
    assert torch.equal(edited[names[0]][0][..., others], unedited[names[0]][0][..., others])
    fc1 = points[2]
    generation, only = model.generate_edited(inputs, prompt, [NeuronEdit(fc1, neurons, values)], steps, record=[fc1])
    agree = _agreeing_steps(generation.sequences, base.sequences, prompt.shape[1])
    assert agree >= 1
    others = [i for i in range(fc1.width) if i not in neurons.tolist()]
    for step in range(min(agree, len(only[fc1.name]))):
        assert torch.equal(only[fc1.name][step][..., others], unedited[fc1.name][step][..., others]), step


def test_same_tokens_as_plain_torch_forward_hooks(seamless_text):
    """A strong edit changes the output, and plain forward hooks doing the same replacement agree exactly."""
    model, inputs, prompt = seamless_text
    points = model.select(["text_decoder.layers.*.ffn.fc1", "text_encoder.layers.0.self_attn.q_proj"])
    neurons = torch.arange(0, 40, 2)
    values = torch.full((20,), 30.0)
    plain = model.generate(inputs, prompt, 10)
    edited, _ = model.generate_edited(inputs, prompt, [NeuronEdit(p, neurons, values) for p in points], 10)

    def replace(module, args, output):
        output[..., neurons] = values

    handles = [model.model.get_submodule(p.module).register_forward_hook(replace) for p in points]
    try:
        hooked = model.generate(inputs, prompt, 10)
    finally:
        for handle in handles:
            handle.remove()
    assert not torch.equal(edited.sequences, plain.sequences)
    assert torch.equal(edited.sequences, hooked.sequences)


def test_speech_encoder_channels_are_edited(tiny_model_dir, corpus):
    from hookpoints.audio import load_audio
    from hookpoints.manifest import read_manifest

    model = load(tiny_model_dir("seamless_m4t_v2"), modality="speech")
    manifest = read_manifest(corpus.speech, required=("audio",))
    waves = [
        load_audio(manifest.audio_path(a), i)
        for a, i in zip(manifest.column("audio")[:2], manifest.ids[:2], strict=True)
    ]
    inputs = model.speech_inputs(waves)
    prompt = model.decoder_prompt(["eng", "eng"])
    conv = model.hook_points.get("speech_encoder.layers.1.conv_module.depthwise_conv")
    assert conv.neuron_axis == 1  # [batch, channels, time]
    plain = model.generate(inputs, prompt, 6)
    none, _ = model.generate_edited(inputs, prompt, [], 6)
    assert torch.equal(none.sequences, plain.sequences)
    neurons, values = torch.tensor([2, 9]), torch.tensor([4.0, -4.0])
    _, seen = model.generate_edited(inputs, prompt, [NeuronEdit(conv, neurons, values)], 6, record=[conv])
    (tensor,) = seen[conv.name]
    assert torch.equal(tensor[..., neurons], values.expand(*tensor.shape[:2], 2))


def test_torch_hook_path_equals_the_nnsight_path(seamless_text):
    """Without recording, edits run as plain torch hooks: the same tokens as the traced (nnsight) path."""
    model, inputs, prompt = seamless_text
    points = model.select(["text_decoder.layers.*.ffn.fc1", "text_decoder.layers.0.self_attn.v_proj:input"])
    edits = [NeuronEdit(p, torch.arange(1, 30, 3), torch.linspace(-20, 20, 10)) for p in points]
    fast, recorded = model.generate_edited(inputs, prompt, edits, 10)
    traced, _ = model.generate_edited(inputs, prompt, edits, 10, record=points[:1])  # recording: nnsight
    assert recorded == {}
    assert not torch.equal(fast.sequences, model.generate(inputs, prompt, 10).sequences)
    assert torch.equal(fast.sequences, traced.sequences)
    assert torch.equal(fast.lengths, traced.lengths)
