"""Decoder-only language models (GPT-2, LLaMA, Qwen2 families) with TransformerLens hook names.

Each TransformerLens name resolves to the tensor TransformerLens gives it for an unprocessed model
(``HookedTransformer.from_pretrained_no_processing``): ``blocks.{l}.hook_resid_pre`` is the block's input,
``ln1.hook_scale`` / ``ln1.hook_normalized`` the norm's divisor and its input divided by it (before the
gain and bias; computed from the norm's input, hookpoints.derived; the norm module's own output is its
module path, e.g. ``transformer.h.0.ln_1``), ``attn.hook_q/k/v`` the query/key/value projections before rotary
embeddings (neurons read as ``[heads, d_head]``), ``attn.hook_rot_q/k`` after them, ``attn.hook_attn_scores``
/ ``attn.hook_pattern`` the masked scaled scores and their softmax (``[batch, head, query_pos, key_pos]``),
``attn.hook_z`` the attention output before the output projection, ``mlp.hook_pre`` the MLP pre-activation
(the gate projection in gated MLPs), ``mlp.hook_post`` the input of the down projection. TransformerLens 4's
TransformerBridge names of the same tensors are aliases (``RENAMES``).
"""

from __future__ import annotations

from dataclasses import replace

from transformers import AutoModelForCausalLM

from hookpoints.adapters.base import Point, Single, Stack, TokenAdapter


class DecoderLM(TokenAdapter):
    def model_class(self, config, modality):
        return AutoModelForCausalLM

    def tasks(self, config, modality):
        """forward, and ``continue``: greedy generation from the text (hookpoints.generation)."""
        return ("forward", "continue")


def norm_points(tl: str, module: str) -> tuple[Point, Point]:
    """TransformerLens' ``{tl}.hook_scale`` and ``{tl}.hook_normalized``, computed from ``module``'s input."""
    return Point(f"{tl}.hook_scale", module, derived="scale"), Point(
        f"{tl}.hook_normalized", module, derived="normalized"
    )


def map_points(attn: str, heads: str) -> tuple[Point, Point]:
    """``attn.hook_attn_scores`` and ``attn.hook_pattern`` of the attention module ``attn``."""
    return (
        Point("attn.hook_attn_scores", f"{attn}.hook_attn_scores", heads=heads),
        Point("attn.hook_pattern", f"{attn}.hook_pattern", heads=heads),
    )


GPT2_BLOCK = (
    Point("hook_resid_pre", "", io="input"),
    *norm_points("ln1", "ln_1"),
    Point("attn.hook_q", "attn.c_attn", part=(0, 3), heads="n_head"),
    Point("attn.hook_k", "attn.c_attn", part=(1, 3), heads="n_head"),
    Point("attn.hook_v", "attn.c_attn", part=(2, 3), heads="n_head"),
    *map_points("attn", "n_head"),
    Point("attn.hook_z", "attn.c_proj", io="input", heads="n_head"),
    Point("hook_attn_out", "attn"),
    Point("hook_resid_mid", "ln_2", io="input"),
    *norm_points("ln2", "ln_2"),
    Point("mlp.hook_pre", "mlp.c_fc"),
    Point("mlp.hook_post", "mlp.c_proj", io="input"),
    Point("hook_mlp_out", "mlp"),
    Point("hook_resid_post", ""),
)

