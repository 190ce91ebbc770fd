"""Edited generation against an independent reference: plain torch forward hooks that return a new tensor with
the chosen neurons replaced (or shifted), around HF ``generate`` run WITHOUT the KV cache (every step recomputes
every position, so an edit at a prompt position is made afresh at each step, once). ``generate_edited`` (folded,
hooked, and traced through nnsight) must give the same tokens and the same logits at every step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hookpoints as hp
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
    forward hook per edit replacing the module's tensor (its output, or its input: the first positional argument,
    else the features or hidden states by name, else the first keyword)."""
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
            key = next((k for k in ("input_features", "hidden_states") if k in kwargs), next(iter(kwargs)))
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


def test_keys_the_cache_hands_back_are_replaced_and_shifted_once(seamless):
    """hook_rot_k is called with the cache's keys (every position so far): a replacement there equals the
    reference, and so does a shift (once added in place to the cache's own tensor, so again at every later step:
    the prompt's keys shifted steps + 1 times; the hook now gets a copy, hookpoints.attention._own_keys); the
    same shift of k_proj (before the cache; no rotary in this decoder) equals it too."""
    model, inputs, prompt = seamless
    rot_k = "text_decoder.layers.0.self_attn.hook_rot_k"
    neurons = list(range(0, 64, 3))
    replace = [_edit(model, rot_k, neurons, seed=1)]
    reference = _reference(model, inputs, prompt, replace, use_cache=False)
    assert torch.equal(reference[0], _reference(model, inputs, prompt, replace, use_cache=True)[0])
    _same(model, inputs, prompt, replace, reference)
    shift = [_edit(model, rot_k, neurons, add=True, seed=1)]
    reference = _reference(model, inputs, prompt, shift, use_cache=False)
    _same(model, inputs, prompt, shift, reference)
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


def _mixed(model, decoder: str, encoder: str, cross: str, modules: str) -> list[NeuronEdit]:
    """Every kind of edit on every kind of tensor: replacements of Linear outputs (folded) and of LayerNorm,
    attention-module and layer outputs, per-head q and k (hooks); shifts of each (hooks); an encoder Linear and
    layer, and cross-attention keys/values, which run at step 0 only. ``modules``: the decoder's module path."""
    names = [
        (f"{decoder}.layers.0.fc1", False), (f"{decoder}.layers.1.fc2", True),
        (f"{decoder}.layers.0.self_attn.q_proj", False), (f"{decoder}.layers.1.self_attn.v_proj", True),
        (f"{decoder}.layers.0.{cross}.k_proj", False), (f"{decoder}.layers.1.{cross}.v_proj", False),
        (f"{decoder}.layers.1.final_layer_norm", False), (f"{decoder}.layers.0.self_attn_layer_norm", True),
        (f"{modules}.layers.1.self_attn", False), (f"{modules}.layers.0.{cross}", True),
        (f"{modules}.layers.1.self_attn.hook_rot_q", True), (f"{modules}.layers.1.self_attn.hook_rot_k", False),
        (f"{decoder}.layers.0.hook_resid_post", True), (f"{encoder}.layers.1.fc1", False),
        (f"{encoder}.layers.0.hook_resid_post", False),
    ]  # fmt: skip
    edits = []
    for seed, (name, add) in enumerate(names):
        name = name if name in model.hook_points else name.replace(".fc", ".ffn.fc").replace("final_", "ffn_")
        width = model.hook_points.get(name).width
        edits.append(_edit(model, name, list(range(seed % 3, width, 5)), add, scale=1.0, seed=seed))
    return edits


@pytest.mark.parametrize("batch", [2, 1])
def test_seamless_edits_of_every_kind_equal_plain_hooks_without_the_cache(seamless, batch):
    model, inputs, prompt = seamless
    if batch == 1:
        inputs = model.source_inputs(["Il fait beau."], ["fra"])
        prompt = prompt[:1]
    edits = _mixed(model, "text_decoder", "text_encoder", "cross_attention", "text_decoder")
    reference = _reference(model, inputs, prompt, edits, use_cache=False)
    assert not torch.equal(reference[0], _reference(model, inputs, prompt, [], use_cache=True)[0])  # they matter
    _same(model, inputs, prompt, edits, reference)


def test_whisper_edits_of_every_kind_equal_plain_hooks_without_the_cache(tiny_model_dir):
    model = load(tiny_model_dir("whisper"), modality="speech")
    randomise(model, seed=12, scale=0.05)
    generator = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(16_000, generator=generator), 0.1 * torch.randn(7_000, generator=generator)]
    inputs = model.speech_inputs([wave.numpy() for wave in waves])
    prompt = torch.tensor([[model.model.config.decoder_start_token_id, 5]] * 2)  # the tiny tokenizer has no tasks
    edits = _mixed(model, "text_decoder", "speech_encoder", "encoder_attn", "model.decoder")
    reference = _reference(model, inputs, prompt, edits, use_cache=False)
    assert not torch.equal(reference[0], _reference(model, inputs, prompt, [], use_cache=True)[0])
    _same(model, inputs, prompt, edits, reference, recorded="text_decoder.layers.1.fc1")


