"""Interventions in a plain forward pass (``run_with_hooks``, ``run_with_edits``) and ``generate(edits=...)``,
each against plain torch hooks making the same change on the module's own tensor."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch

import hookpoints as hp
from hookpoints.attention import eager
from hookpoints.errors import UserError
from tests.api_helpers import randomise, sine

TEXTS = ["the quick brown fox jumps over", "a lazy dog"]


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    model = hp.load(tiny_model_dir("gpt2"))
    randomise(model)
    return model


@contextmanager
def torch_hook(model, module_path: str, change, *, on_input: bool = False):
    """A plain forward (pre-)hook that calls ``change(tensor)`` on the module's first output (or input)."""
    module = dict(model.model.named_modules())[module_path]
    if on_input:
        handle = module.register_forward_pre_hook(lambda m, args: change(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, a, out: change(out[0] if isinstance(out, tuple) else out))
    try:
        yield
    finally:
        handle.remove()


def reference_logits(model, texts, module_path, change, **options):
    inputs = model.inputs(texts)
    with torch.inference_mode(), torch_hook(model, module_path, change, **options):
        return model.model(**inputs.kwargs).logits


def test_ablate_a_slice_of_a_fused_projection(gpt2):
    d = gpt2.model.config.n_embd
    out = gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.attn.hook_v", hp.ablate([1, 5]))]).logits

    def change(t):  # c_attn's output is [q | k | v]: v's neurons 1 and 5 sit at 2d + 1 and 2d + 5
        t[..., [2 * d + 1, 2 * d + 5]] = 0.0

    assert torch.allclose(out, reference_logits(gpt2, TEXTS, "transformer.h.0.attn.c_attn", change), atol=1e-6)
    plain = gpt2.run_with_hooks(TEXTS).logits
    assert not torch.allclose(out, plain, atol=1e-4)  # the edit did change the output


def test_edit_of_a_per_head_input_equals_a_torch_pre_hook(gpt2):
    edit = gpt2.edit("blocks.1.attn.hook_z", [0, 17, 63], [1.5, -2.0, 0.25])
    out = gpt2.run_with_edits(TEXTS, [edit]).logits

    def change(t):
        t[..., [0, 17, 63]] = torch.tensor([1.5, -2.0, 0.25])

    reference = reference_logits(gpt2, TEXTS, "transformer.h.1.attn.c_proj", change, on_input=True)
    assert torch.allclose(out, reference, atol=1e-6)

    # the same edit as a hook function on [batch, pos, head, d_head]: head 1 dim 1 is neuron 17
    def fn(x, hook):
        assert x.shape[-2:] == (4, 16) and hook.name == "blocks.1.attn.hook_z"
        x[..., 0, 0], x[..., 1, 1], x[..., 3, 15] = 1.5, -2.0, 0.25  # in place, returns None

    assert torch.allclose(gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.1.attn.hook_z", fn)]).logits, out, atol=1e-6)


def test_steer_and_mean_ablate_equal_torch_hooks(gpt2):
    vector = torch.linspace(-1, 1, gpt2.model.config.n_embd)
    out = gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.hook_resid_post", hp.steer(vector, 3.0))]).logits
    reference = reference_logits(gpt2, TEXTS, "transformer.h.0", lambda t: t.add_(3.0 * vector))
    assert torch.allclose(out, reference, atol=1e-5)

    others = ["seven birds sing", "over the lazy fox and the dog"]
    _, cache = gpt2.run_with_cache(others, names="blocks.0.mlp.hook_post")
    x, mask = cache["blocks.0.mlp.hook_post"], cache.mask
    mean = x[mask].mean(0)  # [d_mlp] over the other texts' real tokens
    out = gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.mlp.hook_post", hp.mean_ablate(cache, [2, 9]))]).logits

    def change(t):
        t[..., [2, 9]] = mean[[2, 9]]

    assert torch.allclose(out, reference_logits(gpt2, TEXTS, "transformer.h.0.mlp.act", change), atol=1e-6)


def test_mean_ablation_from_a_pooled_cache_is_over_positions_or_refused(gpt2):
    """A cache pooled by mean (run_with_cache(..., pooling="mean")) averaged its per-example means: a 7-token
    text weighed as much as a 3-token one, while TransformerLens' mean ablation (and cache.mean's docstring)
    averages over every real position. Now it weighs each example's mean by its real positions (the masks
    come with the cache); a cache pooled by last or max cannot give that mean and is refused."""
    others = ["seven birds sing", "over the lazy fox and the dog jumps high"]
    name = "blocks.0.mlp.hook_post"
    _, cache = gpt2.run_with_cache(others, names=name)
    mean = cache[name][cache.mask].mean(0)  # [d_mlp] over the other texts' real tokens
    _, pooled = gpt2.run_with_cache(others, names=name, pooling="mean")
    assert torch.allclose(pooled.mean(name), mean, atol=1e-6)
    expected = gpt2.run_with_hooks(TEXTS, fwd_hooks=[(name, hp.mean_ablate(cache, [2, 9]))]).logits
    out = gpt2.run_with_hooks(TEXTS, fwd_hooks=[(name, hp.mean_ablate(pooled, [2, 9]))]).logits
    assert torch.allclose(out, expected, atol=1e-6)
    for how in ("last", "max"):
        _, other = gpt2.run_with_cache(others, names=name, pooling=how)
        message = f"cannot average {name} over positions: this cache is pooled by {how}; pass a cache from "
        with pytest.raises(UserError, match=rf"^{message}run_with_cache without pooling \(or pooling='mean'\)$"):
            gpt2.run_with_hooks(TEXTS, fwd_hooks=[(name, hp.mean_ablate(other))])


def test_patching_the_last_residual_gives_the_source_logits(gpt2):
    clean = gpt2.inputs(["the quick brown fox"]).kwargs["input_ids"]  # [1, tokens]
    corrupt = clean.flip(1)  # same length, other tokens (token ids are inputs too)
    clean_out, cache = gpt2.run_with_cache(clean, names="blocks.1.hook_resid_post")
    patched = gpt2.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.hook_resid_post", hp.patch(cache))])
    assert torch.allclose(patched.logits, clean_out.logits, atol=1e-5)
    with pytest.raises(UserError, match="cannot patch blocks.0.hook_resid_post: the cache does not hold it"):
        gpt2.run_with_hooks(corrupt, fwd_hooks=[("blocks.*.hook_resid_post", hp.patch(cache))])
    with pytest.raises(UserError, match="cannot patch blocks.1.hook_resid_post: the cache holds shape"):
        gpt2.run_with_hooks(corrupt[:, :-1], fwd_hooks=[("blocks.1.hook_resid_post", hp.patch(cache))])
    _, pooled = gpt2.run_with_cache(clean, names="blocks.1.hook_resid_post", pooling="last")
    with pytest.raises(UserError, match="the cache is pooled \\(last\\), one vector per example"):
        gpt2.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.hook_resid_post", hp.patch(pooled))])


def test_conformer_conv_channels_axis(tiny_model_dir):
    model = hp.load(tiny_model_dir("seamless_m4t_v2"), modality="speech")
    randomise(model, scale=0.05)
    conv = next(p for p in model.select() if p.time_axis == 2)  # [batch, channels, time]
    waves = [sine(0.7), sine(0.4, 300.0)]
    out = model.run_with_hooks(waves, fwd_hooks=[(conv.name, hp.ablate([3], value=0.5))])
    inputs = model.inputs(waves)

    def change(t):
        t[:, 3, :] = 0.5

    with torch.inference_mode(), model.adapter.batch_guard(model.model, inputs), torch_hook(model, conv.module, change):
        reference = model.model(**inputs.kwargs)
    assert torch.allclose(out.logits, reference.logits, atol=1e-5)


def test_generate_with_edits_equals_torch_hooks_during_generate(tiny_model_dir):
    model = hp.load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    randomise(model, scale=0.05)
    inputs = model.source_inputs(["Das Wetter ist schön.", "Il fait beau."], ["deu", "fra"])
    prompt = model.decoder_prompt(["eng", "eng"])
    neurons = list(range(0, 64, 3))
    edit = model.edit("text_decoder.layers.0.hook_resid_post", neurons, 4.0)
    edited = model.generate(inputs, prompt, 8, edits=[edit])

    def change(t):
        t[..., neurons] = 4.0

    with torch_hook(model, edit.point.module, change):
        reference = model.generate(inputs, prompt, 8)
    assert torch.equal(edited.sequences, reference.sequences)

    def set_four(x, hook):  # TransformerLens style, during generate: [batch, pos, d_model]
        x[..., neurons] = 4.0

    hooked = model.generate(inputs, prompt, 8, fwd_hooks=[(edit.point.name, set_four)])
    assert torch.equal(hooked.sequences, reference.sequences)
    assert not torch.equal(edited.sequences, model.generate(inputs, prompt, 8).sequences)


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        ("blocks.0.hook_resid_post", "fwd_hooks must be a list"),
        ([("blocks.0.hook_resid_post",)], "pair"),
        ([("blocks.9.hook_nothing", hp.ablate())], "no hook point is called"),
        ([(3, hp.ablate())], "a hook name must be"),
        (
            [(lambda name: name.endswith("hook_result"), hp.ablate())],
            "names filter of a hook function picks no",
        ),  # ran unhooked
        ([("blocks.0.hook_resid_post", lambda x, hook: x[:, :1])], "returned shape"),
        ([("blocks.0.hook_resid_post", hp.steer(torch.ones(5)))], "steering vector has 5 entries"),
        (
            [("blocks.0.mlp.hook_post", hp.ablate([1000]))],
            "neuron 1000 is out of range for hook blocks.0.mlp.hook_post",
        ),
        ([("blocks.0.mlp.hook_post", hp.ablate([-1]))], "neuron -1 is out of range"),  # was the last neuron
    ],
)
def test_bad_hooks_are_one_line_user_errors(gpt2, hooks, message):
    with pytest.raises(UserError) as caught:
        gpt2.run_with_hooks(TEXTS, fwd_hooks=hooks)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bad_edits_are_user_errors(gpt2):
    with pytest.raises(UserError, match="out of range"):
        gpt2.edit("blocks.0.mlp.hook_post", [10_000], [0.0])
    with pytest.raises(UserError, match="no hook point is called"):
        gpt2.edit("blocks.0.mlp.nothing", [1], [0.0])
    with pytest.raises(UserError, match="2 neuron indices but 3 values"):
        gpt2.edit("blocks.0.mlp.hook_post", [1, 2], [0.0, 1.0, 2.0])


