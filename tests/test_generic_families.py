"""Families without an adapter of their own (the generic adapter): GPT-NeoX, OPT, Phi, Gemma.

Their hook points are module paths (plus the attention modules' ``hook_rot_q/k``, ``hook_attn_scores`` and
``hook_pattern``); TransformerLens names are not theirs. Peers: each text run alone (a padded batch, right- or
left-padded, must record what each example gives alone), and the clear refusal of what cannot be recorded.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.tiny import randomise_norms_and_biases, tiny_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog by the river", "a lazy dog", "the river"]
FAMILIES = {
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, {"intermediate_size": 128, "rotary_pct": 0.5}),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "phi": (
        tf.PhiConfig, tf.PhiForCausalLM, {"intermediate_size": 128, "partial_rotary_factor": 0.5, "qk_layernorm": True},
    ),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"intermediate_size": 128, "num_key_value_heads": 2}),
}  # fmt: skip


def build(family: str, folder, **more):
    """A tiny seeded ``family`` model saved in ``folder``, loaded (``more``: config overrides)."""
    config_class, model_class, extra = FAMILIES[family]
    tokenizer = tiny_tokenizer()
    sizes = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "max_position_embeddings": 256}
    torch.manual_seed(0)
    model = model_class(config_class(**sizes, **ids, **extra, **more)).eval()
    randomise_norms_and_biases(model, 0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load(folder, dtype="float32")


@pytest.fixture(scope="module", params=list(FAMILIES))
def generic(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp(request.param))


def _same_as_alone(model, batch, masks, names):
    _, got = model.run_with_cache(batch, names=names)
    for i, text in enumerate(TEXTS):
        _, alone = model.run_with_cache([text], names=names)
        real = masks[i].bool()
        n = int(real.sum())
        for name in names:
            actual, expected = got[name][i], alone[name][0]
            if name.endswith(("hook_pattern", "hook_attn_scores")):  # [head, query, key]
                actual, expected = actual[:, real][:, :, real], expected
                if name.endswith("hook_attn_scores"):
                    kept = expected > -1e30  # the future: the mask's minimum in both
                    actual, expected = actual[kept], expected[kept]
            else:
                actual, expected = actual[real], expected[:n]
            torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5, msg=f"{name} example {i}")


def test_padded_batches_record_what_each_text_gives_alone(generic):
    family, model = generic
    assert model.adapter.name == "generic"
    names = [point.name for point in model.hook_points if point.unavailable is None]
    assert any(name.endswith("hook_pattern") for name in names)
    right = model.text_inputs(TEXTS)
    _same_as_alone(model, TEXTS, right.kwargs["attention_mask"], names)
    left = model.tokenizer(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    _same_as_alone(model, dict(left), left["attention_mask"], names)


def test_transformerlens_names_are_refused_not_guessed(generic, tiny_model_dir):
    """A TransformerLens name on a family hookpoints does not name is refused, saying why (it only said to list
    the names) and how this model's points are named."""
    family, model = generic
    assert not [p.name for p in model.hook_points if p.name.startswith(("blocks.", "hook_embed", "ln_final"))]
    layer = {"gpt_neox": "gpt_neox.layers.0", "opt": "model.decoder.layers.0"}.get(family, "model.layers.0")
    why = rf"no TransformerLens names in hookpoints \(.*\); its names look like {layer}"
    for name in ("blocks.0.hook_resid_post", "blocks.*.mlp.hook_post", "hook_embed"):
        with pytest.raises(UserError, match=why):
            model.run_with_cache(TEXTS, names=name)
    with pytest.raises(UserError) as refused:  # a family with TransformerLens names: no such hint
        load(tiny_model_dir("llama")).run_with_cache(TEXTS, names="blocks.9.hook_resid_post")
    assert "TransformerLens" not in str(refused.value)