def test_a_sweep_steers_keys_as_an_added_edit(seamless):
    """``--kind steer`` of hook_rot_k neurons is an added edit (once refused, while a shift there added up)."""
    from hookpoints.analyses.intervention_sweep import Condition, _edits
    from hookpoints.analyses.interventions import explicit_selection

    model, _, _ = seamless
    hooks = {point.name: (point.component, point.width) for point in model.hook_points if point.unavailable is None}
    selection = explicit_selection(["text_decoder.layers.0.self_attn.hook_rot_k:1,2"], hooks)
    (steer,) = _edits(model, Condition({"kind": "steer"}, selection, np.array([0.5, -0.5])))
    assert steer.add and steer.neurons.tolist() == [1, 2]
    (edit,) = _edits(model, Condition({"kind": "median"}, selection, np.array([0.5, -0.5])))
    assert not edit.add and edit.neurons.tolist() == [1, 2]


def test_input_edits_while_recording_land_before_the_padding_is_zeroed(tiny_model_dir):
    """SeamlessM4T's batch guard zeroes a padded speech batch's frames before the adaptor's strided convolutions
    (pre-hooks). The traced path (recording) edited those convolutions' inputs after the guard, inside nnsight's
    forward, so the edit values at padding frames reached the short example's last positions."""
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="speech")
    randomise(model, seed=11, scale=0.05)
    generator = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(16_000, generator=generator), 0.1 * torch.randn(6_000, generator=generator)]
    inputs = model.speech_inputs([wave.numpy() for wave in waves])
    assert not bool(inputs.masks["input"].all())  # padded
    prompt = model.decoder_prompt(["eng", "eng"])
    edits = [_edit(model, "speech_encoder.adapter.layers.0.residual_conv:input", list(range(0, 64, 3)), seed=5)]
    reference = _reference(model, inputs, prompt, edits, use_cache=False)
    _same(model, inputs, prompt, edits, reference)
    recorded = model.hook_points.get("speech_encoder.adapter.layers.0.residual_conv:input")
    _, seen = model.generate_edited(inputs, prompt, edits, STEPS, record=[recorded])
    (tensor,) = seen[recorded.name]  # [batch, frames, channels]: edited at the real frames, zero at padding
    valid = inputs.masks["input"][:, : tensor.shape[1]]
    assert torch.equal(tensor[valid][:, edits[0].neurons], edits[0].values.expand(int(valid.sum()), -1))
    assert not bool(tensor[~valid].any())


def _model_state(model) -> tuple:
    """Every parameter and buffer (non-persistent ones too) as bytes, every hook, the attention settings."""
    from hookpoints import attention

    tensors = {name: t.detach().clone() for name, t in model.model.named_parameters(remove_duplicate=False)}
    tensors |= {f"buffer:{name}": t.clone() for name, t in model.model.named_buffers(remove_duplicate=False)}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules())
    settings = (
        getattr(attention._STATE, "eager", False),
        [getattr(m.config, "_attn_implementation", None) for m in model.model.modules() if hasattr(m, "config")],
        model.model.generation_config.to_json_string(),
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
    )
    return tensors, hooks, settings


def _unchanged(before: tuple, after: tuple) -> bool:
    same_bits = before[0].keys() == after[0].keys() and all(
        torch.equal(before[0][k].view(torch.uint8), after[0][k].view(torch.uint8))
        if before[0][k].is_floating_point()
        else torch.equal(before[0][k], after[0][k])
        for k in before[0]
    )
    return same_bits and before[1:] == after[1:]


