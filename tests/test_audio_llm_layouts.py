"""The audio LLMs' language models get TransformerLens names only in the LLaMA layout they were written for.

Ultravox checkpoints name their language model by config (any causal LM: ``text_config.model_type``). Gemma 2 /
Gemma 3 layers norm the attention output and the MLP output too (``post_attention_layernorm`` is applied to the
attention output, ``pre_feedforward_layernorm`` feeds the MLP): LLaMA's layout put on them named the attention
output ``blocks.{l}.hook_resid_mid`` and its norm ``ln2``. Peer: plain torch hooks on the stock language model.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.models.ultravox import UltravoxConfig, UltravoxModel
from hookpoints.tiny import AUDIO_POSITIONS, _config, randomise_norms_and_biases, tiny_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog", "a lazy dog"]


@pytest.fixture(scope="module")
def gemma_ultravox(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ultravox-gemma2")
    tokenizer = tiny_tokenizer()
    text = tf.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    config = UltravoxConfig(
        audio_config=_config("whisper", len(tokenizer)).to_dict(), text_config=text.to_dict(), hidden_size=128
    )
    torch.manual_seed(0)
    model = UltravoxModel(config).eval()
    randomise_norms_and_biases(model, 0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tf.WhisperFeatureExtractor(feature_size=80, chunk_length=2 * AUDIO_POSITIONS // 100).save_pretrained(folder)
    return load(folder, modality="text")


def _stock_layer0(model, inputs) -> dict[str, torch.Tensor]:
    """TransformerLens' meanings in layer 0 of the stock language model, by plain torch hooks."""
    layer = model.model.language_model.model.layers[0]
    seen = {}

    def first_input(name):
        def hook(_module, args, kwargs):
            seen[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [
        layer.register_forward_pre_hook(first_input("hook_resid_pre"), with_kwargs=True),
        layer.pre_feedforward_layernorm.register_forward_pre_hook(first_input("hook_resid_mid"), with_kwargs=True),
        layer.register_forward_hook(lambda _m, _a, out: seen.__setitem__("hook_resid_post", out)),
    ]
    try:
        with torch.no_grad():
            model.model(**inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    x = seen["hook_resid_mid"]
    scale = (x.pow(2).mean(-1, keepdim=True) + layer.pre_feedforward_layernorm.eps).sqrt()
    seen["ln2.hook_normalized"] = x / scale  # what the MLP's norm normalises
    return seen


def test_a_gemma_language_model_gets_no_llama_names(gemma_ultravox):
    model = gemma_ultravox
    inputs = model.text_inputs(TEXTS)
    valid = inputs.masks["input"]
    expected = _stock_layer0(model, inputs)
    named = [name for name in expected if f"blocks.0.{name}" in model.hook_points]
    if named:  # a TransformerLens name must mean what TransformerLens says
        _, got = model.run_with_cache(inputs, names=[f"blocks.0.{name}" for name in named])
        for name in named:
            torch.testing.assert_close(got[f"blocks.0.{name}"][valid], expected[name][valid], msg=name)
    assert not [point.name for point in model.hook_points if point.name.startswith(("blocks.", "ln_final."))]
    with pytest.raises(UserError, match="no TransformerLens names"):
        model.run_with_cache(inputs, names="blocks.*.hook_resid_post")
    layer = "language_model.model.layers.0"  # its layers are reached by module path, with their layer index
    point = model.hook_points.get(layer)
    assert (point.component, point.layer) == ("lm", 0)
    _, got = model.run_with_cache(inputs, names=layer)
    torch.testing.assert_close(got[layer][valid], expected["hook_resid_post"][valid])


def test_a_llama_language_model_keeps_its_names(tiny_model_dir):
    model = load(tiny_model_dir("ultravox"), modality="text")
    assert "blocks.0.hook_resid_mid" in model.hook_points and "ln_final.hook_normalized" in model.hook_points
