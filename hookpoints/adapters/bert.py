"""BERT-family encoders (BERT, sentence-transformers' MiniLM), named like TransformerLens' HookedEncoder.

BERT is post-LayerNorm: ``hook_resid_mid`` is the sum before the attention LayerNorm (TransformerLens' ``ln1``),
``hook_resid_post`` the sum before the output LayerNorm (``ln2``), ``hook_normalized_resid_post`` that norm's
output (the layer's output, its "last hidden state"). ``ln1/ln2/embed.ln.hook_normalized`` and ``hook_scale``
are TransformerLens' (before the gain and bias; hookpoints.derived); each norm module's output is reachable
under its module path (``encoder.layer.0.attention.output.LayerNorm``). ``attn.hook_attn_scores`` /
``attn.hook_pattern`` are the masked scaled scores and their softmax (``[batch, head, query_pos, key_pos]``).
"""

from __future__ import annotations

from transformers import AutoModel

from hookpoints.adapters.base import Point, Single, Stack, TokenAdapter
from hookpoints.adapters.decoder_lm import map_points, norm_points

BERT_BLOCK = (
    Point("hook_resid_pre", "", io="input"),
    Point("attn.hook_q", "attention.self.query", heads="num_attention_heads"),
    Point("attn.hook_k", "attention.self.key", heads="num_attention_heads"),
    Point("attn.hook_v", "attention.self.value", heads="num_attention_heads"),
    *map_points("attention.self", "num_attention_heads"),
    Point("attn.hook_z", "attention.output.dense", io="input", heads="num_attention_heads"),
    Point("hook_attn_out", "attention.output.dense"),
    Point("hook_resid_mid", "attention.output.LayerNorm", io="input"),
    *norm_points("ln1", "attention.output.LayerNorm"),
    Point("mlp.hook_pre", "intermediate.dense"),
    Point("mlp.hook_post", "output.dense", io="input"),
    Point("hook_mlp_out", "output.dense"),
    Point("hook_resid_post", "output.LayerNorm", io="input"),
    *norm_points("ln2", "output.LayerNorm"),
    Point("hook_normalized_resid_post", "output.LayerNorm"),
)

#: HookedEncoder's own embedding names, and TransformerLens 4's names of the same tensors.
RENAMES = (
    ("hook_embed", "embed.hook_embed"),
    ("hook_pos_embed", "embed.hook_pos_embed"),
    ("hook_token_type_embed", "embed.hook_token_type_embed"),
    ("hook_resid_pre", "hook_in"),
    ("attn.hook_q", "attn.q.hook_out"),
    ("attn.hook_k", "attn.k.hook_out"),
    ("attn.hook_v", "attn.v.hook_out"),
    ("attn.hook_z", "attn.o.hook_in"),
    ("hook_normalized_resid_post", "hook_out"),
)


class Encoder(TokenAdapter):
    def model_class(self, config, modality):
        return AutoModel


BERT = Encoder(
    name="bert",
    model_types=("bert",),
    stacks=(Stack("encoder", "encoder.layer", "blocks", BERT_BLOCK, output="hook_normalized_resid_post"),),
    singles=(
        Single("hook_embed", "embeddings.word_embeddings", "encoder", "hook_embed"),
        Single("hook_pos_embed", "embeddings.position_embeddings", "encoder", "hook_pos_embed"),
        Single("hook_token_type_embed", "embeddings.token_type_embeddings", "encoder", "hook_token_type_embed"),
        Single("hook_full_embed", "embeddings", "encoder", "hook_full_embed"),
        Single("embed.ln.hook_scale", "embeddings.LayerNorm", "encoder", "embed.ln.hook_scale", derived="scale"),
        Single(
            "embed.ln.hook_normalized",
            "embeddings.LayerNorm",
            "encoder",
            "embed.ln.hook_normalized",
            derived="normalized",
        ),
    ),
    components={"embeddings": "encoder", "encoder": "encoder", "pooler": "encoder"},
    renames=RENAMES,
)
