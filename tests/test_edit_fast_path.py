"""The edit fast path (hookpoints.editing.EditGroup): the same tokens and the same edited activations as plain torch
hooks doing index assignments, one aten op per edited tensor per call (counted, not timed), and bad edits refused.
"""

from __future__ import annotations

import pytest
import torch

from hookpoints.editing import EditGroup, NeuronEdit, apply_edit
from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.op_count import OpCount
from hookpoints.points import HookPoint
from tests.api_helpers import randomise

STEPS = 6


@pytest.fixture(scope="module")
def seamless(tiny_model_dir):
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    randomise(model, seed=7, scale=0.05)  # every parameter, norm gains and biases included
    # Padded batch: the sentences differ in length; the decoder prompt is the same length for both.
    inputs = model.source_inputs(["Das Wetter ist heute sehr schön, sagt man.", "Il fait beau."], ["deu", "fra"])
    assert not all(bool(mask.all()) for mask in inputs.masks.values())  # the batch is padded
    return model, inputs, model.decoder_prompt(["eng", "eng"])


def _edits(model) -> list[NeuronEdit]:
    """Edits of every kind the fast path merges or keeps apart: several hook points, two replacements of one
    tensor that overlap (the later wins), a shift after a replacement (applied after it), an encoder hook."""
    generator = torch.Generator().manual_seed(3)

    def edit(name, neurons, add=False):
        neurons = torch.tensor(neurons)
        return NeuronEdit(model.hook_points.get(name), neurons, 3 * torch.randn(len(neurons), generator=generator), add)

    return [
        edit("text_encoder.layers.0.ffn.fc1", [0, 5, 9]),
        edit("text_decoder.layers.0.self_attn.q_proj", [1, 2, 30]),
        edit("text_decoder.layers.0.ffn.fc1", [4, 8, 15, 16]),
        edit("text_decoder.layers.0.ffn.fc1", [8, 20]),  # overlaps the edit before: its values win at 8
        edit("text_decoder.layers.0.ffn.fc1", [8, 21], add=True),  # then shifted
        edit("text_decoder.layers.1.ffn.fc2", [0, 63]),
        edit("text_decoder.layers.1.self_attn.out_proj", [7], add=True),
    ]


def _reference(model, inputs, prompt, edits, record):
    """Plain torch forward hooks, one per edit in order, each an index assignment on ``[batch, pos, width]``; then
    one more hook per recorded module keeping a copy of its tensor per call. Independent of hookpoints.editing."""
    modules = dict(model.model.named_modules())
    seen = {point.name: [] for point in record}
    handles = []

    def change(edit):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output  # [batch, pos, width]
            assert edit.point.time_axis == 1 and tensor.dim() == 3 and tensor.shape[-1] == edit.point.width
            values = edit.values.to(tensor.dtype)
            if edit.add:
                tensor[..., edit.neurons] += values
            else:
                tensor[..., edit.neurons] = values

        return hook

    def keep(point):
        return lambda module, args, output: seen[point.name].append(
            (output[0] if isinstance(output, tuple) else output).clone()
        )

    try:
        handles += [modules[edit.point.module].register_forward_hook(change(edit)) for edit in edits]
        handles += [modules[point.module].register_forward_hook(keep(point)) for point in record]
        generation = model.generate(inputs, prompt, STEPS)
    finally:
        for handle in handles:
            handle.remove()
    return generation, seen


def test_fast_path_generates_the_same_tokens_as_index_assignments(seamless):
    model, inputs, prompt = seamless
    edits = _edits(model)
    fast, recorded = model.generate_edited(inputs, prompt, edits, STEPS, fold=False)
    reference, _ = _reference(model, inputs, prompt, edits, [])
    assert recorded == {}
    assert torch.equal(fast.sequences, reference.sequences)
    assert not torch.equal(fast.sequences, model.generate(inputs, prompt, STEPS).sequences)  # the edits matter


def test_recorded_edited_activations_equal_the_reference(seamless):
    model, inputs, prompt = seamless
    edits = _edits(model)
    points = list({edit.point.name: edit.point for edit in edits}.values())
    generation, recorded = model.generate_edited(inputs, prompt, edits, STEPS, record=points)  # through nnsight
    reference, seen = _reference(model, inputs, prompt, edits, points)
    assert torch.equal(generation.sequences, reference.sequences)
    for point in points:
        assert len(recorded[point.name]) == len(seen[point.name]) >= 1, point.name
        for ours, theirs in zip(recorded[point.name], seen[point.name], strict=True):
            assert torch.equal(ours, theirs), point.name
    fc1 = recorded["text_decoder.layers.0.ffn.fc1"][-1]  # the merged replacements and the shift, explicitly
    later, shift = edits[3], edits[4]
    assert torch.equal(fc1[..., 20], later.values[1].expand_as(fc1[..., 20]))
    assert torch.equal(fc1[..., 8], (later.values[0] + shift.values[0]).expand_as(fc1[..., 8]))


