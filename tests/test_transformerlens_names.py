"""TransformerLens names resolve to the tensors TransformerLens gives them.

Each test recomputes a whole forward pass by hand from the checkpoint's weights, following
TransformerLens' definitions (HookedTransformer / HookedEncoder without weight processing), and compares every
named tensor with what hookpoints records (pooling ``none``: every position).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hookpoints.loading import load

TEXT = "The weather is nice today, and the river is calm."


def recorded(model, patterns):
    inputs = model.text_inputs([TEXT])
    values = model.pooled(inputs, model.select(patterns), "none")  # hook -> [positions, width]
    return inputs.kwargs["input_ids"][0], values


def close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5, msg=name)


def attention(q, k, v, heads: int, kv_heads: int, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head) [+ causal mask]) v, heads merged back: [pos, heads * d_head]."""
    pos = q.shape[0]
    d_head = q.shape[1] // heads
    q = q.view(pos, heads, d_head).transpose(0, 1)  # [heads, pos, d_head]
    k = k.view(pos, kv_heads, d_head).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = v.view(pos, kv_heads, d_head).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(d_head)  # [heads, pos, pos]
    if causal:
        scores = scores.masked_fill(torch.ones(pos, pos, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(pos, heads * d_head)


def test_gpt2(tiny_model_dir):
    model = load(tiny_model_dir("gpt2"))
    ids, got = recorded(model, ["blocks.*", "hook_*", "ln_final.*"])
    hf = model.model.transformer
    cfg = model.model.config
    heads, eps = cfg.n_head, cfg.layer_norm_epsilon

    def conv1d(x, module):  # GPT-2's Conv1D: weight is [in, out]
        return x @ module.weight + module.bias

    embed, pos_embed = hf.wte.weight[ids], hf.wpe.weight[: len(ids)]
    close(got["hook_embed"], embed, "hook_embed")
    close(got["hook_pos_embed"], pos_embed, "hook_pos_embed")
    resid = embed + pos_embed
    for layer, block in enumerate(hf.h):
        name = f"blocks.{layer}"
        close(got[f"{name}.hook_resid_pre"], resid, f"{name}.hook_resid_pre")
        ln1 = F.layer_norm(resid, (cfg.n_embd,), block.ln_1.weight, block.ln_1.bias, eps)
        close(got[f"{name}.ln1.hook_normalized"], ln1, "ln1")
        q, k, v = conv1d(ln1, block.attn.c_attn).split(cfg.n_embd, dim=-1)
        for key, value in (("q", q), ("k", k), ("v", v)):
            close(got[f"{name}.attn.hook_{key}"], value, f"hook_{key}")
        z = attention(q, k, v, heads, heads, causal=True)
        close(got[f"{name}.attn.hook_z"], z, "hook_z")
        attn_out = conv1d(z, block.attn.c_proj)
        close(got[f"{name}.hook_attn_out"], attn_out, "hook_attn_out")
        resid_mid = resid + attn_out
        close(got[f"{name}.hook_resid_mid"], resid_mid, "hook_resid_mid")
        ln2 = F.layer_norm(resid_mid, (cfg.n_embd,), block.ln_2.weight, block.ln_2.bias, eps)
        close(got[f"{name}.ln2.hook_normalized"], ln2, "ln2")
        pre = conv1d(ln2, block.mlp.c_fc)
        close(got[f"{name}.mlp.hook_pre"], pre, "mlp.hook_pre")
        post = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))  # gelu_new
        close(got[f"{name}.mlp.hook_post"], post, "mlp.hook_post")
        mlp_out = conv1d(post, block.mlp.c_proj)
        close(got[f"{name}.hook_mlp_out"], mlp_out, "hook_mlp_out")
        resid = resid_mid + mlp_out
        close(got[f"{name}.hook_resid_post"], resid, "hook_resid_post")
    final = F.layer_norm(resid, (cfg.n_embd,), hf.ln_f.weight, hf.ln_f.bias, eps)
    close(got["ln_final.hook_normalized"], final, "ln_final")


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, cos, sin, heads):
    """Rotary embedding on [pos, heads * d_head] (the rotate-half convention of LLaMA)."""
    pos = x.shape[0]
    x = x.view(pos, heads, -1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).reshape(pos, -1)