@pytest.mark.parametrize("generic", ["phi"], indirect=True)  # the one family with per-head q/k norms
def test_heads_before_positions_are_refused_with_the_reason(generic):
    """Phi's per-head q/k LayerNorms run on [batch, head, pos, d_head]: refused, saying so (it said the tensor had
    no neuron axis)."""
    _, model = generic
    name = "model.layers.0.self_attn.q_layernorm"
    point = model.hook_points.get(name)
    assert point.unavailable is not None and "lie between its neuron axes" in point.unavailable
    with pytest.raises(UserError, match=r"axis 2 of \[2, 4, 11, 16\]\) lie between its neuron axes"):
        model.run_with_cache(TEXTS, names=name)


def test_rotary_hooks_keep_their_heads(generic):
    """An attention module's ``hook_rot_q`` / ``hook_rot_k`` under its module path is ``[batch, pos, head, d_head]``
    in the cache and in hook functions, as the module's own tensor (it came flattened to ``[batch, pos, width]``)."""
    family, model = generic
    attention = {"gpt_neox": "gpt_neox.layers.1.attention", "opt": "model.decoder.layers.1.self_attn"}
    module = attention.get(family, "model.layers.1.self_attn")
    seen = {}
    modules = dict(model.model.named_modules())
    handles = [
        modules[f"{module}.{hook}"].register_forward_hook(lambda _m, _a, out, hook=hook: seen.__setitem__(hook, out))
        for hook in ("hook_rot_q", "hook_rot_k")
    ]
    try:
        with torch.no_grad():
            model.model(**model.text_inputs(TEXTS).kwargs)
    finally:
        for handle in handles:
            handle.remove()
    _, cache = model.run_with_cache(TEXTS, names=[f"{module}.hook_rot_q", f"{module}.hook_rot_k"])
    for hook, tensor in seen.items():
        assert tensor.dim() == 4  # [batch, pos, head, d_head]
        torch.testing.assert_close(cache[f"{module}.{hook}"], tensor, msg=hook)
        assert model.hook_points.get(f"{module}.{hook}").shape == tuple(tensor.shape[2:])


#: A Linear output inside the first layer of each family (an edit there is folded into its weights).
EDITED = {
    "gpt_neox": "gpt_neox.layers.0.mlp.dense_h_to_4h",
    "opt": "model.decoder.layers.0.self_attn.q_proj",
    "phi": "model.layers.0.mlp.fc1",
    "gemma": "model.layers.0.mlp.up_proj",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_padded_batch_continues_each_text_as_hf_generate_does_alone_with_and_without_an_edit(family, tmp_path):
    """A causal LM of the generic adapter generates (task ``continue``): each text of a left-padded batch gets
    HF's greedy tokens for it alone, and an edit of a module path equals a plain torch hook doing the same around
    HF's generate; recording the continuation passes the run-time logits check (positions counted right)."""
    model = build(family, tmp_path, initializer_range=0.3)  # greedy output that varies between texts
    assert model.continues
    layer = model.hook_points.get(EDITED[family])
    edit = model.edit(layer.name, [0, 3], [40.0, -40.0])
    plain, edited = (model.generate(TEXTS, max_new_tokens=6, edits=e) for e in (None, [edit]))
    module = dict(model.model.named_modules())[layer.module]

    def replace(mod, args, output):  # [batch, pos, width]
        output = output.clone()
        output[..., [0, 3]] = torch.tensor([40.0, -40.0])
        return output

    for i, text in enumerate(TEXTS):
        ids = model.tokenizer([text], return_tensors="pt")["input_ids"]
        for generation, hooked in ((plain, False), (edited, True)):
            handle = module.register_forward_hook(replace) if hooked else None
            try:
                with torch.inference_mode():
                    out = model.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            finally:
                if handle is not None:
                    handle.remove()
            want = out[0, ids.shape[1] :].tolist()
            assert generation.generated(i) == want[: len(generation.generated(i))], f"{family} {i} edited={hooked}"
    assert any(plain.generated(i) != edited.generated(i) for i in range(len(TEXTS)))  # the edit changed text
    pooled, _ = model.pooled_generating(model.inputs(TEXTS), None, [layer], "mean", 6)  # the logits check holds
    assert pooled[layer.name].shape == (len(TEXTS), layer.width)
