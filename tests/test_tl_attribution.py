"""model.cfg, the unembedding accessors and the cache's direct logit attribution equal TransformerLens 3.9's.

The peer is TransformerLens' HookedTransformer loaded from the same tiny checkpoint with every processing step off
(tests/test_transformerlens_names.py), every norm gain and bias random (hookpoints.tiny); the logit identities are
checked against the HF model's own logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_transformerlens_names import TEXT, transformerlens_model

from hookpoints.errors import UserError
from hookpoints.loading import load

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # HookedTransformer is deprecated in 3.9


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    """``pair(family)``: (hookpoints model, TransformerLens peer), both from one folder named ``model``."""
    made = {}

    def make(family: str):
        if family not in made:
            scratch = tmp_path_factory.mktemp("peer")  # not the family: TL reads "llama" in a path
            peer = transformerlens_model(family, tiny_model_dir(family), scratch)
            model = load(scratch / "model")  # the copy: TransformerLens names the model after its folder
            if family != "bert":
                peer.set_tokenizer(model.tokenizer)
            made[family] = model, peer
        return made[family]

    return make


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    torch.testing.assert_close(actual.float(), expected.float(), atol=5e-5, rtol=5e-5, msg=msg)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_cfg_and_weights_equal_transformerlens(pair, family):
    model, peer = pair(family)
    for field in dataclasses.fields(model.cfg):
        assert getattr(model.cfg, field.name) == getattr(peer.cfg, field.name), field.name
    for name in ("W_E", "W_pos", "W_U", "b_U"):
        if family == "llama" and name == "W_pos":
            with pytest.raises(UserError, match="rotary positions"):
                _ = model.W_pos
        elif family == "bert" and name in ("W_U", "b_U"):  # hookpoints loads BertModel: no MLM head
            with pytest.raises(UserError, match="has no LM head"):
                getattr(model, name)
        else:
            assert torch.equal(getattr(model, name), getattr(peer, name)), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tokens_to_residual_directions_equal_transformerlens(pair, family):
    model, peer = pair(family)
    word = model.to_str_tokens(TEXT)[1]
    ids = model.to_tokens([TEXT])
    for tokens in (word, 7, torch.tensor(7), torch.tensor([7]), ids[:, 0], ids, ids[0, :3]):
        close(model.tokens_to_residual_directions(tokens), peer.tokens_to_residual_directions(tokens), repr(tokens))
    assert model.to_single_token(word) == peer.to_single_token(word)


def caches(model, peer, ids, mask=None):
    _, cache = model.run_with_cache(ids if mask is None else {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        _, expected = peer.run_with_cache(ids, attention_mask=mask)
    return cache, expected


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decompose_and_accumulated_resid_equal_transformerlens(pair, family):
    model, peer = pair(family)
    ids = model.to_tokens([TEXT])
    cache, expected = caches(model, peer, torch.cat([ids, ids.roll(3, 1)]))  # [2, pos], no padding
    layers = model.cfg.n_layers
    for layer in (None, -1, 0, 1, layers):
        for mlp_input in (False, True) if layer in (0, 1) else (False,):
            for apply_ln in (False, True):
                for mode in ("all", "attn", "mlp"):
                    for pos_slice in (None, -1, (1, 4), [0, 2]):
                        empty = layer == 0 and not (mlp_input and mode != "mlp")  # nothing but the embeddings
                        for incl_embeds in (True,) if empty else (True, False):
                            kwargs = dict(mlp_input=mlp_input, apply_ln=apply_ln, mode=mode, pos_slice=pos_slice)
                            kwargs.update(incl_embeds=incl_embeds, return_labels=True)
                            got, labels = cache.decompose_resid(layer, **kwargs)
                            want, want_labels = expected.decompose_resid(layer, **kwargs)
                            assert labels == want_labels
                            close(got, want, f"decompose_resid({layer}, {kwargs})")
            for incl_mid in (False, True):
                for pos_slice in (None, -1, (1, 4)):
                    kwargs = dict(incl_mid=incl_mid, apply_ln=True, pos_slice=pos_slice, mlp_input=mlp_input)
                    got, labels = cache.accumulated_resid(layer, return_labels=True, **kwargs)
                    want, want_labels = expected.accumulated_resid(layer, return_labels=True, **kwargs)
                    assert labels == want_labels
                    close(got, want, f"accumulated_resid({layer}, {kwargs})")
    stack, want_stack = cache.decompose_resid(), expected.decompose_resid()
    for layer, mlp_input in ((None, False), (0, False), (1, True)):
        for batch_slice in (None, 1, (1,), [1, 0]):
            got = cache.apply_ln_to_stack(stack, layer, mlp_input, batch_slice=batch_slice)
            close(got, expected.apply_ln_to_stack(want_stack, layer, mlp_input, batch_slice=batch_slice))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logit_attrs_equal_transformerlens(pair, family):
    model, peer = pair(family)
    ids = model.to_tokens([TEXT])
    ids = torch.cat([ids, ids.roll(3, 1)])
    cache, expected = caches(model, peer, ids)
    word = model.to_str_tokens(TEXT)[1]
    last, want_last = cache.decompose_resid(pos_slice=-1), expected.decompose_resid(pos_slice=-1)
    for tokens, wrong in ((ids[:, -1], ids[:, -1].roll(1)), (5, 9), (torch.tensor(5), torch.tensor(9)), (word, 9)):
        for incorrect in (None, wrong):
            got = cache.logit_attrs(last, tokens, incorrect, pos_slice=-1)
            close(got, expected.logit_attrs(want_last, tokens, incorrect, pos_slice=-1), f"{tokens!r} {incorrect!r}")
            assert got.shape == (len(last), 2)  # [components, batch]
    full, want_full = cache.decompose_resid(apply_ln=False), expected.decompose_resid(apply_ln=False)
    close(cache.logit_attrs(full, ids, ids.roll(1, 1)), expected.logit_attrs(want_full, ids, ids.roll(1, 1)))
    one = cache.logit_attrs(full, ids[1:], batch_slice=[1])  # the stack's batch axis is sliced too
    close(one, expected.logit_attrs(want_full, ids[1:], batch_slice=[1]))
    single = model.run_with_cache(ids[:1], remove_batch_dim=True)[1]  # TransformerLens' has_batch_dim=False
    with torch.no_grad():
        want_single = peer.run_with_cache(ids[:1], remove_batch_dim=True)[1]
    stack = single.decompose_resid(apply_ln=False)
    close(stack, want_single.decompose_resid())
    got = single.logit_attrs(stack, ids[0], has_batch_dim=False)
    close(got, want_single.logit_attrs(want_single.decompose_resid(), ids[0], has_batch_dim=False))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attributions_sum_to_the_hf_logits(tiny_model_dir, family):
    """Plain torch: the components through the cached final scale, given the final norm's gain and bias, give the
    HF model's logits; with a unit gain and no bias, the logit attributions sum to the logit (less b_U) and to
    the logit difference, exactly TransformerLens' identity for folded weights (for LN and RMS alike)."""
    model = load(tiny_model_dir(family))
    texts = ["The weather is nice today", "a calm river, and the weather"]
    ids, mask = model.to_tokens(texts), model.inputs(texts).masks["input"]
    head = model.model.get_output_embeddings()
    final = model.model.base_model.get_submodule("ln_f" if family == "gpt2" else "norm")
    with torch.no_grad():
        logits = model.model(input_ids=ids, attention_mask=mask.long()).logits  # [batch, pos, d_vocab]
    _, cache = model.run_with_cache(texts)
    parts = cache.decompose_resid(apply_ln=True)  # [components, batch, pos, d_model]
    real = mask.bool()
    assert not real.all()  # padded
    normed = parts.sum(0) * final.weight + (final.bias if getattr(final, "bias", None) is not None else 0)
    close((normed @ head.weight.T)[real], logits[real], "given the gain and bias")
    assert parts[:, ~real].isnan().all()  # padding: NaN, not a value
    with torch.no_grad():  # the cache stays right: the final norm's gain and bias change neither stream nor scale
        final.weight.fill_(1.0)
        if getattr(final, "bias", None) is not None:
            final.bias.zero_()
        logits = model.model(input_ids=ids, attention_mask=mask.long()).logits
    right, wrong = ids.roll(-1, 1), ids.roll(2, 1)  # [batch, pos]: a token per position
    attrs = cache.logit_attrs(cache.decompose_resid(), right)  # the raw stack: logit_attrs scales it
    diff = cache.logit_attrs(cache.decompose_resid(), right, wrong)
    at = logits.gather(-1, right[..., None])[..., 0]
    close((attrs.sum(0) + model.b_U[right])[real], at[real], "logit")
    close(diff.sum(0)[real], (at - logits.gather(-1, wrong[..., None])[..., 0])[real], "logit difference")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_batch_equals_transformerlens_at_real_positions(pair, family):
    model, peer = pair(family)
    texts = [TEXT, "a calm river", "The weather"]
    inputs = model.inputs(texts)
    ids, mask = inputs.kwargs["input_ids"], inputs.kwargs["attention_mask"]
    cache, expected = caches(model, peer, ids, mask)
    real = mask.bool()
    got, want = cache.decompose_resid(apply_ln=True), expected.decompose_resid(apply_ln=True)
    close(got[:, real], want[:, real])
    assert got[:, ~real].isnan().all()
    lens, want_lens = cache.accumulated_resid(apply_ln=True), expected.accumulated_resid(apply_ln=True)
    close(lens[:, real], want_lens[:, real])
    assert lens[:, ~real].isnan().all()
    attrs = cache.logit_attrs(cache.decompose_resid(), ids)
    close(attrs[:, real], expected.logit_attrs(expected.decompose_resid(), ids)[:, real])
    assert attrs[:, ~real].isnan().all()
    close(
        cache.logit_attrs(cache.decompose_resid(pos_slice=0), 5, pos_slice=0),
        expected.logit_attrs(expected.decompose_resid(pos_slice=0), 5, pos_slice=0),
    )  # position 0 is real in every example
    with pytest.raises(UserError, match=r"position -1 is padding in example\(s\) \[1, 2\]"):
        cache.logit_attrs(cache.decompose_resid(pos_slice=-1), 5, pos_slice=-1)