# -- hook functions on derived hook points, attention maps and broadcast tensors ----------------------------


def test_hook_function_on_a_derived_norm_point_sees_its_value_and_cannot_change_it(gpt2):
    """``ln1.hook_normalized`` is computed from the norm's input: a hook function reads that value (as
    run_with_cache gives it), and changing it is refused instead of silently editing the norm's input."""
    seen = {}

    def read(x, hook):
        seen[hook.name] = x.clone()

    names = ["blocks.0.ln1.hook_normalized", "blocks.0.ln1.hook_scale"]
    out = gpt2.run_with_hooks(TEXTS, fwd_hooks=[(name, read) for name in names])
    _, cache = gpt2.run_with_cache(TEXTS, names=[*names, "blocks.0.hook_resid_pre"])
    x = cache["blocks.0.hook_resid_pre"]  # by hand, as TransformerLens: centre, divide by the scale
    centred = x - x.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + gpt2.model.config.layer_norm_epsilon).sqrt()
    torch.testing.assert_close(seen["blocks.0.ln1.hook_scale"], scale)
    torch.testing.assert_close(seen["blocks.0.ln1.hook_normalized"], centred / scale)
    assert torch.equal(out.logits, gpt2.run_with_hooks(TEXTS).logits)  # reading changed nothing
    for change in (lambda x, hook: x * 0, lambda x, hook: x.mul_(2)):
        with pytest.raises(UserError, match="blocks.0.ln1.hook_normalized is computed from") as caught:
            gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.ln1.hook_normalized", change)])
        assert "\n" not in str(caught.value)


