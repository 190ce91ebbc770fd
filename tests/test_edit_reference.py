"""Edited generation against an independent reference: plain torch forward hooks that return a new tensor with
the chosen neurons replaced (or shifted), around HF ``generate`` run WITHOUT the KV cache (every step recomputes
every position, so an edit at a prompt position is made afresh at each step, once). ``generate_edited`` (folded,
hooked, and traced through nnsight) must give the same tokens and the same logits at every step.
"""

from __future__ import annotations

import pytest
import torch

from hookpoints.editing import NeuronEdit
from hookpoints.errors import UserError
from hookpoints.generation import greedy_kwargs
from hookpoints.loading import load
from tests.api_helpers import randomise

STEPS = 5


def _changed(tensor: torch.Tensor, edit: NeuronEdit) -> torch.Tensor:
    """A new tensor: ``tensor`` with the edit's neurons set (or shifted), counted as the store counts them."""
    point = edit.point
    axis = point.time_axis
    moved = tensor.unsqueeze(1) if axis is None else tensor.movedim(axis, 1)  # [batch, pos, *neurons]
    flat = moved.reshape(*moved.shape[:2], -1).clone()
    index = edit.neurons + (point.part[0] * point.width if point.part else 0)
    values = edit.values.to(flat.dtype)
    flat[..., index] = flat[..., index] + values if edit.add else values.expand(*flat.shape[:2], -1)
    back = flat.reshape(moved.shape)
    return back.squeeze(1) if axis is None else back.movedim(1, axis)


def _reference(model, inputs, prompt, edits, *, use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[batch, prompt + steps]`` and logits ``[steps, batch, vocab]`` of HF ``generate`` with one plain
    forward hook per edit replacing the module's tensor (its output, or its first argument: positional, else the
    first keyword)."""
    modules = dict(model.model.named_modules())
    handles = []

    def on_output(edit):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (_changed(output[0], edit), *output[1:])
            return _changed(output, edit)

        return hook

    def on_input(edit):
        def hook(module, args, kwargs):
            if args:
                return (_changed(args[0], edit), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: _changed(kwargs[key], edit)}

        return hook

    for edit in edits:
        module = modules[edit.point.module]
        if edit.point.io == "output":
            handles.append(module.register_forward_hook(on_output(edit)))
        else:
            handles.append(module.register_forward_pre_hook(on_input(edit), with_kwargs=True))
    kwargs = {**inputs.kwargs, **model.adapter.prompt_kwargs(model.model, prompt), "decoder_input_ids": prompt}
    try:
        with torch.inference_mode(), model.adapter.batch_guard(model.model, inputs):
            out = model.model.generate(
                **kwargs, **greedy_kwargs(STEPS), min_new_tokens=STEPS, use_cache=use_cache,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    return out.sequences, torch.stack(out.logits)


def _ours(model, inputs, prompt, edits, **options) -> tuple[torch.Tensor, torch.Tensor]:
    model.modules_run_every_step(inputs, prompt)  # found once per model, before the head is watched
    seen = []
    head = model.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, output: seen.append(output[:, -1].detach().clone()))
    min_new = model.model.generation_config.min_new_tokens
    model.model.generation_config.min_new_tokens = STEPS  # every example takes every step, as in the reference
    try:
        generation, _ = model.generate_edited(inputs, prompt, edits, STEPS, **options)
    finally:
        handle.remove()
        model.model.generation_config.min_new_tokens = min_new
    return generation.sequences, torch.stack(seen)


def _same(model, inputs, prompt, edits, reference, recorded="text_decoder.layers.1.ffn.fc1"):
    """Folded, hooked and traced (recording ``recorded``: the nnsight path) all give ``reference``."""
    tokens, logits = reference
    runs = {"fold": {"fold": True}, "hooks": {"fold": False}, "nnsight": {"record": [model.hook_points.get(recorded)]}}
    for name, options in runs.items():
        got_tokens, got_logits = _ours(model, inputs, prompt, edits, **options)
        assert torch.equal(got_tokens[:, -tokens.shape[1] :], tokens[:, -got_tokens.shape[1] :]), name
        assert torch.allclose(got_logits, logits, atol=1e-4, rtol=1e-4), (name, (got_logits - logits).abs().max())


@pytest.fixture(scope="module")
def seamless(tiny_model_dir):
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    randomise(model, seed=11, scale=0.05)
    inputs = model.source_inputs(["Das Wetter ist heute sehr schön, sagt man.", "Il fait beau."], ["deu", "fra"])
    return model, inputs, model.decoder_prompt(["eng", "eng"])


def _edit(model, name, neurons, add=False, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    values = scale * torch.randn(len(neurons), generator=generator)
    return NeuronEdit(model.hook_points.get(name), torch.tensor(neurons), values, add)


def test_keys_the_cache_hands_back_are_replaced_and_never_shifted_twice(seamless):
    """hook_rot_k is called with the cache's keys (every position so far), in place: a replacement there equals
    the reference; a shift was added again at every later step (the prompt's keys shifted steps + 1 times, other
    tokens than without the cache) and is refused; the same shift of k_proj (before the cache) equals it."""
    model, inputs, prompt = seamless
    rot_k = "text_decoder.layers.0.self_attn.hook_rot_k"
    neurons = list(range(0, 64, 3))
    replace = [_edit(model, rot_k, neurons, seed=1)]
    reference = _reference(model, inputs, prompt, replace, use_cache=False)
    assert torch.equal(reference[0], _reference(model, inputs, prompt, replace, use_cache=True)[0])
    _same(model, inputs, prompt, replace, reference)
    shift = [_edit(model, rot_k, neurons, add=True, seed=1)]
    reference = _reference(model, inputs, prompt, shift, use_cache=False)
    for options in ({"fold": True}, {"record": [model.hook_points.get("text_decoder.layers.1.ffn.fc1")]}):
        with pytest.raises(UserError, match=r"hook_rot_k: a shift of the keys cannot be made during generation .*"
                                            r"text_decoder.layers.0.self_attn.k_proj"):  # fmt: skip
            model.generate_edited(inputs, prompt, shift, STEPS, **options)
    k_proj = model.hook_points.get("text_decoder.layers.0.self_attn.k_proj")
    k_proj = [NeuronEdit(k_proj, shift[0].neurons, shift[0].values, add=True)]
    _same(model, inputs, prompt, k_proj, reference)


@pytest.mark.parametrize("add", [False, True], ids=["replace", "shift"])
def test_inputs_passed_by_keyword_are_edited(seamless, add):
    """The attention modules take ``hidden_states=`` by keyword: their ``:input`` hook point is that tensor."""
    model, inputs, prompt = seamless
    edits = [_edit(model, "text_decoder.layers.0.self_attn:input", [0, 5, 9, 33], add, seed=2)]
    reference = _reference(model, inputs, prompt, edits, use_cache=False)
    _same(model, inputs, prompt, edits, reference)