def test_token_ids_that_do_not_match_the_stacks_examples_are_refused(pair):
    """``[batch]`` ids against a stack that keeps positions would broadcast along the position axis when there
    are as many positions as examples (TransformerLens 3.9 silently does): refused; ``[batch, pos]`` ids, and a
    ``[pos]`` row for a one-example stack, are the ids per position."""
    model, _ = pair("gpt2")
    ids = model.to_tokens([TEXT])[:, :3].repeat(3, 1)  # [3, 3]: as many positions as examples
    ids[1], ids[2] = ids[1].roll(1), ids[2].roll(2)
    _, cache = model.run_with_cache(ids)
    stack = cache.decompose_resid()  # [components, 3, 3, d_model]
    answers = torch.tensor([5, 6, 7])  # one per example
    with pytest.raises(UserError, match=r"tokens of shape \(3,\) do not fit the stack's \(3, 3\)"):
        cache.logit_attrs(stack, answers)
    with pytest.raises(UserError, match=r"incorrect_tokens"):
        cache.logit_attrs(stack, answers[:, None].expand(3, 3), torch.tensor([1, 2, 3]))
    per_position = cache.logit_attrs(stack, answers[:, None].expand(3, 3))
    assert per_position.shape == (len(stack), 3, 3)
    last = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), answers, pos_slice=-1)  # [components, batch]
    close(last, per_position[:, :, -1])
    _, one = model.run_with_cache(ids[:1])
    row = one.logit_attrs(one.decompose_resid(), ids[0])  # [pos] ids for a one-example stack
    close(row, one.logit_attrs(one.decompose_resid(), ids[:1]))