@pytest.mark.parametrize("path", ["fold", "hooks", "nnsight"])
def test_the_model_is_bit_identical_after_a_generation_stopped_half_way(seamless, path):
    model, inputs, prompt = seamless
    edits = _mixed(model, "text_decoder", "text_encoder", "cross_attention", "text_decoder")
    edits.append(_edit(model, "text_decoder.layers.1.self_attn:input", [3, 4], seed=20))
    pattern = model.hook_points.get("text_decoder.layers.0.self_attn.hook_pattern")  # eager attention inside
    options = {"fold": {"fold": True}, "hooks": {"fold": False}, "nnsight": {"record": [pattern]}}[path]
    model.modules_run_every_step(inputs, prompt)
    before = _model_state(model)
    calls = []

    def stop_at_step_three(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = model.model.get_output_embeddings().register_forward_hook(stop_at_step_three)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate_edited(inputs, prompt, edits, STEPS, **options)
    finally:
        handle.remove()
    assert _unchanged(before, _model_state(model))
    model.generate_edited(inputs, prompt, edits, STEPS, **options)
    assert _unchanged(before, _model_state(model))


@pytest.mark.parametrize(
    ("family", "name"),
    [("seamless_m4t_v2", "speech_encoder.feature_projection:input"), ("whisper", "model.encoder.conv1:input")],
)
def test_an_input_edit_never_changes_the_callers_features(tiny_model_dir, family, name):
    """The feature projection (Whisper: conv1) is handed the caller's input_features itself: an edit of its input
    changed them in place, so every later generation from those inputs (a sweep's next condition) started from
    features edited by the conditions before it."""
    model = load(tiny_model_dir(family), modality="speech")
    randomise(model, seed=13, scale=0.05)
    generator = torch.Generator().manual_seed(1)
    inputs = model.speech_inputs([0.1 * torch.randn(12_000, generator=generator).numpy()])
    start = model.model.config.decoder_start_token_id
    prompt = model.decoder_prompt(["eng"]) if family == "seamless_m4t_v2" else torch.tensor([[start, 5]])
    features = inputs.kwargs["input_features"].clone()
    first, second = (_edit(model, name, list(range(i, 40, 2)), scale=4.0, seed=i) for i in (0, 1))
    reference = _reference(model, inputs, prompt, [second], use_cache=False)
    model.generate_edited(inputs, prompt, [first], STEPS)
    model.generate_edited(inputs, prompt, [first], STEPS, record=[model.hook_points.get(name)])
    model.run_with_edits(inputs, [first])
    model.run_with_hooks(inputs, fwd_hooks=[(name, hp.ablate([0, 3]))])
    assert torch.equal(inputs.kwargs["input_features"], features)
    _same(model, inputs, prompt, [second], reference, recorded=name)


@pytest.mark.parametrize(
    ("family", "name"), [("seamless_m4t_v2", "speech_encoder:input"), ("whisper", "model.encoder:input")]
)
def test_an_encoders_input_is_edited_in_generation_as_in_a_forward_pass(tiny_model_dir, family, name):
    """generate calls the encoder with keywords, input_features last (``encoder(attention_mask=..., ...,
    input_features=...)``): the edit took the first keyword (the mask, or None) and raised a UserError."""
    model = load(tiny_model_dir(family), modality="speech")
    randomise(model, seed=14, scale=0.05)
    generator = torch.Generator().manual_seed(2)
    inputs = model.speech_inputs([0.1 * torch.randn(12_000, generator=generator).numpy()])
    start = model.model.config.decoder_start_token_id
    prompt = model.decoder_prompt(["eng"]) if family == "seamless_m4t_v2" else torch.tensor([[start, 5]])
    edits = [_edit(model, name, list(range(0, 80, 2)), scale=30.0, seed=3)]
    reference = _reference(model, inputs, prompt, edits, use_cache=False)
    assert not torch.equal(reference[1], _reference(model, inputs, prompt, [], use_cache=True)[1])
    _same(model, inputs, prompt, edits, reference, recorded=name)
    _, seen = model.generate_edited(inputs, prompt, edits, STEPS, record=[edits[0].point])
    (features,) = seen[name]  # recorded at step 0 (the encoder runs once), edited
    assert torch.equal(features[..., edits[0].neurons], edits[0].values.expand(*features.shape[:2], -1))


def test_a_decoder_only_lm_under_generate_edits_the_keys_once(tiny_model_dir):
    """Llama (left-padded batch, HF generate inside edits_applied): a replacement and a shift of hook_rot_k
    (after rotary) equal plain hooks without the cache (a shift was re-added to the cached keys at every step)."""
    from hookpoints.edit_folding import edits_applied

    model = hp.load(tiny_model_dir("llama"))
    randomise(model, seed=3, scale=0.05)
    batch = dict(model.tokenizer(["Hello there my friend, how are you", "Hi"], padding=True, padding_side="left",
                                 return_tensors="pt"))  # fmt: skip
    options = {"max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False, "output_logits": True,
               "return_dict_in_generate": True}  # fmt: skip
    replace = _edit(model, "blocks.0.attn.hook_rot_k", list(range(0, 32, 3)), seed=2)
    shift = NeuronEdit(replace.point, replace.neurons, replace.values, add=True)
    module = model.model.get_submodule(replace.point.module)
    for edit in (replace, shift):
        handle = module.register_forward_hook(lambda m, args, output, edit=edit: _changed(output, edit))
        try:
            with torch.inference_mode():
                reference = model.model.generate(**batch, **options, use_cache=False)
        finally:
            handle.remove()
        with edits_applied(model.model, [edit]), torch.inference_mode():
            ours = model.model.generate(**batch, **options)
        assert torch.equal(ours.sequences, reference.sequences), edit.add
        assert torch.allclose(torch.stack(ours.logits), torch.stack(reference.logits), atol=1e-4, rtol=1e-4)


def test_non_finite_values_are_refused_when_the_edit_is_made(seamless):
    """A NaN value gave NaN logits on the hook path and, folded, a RuntimeError blaming the layer's input."""
    model, _, _ = seamless
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(UserError, match=rf"ffn.fc1: value {value} for neuron 2 is not a finite number"):
            model.edit("text_decoder.layers.0.ffn.fc1", [1, 2], [0.0, value])
