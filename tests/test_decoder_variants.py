"""The decoder-only names on the variants TransformerLens 3.9 does not load as HF runs them.

TransformerLens 3.9 drops LLaMA's ``attention_bias`` / ``mlp_bias`` and Qwen3's q/k/v biases, ignores Qwen2 /
Qwen3 sliding windows and linear RoPE scaling (its logits differ from HF's by 0.2 to 1.0 on these tiny models;
tests/test_transformerlens_names.py compares the plain variants and Mistral with TransformerLens itself). Here
every TransformerLens name of these variants is compared, at every real position of a right-padded batch, with
plain torch hooks on the stock model run with HF's own eager attention (``output_attentions``), and the norms'
``hook_scale`` / ``hook_normalized`` with TransformerLens' arithmetic on the norm's input.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from hookpoints.loading import load
from hookpoints.tiny import randomise_norms_and_biases, tiny_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog by the river", "a lazy dog by the river"]  # windows of 4
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}
WINDOW = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}  # layer 1 windowed
VARIANTS = {
    "llama-biases": (tf.LlamaConfig, tf.LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "llama-linear-rope": (
        tf.LlamaConfig, tf.LlamaForCausalLM, {"rope_parameters": LINEAR_ROPE},
    ),
    "mistral-window": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 4, "head_dim": 16}),
    "qwen2-window": (tf.Qwen2Config, tf.Qwen2ForCausalLM, WINDOW),
    "qwen3-window-biases": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {**WINDOW, "head_dim": 32, "attention_bias": True}),
}  # fmt: skip


def build(folder, variant: str):
    config_class, model_class, extra = VARIANTS[variant]
    tokenizer = tiny_tokenizer()
    sizes = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    sizes |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    torch.manual_seed(0)
    model = model_class(config_class(**sizes, pad_token_id=0, bos_token_id=2, eos_token_id=3, **extra)).eval()
    randomise_norms_and_biases(model, 0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model_class


def stock_tensors(stock, inputs) -> dict[str, torch.Tensor]:
    """TransformerLens names -> the stock model's tensors ([batch, pos, ...]), read with plain torch hooks."""
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def output(name, index=None):
        def hook(_module, _args, out):
            seen[name] = out if index is None else out[index]

        return hook

    def first_input(name):
        def hook(_module, args, kwargs):
            seen[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    def on(module, name, index=None):
        handles.append(module.register_forward_hook(output(name, index)))

    def before(module, name):
        handles.append(module.register_forward_pre_hook(first_input(name), with_kwargs=True))

    base = stock.model
    on(base.embed_tokens, "hook_embed")
    before(base.norm, "ln_final")
    for layer, block in enumerate(base.layers):
        name = f"blocks.{layer}"
        before(block, f"{name}.hook_resid_pre")
        on(block, f"{name}.hook_resid_post")
        before(block.input_layernorm, f"{name}.ln1")
        for key in ("q", "k", "v"):
            on(getattr(block.self_attn, f"{key}_proj"), f"{name}.attn.hook_{key}")
        for key in ("q", "k"):
            if hasattr(block.self_attn, f"{key}_norm"):
                before(getattr(block.self_attn, f"{key}_norm"), f"{name}.attn.{key}_norm")
                on(getattr(block.self_attn, f"{key}_norm"), f"{name}.attn.{key}_normed")
        before(block.self_attn.o_proj, f"{name}.attn.hook_z")
        on(block.self_attn, f"{name}.hook_attn_out", 0)
        before(block.post_attention_layernorm, f"{name}.hook_resid_mid")
        before(block.post_attention_layernorm, f"{name}.ln2")
        on(block.mlp.gate_proj, f"{name}.mlp.hook_pre")
        on(block.mlp.up_proj, f"{name}.mlp.hook_pre_linear")
        before(block.mlp.down_proj, f"{name}.mlp.hook_post")
        on(block.mlp, f"{name}.hook_mlp_out")
        handles.append(block.register_forward_pre_hook(keep_rotary(seen, name), with_kwargs=True))
    try:
        with torch.no_grad():
            out = stock(**inputs.kwargs, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    config = stock.config
    for layer, block in enumerate(base.layers):
        name = f"blocks.{layer}"
        for norm, module in (("ln1", block.input_layernorm), ("ln2", block.post_attention_layernorm)):
            tl_norm(seen, f"{name}.{norm}", seen.pop(f"{name}.{norm}"), module.variance_epsilon)
        batch, pos = inputs.kwargs["input_ids"].shape
        q = seen[f"{name}.attn.hook_q"].view(batch, pos, -1, block.self_attn.head_dim)
        k = seen[f"{name}.attn.hook_k"].view(batch, pos, -1, block.self_attn.head_dim)
        if f"{name}.attn.q_norm" in seen:
            for key in ("q", "k"):
                normed = seen.pop(f"{name}.attn.{key}_norm")
                tl_norm(seen, f"{name}.attn.{key}_norm", normed, block.self_attn.q_norm.variance_epsilon)
            q, k = seen.pop(f"{name}.attn.q_normed"), seen.pop(f"{name}.attn.k_normed")
        cos, sin = seen.pop(f"{name}.rotary")
        module = __import__(type(block).__module__, fromlist=["apply_rotary_pos_emb"])
        rot_q, rot_k = module.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        seen[f"{name}.attn.hook_rot_q"], seen[f"{name}.attn.hook_rot_k"] = rot_q.transpose(1, 2), rot_k.transpose(1, 2)
        seen[f"{name}.attn.hook_pattern"] = out.attentions[layer]  # HF's eager weights
        groups = config.num_attention_heads // config.num_key_value_heads
        keys = rot_k.repeat_interleave(groups, 1)  # [batch, head, pos, d_head]
        seen[f"{name}.attn.hook_attn_scores"] = rot_q @ keys.transpose(2, 3) * block.self_attn.scaling
    tl_norm(seen, "ln_final", seen.pop("ln_final"), base.norm.variance_epsilon)
    return seen


def keep_rotary(seen, name):
    def hook(_module, _args, kwargs):
        seen[f"{name}.rotary"] = kwargs["position_embeddings"]

    return hook


def tl_norm(seen, name: str, x: torch.Tensor, eps: float) -> None:
    """TransformerLens' RMS ``hook_scale`` / ``hook_normalized`` of ``x`` (before the gain)."""
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    seen[f"{name}.hook_scale"], seen[f"{name}.hook_normalized"] = scale, x / scale


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_name_equals_plain_torch_hooks(tmp_path, variant):
    model_class = build(tmp_path, variant)
    model = load(tmp_path, dtype="float32")
    stock = model_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    inputs = model.text_inputs(TEXTS)
    valid = inputs.masks["input"]
    assert not valid.all() and valid.sum(1).min() > 4  # padded, and longer than the windows
    expected = stock_tensors(stock, inputs)
    output, got = model.run_with_cache(inputs, names=list(expected))
    torch.testing.assert_close(output.logits[valid], stock(**inputs.kwargs).logits[valid], atol=1e-5, rtol=1e-5)
    names = [p.name for p in model.hook_points if p.canonical and p.unavailable is None]
    assert sorted(expected) == sorted(names)  # every TransformerLens name of the model
    for name in names:
        for i in range(len(TEXTS)):
            real = valid[i]
            actual, want = got[name][i], expected[name][i]
            if name.endswith(("hook_pattern", "hook_attn_scores")):  # [head, query, key]
                actual, want = actual[:, real][:, :, real], want[:, real][:, :, real]
                if name.endswith("hook_attn_scores"):  # outside the window or the future: the mask
                    masked = expected[name.replace("attn_scores", "pattern")][i][:, real][:, :, real] == 0
                    assert (actual[masked] < -1e30).all(), name
                    actual, want = actual[~masked], want[~masked]
            else:
                actual, want = actual[real], want[real].reshape(actual[real].shape)
            torch.testing.assert_close(actual, want, atol=2e-5, rtol=2e-5, msg=f"{variant} {name} example {i}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # HookedTransformer: deprecated in favour of 4.x's bridge
@pytest.mark.parametrize("ungroup", [False, True])
def test_mistral_window_and_grouped_keys_equal_transformerlens(tmp_path, ungroup):
    """Mistral with a window of 4 keys (shorter than the texts) and 2 key-value heads for 4 query heads, against
    TransformerLens 3.9 given the same padded batch. TransformerLens' ``hook_k`` / ``hook_v`` / ``hook_rot_k``
    hold the key-value heads, or with ``ungroup_grouped_query_attention`` each repeated for its query heads
    (``repeat_interleave``): hookpoints keeps the key-value heads."""
    from tests.test_transformerlens_names import NOT_GIVEN, transformerlens_model

    build(tmp_path / "mistral", "mistral-window")
    model = load(tmp_path / "mistral", dtype="float32")
    peer = transformerlens_model("mistral", tmp_path / "mistral", tmp_path)
    assert peer.cfg.window_size == 4 and peer.cfg.n_key_value_heads == 2
    peer.cfg.ungroup_grouped_query_attention = ungroup
    inputs = model.text_inputs(TEXTS)
    ids, mask = inputs.kwargs["input_ids"], inputs.kwargs["attention_mask"]
    with torch.no_grad():
        logits, cache = peer.run_with_cache(ids, attention_mask=mask)
    names = [name for name in cache.keys() if not name.startswith(NOT_GIVEN)]
    output, got = model.run_with_cache(inputs, names=names)
    valid = mask.bool()
    torch.testing.assert_close(output.logits[valid], logits[valid], atol=5e-5, rtol=5e-5)
    for name in names:
        for i in range(len(TEXTS)):
            actual, expected = got[name][i], cache[name][i]
            if name.endswith(("hook_pattern", "hook_attn_scores")):  # [head, query, key]: real queries and keys
                actual, expected = actual[:, valid[i]][:, :, valid[i]], expected[:, valid[i]][:, :, valid[i]]
                kept = torch.isfinite(expected)  # TransformerLens: -inf at masked keys (the future, the window)
                assert (actual[~kept] < -1e30).all() if name.endswith("scores") else (actual[~kept] == 0).all()
                actual, expected = actual[kept], expected[kept]
            else:
                actual, expected = actual[valid[i]], expected[valid[i]]
                if ungroup and name.endswith(("attn.hook_k", "attn.hook_v", "hook_rot_k")):  # [pos, kv head, d]
                    actual = actual.repeat_interleave(peer.cfg.n_heads // peer.cfg.n_key_value_heads, 1)
            torch.testing.assert_close(actual, expected, atol=5e-5, rtol=5e-5, msg=f"{name} example {i}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(("family", "peer_family"), [("qwen2_audio", "qwen2"), ("ultravox", "llama")])
def test_audio_llm_language_model_names_equal_transformerlens(tiny_model_dir, tmp_path, family, peer_family):
    """The audio LLMs' language models (on text) under TransformerLens' names: their weights loaded into
    TransformerLens 3.9 as a plain Qwen2 / LLaMA, every name it caches compared."""
    from tests.test_transformerlens_names import NOT_GIVEN, TEXT, transformerlens_model

    model = load(tiny_model_dir(family), modality="text")
    body, head = {"qwen2_audio": ("model.language_model.", "lm_head."), "ultravox": ("language_model.model.", "")}[
        family
    ]
    head = head or "language_model.lm_head."
    weights = model.model.state_dict()
    plain = {"model." + k.removeprefix(body): v for k, v in weights.items() if k.startswith(body)}
    plain |= {"lm_head." + k.removeprefix(head): v for k, v in weights.items() if k.startswith(head)}
    lm_class = tf.Qwen2ForCausalLM if family == "qwen2_audio" else tf.LlamaForCausalLM
    lm = lm_class(model.model.config.text_config).eval()
    lm.load_state_dict(plain, strict=True)
    lm.save_pretrained(tmp_path / "lm")
    model.tokenizer.save_pretrained(tmp_path / "lm")  # TransformerLens loads one
    (tmp_path / "scratch").mkdir()
    peer = transformerlens_model(peer_family, tmp_path / "lm", tmp_path / "scratch")
    ids = model.text_inputs([TEXT]).kwargs["input_ids"]
    with torch.no_grad():
        logits, cache = peer.run_with_cache(ids)
    names = [name for name in cache.keys() if not name.startswith(NOT_GIVEN)]
    output, got = model.run_with_cache(ids, names=names)
    torch.testing.assert_close(output.logits, logits, atol=5e-5, rtol=5e-5)
    for name in names:
        actual, expected = got[name][0], cache[name][0]
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            masked = torch.isinf(expected)
            assert (actual[masked] < -1e30).all(), name
            actual, expected = actual.masked_fill(masked, 0), expected.masked_fill(masked, 0)
        torch.testing.assert_close(actual, expected, atol=5e-5, rtol=5e-5, msg=f"{family} {name}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_recorded_mistral_window_equals_transformerlens(tmp_path):
    """What ``record`` stores (pooling ``none``, a padded batch of 3) for every TransformerLens name of Mistral with
    a window shorter than the texts, read back from the store, against TransformerLens run on each text alone."""
    from hookpoints.store.catalog import Store

    from hookpoints.record_api import record
    from tests.store_checks import table_rows
    from tests.test_transformerlens_names import NOT_GIVEN, transformerlens_model

    build(tmp_path / "mistral", "mistral-window")
    model = load(tmp_path / "mistral", dtype="float32")
    peer = transformerlens_model("mistral", tmp_path / "mistral", tmp_path)
    texts = [*TEXTS, "the river"]
    rows = [{"id": f"t{i}", "text": text} for i, text in enumerate(texts)]
    with torch.no_grad():
        caches = [peer.run_with_cache(model.text_inputs([text]).kwargs["input_ids"])[1] for text in texts]
    names = [name for name in caches[0].keys() if not name.startswith(NOT_GIVEN)]
    store = Store.open(tmp_path / "store", create=True)
    record(model, rows, store, "r", hooks=names, pooling="none", batch_size=3, progress=False)
    table = table_rows(store, "activations", "r", ["hook", "example_id", "position", "activation"])
    stored = {(hook, example, position): torch.tensor(vector) for hook, example, position, vector in table}
    heads, keys = peer.cfg.n_heads, model.hook_points.get("blocks.0.attn.hook_pattern").keys
    for name in names:
        for i, cache in enumerate(caches):
            expected = cache[name][0]  # [pos, ...] or [head, query, key]
            positions = expected.shape[1] if name.endswith(("hook_pattern", "hook_attn_scores")) else len(expected)
            actual = torch.stack([stored[name, f"t{i}", position] for position in range(positions)])
            assert (name, f"t{i}", positions) not in stored  # nothing recorded at padding
            if name.endswith(("hook_pattern", "hook_attn_scores")):
                actual = actual.view(positions, heads, keys)  # [query, head, key], zeros past the example's keys
                assert not actual[:, :, positions:].any()
                actual = actual[:, :, :positions].transpose(0, 1)
                kept = torch.isfinite(expected)  # the future and outside the window: -inf in TransformerLens
                assert (actual[~kept] < -1e30).all() if name.endswith("scores") else (actual[~kept] == 0).all()
                actual, expected = actual[kept], expected[kept]
            torch.testing.assert_close(actual, expected.reshape(actual.shape), atol=5e-5, rtol=5e-5, msg=name)
