"""``hook_rot_q`` is the query itself in families that scale it before the attention function.

Whisper (and Qwen2-Audio's Whisper encoder, OPT, Voxtral, ...) multiply the query projection by
``1 / sqrt(d_head)`` before calling the attention function with ``scaling=1.0``. TransformerLens' ``hook_rot_q``
is q after rotary (no rotary here: q itself), never scaled; its scores are ``q k^T / sqrt(d_head)``. Peers: the
stock model with plain torch hooks on its ``q_proj``.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from hookpoints.loading import load
from hookpoints.tiny import randomise_norms_and_biases, tiny_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog by the river", "a lazy dog"]


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("opt")
    tokenizer = tiny_tokenizer()
    config = tf.OPTConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.OPTForCausalLM(config).eval()
    randomise_norms_and_biases(model, 0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _family(request, tiny_model_dir, opt_dir):
    """(hookpoints model, stock model, inputs, attention module path of the stock model, hook name prefix)."""
    if request.param == "opt":
        model = load(opt_dir, dtype="float32")
        stock = tf.OPTForCausalLM.from_pretrained(opt_dir).eval()
        return model, stock, model.inputs(TEXTS), "model.decoder.layers.1.self_attn", "model.decoder.layers.1.self_attn"
    folder = tiny_model_dir("whisper")
    model = load(folder, modality="speech")
    stock = tf.WhisperForConditionalGeneration.from_pretrained(folder).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = model.speech_inputs([(0.1 * torch.randn(16_000, generator=generator)).numpy()])
    return model, stock, inputs, "model.encoder.layers.0.self_attn", "model.encoder.layers.0.self_attn"


@pytest.fixture(params=["opt", "whisper"])
def family(request, tiny_model_dir, opt_dir):
    return _family(request, tiny_model_dir, opt_dir)


def _stock_run(stock, inputs, module: str, change=None):
    """The stock model's output and its ``{module}.q_proj`` / ``k_proj`` outputs (plain torch hooks); ``change``
    edits the q_proj output."""
    seen = {}
    modules = dict(stock.named_modules())

    def keep(name):
        def hook(_module, _args, output):
            if change is not None and name == "q_proj":
                output = change(output.clone())
            seen[name] = output
            return output

        return hook

    handles = [modules[f"{module}.{name}"].register_forward_hook(keep(name)) for name in ("q_proj", "k_proj")]
    try:
        with torch.no_grad():
            output = stock(**inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return output, seen


def test_hook_rot_q_is_the_unscaled_query(family):
    model, stock, inputs, module, prefix = family
    _, seen = _stock_run(stock, inputs, module)
    names = [f"{prefix}.hook_rot_q", f"{prefix}.hook_rot_k"]
    _, cache = model.run_with_cache(inputs, names=[*names, f"{prefix}.hook_attn_scores"])
    for name, projection in zip(names, ("q_proj", "k_proj"), strict=True):
        got = cache[name]  # [batch, pos, head, d_head]
        torch.testing.assert_close(got.flatten(2), seen[projection], atol=1e-6, rtol=1e-5, msg=name)
    heads = cache[f"{prefix}.hook_attn_scores"].shape[1]
    q, k = (cache[name].flatten(2).unflatten(2, (heads, -1)).transpose(1, 2) for name in names)  # [b, head, pos, d]
    scores = q @ k.transpose(2, 3) / q.shape[-1] ** 0.5  # TransformerLens' hook_attn_scores, before the mask
    got = cache[f"{prefix}.hook_attn_scores"]
    kept = got > -1e30  # the mask (causal, padding) where it applies
    torch.testing.assert_close(got[kept], scores[kept], atol=1e-5, rtol=1e-5)


def test_an_edit_of_hook_rot_q_is_an_edit_of_the_query(family):
    model, stock, inputs, module, prefix = family
    neurons, value = [1, 6, 17, 40], 40.0

    def change(q):
        q[..., neurons] = value
        return q

    expected, _ = _stock_run(stock, inputs, module, change)
    edit = model.edit(f"{prefix}.hook_rot_q", neurons, [value] * len(neurons))
    got = model.run_with_edits(inputs, [edit])
    untouched, _ = _stock_run(stock, inputs, module)
    assert (untouched.logits - expected.logits).abs().max() > 1e-4  # the edit matters
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-6, rtol=1e-5)
