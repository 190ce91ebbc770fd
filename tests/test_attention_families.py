"""Families the adapters do not name (the generic adapter) keep their own attention arithmetic.

hookpoints routes attention through its own function (hookpoints.attention). Peers: the stock model, loaded
with the same weights and its own attention implementation, and HF's own eager attention weights. Falcon's
attention does not dispatch through transformers' attention interface (it branches on the implementation's
name); Gemma 2 soft-caps its scores and runs on eager attention by default.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from hookpoints.loading import load
from hookpoints.tiny import randomise_norms_and_biases, tiny_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog by the river", "a lazy dog"]  # padded


def build(tmp_path, config_class, model_class, **extra):
    tokenizer = tiny_tokenizer()
    sizes = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "max_position_embeddings": 256}
    torch.manual_seed(0)
    model = model_class(config_class(**sizes, **ids, **extra)).eval()
    randomise_norms_and_biases(model, 0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path, model_class


def stock_logits(folder, model_class, inputs, **options):
    stock = model_class.from_pretrained(folder, **options).eval()
    with torch.inference_mode():
        return stock(**inputs.kwargs, output_attentions="attn_implementation" in options)


@pytest.mark.parametrize("family", ["falcon", "gptj"])
def test_attention_outside_the_interface_is_left_alone(tmp_path, family):
    """Falcon and GPT-J compute attention themselves, branching on the implementation's name: given hookpoints'
    boolean mask they added 1s and 0s to the scores (logits off by 0.4 and 0.16 on these tiny models). Their
    attention is left as it is (and has no map hook points)."""
    if family == "falcon":
        folder, model_class = build(tmp_path, tf.FalconConfig, tf.FalconForCausalLM)
    else:
        folder, model_class = build(tmp_path, tf.GPTJConfig, tf.GPTJForCausalLM, rotary_dim=8)
    model = load(folder, device="cpu", dtype="float32")
    inputs = model.inputs(TEXTS)
    valid = inputs.masks["input"]
    reference = stock_logits(folder, model_class, inputs).logits
    output = model.run_with_hooks(TEXTS).logits
    torch.testing.assert_close(output[valid], reference[valid], atol=1e-6, rtol=1e-6)
    assert not [p.name for p in model.hook_points if p.name.endswith("hook_pattern") and p.unavailable is None]


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_gemma2_eager_and_soft_capped_attention(tmp_path, softcap):
    extra = {"intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16}
    extra |= {"attn_logit_softcapping": softcap, "final_logit_softcapping": None, "sliding_window": 4}
    folder, model_class = build(tmp_path, tf.Gemma2Config, tf.Gemma2ForCausalLM, **extra)
    model = load(folder, device="cpu", dtype="float32")
    inputs = model.inputs(TEXTS)
    valid = inputs.masks["input"]
    reference = stock_logits(folder, model_class, inputs, attn_implementation="eager")
    output = model.run_with_hooks(TEXTS).logits  # Gemma 2 runs eager attention: the same arithmetic
    torch.testing.assert_close(output[valid], reference.logits[valid], atol=1e-6, rtol=1e-6)
    names = [p.name for p in model.hook_points if p.name.endswith("hook_pattern")]
    traced, cache = model.run_with_cache(TEXTS, names=names)
    torch.testing.assert_close(traced.logits[valid], reference.logits[valid], atol=1e-6, rtol=1e-6)
    for layer, name in enumerate(names):
        pattern, expected = cache[name], reference.attentions[layer]  # [batch, head, query, key]
        for i in range(len(TEXTS)):
            real = valid[i]
            torch.testing.assert_close(pattern[i][:, real][:, :, real], expected[i][:, real][:, :, real])


def test_gpt_oss_attention_sinks(tmp_path):
    """GPT-OSS adds a per-head sink logit to the softmax (eager attention): the patterns are HF's eager weights
    (rows summing to less than 1) and the output is the stock model's, with maps recorded or not."""
    extra = {"intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4}
    extra |= {"num_experts_per_tok": 2, "sliding_window": 4}
    folder, model_class = build(tmp_path, tf.GptOssConfig, tf.GptOssForCausalLM, **extra)
    model = load(folder, device="cpu", dtype="float32")
    with torch.no_grad():  # the sinks start at 0 in a fresh model
        for layer in model.model.model.layers:
            layer.self_attn.sinks.normal_(generator=torch.Generator().manual_seed(layer.self_attn.layer_idx))
    model.model.save_pretrained(folder)
    inputs = model.inputs(TEXTS)
    valid = inputs.masks["input"]
    reference = stock_logits(folder, model_class, inputs, attn_implementation="eager")
    torch.testing.assert_close(model.run_with_hooks(TEXTS).logits[valid], reference.logits[valid])
    names = [p.name for p in model.hook_points if p.name.endswith("hook_pattern")]
    traced, cache = model.run_with_cache(TEXTS, names=names)
    torch.testing.assert_close(traced.logits[valid], reference.logits[valid], atol=1e-6, rtol=1e-6)
    for layer, name in enumerate(names):
        pattern, expected = cache[name], reference.attentions[layer]
        assert float(pattern[0, :, -1].sum(-1).max()) < 0.999  # some weight went to the sink
        for i in range(len(TEXTS)):
            real = valid[i]
            torch.testing.assert_close(pattern[i][:, real][:, :, real], expected[i][:, real][:, :, real])