@pytest.mark.parametrize("fold", [False, True])
def test_aten_ops_per_edited_tensor_per_step(seamless, fold):
    """Counted with OpCount: each further step of a generation with replacements makes exactly one more
    op per edited module than a step without (the ``where``), whatever the number of neurons or edits of that
    tensor; with the replacements of Linear outputs folded into the weights (the default), none at all. Steps
    are isolated by generating 2 and 6 tokens; what a generation does once (merging two edits of one tensor,
    folding and restoring rows, the fold's one-shot check) cancels."""
    model, inputs, prompt = seamless
    point = model.hook_points.get
    layers = [f"text_decoder.layers.{i}" for i in range(2)]
    edits = [
        NeuronEdit(point(f"{layer}.{name}"), torch.arange(k), torch.randn(k))
        for layer in layers
        for name, k in (("self_attn.q_proj", 5), ("ffn.fc1", 40), ("ffn.fc2", 1))
    ]
    edits.append(NeuronEdit(point("text_decoder.layers.0.ffn.fc1"), torch.tensor([50, 51]), torch.ones(2)))
    modules = {edit.point.module for edit in edits}
    ops = {}
    model.generate_edited(inputs, prompt, edits, 2, fold=fold)  # warm: masks placed once
    try:
        for steps in (2, 6):
            model.model.generation_config.min_new_tokens = steps  # edited and plain runs take the same steps
            for name, chosen in (("plain", []), ("edited", edits)):
                with OpCount() as counter:
                    model.generate_edited(inputs, prompt, chosen, steps, fold=fold)
                ops[name, steps] = counter.by_name
    finally:
        model.model.generation_config.min_new_tokens = None
    per_step = {name: (ops[name, 6].total() - ops[name, 2].total()) / 4 for name in ("plain", "edited")}
    wheres = {name: ops[name, 6]["aten.where"] - ops[name, 2]["aten.where"] for name in ("plain", "edited")}
    once = ops["edited", 2].total() - ops["plain", 2].total()
    if fold:  # 6 Linear outputs replaced: no op per step; once per module: ~10 (CPU) to find the rows, 6 to fold
        # and restore them, 4 to check (one stack for all)
        assert per_step["edited"] == per_step["plain"] and wheres["edited"] == wheres["plain"]
        assert ops["edited", 6] - ops["plain", 6] == ops["edited", 2] - ops["plain", 2]  # op by op
        assert 0 < once <= 24 * len(modules)
    else:
        assert per_step["edited"] - per_step["plain"] == len(modules)  # 6 edited modules: one op each per step
        assert wheres["edited"] - wheres["plain"] == 4 * len(modules)
        assert once <= 2 * len(modules) + 2  # 2 steps + merging fc1's edits


def test_fused_slices_and_layouts_merge_into_one_op():
    """GPT-2's fused q/k/v: edits of two slices are one ``where``; the values equal sequential index writes."""
    q = HookPoint(name="q", module="attn.c_attn", width=8, neuron_axis=2, time_axis=1, part=(0, 3))
    k = HookPoint(name="k", module="attn.c_attn", width=8, neuron_axis=2, time_axis=1, part=(1, 3))
    edits = [NeuronEdit(q, torch.tensor([0, 7]), torch.tensor([1.0, 2.0])),
             NeuronEdit(k, torch.tensor([7, 3]), torch.tensor([-1.0, 0.5]))]  # fmt: skip
    tensor = torch.randn(2, 5, 24)
    expected = tensor.clone()
    expected[..., [0, 7]] = torch.tensor([1.0, 2.0])
    expected[..., [15, 11]] = torch.tensor([-1.0, 0.5])
    group = EditGroup(edits)
    with OpCount() as first:
        group.apply((tensor, None))
    with OpCount() as second:
        group.apply(tensor)
    assert torch.equal(tensor, expected)
    assert len(group.steps(tensor)) == 1 and second.by_name == {"aten.where": 1}
    assert first.total > 1  # placing the masks happens on the first call only


def _point(**kw) -> HookPoint:
    return HookPoint(**{"name": "h", "module": "m", **kw})