def test_llama(tiny_model_dir):
    model = load(tiny_model_dir("llama"))
    ids, got = recorded(model, ["blocks.*", "hook_embed", "ln_final.*"])
    hf = model.model.model
    cfg = model.model.config
    heads, kv_heads, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    positions = torch.arange(len(ids))[None]
    cos, sin = (t[0] for t in hf.rotary_emb(hf.embed_tokens.weight[ids][None], positions))  # [pos, d_head]

    resid = hf.embed_tokens.weight[ids]
    close(got["hook_embed"], resid, "hook_embed")
    for layer, block in enumerate(hf.layers):
        name = f"blocks.{layer}"
        close(got[f"{name}.hook_resid_pre"], resid, "hook_resid_pre")
        ln1 = rms_norm(resid, block.input_layernorm.weight, eps)
        close(got[f"{name}.ln1.hook_normalized"], ln1, "ln1")
        attn = block.self_attn
        q, k, v = ln1 @ attn.q_proj.weight.T, ln1 @ attn.k_proj.weight.T, ln1 @ attn.v_proj.weight.T
        for key, value in (("q", q), ("k", k), ("v", v)):  # before rotary, as TransformerLens' hook_q/k
            close(got[f"{name}.attn.hook_{key}"], value, f"hook_{key}")
        z = attention(rotate(q, cos, sin, heads), rotate(k, cos, sin, kv_heads), v, heads, kv_heads, causal=True)
        close(got[f"{name}.attn.hook_z"], z, "hook_z")
        attn_out = z @ attn.o_proj.weight.T
        close(got[f"{name}.hook_attn_out"], attn_out, "hook_attn_out")
        resid_mid = resid + attn_out
        close(got[f"{name}.hook_resid_mid"], resid_mid, "hook_resid_mid")
        ln2 = rms_norm(resid_mid, block.post_attention_layernorm.weight, eps)
        close(got[f"{name}.ln2.hook_normalized"], ln2, "ln2")
        pre, pre_linear = ln2 @ block.mlp.gate_proj.weight.T, ln2 @ block.mlp.up_proj.weight.T
        close(got[f"{name}.mlp.hook_pre"], pre, "mlp.hook_pre")
        close(got[f"{name}.mlp.hook_pre_linear"], pre_linear, "mlp.hook_pre_linear")
        post = F.silu(pre) * pre_linear
        close(got[f"{name}.mlp.hook_post"], post, "mlp.hook_post")
        mlp_out = post @ block.mlp.down_proj.weight.T
        close(got[f"{name}.hook_mlp_out"], mlp_out, "hook_mlp_out")
        resid = resid_mid + mlp_out
        close(got[f"{name}.hook_resid_post"], resid, "hook_resid_post")
    close(got["ln_final.hook_normalized"], rms_norm(resid, hf.norm.weight, eps), "ln_final")


def test_bert(tiny_model_dir):
    model = load(tiny_model_dir("bert"))
    ids, got = recorded(model, ["blocks.*", "hook_*", "embed.*"])
    hf = model.model
    cfg = hf.config
    heads, eps, d = cfg.num_attention_heads, cfg.layer_norm_eps, cfg.hidden_size
    emb = hf.embeddings
    word, pos, token_type = emb.word_embeddings.weight[ids], emb.position_embeddings.weight[: len(ids)], None
    token_type = emb.token_type_embeddings.weight[torch.zeros_like(ids)]
    close(got["hook_embed"], word, "hook_embed")
    close(got["hook_pos_embed"], pos, "hook_pos_embed")
    close(got["hook_token_type_embed"], token_type, "hook_token_type_embed")
    resid = F.layer_norm(word + pos + token_type, (d,), emb.LayerNorm.weight, emb.LayerNorm.bias, eps)
    close(got["embed.ln.hook_normalized"], resid, "embed.ln")

    def linear(x, module):
        return x @ module.weight.T + module.bias

    for layer, block in enumerate(hf.encoder.layer):
        name = f"blocks.{layer}"
        close(got[f"{name}.hook_resid_pre"], resid, "hook_resid_pre")
        self_attn = block.attention.self
        q, k, v = linear(resid, self_attn.query), linear(resid, self_attn.key), linear(resid, self_attn.value)
        for key, value in (("q", q), ("k", k), ("v", v)):
            close(got[f"{name}.attn.hook_{key}"], value, f"hook_{key}")
        z = attention(q, k, v, heads, heads, causal=False)
        close(got[f"{name}.attn.hook_z"], z, "hook_z")
        attn_out = linear(z, block.attention.output.dense)
        close(got[f"{name}.hook_attn_out"], attn_out, "hook_attn_out")
        resid_mid = resid + attn_out
        close(got[f"{name}.hook_resid_mid"], resid_mid, "hook_resid_mid")
        norm1 = block.attention.output.LayerNorm
        ln1 = F.layer_norm(resid_mid, (d,), norm1.weight, norm1.bias, eps)
        close(got[f"{name}.ln1.hook_normalized"], ln1, "ln1")
        pre = linear(ln1, block.intermediate.dense)
        close(got[f"{name}.mlp.hook_pre"], pre, "mlp.hook_pre")
        post = F.gelu(pre)
        close(got[f"{name}.mlp.hook_post"], post, "mlp.hook_post")
        mlp_out = linear(post, block.output.dense)
        close(got[f"{name}.hook_mlp_out"], mlp_out, "hook_mlp_out")
        resid_post = ln1 + mlp_out
        close(got[f"{name}.hook_resid_post"], resid_post, "hook_resid_post")
        resid = F.layer_norm(resid_post, (d,), block.output.LayerNorm.weight, block.output.LayerNorm.bias, eps)
        close(got[f"{name}.ln2.hook_normalized"], resid, "ln2")