#: LLaMA, Qwen2, Mistral and their kin share this layer layout.
LLAMA_BLOCK = (
    Point("hook_resid_pre", "", io="input"),
    *norm_points("ln1", "input_layernorm"),
    Point("attn.hook_q", "self_attn.q_proj", heads="num_attention_heads"),
    Point("attn.hook_k", "self_attn.k_proj", heads="num_key_value_heads"),
    Point("attn.hook_v", "self_attn.v_proj", heads="num_key_value_heads"),
    # Qwen3's per-head RMSNorm of q and k (before rotary); absent modules are skipped (LLaMA, Qwen2, Mistral)
    *(replace(point, heads="num_attention_heads") for point in norm_points("attn.q_norm", "self_attn.q_norm")),
    *(replace(point, heads="num_key_value_heads") for point in norm_points("attn.k_norm", "self_attn.k_norm")),
    Point("attn.hook_rot_q", "self_attn.hook_rot_q", heads="num_attention_heads"),
    Point("attn.hook_rot_k", "self_attn.hook_rot_k", heads="num_key_value_heads"),
    *map_points("self_attn", "num_attention_heads"),
    Point("attn.hook_z", "self_attn.o_proj", io="input", heads="num_attention_heads"),
    Point("hook_attn_out", "self_attn"),
    Point("hook_resid_mid", "post_attention_layernorm", io="input"),
    *norm_points("ln2", "post_attention_layernorm"),
    Point("mlp.hook_pre", "mlp.gate_proj"),
    Point("mlp.hook_pre_linear", "mlp.up_proj"),
    Point("mlp.hook_post", "mlp.down_proj", io="input"),
    Point("hook_mlp_out", "mlp"),
    Point("hook_resid_post", ""),
)

#: TransformerLens 4 (TransformerBridge) names of the same tensors (its BlockBridge, AttentionBridge,
#: MLPBridge / GatedMLPBridge and embedding ``hook_aliases``, read inverted).
RENAMES = (
    ("hook_resid_pre", "hook_in"),
    ("hook_resid_mid", "ln2.hook_in"),
    ("hook_resid_post", "hook_out"),
    ("attn.hook_q", "attn.q.hook_out"),
    ("attn.hook_k", "attn.k.hook_out"),
    ("attn.hook_v", "attn.v.hook_out"),
    ("attn.hook_z", "attn.o.hook_in"),
    ("hook_attn_out", "attn.hook_out"),
    ("mlp.hook_post", "mlp.out.hook_in"),
    ("hook_mlp_out", "mlp.hook_out"),
    ("hook_embed", "embed.hook_out"),
    ("hook_pos_embed", "pos_embed.hook_out"),
)
GPT2_RENAMES = (*RENAMES, ("mlp.hook_pre", "mlp.in.hook_out"))
GATED_RENAMES = (*RENAMES, ("mlp.hook_pre", "mlp.gate.hook_out"), ("mlp.hook_pre_linear", "mlp.in.hook_out"))

GPT2 = DecoderLM(
    name="gpt2",
    model_types=("gpt2",),
    stacks=(Stack("lm", "transformer.h", "blocks", GPT2_BLOCK),),
    singles=(
        Single("hook_embed", "transformer.wte", "lm", "hook_embed"),
        Single("hook_pos_embed", "transformer.wpe", "lm", "hook_pos_embed"),
        Single("ln_final.hook_scale", "transformer.ln_f", "lm", "ln_final.hook_scale", derived="scale"),
        Single("ln_final.hook_normalized", "transformer.ln_f", "lm", "ln_final.hook_normalized", derived="normalized"),
    ),
    components={"transformer": "lm", "lm_head": "lm"},
    renames=GPT2_RENAMES,
)

LLAMA = DecoderLM(
    name="llama",
    model_types=("llama", "qwen2", "qwen3", "mistral"),
    stacks=(Stack("lm", "model.layers", "blocks", LLAMA_BLOCK),),
    singles=(
        Single("hook_embed", "model.embed_tokens", "lm", "hook_embed"),
        Single("ln_final.hook_scale", "model.norm", "lm", "ln_final.hook_scale", derived="scale"),
        Single("ln_final.hook_normalized", "model.norm", "lm", "ln_final.hook_normalized", derived="normalized"),
    ),
    components={"model": "lm", "lm_head": "lm"},
    renames=GATED_RENAMES,
)


def llama_layout(config) -> bool:
    """Whether a language model (an audio LLM's ``text_config``) has the layer layout ``LLAMA_BLOCK`` names. Others
    (Gemma 2 / 3 norm the attention and MLP outputs too: LLaMA's names would call the attention output
    ``hook_resid_mid``) are named by module paths."""
    return getattr(config, "model_type", None) in LLAMA.model_types


def without_foreign_lm(points: list, config) -> list:
    """``points`` without the language model's (component ``lm``) unless it has LLaMA's layout."""
    return points if llama_layout(config) else [point for point in points if point.component != "lm"]