def test_hook_function_on_the_attention_pattern_changes_the_output(gpt2):
    """TransformerLens' pattern ablation: the function gets [batch, head, query, key] and its result is what the
    attention multiplies the values by (the SDPA fast path would never call it)."""
    heads = gpt2.model.config.n_head
    d_head = gpt2.model.config.n_embd // heads
    calls = []

    def uniform_head_1(pattern, hook):
        calls.append(pattern.shape)
        keep = pattern[:, 1] > 0  # the causal, unpadded keys of each query
        pattern[:, 1] = keep / keep.sum(-1, keepdim=True)  # head 1 averages over them

    out = gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform_head_1)]).logits
    inputs = gpt2.inputs(TEXTS)
    batch, pos = inputs.kwargs["input_ids"].shape
    assert calls == [(batch, heads, pos, pos)]
    _, cache = gpt2.run_with_cache(TEXTS, names="blocks.0.attn.hook_v")
    v = cache["blocks.0.attn.hook_v"]  # [batch, key, head, d_head]
    causal = torch.ones(pos, pos, dtype=torch.bool).tril()
    keep = causal[None] & inputs.kwargs["attention_mask"].bool()[:, None, :]  # [batch, query, key]
    mean_v = (keep.float() / keep.sum(-1, keepdim=True)) @ v[:, :, 1]  # [batch, query, d_head]

    def change(z):  # c_proj's input: [batch, pos, heads * d_head]; head 1's slice
        z[..., d_head : 2 * d_head] = mean_v

    reference = reference_logits(gpt2, TEXTS, "transformer.h.0.attn.c_proj", change, on_input=True)
    valid = inputs.kwargs["attention_mask"].bool()
    torch.testing.assert_close(out[valid], reference[valid], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[valid], gpt2.run_with_hooks(TEXTS).logits[valid], atol=1e-4)


