"""Replacement edits folded into Linear weights (hookpoints.edit_folding): the same tokens and the same per-step
logits as the hook path, bit for bit (float32 and bfloat16); the model bit-identical afterwards, raised or not; the
run-time check firing when a fold does not land; and no fold where it would not be exact.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import hookpoints as hp
from hookpoints.edit_folding import FoldedEdits, edits_applied
from hookpoints.editing import EditGroup, NeuronEdit, groups
from hookpoints.loading import load
from tests.api_helpers import randomise

STEPS = 6


def _seamless(tiny_model_dir, dtype: str):
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="text", dtype=dtype)
    randomise(model, seed=7, scale=0.05)  # every parameter, norm gains and biases included
    inputs = model.source_inputs(["Das Wetter ist heute sehr schön, sagt man.", "Il fait beau."], ["deu", "fra"])
    assert not all(bool(mask.all()) for mask in inputs.masks.values())  # the batch is padded
    return model, inputs, model.decoder_prompt(["eng", "eng"])


@pytest.fixture(scope="module")
def seamless(tiny_model_dir):
    return _seamless(tiny_model_dir, "float32")


def _edit(point, neurons, seed, add=False, scale=3.0) -> NeuronEdit:
    values = scale * torch.randn(len(neurons), generator=torch.Generator().manual_seed(seed))
    return NeuronEdit(point, torch.tensor(neurons), values, add)


def _seamless_edits(model) -> tuple[list[NeuronEdit], set[str]]:
    """Foldable replacements (several Linear outputs, two overlapping edits of one, a fused-slice point of a
    Linear, an encoder Linear, cross-attention keys that run at step 0 only) mixed with edits that keep their hooks
    (a shift, a replacement grouped with a shift, a LayerNorm output, a Linear's input); the modules to fold."""
    get = model.hook_points.get
    fc2 = get("text_decoder.layers.1.ffn.fc2")
    second_half = dataclasses.replace(fc2, name="fc2.half", part=(1, 2), width=fc2.width // 2)  # a fused slice
    edits = [
        _edit(get("text_encoder.layers.0.ffn.fc1"), [0, 5, 9], 1),
        _edit(get("text_decoder.layers.0.self_attn.q_proj"), [1, 2, 30], 2),
        _edit(get("text_decoder.layers.0.cross_attention.k_proj"), [3, 4], 3),
        _edit(get("text_decoder.layers.1.ffn.fc1"), [4, 8, 15, 16], 4),
        _edit(get("text_decoder.layers.1.ffn.fc1"), [8, 20], 5),  # overlaps the edit before: its values win at 8
        _edit(fc2, [0, 40], 6),
        _edit(second_half, [0, 23], 7),  # fc2's neurons 32 and 55
        # not foldable:
        _edit(get("text_decoder.layers.0.ffn.fc1"), [4, 8], 8),
        _edit(get("text_decoder.layers.0.ffn.fc1"), [8, 21], 9, add=True),  # a shift in the group: hooks
        _edit(get("text_decoder.layers.1.self_attn.out_proj"), [7], 10, add=True),
        _edit(get("text_decoder.layers.1.self_attn_layer_norm"), [2, 11], 11),  # a LayerNorm
        _edit(get("text_decoder.layers.0.ffn.fc2:input"), [1, 100], 12),  # an input
    ]
    folded = {
        "text_encoder.layers.0.ffn.fc1",
        "text_decoder.layers.0.self_attn.q_proj",
        "text_decoder.layers.0.cross_attention.k_proj",
        "text_decoder.layers.1.ffn.fc1",
        "text_decoder.layers.1.ffn.fc2",
    }
    return edits, folded


def _logits_per_step(head: nn.Module, run):
    """``run()``'s result and the output head's logits at every call (one per generation step)."""
    seen = []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    try:
        return run(), seen
    finally:
        handle.remove()


def _index_assignments(model, inputs, prompt, edits):
    """Independent of hookpoints.editing: one plain torch hook per edit in order, an index assignment on the
    last axis (a part's offset added), around ``model.generate``."""
    modules = dict(model.model.named_modules())
    handles = []

    def change(edit):
        index = edit.neurons + (edit.point.part[0] * edit.point.width if edit.point.part else 0)

        def write(tensor):
            values = edit.values.to(tensor.dtype)
            tensor[..., index] = tensor[..., index] + values if edit.add else values

        if edit.point.io == "input":
            return modules[edit.point.module].register_forward_pre_hook(lambda m, args: write(args[0]))
        return modules[edit.point.module].register_forward_hook(lambda m, args, output: write(output))

    try:
        handles += [change(edit) for edit in edits]
        return model.generate(inputs, prompt, STEPS)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_folded_generation_equals_the_hook_path_bit_for_bit(tiny_model_dir, seamless, dtype):
    model, inputs, prompt = seamless if dtype == "float32" else _seamless(tiny_model_dir, dtype)
    edits, expected = _seamless_edits(model)
    assert set(FoldedEdits(model.model, groups(edits)).modules) == expected
    head = model.model.get_output_embeddings()
    runs = {}
    for fold in (True, False):
        runs[fold] = _logits_per_step(
            head, lambda f=fold: model.generate_edited(inputs, prompt, edits, STEPS, fold=f)[0]
        )
    (folded, folded_logits), (hooked, hooked_logits) = runs[True], runs[False]
    assert torch.equal(folded.sequences, hooked.sequences)
    assert len(folded_logits) == len(hooked_logits) >= STEPS
    for ours, theirs in zip(folded_logits, hooked_logits, strict=True):
        assert ours.dtype == getattr(torch, dtype) and torch.equal(ours, theirs)
    assert torch.equal(folded.sequences, _index_assignments(model, inputs, prompt, edits).sequences)
    assert not torch.equal(folded.sequences, model.generate(inputs, prompt, STEPS).sequences)  # the edits matter


def _decoder_only(tiny_model_dir, family: str, dtype: str = "float32"):
    model = hp.load(tiny_model_dir(family), dtype=dtype)
    randomise(model, seed=3, scale=0.05)
    batch = model.tokenizer(["Hello there my friend, how are you", "Hi"], padding=True, padding_side="left",
                            return_tensors="pt")  # fmt: skip
    assert not bool(batch["attention_mask"].all())
    return model, dict(batch)


def _generate(model, batch, edits, fold):
    kwargs = {**batch, "max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False,
              "output_logits": True, "return_dict_in_generate": True}  # fmt: skip
    with edits_applied(model.model, edits, fold=fold) as folded, torch.inference_mode():
        out = model.model.generate(**kwargs)
    return out.sequences, torch.stack(out.logits), folded  # [batch, prompt + steps], [steps, batch, vocab]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoder_only_lm_folds_qkv_and_keeps_hooks_elsewhere(tiny_model_dir, dtype):
    """Qwen2: q/k/v projections have biases (folded, per-head points); o_proj and the MLP have none (hooks)."""
    model, batch = _decoder_only(tiny_model_dir, "qwen2", dtype)
    get = model.hook_points.get
    edits = [
        _edit(get("blocks.0.attn.hook_q"), [0, 17, 63], 1),
        _edit(get("blocks.1.attn.hook_v"), [2, 5], 2),
        _edit(get("blocks.1.attn.hook_k"), [1], 3, add=True),  # a shift: hooks
        _edit(get("blocks.0.mlp.hook_pre"), [3, 4], 4),  # gate_proj: no bias
        _edit(get("blocks.0.mlp.hook_post"), [9], 5),  # down_proj's input
        _edit(get("blocks.1.hook_resid_post"), [6, 7], 6, scale=0.5),  # a decoder layer's output
    ]
    folded_tokens, folded_logits, folded = _generate(model, batch, edits, True)
    hooked_tokens, hooked_logits, none = _generate(model, batch, edits, False)
    assert none is None and folded.modules == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert model.model.get_submodule(folded.modules[0]).weight.dtype == getattr(torch, dtype)
    assert torch.equal(folded_tokens, hooked_tokens) and torch.equal(folded_logits, hooked_logits)
    plain_tokens, plain_logits, _ = _generate(model, batch, [], True)
    assert not torch.equal(folded_logits, plain_logits)


def test_conv1d_is_not_folded_and_its_edits_still_land(tiny_model_dir):
    """GPT-2's fused c_attn is a Conv1D (x @ W + b, weight [in, out]): never folded; the hook edits it."""
    model, batch = _decoder_only(tiny_model_dir, "gpt2")
    edits = [_edit(model.hook_points.get("blocks.0.attn.hook_k"), [1, 9], 1)]
    assert FoldedEdits(model.model, groups(edits)).modules == []
    tokens, logits, folded = _generate(model, batch, edits, True)
    index = torch.tensor([64 + 1, 64 + 9])  # k is the second of c_attn's 3 slices of 64

    def write(module, args, output):
        output[..., index] = edits[0].values

    handle = model.model.get_submodule("transformer.h.0.attn.c_attn").register_forward_hook(write)
    try:
        reference_tokens, reference_logits, _ = _generate(model, batch, [], True)  # an index assignment instead
    finally:
        handle.remove()
    assert folded.modules == [] and torch.equal(tokens, reference_tokens) and torch.equal(logits, reference_logits)
    assert not torch.equal(logits, _generate(model, batch, [], True)[1])


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.model.state_dict().items()}


def _same_bits(before: dict[str, torch.Tensor], model) -> bool:
    after = model.model.state_dict()
    return before.keys() == after.keys() and all(
        torch.equal(before[name].view(torch.uint8), after[name].view(torch.uint8)) for name in before
    )


def test_weights_are_restored_after_the_call_and_after_an_error(tiny_model_dir):
    model, inputs, prompt = _seamless(tiny_model_dir, "float32")  # fresh: no other test's call touched it
    edits, folded = _seamless_edits(model)
    before = _snapshot(model)
    model.generate_edited(inputs, prompt, edits, STEPS)
    assert _same_bits(before, model)
    calls = []

    def fail_at_step_three(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("stop here")

    head = model.model.get_output_embeddings()
    probe = model.model.get_submodule("text_decoder.layers.1.ffn.fc1")
    seen_folded = []
    handles = [
        head.register_forward_hook(fail_at_step_three),
        head.register_forward_hook(lambda m, a, o: seen_folded.append(float(probe.weight[4].abs().sum()))),
    ]
    try:
        with pytest.raises(ValueError, match="stop here"):
            model.generate_edited(inputs, prompt, edits, STEPS)
    finally:
        for handle in handles:
            handle.remove()
    assert seen_folded == [0.0, 0.0]  # the fold was in place while it ran
    assert _same_bits(before, model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.model.modules())  # every hook removed


def test_the_check_fires_when_a_fold_does_not_land(seamless):
    model, inputs, prompt = seamless
    q = model.hook_points.get("text_decoder.layers.0.self_attn.q_proj")
    edits = [_edit(q, [1, 2, 30], 2)]
    module = model.model.get_submodule(q.module)
    before = _snapshot(model)
    # 1. A forward that does not read the module's weights (a cached copy of them, as a compiled kernel might).
    weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
    module.forward = lambda x: nn.functional.linear(x, weight, bias)
    try:
        with pytest.raises(RuntimeError, match=f"module {q.module}'s output differs") as caught:
            model.generate_edited(inputs, prompt, edits, STEPS)
    finally:
        del module.forward
    assert "\n" not in str(caught.value)
    assert _same_bits(before, model)
    # 2. An inf in the input: 0 * inf is NaN where the hook path gives the value (documented); caught at its
    # first call. The hook path is unaffected.
    handle = module.register_forward_pre_hook(
        lambda m, args: (args[0].clone().index_fill_(-1, torch.tensor([0]), torch.inf),)
    )
    try:
        with pytest.raises(RuntimeError, match="folded edits did not land"):
            model.generate_edited(inputs, prompt, edits, STEPS)
        model.generate_edited(inputs, prompt, edits, STEPS, fold=False)
    finally:
        handle.remove()
    assert _same_bits(before, model)
    model.generate_edited(inputs, prompt, edits, STEPS)  # and it passes when the fold lands


class _Subclass(nn.Linear):
    pass


def test_no_fold_where_it_would_not_be_exact(seamless, tiny_model_dir):
    model, _, _ = seamless
    point = model.hook_points.get("text_decoder.layers.0.ffn.fc1")
    replace = EditGroup([_edit(point, [1, 2], 1)])
    linear = model.model.get_submodule(point.module)
    assert FoldedEdits.why_not(linear, replace) is None
    assert "adds" in FoldedEdits.why_not(linear, EditGroup([_edit(point, [1], 1, add=True)]))
    no_bias = nn.Linear(linear.in_features, linear.out_features, bias=False)
    assert "no bias" in FoldedEdits.why_not(no_bias, replace)
    subclass = _Subclass(linear.in_features, linear.out_features)
    assert "not exactly nn.Linear" in FoldedEdits.why_not(subclass, replace)
    offloaded = nn.Linear(linear.in_features, linear.out_features, device="meta")
    assert "not plain floating-point tensors" in FoldedEdits.why_not(offloaded, replace)
    quantised = nn.Linear(linear.in_features, linear.out_features)
    quantised.weight = nn.Parameter(quantised.weight.detach().to(torch.int8), requires_grad=False)
    assert "not plain floating-point tensors" in FoldedEdits.why_not(quantised, replace)
    with torch.inference_mode():
        made_in_inference = nn.Linear(linear.in_features, linear.out_features)
    assert "inference_mode" in FoldedEdits.why_not(made_in_inference, replace)
    other_width = dataclasses.replace(point, width=point.width // 2)
    assert "lists" in FoldedEdits.why_not(linear, EditGroup([_edit(other_width, [1], 1)]))
    last_time = dataclasses.replace(point, time_axis=2, neuron_axis=1)
    assert "last axis" in FoldedEdits.why_not(linear, EditGroup([_edit(last_time, [1], 1)]))
    linear._hf_hook = object()  # accelerate's offload / device-map hook
    try:
        assert "accelerate" in FoldedEdits.why_not(linear, replace)
        assert FoldedEdits(model.model, groups(replace.edits)).modules == []
    finally:
        del linear._hf_hook
    handle = linear.register_forward_hook(lambda m, a, o: None)  # another reader of the output
    try:
        assert "other forward hooks" in FoldedEdits.why_not(linear, replace)
    finally:
        handle.remove()
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight  # a tied weight: writing it would change the other layer
    tied_edit = [_edit(dataclasses.replace(point, module="1", width=4), [1], 1)]
    assert FoldedEdits(tied, groups(tied_edit)).modules == []
    untied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert FoldedEdits(untied, groups(tied_edit)).modules == ["1"]
    # A Linear of a tiny model without biases (Qwen2's o_proj) stays a hook, end to end.
    qwen, batch = _decoder_only(tiny_model_dir, "qwen2")
    o_proj = [_edit(qwen.hook_points.get("blocks.0.hook_attn_out"), [3], 1)]
    assert FoldedEdits(qwen.model, groups(o_proj)).modules == []


def test_a_folded_layer_computes_what_the_hook_computes():
    """One Linear, random 3D input: folded forward == the EditGroup hook's forward, exactly (a fused slice's
    offset added; a later edit wins at a shared neuron); a group's rows are made once and reused, and made anew
    when the group's edits differ."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(12, 24))
    point = hp.HookPoint(name="h", module="0", width=8, neuron_axis=2, time_axis=1, part=(1, 3))  # neurons 8..15
    whole = dataclasses.replace(point, name="w", width=24, part=None)
    x = torch.randn(3, 5, 12)  # [batch, pos, in]
    first = _edit(point, [0, 7], 1)  # flat neurons 8 and 15
    for later, rows in ((_edit(whole, [8, 23], 2), [8, 15, 23]), (_edit(whole, [3], 3), [3, 8, 15])):
        edits = [first, later]
        handle = layer[0].register_forward_hook(groups(edits)[("0", "output")].output_hook)
        try:
            expected = layer(x).detach()  # [3, 5, 24]
        finally:
            handle.remove()
        with torch.no_grad(), edits_applied(layer, edits) as folded:
            got = layer(x)
        assert folded.modules == ["0"] and folded.folds[0].rows.tolist() == rows
        assert torch.equal(got, expected) and torch.equal(got[..., 15], first.values[1].expand(3, 5))
        winner = later.values[0] if 8 in later.neurons.tolist() else first.values[0]
        assert torch.equal(got[..., 8], winner.expand(3, 5))
        assert FoldedEdits(layer, groups(edits)).folds[0].rows is folded.folds[0].rows  # made once per group


def test_a_folded_layer_refuses_to_run_with_gradients():
    """With autograd, d out_j / d weight_j is x after folding but 0 through a hook: refused, weights restored."""
    layer = nn.Sequential(nn.Linear(6, 4))
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    point = hp.HookPoint(name="h", module="0", width=4, neuron_axis=2, time_axis=1)
    with pytest.raises(RuntimeError, match="ran with gradients"), edits_applied(layer, [_edit(point, [1], 1)]):
        layer(torch.randn(2, 3, 6))
    assert all(torch.equal(before[name], tensor) for name, tensor in layer.state_dict().items())
    edit = _edit(point, [1], 1)
    with torch.no_grad(), edits_applied(layer, [edit]) as folded:
        out = layer(torch.randn(2, 3, 6))  # [2, 3, 4]
    assert folded.modules == ["0"] and torch.equal(out[..., 1], edit.values[0].expand(2, 3))
