"""TransformerLens names resolve to the tensors TransformerLens gives them.

Each family is checked twice, on tiny checkpoints whose every parameter is random (norm gains and biases
included, hookpoints.tiny): against a whole forward pass recomputed by hand from the weights with the
arithmetic TransformerLens documents (HookedTransformer / HookedEncoder without weight processing), and against
the real TransformerLens 3.9 (``test_every_name_equals_transformerlens``). Every named tensor is compared with
what hookpoints records (pooling ``none``: every position).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hookpoints.errors import UserError
from hookpoints.loading import load

TEXT = "The weather is nice today, and the river is calm."


def recorded(model, patterns):
    inputs = model.text_inputs([TEXT])
    patterns = [*patterns, "*.hook_pattern", "*.hook_attn_scores"]  # attention maps only match when named
    values = model.pooled(inputs, model.select(patterns), "none")  # hook -> [positions, width]
    return inputs.kwargs["input_ids"][0], values


def tl_norm(x: torch.Tensor, eps: float, centre: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """TransformerLens' (hook_scale, hook_normalized): before the gain and bias."""
    if centre:
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # [pos, 1]
    return scale, x / scale


def check_norm(got, name: str, x: torch.Tensor, module, eps: float, centre: bool = True) -> torch.Tensor:
    """The norm's TransformerLens hooks and its module output (under its module path); returns the output."""
    scale, normalized = tl_norm(x, eps, centre)
    close(got[f"{name}.hook_scale"], scale, f"{name}.hook_scale")
    close(got[f"{name}.hook_normalized"], normalized, f"{name}.hook_normalized")
    bias = getattr(module, "bias", None)
    output = normalized * module.weight + (0 if bias is None else bias)
    if centre:  # torch's own LayerNorm agrees with TransformerLens' arithmetic
        torch.testing.assert_close(
            output, F.layer_norm(x, x.shape[-1:], module.weight, bias, eps), atol=2e-5, rtol=2e-5
        )
    return output


def map_of(recorded_rows: torch.Tensor, heads: int, keys: int) -> torch.Tensor:
    """A recorded attention map ([query_pos, head * max_keys] rows) as [head, query_pos, key_pos]."""
    queries = recorded_rows.shape[0]
    return recorded_rows.view(queries, heads, -1)[:, :, :keys].transpose(0, 1)


def close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5, msg=name)