def test_hook_function_on_position_embeddings_sees_the_batch(gpt2):
    """``hook_pos_embed`` is [batch, pos, d] in the cache and in a hook function (as in TransformerLens), and
    an example's own change stays in that example."""
    _, cache = gpt2.run_with_cache(TEXTS, names="hook_pos_embed")
    shapes = []

    def zero_first(x, hook):
        shapes.append(x.shape)
        x[0] = 0.0  # the first example's position embeddings only

    out = gpt2.run_with_hooks(TEXTS, fwd_hooks=[("hook_pos_embed", zero_first)]).logits
    assert shapes == [cache["hook_pos_embed"].shape]
    plain = gpt2.run_with_hooks(TEXTS).logits
    assert torch.equal(out[1], plain[1])  # the second example is untouched
    reference = reference_logits(gpt2, TEXTS[:1], "transformer.wpe", lambda t: t.zero_())
    torch.testing.assert_close(out[0, : reference.shape[1]], reference[0], atol=1e-5, rtol=1e-5)
    patched = gpt2.run_with_hooks(TEXTS, fwd_hooks=[("hook_pos_embed", hp.patch(cache))]).logits
    assert torch.equal(patched, plain)


@pytest.mark.parametrize("returned", [3, "x", [1.0]])
def test_hook_function_returning_no_tensor_is_a_user_error(gpt2, returned):
    with pytest.raises(UserError, match="hook function for blocks.0.hook_resid_post returned") as caught:
        gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: returned)])
    assert "\n" not in str(caught.value)