LAYOUTS = [  # (shape with batch 2 and `pos` positions, hook point); neurons numbered as in the store
    (lambda pos: (2, pos, 8), _point(width=8, neuron_axis=2, time_axis=1)),  # [batch, pos, width]
    (lambda pos: (2, 8, pos), _point(width=8, neuron_axis=1, time_axis=2)),  # Conformer conv: [batch, chan, time]
    (lambda pos: (2, pos, 4, 2), _point(width=8, neuron_axis=2, time_axis=1, heads=4)),  # per head
    (lambda pos: (2, pos, 24), _point(width=8, neuron_axis=2, time_axis=1, part=(2, 3))),  # fused qkv: v
    (lambda pos: (2 * pos, 8), _point(width=8, neuron_axis=1)),  # one vector per example (batch 2 x pos)
]


@pytest.mark.parametrize("positions", [3, 5000])  # a decoder step's few elements (where) and a long pass (indexed)
@pytest.mark.parametrize(("shape", "point"), LAYOUTS)
def test_both_edit_kernels_equal_index_assignment(shape, point, positions):
    tensor = torch.randn(shape(positions))
    assert (tensor.numel() > 1 << 14) == (positions > 3)  # the two sizes take the two kernels
    set_first = NeuronEdit(point, torch.tensor([6, 1, 3]), torch.tensor([10.0, -2.0, 0.5]))
    set_later = NeuronEdit(point, torch.tensor([3, 7]), torch.tensor([4.0, 8.0]))  # overlaps at 3: wins
    shift = NeuronEdit(point, torch.tensor([7, 0]), torch.tensor([1.5, -1.0]), add=True)
    expected = tensor.clone()  # by hand: the cache layout [batch, pos, width], neurons as the store numbers them
    view = expected.unsqueeze(1) if point.time_axis is None else expected.movedim(point.time_axis, 1)
    flat = view.reshape(*view.shape[:2], -1).clone()
    offset = point.part[0] * point.width if point.part else 0
    for edit in (set_first, set_later, shift):
        index = edit.neurons + offset
        flat[..., index] = flat[..., index] + edit.values if edit.add else edit.values
    expected.copy_(flat.reshape(view.shape).squeeze(1) if point.time_axis is None
                   else flat.reshape(view.shape).movedim(1, point.time_axis))  # fmt: skip
    group = EditGroup([set_first, set_later, shift])
    group.apply(tensor)
    assert torch.equal(tensor, expected)
    assert len(group.steps(tensor)) == 2  # the replacements merged; the shift after them
    assert all((step._indexed is not None) == (positions > 3) for step in group.steps(tensor))  # which kernel ran


def test_edits_keep_autograd_working():
    point = HookPoint(name="h", module="m", width=4, neuron_axis=2, time_axis=1)
    x = torch.randn(1, 3, 4, requires_grad=True)
    y = x * 2  # a non-leaf, as a module output
    apply_edit(y, NeuronEdit(point, torch.tensor([1]), torch.tensor([5.0])))
    y.sum().backward()
    assert torch.equal(x.grad[..., 1], torch.zeros(1, 3)) and torch.equal(x.grad[..., 0], torch.full((1, 3), 2.0))


def test_bad_edits_during_generation_are_user_errors(seamless, tiny_model_dir):
    model, inputs, prompt = seamless
    with pytest.raises(UserError, match="out of range") as caught:
        model.edit("text_decoder.layers.0.ffn.fc1", [10_000], [0.0])
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="no hook point is called"):
        model.edit("text_decoder.layers.0.ffn.nothing", [1], [0.0])
    foreign = HookPoint(name="blocks.0.mlp.hook_post", module="transformer.h.0.mlp.act", width=256, time_axis=1)
    with pytest.raises(UserError, match="which this model does not have") as caught:
        model.generate_edited(inputs, prompt, [NeuronEdit(foreign, torch.tensor([1]), torch.tensor([0.0]))], 2)
    assert "\n" not in str(caught.value)
    # A hook point whose width does not match the module's tensor (another model's, same module name) is refused.
    fc1 = model.hook_points.get("text_decoder.layers.0.ffn.fc1")
    wrong = HookPoint(name=fc1.name, module=fc1.module, width=fc1.width * 2, neuron_axis=2, time_axis=1)
    with pytest.raises(UserError, match="neurons per position here, the hook point lists") as caught:
        model.generate_edited(inputs, prompt, [NeuronEdit(wrong, torch.tensor([1]), torch.tensor([0.0]))], 2)
    assert "\n" not in str(caught.value)
