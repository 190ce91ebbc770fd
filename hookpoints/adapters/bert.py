"""BERT-family encoders (BERT, sentence-transformers' MiniLM), named like TransformerLens' HookedEncoder.

BERT is post-LayerNorm: ``hook_resid_mid`` is the sum before the attention LayerNorm, ``ln1.hook_normalized``
its output; ``hook_resid_post`` the sum before the output LayerNorm, ``ln2.hook_normalized`` the layer's
output (the "last hidden state" of the layer).
"""

from __future__ import annotations

from transformers import AutoModel

from hookpoints.adapters.base import Point, Single, Stack, TokenAdapter

BERT_BLOCK = (
    Point("hook_resid_pre", "", io="input"),
    Point("attn.hook_q", "attention.self.query", heads="num_attention_heads"),
    Point("attn.hook_k", "attention.self.key", heads="num_attention_heads"),
    Point("attn.hook_v", "attention.self.value", heads="num_attention_heads"),
    Point("attn.hook_z", "attention.output.dense", io="input", heads="num_attention_heads"),
    Point("hook_attn_out", "attention.output.dense"),
    Point("hook_resid_mid", "attention.output.LayerNorm", io="input"),
    Point("ln1.hook_normalized", "attention.output.LayerNorm"),
    Point("mlp.hook_pre", "intermediate.dense"),
    Point("mlp.hook_post", "output.dense", io="input"),
    Point("hook_mlp_out", "output.dense"),
    Point("hook_resid_post", "output.LayerNorm", io="input"),
    Point("ln2.hook_normalized", "output.LayerNorm"),
)


class Encoder(TokenAdapter):
    def model_class(self, config, modality):
        return AutoModel


BERT = Encoder(
    name="bert",
    model_types=("bert",),
    stacks=(Stack("encoder", "encoder.layer", "blocks", BERT_BLOCK, output="ln2.hook_normalized"),),
    singles=(
        Single("hook_embed", "embeddings.word_embeddings", "encoder", "hook_embed"),
        Single("hook_pos_embed", "embeddings.position_embeddings", "encoder", "hook_pos_embed"),
        Single("hook_token_type_embed", "embeddings.token_type_embeddings", "encoder", "hook_token_type_embed"),
        Single("embed.ln.hook_normalized", "embeddings.LayerNorm", "encoder", "embed.ln.hook_normalized"),
    ),
    components={"embeddings": "encoder", "encoder": "encoder", "pooler": "encoder"},
)