def test_bad_edit_arguments_are_user_errors(gpt2):
    with pytest.raises(UserError, match=r"neuron indices must be whole numbers, not 1.5"):
        gpt2.edit("blocks.0.mlp.hook_post", [1.5], [0.0])  # was silently neuron 1
    edit = gpt2.edit("blocks.0.mlp.hook_post", [1], [0.0])
    with pytest.raises(UserError, match="edits must be a list of NeuronEdit"):
        gpt2.run_with_edits(TEXTS, edit)
    with pytest.raises(UserError, match="edits must be a list of NeuronEdit"):
        gpt2.run_with_edits(TEXTS, ["blocks.0.mlp.hook_post"])


def test_a_decoder_prompt_for_a_decoder_only_lm_is_a_user_error(gpt2):
    """GPT-2 continues its inputs (tests/test_continue.py): a decoder prompt, with or without edits, is refused."""
    edit = gpt2.edit("blocks.0.mlp.hook_post", [1], [0.0])
    for call in (
        lambda: gpt2.decoder_prompt(["eng"]),
        lambda: gpt2.generate(TEXTS, torch.tensor([[1], [1]]), 3),
        lambda: gpt2.generate(TEXTS, torch.tensor([[1], [1]]), 3, edits=[edit]),
    ):
        with pytest.raises(UserError, match="is a decoder-only LM: it continues its inputs") as caught:
            call()
        assert "\n" not in str(caught.value)


def test_ready_made_hook_function_arguments(gpt2):
    _, cache = gpt2.run_with_cache(TEXTS, names="blocks.0.mlp.hook_post")
    with pytest.raises(UserError, match="neuron 1000 is out of range"):
        gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.mlp.hook_post", hp.mean_ablate(cache, [1000]))])
    with pytest.raises(UserError, match="steering vector must be numbers"):
        hp.steer("abc")
    one = gpt2.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.mlp.hook_post", hp.ablate(3))]).logits  # an int: one neuron

    def change(t):
        t[..., 3] = 0.0

    reference = reference_logits(gpt2, TEXTS, "transformer.h.0.mlp.act", change)
    assert torch.allclose(one, reference, atol=1e-6)


def test_ready_made_hook_functions_on_an_attention_map_use_the_stores_neuron_numbers(gpt2):
    """A map's neuron ``n`` is head ``n // keys``, key ``n % keys`` (a stored row: [head * keys] per query), as
    NeuronEdit and the store number it; ablate([n]) once zeroed query 0, key ``n`` of every head (a no-op under
    the causal mask) and steer raised a bare RuntimeError."""
    name = "blocks.0.attn.hook_pattern"
    point = gpt2.hook_points.get(name)
    keys = point.keys  # the store's key axis: the longest input
    chosen = [1 * keys + 2, 3 * keys + 0]  # head 1 key 2, head 3 key 0
    out = gpt2.run_with_hooks(TEXTS, fwd_hooks=[(name, hp.ablate(chosen, value=0.25))]).logits
    vector = torch.randn(point.width, generator=torch.Generator().manual_seed(0))  # [head * keys]
    steered = gpt2.run_with_hooks(TEXTS, fwd_hooks=[(name, hp.steer(vector, scale=0.5))]).logits

    def shift(pattern):
        pattern += 0.5 * vector.view(point.heads, keys)[None, :, None, : pattern.shape[-1]]

    def change(pattern):  # the module's own [batch, head, query, key] tensor
        pattern[:, 1, :, 2] = 0.25
        pattern[:, 3, :, 0] = 0.25

    with eager():  # the SDPA path never calls the map's hook module
        reference = reference_logits(gpt2, TEXTS, point.module, change)
        shifted = reference_logits(gpt2, TEXTS, point.module, shift)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, gpt2.run_with_hooks(TEXTS).logits, atol=1e-4)
    torch.testing.assert_close(steered, shifted, atol=1e-6, rtol=1e-6)


