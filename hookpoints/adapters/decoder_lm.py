"""Decoder-only language models (GPT-2, LLaMA, Qwen2 families) with TransformerLens hook names.

Each TransformerLens name resolves to the tensor TransformerLens gives it for an unprocessed model
(``HookedTransformer.from_pretrained_no_processing``): ``blocks.{l}.hook_resid_pre`` is the block's input,
``attn.hook_q/k/v`` the query/key/value projections before rotary embeddings (neurons read as
``[heads, d_head]``), ``attn.hook_z`` the attention output before the output projection, ``mlp.hook_pre`` the
MLP pre-activation (the gate projection in gated MLPs), ``mlp.hook_post`` the input of the down projection.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from hookpoints.adapters.base import Point, Single, Stack, TokenAdapter


class DecoderLM(TokenAdapter):
    def model_class(self, config, modality):
        return AutoModelForCausalLM


GPT2_BLOCK = (
    Point("hook_resid_pre", "", io="input"),
    Point("ln1.hook_normalized", "ln_1"),
    Point("attn.hook_q", "attn.c_attn", part=(0, 3), heads="n_head"),
    Point("attn.hook_k", "attn.c_attn", part=(1, 3), heads="n_head"),
    Point("attn.hook_v", "attn.c_attn", part=(2, 3), heads="n_head"),
    Point("attn.hook_z", "attn.c_proj", io="input", heads="n_head"),
    Point("hook_attn_out", "attn"),
    Point("hook_resid_mid", "ln_2", io="input"),
    Point("ln2.hook_normalized", "ln_2"),
    Point("mlp.hook_pre", "mlp.c_fc"),
    Point("mlp.hook_post", "mlp.c_proj", io="input"),
    Point("hook_mlp_out", "mlp"),
    Point("hook_resid_post", ""),
)

#: LLaMA, Qwen2, Mistral and their kin share this layer layout.
LLAMA_BLOCK = (
    Point("hook_resid_pre", "", io="input"),
    Point("ln1.hook_normalized", "input_layernorm"),
    Point("attn.hook_q", "self_attn.q_proj", heads="num_attention_heads"),
    Point("attn.hook_k", "self_attn.k_proj", heads="num_key_value_heads"),
    Point("attn.hook_v", "self_attn.v_proj", heads="num_key_value_heads"),
    Point("attn.hook_z", "self_attn.o_proj", io="input", heads="num_attention_heads"),
    Point("hook_attn_out", "self_attn"),
    Point("hook_resid_mid", "post_attention_layernorm", io="input"),
    Point("ln2.hook_normalized", "post_attention_layernorm"),
    Point("mlp.hook_pre", "mlp.gate_proj"),
    Point("mlp.hook_pre_linear", "mlp.up_proj"),
    Point("mlp.hook_post", "mlp.down_proj", io="input"),
    Point("hook_mlp_out", "mlp"),
    Point("hook_resid_post", ""),
)

GPT2 = DecoderLM(
    name="gpt2",
    model_types=("gpt2",),
    stacks=(Stack("lm", "transformer.h", "blocks", GPT2_BLOCK),),
    singles=(
        Single("hook_embed", "transformer.wte", "lm", "hook_embed"),
        Single("hook_pos_embed", "transformer.wpe", "lm", "hook_pos_embed"),
        Single("ln_final.hook_normalized", "transformer.ln_f", "lm", "ln_final.hook_normalized"),
    ),
    components={"transformer": "lm", "lm_head": "lm"},
)

LLAMA = DecoderLM(
    name="llama",
    model_types=("llama", "qwen2", "qwen3", "mistral"),
    stacks=(Stack("lm", "model.layers", "blocks", LLAMA_BLOCK),),
    singles=(
        Single("hook_embed", "model.embed_tokens", "lm", "hook_embed"),
        Single("ln_final.hook_normalized", "model.norm", "lm", "ln_final.hook_normalized"),
    ),
    components={"model": "lm", "lm_head": "lm"},
)