def test_bad_inputs_are_one_line_user_errors(pair, tiny_model_dir):
    model, _ = pair("gpt2")
    ids = model.to_tokens([TEXT])
    _, partial = model.run_with_cache(ids, names=["blocks.*.hook_resid_*", "hook_*embed"])
    _, cache = model.run_with_cache(ids)
    stack = cache.decompose_resid()
    bad = [
        (lambda: partial.decompose_resid(), r"needs blocks.0.hook_attn_out: add 'blocks.\*.hook_attn_out'"),
        (lambda: partial.apply_ln_to_stack(stack), "needs ln_final.hook_scale: add 'ln_final.hook_scale'"),
        (lambda: partial.accumulated_resid(1, apply_ln=True), r"add 'blocks.\*.ln1.hook_scale'"),
        (lambda: cache.logit_attrs(stack, 1.5), "tokens must be a string, an int or a tensor"),
        (lambda: cache.logit_attrs(stack, torch.tensor([1.0, 2.0])), "token ids must be whole numbers"),
        (lambda: cache.logit_attrs(stack, [1, 2]), "tokens must be a string, an int or a tensor"),
        (lambda: cache.logit_attrs(stack, True), "tokens must be a string"),
        (lambda: cache.logit_attrs(stack, 10**6), "token ids must be from 0 to"),
        (lambda: cache.logit_attrs(stack, "The weather is"), r"is \d+ tokens, not one"),
        (lambda: cache.logit_attrs(stack, ids, 5), "must have the same shape"),
        (lambda: cache.logit_attrs(stack, ids[0, :3]), "do not fit the stack"),
        (lambda: cache.logit_attrs(stack[..., :5], 5), "not d_model 64"),
        (lambda: cache.logit_attrs("stack", 5), "residual_stack must be"),
        (lambda: cache.decompose_resid(5), "layer must be -1 or a block count from 0 to 2"),
        (lambda: cache.decompose_resid(1.5), "layer must be -1 or a block count"),
        (lambda: cache.apply_ln_to_stack(stack, -3), "layer must be -1 or a block count"),
        (lambda: cache.accumulated_resid(7, apply_ln=True), "layer must be -1 or a block count"),
        (lambda: cache.decompose_resid(mode="heads"), "mode must be 'all', 'mlp' or 'attn'"),
        (lambda: cache.decompose_resid(mlp_input=True), "mlp_input is for a block's MLP input"),
        (lambda: cache.apply_ln_to_stack(stack, None, True), "mlp_input is for a block's MLP input"),
        (lambda: cache.decompose_resid(0, incl_embeds=False), "no component to stack"),
        (lambda: cache.decompose_resid(pos_slice=1.5), "pos_slice must be an int"),
        (lambda: cache.decompose_resid(pos_slice=[[0]]), "flat list of whole numbers"),
        (lambda: cache.decompose_resid(pos_slice=99), "slice out of range"),
        (lambda: cache.pooled("mean").decompose_resid(), "this cache is pooled"),
        (lambda: cache.decompose_resid(pos_slice=("a",)), "as a tuple is"),
        (lambda: cache.decompose_resid(pos_slice=slice("a", None)), "pos_slice as a slice needs whole numbers"),
        (lambda: cache.apply_ln_to_stack(stack[:, :, :2]), r"residual_stack's \[batch, pos\] axes are \[1, 2\]"),
        (lambda: cache.apply_ln_to_stack(torch.cat([stack, stack], 1)), r"axes are \[2, \d+\]"),
        (lambda: cache.apply_ln_to_stack(stack.long()), "residual_stack must hold real numbers"),
    ]
    for call, message in bad:
        with pytest.raises(UserError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    whisper = load(tiny_model_dir("whisper"))
    for name in ("cfg", "W_U", "W_E", "tokens_to_residual_directions"):
        with pytest.raises(UserError, match=f"{name} is for models with TransformerLens names"):
            attribute = getattr(whisper, name)
            attribute(5)  # the method (the properties refuse above)
    bert = load(tiny_model_dir("bert"))
    _, bert_cache = bert.run_with_cache(["Hello world"])
    with pytest.raises(UserError, match="decompose_resid is for decoder-only LMs.*BERT is post-LayerNorm"):
        bert_cache.decompose_resid()
    assert bert_cache.accumulated_resid().shape[0] == 3  # the stack itself needs no final norm


def test_an_audio_llm_has_its_language_models_cfg(tiny_model_dir):
    audio = load(tiny_model_dir("qwen2_audio"), modality="speech")
    text = load(tiny_model_dir("qwen2"))
    assert audio.cfg == replace(text.cfg, model_name=audio.cfg.model_name)  # the same text_config (hookpoints.tiny)
    assert torch.equal(audio.W_U, audio.model.lm_head.weight.T)
    _, cache = audio.run_with_cache([np.random.default_rng(0).normal(size=16_000).astype(np.float32)])
    with pytest.raises(UserError, match="reads speech: at those positions hook_embed is a placeholder"):
        cache.decompose_resid()
    parts = cache.decompose_resid(incl_embeds=False, apply_ln=True)
    assert parts.shape[0] == 2 * audio.cfg.n_layers and not parts.isnan().any()