def attention(q, k, v, heads: int, kv_heads: int, causal: bool, got=None, name: str = "") -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head) [+ causal mask]) v, heads merged back: [pos, heads * d_head].

    With ``got``, also checks the recorded ``{name}.attn.hook_attn_scores`` and ``hook_pattern``.
    """
    pos = q.shape[0]
    d_head = q.shape[1] // heads
    q = q.view(pos, heads, d_head).transpose(0, 1)  # [heads, pos, d_head]
    k = k.view(pos, kv_heads, d_head).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = v.view(pos, kv_heads, d_head).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(d_head)  # [heads, pos, pos]
    masked = torch.ones(pos, pos, dtype=torch.bool).triu(1) if causal else torch.zeros(pos, pos, dtype=torch.bool)
    scores = scores.masked_fill(masked, float("-inf"))
    pattern = scores.softmax(-1)
    if got is not None:
        recorded_scores = map_of(got[f"{name}.attn.hook_attn_scores"], heads, pos)
        close(recorded_scores.masked_fill(masked, 0), scores.masked_fill(masked, 0), "hook_attn_scores")
        assert (recorded_scores[:, masked] < -1e30).all()  # masked: the additive mask (TransformerLens: -inf)
        close(map_of(got[f"{name}.attn.hook_pattern"], heads, pos), pattern, "hook_pattern")
    return (pattern @ v).transpose(0, 1).reshape(pos, heads * d_head)


def test_gpt2(tiny_model_dir):
    model = load(tiny_model_dir("gpt2"))
    ids, got = recorded(model, ["blocks.*", "hook_*", "ln_final.*", "transformer.h.*.ln_1"])
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
        ln1 = check_norm(got, f"{name}.ln1", resid, block.ln_1, eps)
        close(got[f"transformer.h.{layer}.ln_1"], ln1, "the ln_1 module's output")
        q, k, v = conv1d(ln1, block.attn.c_attn).split(cfg.n_embd, dim=-1)
        for key, value in (("q", q), ("k", k), ("v", v)):
            close(got[f"{name}.attn.hook_{key}"], value, f"hook_{key}")
        z = attention(q, k, v, heads, heads, causal=True, got=got, name=name)
        close(got[f"{name}.attn.hook_z"], z, "hook_z")
        attn_out = conv1d(z, block.attn.c_proj)
        close(got[f"{name}.hook_attn_out"], attn_out, "hook_attn_out")
        resid_mid = resid + attn_out
        close(got[f"{name}.hook_resid_mid"], resid_mid, "hook_resid_mid")
        ln2 = check_norm(got, f"{name}.ln2", resid_mid, block.ln_2, eps)
        pre = conv1d(ln2, block.mlp.c_fc)
        close(got[f"{name}.mlp.hook_pre"], pre, "mlp.hook_pre")
        post = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))  # gelu_new
        close(got[f"{name}.mlp.hook_post"], post, "mlp.hook_post")
        mlp_out = conv1d(post, block.mlp.c_proj)
        close(got[f"{name}.hook_mlp_out"], mlp_out, "hook_mlp_out")
        resid = resid_mid + mlp_out
        close(got[f"{name}.hook_resid_post"], resid, "hook_resid_post")
    check_norm(got, "ln_final", resid, hf.ln_f, eps)


def linear(x, module):
    """A Linear layer by hand (Qwen2's q/k/v have biases)."""
    return x @ module.weight.T + (0 if module.bias is None else module.bias)


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, cos, sin, heads):
    """Rotary embedding on [pos, heads * d_head] (the rotate-half convention of LLaMA)."""
    pos = x.shape[0]
    x = x.view(pos, heads, -1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).reshape(pos, -1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama(tiny_model_dir, family):
    model = load(tiny_model_dir(family))
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
        ln1 = check_norm(got, f"{name}.ln1", resid, block.input_layernorm, eps, centre=False)
        close(ln1, rms_norm(resid, block.input_layernorm.weight, eps), "RMSNorm")
        attn = block.self_attn
        q, k, v = (linear(ln1, attn.q_proj), linear(ln1, attn.k_proj), linear(ln1, attn.v_proj))
        for key, value in (("q", q), ("k", k), ("v", v)):  # before rotary, as TransformerLens' hook_q/k
            close(got[f"{name}.attn.hook_{key}"], value, f"hook_{key}")
        rot_q, rot_k = rotate(q, cos, sin, heads), rotate(k, cos, sin, kv_heads)
        close(got[f"{name}.attn.hook_rot_q"], rot_q, "hook_rot_q")
        close(got[f"{name}.attn.hook_rot_k"], rot_k, "hook_rot_k")
        z = attention(rot_q, rot_k, v, heads, kv_heads, causal=True, got=got, name=name)
        close(got[f"{name}.attn.hook_z"], z, "hook_z")
        attn_out = z @ attn.o_proj.weight.T
        close(got[f"{name}.hook_attn_out"], attn_out, "hook_attn_out")
        resid_mid = resid + attn_out
        close(got[f"{name}.hook_resid_mid"], resid_mid, "hook_resid_mid")
        ln2 = check_norm(got, f"{name}.ln2", resid_mid, block.post_attention_layernorm, eps, centre=False)
        pre, pre_linear = ln2 @ block.mlp.gate_proj.weight.T, ln2 @ block.mlp.up_proj.weight.T
        close(got[f"{name}.mlp.hook_pre"], pre, "mlp.hook_pre")
        close(got[f"{name}.mlp.hook_pre_linear"], pre_linear, "mlp.hook_pre_linear")
        post = F.silu(pre) * pre_linear
        close(got[f"{name}.mlp.hook_post"], post, "mlp.hook_post")
        mlp_out = post @ block.mlp.down_proj.weight.T
        close(got[f"{name}.hook_mlp_out"], mlp_out, "hook_mlp_out")
        resid = resid_mid + mlp_out
        close(got[f"{name}.hook_resid_post"], resid, "hook_resid_post")
    check_norm(got, "ln_final", resid, hf.norm, eps, centre=False)


def test_bert(tiny_model_dir):
    model = load(tiny_model_dir("bert"))
    ids, got = recorded(model, ["blocks.*", "hook_*", "embed.*"])
    hf = model.model
    cfg = hf.config
    heads, eps = cfg.num_attention_heads, cfg.layer_norm_eps
    emb = hf.embeddings
    word, pos, token_type = emb.word_embeddings.weight[ids], emb.position_embeddings.weight[: len(ids)], None
    token_type = emb.token_type_embeddings.weight[torch.zeros_like(ids)]
    close(got["hook_embed"], word, "hook_embed")
    close(got["hook_pos_embed"], pos, "hook_pos_embed")
    close(got["hook_token_type_embed"], token_type, "hook_token_type_embed")
    resid = check_norm(got, "embed.ln", word + pos + token_type, emb.LayerNorm, eps)

    for layer, block in enumerate(hf.encoder.layer):
        name = f"blocks.{layer}"
        close(got[f"{name}.hook_resid_pre"], resid, "hook_resid_pre")
        self_attn = block.attention.self
        q, k, v = linear(resid, self_attn.query), linear(resid, self_attn.key), linear(resid, self_attn.value)
        for key, value in (("q", q), ("k", k), ("v", v)):
            close(got[f"{name}.attn.hook_{key}"], value, f"hook_{key}")
        z = attention(q, k, v, heads, heads, causal=False, got=got, name=name)
        close(got[f"{name}.attn.hook_z"], z, "hook_z")
        attn_out = linear(z, block.attention.output.dense)
        close(got[f"{name}.hook_attn_out"], attn_out, "hook_attn_out")
        resid_mid = resid + attn_out
        close(got[f"{name}.hook_resid_mid"], resid_mid, "hook_resid_mid")
        ln1 = check_norm(got, f"{name}.ln1", resid_mid, block.attention.output.LayerNorm, eps)
        pre = linear(ln1, block.intermediate.dense)
        close(got[f"{name}.mlp.hook_pre"], pre, "mlp.hook_pre")
        post = F.gelu(pre)
        close(got[f"{name}.mlp.hook_post"], post, "mlp.hook_post")
        mlp_out = linear(post, block.output.dense)
        close(got[f"{name}.hook_mlp_out"], mlp_out, "hook_mlp_out")
        resid_post = ln1 + mlp_out
        close(got[f"{name}.hook_resid_post"], resid_post, "hook_resid_post")
        resid = check_norm(got, f"{name}.ln2", resid_post, block.output.LayerNorm, eps)
        close(got[f"{name}.hook_normalized_resid_post"], resid, "hook_normalized_resid_post")


# -- against the real TransformerLens 3.9 (HookedTransformer / HookedEncoder, weights unprocessed) ----------

#: TransformerLens names hookpoints does not give: the unembedding and BERT's MLM head are not hook points.
NOT_GIVEN = ("unembed.", "mlm_head.")


def transformerlens_model(family: str, folder: Path, scratch: Path):
    """The checkpoint in ``folder`` as a TransformerLens model, loaded offline with every processing step off."""
    import transformers as tf
    from transformer_lens import HookedEncoder, HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config
    from transformer_lens.pretrained import weight_conversions

    copy = scratch / "model"  # TransformerLens' config conversion misreads a path that contains "llama"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    if family == "gpt2":
        config["n_ctx"] = config["n_positions"]  # TransformerLens reads GPT-2's context length as n_ctx
    if family == "bert":
        config["architectures"] = ["BertForMaskedLM"]  # the BERT class TransformerLens' config loader knows
    (copy / "config.json").write_text(json.dumps(config))
    cfg = get_pretrained_model_config(str(copy), fold_ln=False, device="cpu")
    if family == "bert":
        hf = tf.BertForPreTraining(tf.BertConfig.from_pretrained(copy))  # its weight converter reads both heads
        missing, _ = hf.bert.load_state_dict(tf.BertModel.from_pretrained(copy).state_dict(), strict=False)
        assert not [name for name in missing if not name.startswith("pooler")], missing
        model = HookedEncoder(cfg)
        model.load_state_dict(weight_conversions.convert_bert_weights(hf, cfg), strict=False)
        return model.eval()
    hf = tf.AutoModelForCausalLM.from_pretrained(copy)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        getattr(weight_conversions, f"convert_{family}_weights")(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # HookedTransformer: deprecated in favour of 4.x's bridge
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "qwen3", "bert"])
def test_every_name_equals_transformerlens(tiny_model_dir, tmp_path, family):
    model = load(tiny_model_dir(family))
    peer = transformerlens_model(family, tiny_model_dir(family), tmp_path)
    ids = model.text_inputs([TEXT]).kwargs["input_ids"]  # [1, pos]: the same tokens for both (no BOS added)
    with torch.no_grad():
        _, cache = peer.run_with_cache(ids)
    names = [name for name in cache.keys() if not name.startswith(NOT_GIVEN)]
    assert len(names) > 20
    missing = [name for name in names if name not in model.hook_points]
    assert not missing, f"TransformerLens names hookpoints lacks: {missing}"
    got = model.pooled(model.text_inputs([TEXT]), model.select(names), "none")  # name -> [pos, width]
    for name in names:
        expected, actual = cache[name][0], got[model.hook_points.get(name).name]  # drop TL's batch axis
        if "_norm.hook_" in name:  # Qwen3's per-head q/k norm: TL runs it on [batch * pos * head, d_head]
            expected = cache[name].reshape(actual.shape)  # hookpoints: [pos, head * d_head] ([pos, head] scales)
        if name.endswith(("hook_pattern", "hook_attn_scores")):  # [head, query, key]
            heads, queries, keys = expected.shape
            actual = map_of(actual, heads, keys)
            masked = torch.isinf(expected)  # TransformerLens masks with -inf, HF with the dtype's minimum
            assert (actual[masked] < -1e30).all(), name
            expected, actual = expected.masked_fill(masked, 0), actual.masked_fill(masked, 0)
        else:
            expected = expected.reshape(actual.shape[0], -1)  # [pos, heads * d_head] ...
        torch.testing.assert_close(actual, expected, atol=5e-5, rtol=5e-5, msg=f"{family} {name}")