def greedy_without_cache(model, inputs, prompt, steps: int, hooks=nullcontext) -> torch.Tensor:
    """Greedy decoding by whole forward passes (no KV cache): every call sees the whole sequence once."""
    sequences = prompt
    encoder = {k: v for k, v in inputs.kwargs.items() if k != "decoder_input_ids"}
    with torch.inference_mode(), hooks():
        for _ in range(steps):
            logits = model.model(**encoder, decoder_input_ids=sequences, use_cache=False).logits
            sequences = torch.cat([sequences, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return sequences


def test_steering_the_rotary_keys_during_generate_shifts_each_key_once(tiny_model_dir):
    """``hook_rot_k`` gets the keys after the KV cache was updated: the cache's own tensor. An added edit changed
    it in place, so a cached position was shifted again at every later step (TransformerLens' cache holds the
    keys before this hook) and the text changed, where one shift of every key leaves attention as it is.
    References: greedy decoding without a KV cache, the edit made once per call; the keys recorded unedited."""
    model = hp.load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    randomise(model, scale=0.05)
    inputs = model.source_inputs(["Das Wetter ist schön.", "Il fait beau."], ["deu", "fra"])
    prompt = model.decoder_prompt(["eng", "eng"])
    neurons = list(range(0, 64, 2))
    edit = model.edit("text_decoder.layers.0.self_attn.hook_rot_k", neurons, 3.0, add=True)

    def shift(keys):  # [batch, pos, head, d_head], as the hook module gets them
        keys.view(*keys.shape[:2], -1)[..., neurons] += 3.0

    expected = greedy_without_cache(model, inputs, prompt, 8, lambda: torch_hook(model, edit.point.module, shift))
    assert torch.equal(model.generate(inputs, prompt, 8, edits=[edit]).sequences, expected)  # torch hooks

    def steer_keys(x, hook):  # a hook function on [batch, pos, head, d_head], as TransformerLens passes it
        return (x.flatten(2) + torch.isin(torch.arange(x[0, 0].numel()), torch.tensor(neurons)) * 3.0).view(x.shape)

    steered = model.generate(inputs, prompt, 8, fwd_hooks=[(edit.point.name, steer_keys)])
    assert torch.equal(steered.sequences, expected)
    generation, seen = model.generate_edited(inputs, prompt, [edit], 8, record=[edit.point])  # through nnsight
    assert torch.equal(generation.sequences, expected)
    _, plain = model.generate_edited(inputs, prompt, [], 8, record=[edit.point])
    for step, (edited, unedited) in enumerate(zip(seen[edit.point.name], plain[edit.point.name], strict=True)):
        unedited = unedited.clone()
        unedited[..., neurons] += 3.0  # [batch, pos, width]: every position shifted once, at every step
        torch.testing.assert_close(edited, unedited, atol=1e-5, rtol=1e-5, msg=f"step {step}")


def test_hook_functions_written_for_transformer_lens_call_hook_layer(gpt2):
    """TransformerLens' ``hook.layer()`` is a method: a hook function that calls it (a layer-dependent scale, as
    TransformerLens tutorials write) runs here too, and gives what the same scale written by hand gives."""

    def by_layer(x, hook):
        return x * (1.0 + hook.layer())  # blocks.l.hook_resid_post scaled by l + 1

    def by_hand(x, hook):
        return x * (1.0 + int(hook.name.split(".")[1]))

    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    called = gpt2.run_with_hooks(["a lazy dog"], fwd_hooks=[(name, by_layer) for name in names]).logits
    expected = gpt2.run_with_hooks(["a lazy dog"], fwd_hooks=[(name, by_hand) for name in names]).logits
    plain = gpt2.run_with_hooks(["a lazy dog"], fwd_hooks=[]).logits
    torch.testing.assert_close(called, expected, rtol=0, atol=0)
    assert not torch.allclose(called, plain)  # the scale changed something (layer 1 doubled)
    point = gpt2.hook_points.get("blocks.1.hook_resid_post")
    assert point.layer == 1 and point.layer() == 1 and point.row()["layer"] == 1