def gpt2_with_bos(tiny_model_dir, tmp_path):
    """The tiny GPT-2 loaded with ``prepend_bos`` and TransformerLens' copy of it, on the same tokenizer."""
    model = load(tiny_model_dir("gpt2"), prepend_bos=True)
    peer = transformerlens_model("gpt2", tiny_model_dir("gpt2"), tmp_path)
    peer.set_tokenizer(model.tokenizer)
    return model, peer


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_prepend_bos_matches_transformerlens_text_input(tiny_model_dir, tmp_path):
    """TransformerLens tokenises text with BOS first by default; hookpoints does so with prepend_bos."""
    model, peer = gpt2_with_bos(tiny_model_dir, tmp_path)
    inputs = model.text_inputs([TEXT])
    assert torch.equal(inputs.kwargs["input_ids"], peer.to_tokens(TEXT))  # BOS, then the tokenizer's ids
    with torch.no_grad():
        _, cache = peer.run_with_cache(TEXT)  # TransformerLens' default text path
    name = "blocks.1.hook_resid_post"
    got = model.pooled(inputs, model.select([name]), "none")[name]
    torch.testing.assert_close(got, cache[name][0], atol=5e-5, rtol=5e-5)
    plain = load(tiny_model_dir("gpt2"))
    without = plain.pooled(plain.text_inputs([TEXT]), model.select([name]), "mean")[name]
    assert not torch.allclose(without, got.mean(0, keepdim=True), atol=1e-4)  # the BOS changes every position


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_batch_equals_transformerlens_with_its_attention_mask(tiny_model_dir, tmp_path, family):
    """A right-padded batch of unequal texts (GQA and rotary for LLaMA): every name at every real position, and
    the maps over real keys, equal TransformerLens given the same tokens and attention mask."""
    model = load(tiny_model_dir(family))
    peer = transformerlens_model(family, tiny_model_dir(family), tmp_path)
    texts = [TEXT, "a calm river", "The weather"]
    inputs = model.text_inputs(texts)
    ids, mask = inputs.kwargs["input_ids"], inputs.kwargs["attention_mask"]
    assert not mask.all()  # padded
    with torch.no_grad():
        logits, cache = peer.run_with_cache(ids, attention_mask=mask)
    names = [name for name in cache.keys() if not name.startswith(NOT_GIVEN)]
    output, got = model.run_with_cache(inputs, names=names)
    valid = mask.bool()
    torch.testing.assert_close(output.logits[valid], logits[valid], atol=5e-5, rtol=5e-5)
    for name in names:
        for i in range(len(texts)):
            actual, expected = got[name][i], cache[name][i]
            if name.endswith(("hook_pattern", "hook_attn_scores")):  # [head, query, key]: real queries and keys
                actual, expected = actual[:, valid[i]][:, :, valid[i]], expected[:, valid[i]][:, :, valid[i]]
                kept = torch.isfinite(expected)  # TransformerLens: -inf at masked keys
                actual, expected = actual[kept], expected[kept]
            else:
                actual, expected = actual[valid[i]], expected[valid[i]]
            torch.testing.assert_close(actual, expected, atol=5e-5, rtol=5e-5, msg=f"{family} {name} example {i}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_token_helpers_match_transformerlens(tiny_model_dir, tmp_path):
    """to_tokens / to_str_tokens / to_string, as TransformerLens gives them (BOS first by default there)."""
    model, peer = gpt2_with_bos(tiny_model_dir, tmp_path)
    assert torch.equal(model.to_tokens(TEXT), peer.to_tokens(TEXT))
    assert model.to_str_tokens(TEXT) == peer.to_str_tokens(TEXT)
    tokens = model.to_tokens(TEXT)[0]
    assert model.to_string(tokens) == peer.to_string(tokens)
    assert model.to_str_tokens(tokens) == peer.to_str_tokens(tokens)
    texts = [TEXT, "a calm river"]
    assert model.to_str_tokens(texts) == [peer.to_str_tokens(text) for text in texts]  # each without padding
    _, cache = model.run_with_cache(texts, names="blocks.0.hook_resid_post")
    assert [len(row) for row in model.to_str_tokens(texts)] == cache.mask.sum(1).tolist()  # position i: token i
    for bad in (1.5, [[1.0]], "x", None):
        with pytest.raises(UserError, match="token ids must be"):
            model.to_string(bad)
    with pytest.raises(UserError, match="to_tokens is for text input"):
        load(tiny_model_dir("whisper")).to_tokens([np.zeros(16_000, np.float32)])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_stacked_activations_match_transformerlens(tiny_model_dir, tmp_path, family):
    """cache.stack_activation and cache.accumulated_resid give TransformerLens' stacks and labels."""
    model = load(tiny_model_dir(family))
    peer = transformerlens_model(family, tiny_model_dir(family), tmp_path)
    ids = model.text_inputs([TEXT]).kwargs["input_ids"]
    with torch.no_grad():
        _, expected = peer.run_with_cache(ids)
    _, cache = model.run_with_cache(
        ids, names=["blocks.*.hook_resid_*", "blocks.*.ln1.hook_scale", "blocks.*.attn.hook_q"]
    )

    def close(got, want):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)

    for args in (("resid_post",), ("resid_pre", 1), ("scale", -1, "ln1"), ("q", None)):
        close(cache.stack_activation(*args), expected.stack_activation(*args))
    for layer in (None, -1, 0, 1, model.model.config.num_hidden_layers):
        for incl_mid in (False, True):
            got, labels = cache.accumulated_resid(layer, incl_mid=incl_mid, return_labels=True)
            want, want_labels = expected.accumulated_resid(layer, incl_mid=incl_mid, return_labels=True)
            assert labels == want_labels
            close(got, want)
    for bad in (7, -2, 1.5):
        with pytest.raises(UserError, match="layer must be -1 or a block count"):
            cache.stack_activation("resid_post", bad)
