"""Attention scores, patterns and rotary q/k (hookpoints.attention), and the settings around them.

Peers: HuggingFace's own eager attention weights (``output_attentions=True`` on a stock model loaded with
``attn_implementation="eager"``), softmax(q k^T / sqrt(d) + mask) recomputed from the recorded rotary q and k,
and the stock model's output (recording patterns must not change it). Every parameter is random
(hookpoints.tiny), padding included in the batches.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from hookpoints.store.catalog import Store

from hookpoints.attention import eager
from hookpoints.editing import NeuronEdit
from hookpoints.errors import UserError
from hookpoints.loading import load

TEXTS = ["The weather is nice today, and the river is calm.", "Il fait beau."]  # different lengths: padding


def rows_by_example(rows: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Pooling-none rows (valid positions in mask.nonzero() order) split per example."""
    counts = mask.sum(1).tolist()
    return list(rows.split(counts))


def test_pattern_is_softmax_of_recorded_rotary_qk_and_rows_sum_to_one(tiny_model_dir):
    model = load(tiny_model_dir("llama"))  # grouped-query attention: 4 query heads, 2 key/value heads
    cfg = model.model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    inputs = model.text_inputs(TEXTS)
    mask = inputs.masks["input"]
    assert not mask.all()  # the second example is padded
    names = ["blocks.1.attn.hook_rot_q", "blocks.1.attn.hook_rot_k", "blocks.1.attn.hook_pattern"]
    got = model.pooled(inputs, model.select(names), "none")
    keys = model.hook_points.get(names[2]).keys
    per_example = [rows_by_example(got[name], mask) for name in names]
    for q, k, rows in zip(*per_example, strict=True):
        pos = q.shape[0]
        q = q.view(pos, heads, -1).transpose(0, 1)  # [head, pos, d_head]
        k = k.view(pos, kv_heads, -1).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(pos, pos, dtype=torch.bool).triu(1), float("-inf"))
        pattern = rows.view(pos, heads, keys).transpose(0, 1)  # [head, query, keys]
        torch.testing.assert_close(pattern[..., :pos], scores.softmax(-1), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(heads, pos))  # over the example's own keys
        assert (pattern[..., pos:] == 0).all()  # the layout's padding past the example's keys


def hf_attentions(folder, family: str, inputs) -> dict[str, torch.Tensor]:
    """A stock model's eager attention weights, named like hookpoints' map hooks: [batch, head, query, key]."""
    classes = {
        "gpt2": tf.GPT2LMHeadModel,
        "bert": tf.BertModel,
        "whisper": tf.WhisperForConditionalGeneration,
        "seamless_m4t_v2": tf.SeamlessM4Tv2ForTextToText,
    }
    stock = classes[family].from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = stock(**inputs.kwargs, output_attentions=True)
    if family in ("gpt2", "bert"):
        return {f"blocks.{i}.attn.hook_pattern": a for i, a in enumerate(out.attentions)}
    encoder = "speech_encoder" if family == "whisper" else "text_encoder"
    cross = "encoder_attn" if family == "whisper" else "cross_attention"
    named = {f"{encoder}.layers.{i}.self_attn.hook_pattern": a for i, a in enumerate(out.encoder_attentions)}
    named |= {f"text_decoder.layers.{i}.self_attn.hook_pattern": a for i, a in enumerate(out.decoder_attentions)}
    named |= {f"text_decoder.layers.{i}.{cross}.hook_pattern": a for i, a in enumerate(out.cross_attentions)}
    return named


@pytest.mark.parametrize("family", ["gpt2", "bert", "whisper", "seamless_m4t_v2"])
def test_patterns_equal_huggingface_eager_attention_weights(tiny_model_dir, family):
    folder = tiny_model_dir(family)
    model = load(folder)
    inputs = model.adapter.probe_inputs(model.model) if family == "whisper" else None
    if family in ("gpt2", "bert"):
        inputs = model.text_inputs(TEXTS)
    if family == "seamless_m4t_v2":
        inputs = model.adapter.probe_inputs(model.model)
    expected = hf_attentions(folder, family, inputs)
    points = model.select(list(expected))
    assert {p.name for p in points} == set(expected) and any("cross" in n or "encoder_attn" in n for n in expected) == (
        family in ("whisper", "seamless_m4t_v2")
    )
    got = model.pooled(inputs, points, "none")
    for point in points:
        full = expected[point.name]  # [batch, head, query, key]
        queries, keys = inputs.masks[point.space], inputs.masks[point.key_space]
        for example, rows in enumerate(rows_by_example(got[point.name], queries)):
            pattern = rows.view(rows.shape[0], point.heads, point.keys).transpose(0, 1)  # [head, query, keys]
            n_keys = int(keys[example].sum())
            want = full[example][:, queries[example]][..., :n_keys]
            torch.testing.assert_close(pattern[..., :n_keys], want, atol=2e-6, rtol=1e-5, msg=point.name)
            assert (pattern[..., n_keys:] == 0).all()


def test_recording_patterns_leaves_the_model_output_unchanged(tiny_model_dir):
    folder = tiny_model_dir("llama")
    model = load(folder)
    inputs = model.text_inputs(TEXTS)
    stock = tf.AutoModelForCausalLM.from_pretrained(folder).eval()  # sdpa, no hookpoints attention
    with torch.no_grad():
        expected = stock(**inputs.kwargs).logits
        plain = model.model(**inputs.kwargs).logits  # hookpoints attention, SDPA path
    point = model.hook_points.get("blocks.0.attn.hook_pattern")
    with torch.inference_mode(), eager(), model.traced.trace(**inputs.kwargs):
        pattern = model.envoy(point).output.save()
        logits = model._envoys["lm_head"].output.save()
    assert pattern.shape == (2, point.heads, inputs.masks["input"].shape[1], inputs.masks["input"].shape[1])
    valid = inputs.masks["input"]
    torch.testing.assert_close(plain, expected, atol=0, rtol=0)  # not recording maps: the stock SDPA call
    torch.testing.assert_close(logits[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_maps_are_recorded_only_when_named(tiny_model_dir):
    model = load(tiny_model_dir("gpt2"))
    assert not any(p.key_space for p in model.select(["blocks.*"]))
    assert not any(p.key_space for p in model.select())  # the default recording
    named = model.select(["blocks.*.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"])
    assert [p.name for p in named] == [
        "blocks.0.attn.hook_attn_scores",
        "blocks.0.attn.hook_pattern",
        "blocks.1.attn.hook_pattern",
    ]
    assert named[1].width == named[1].heads * named[1].keys == 4 * 256  # [head, key_pos] up to the longest input


def test_derived_and_map_hooks_refuse_edits(tiny_model_dir):
    model = load(tiny_model_dir("gpt2"))
    one = (torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(UserError, match="edit transformer.h.0.ln_1:input instead"):
        NeuronEdit(model.hook_points.get("blocks.0.ln1.hook_normalized"), *one)
    with pytest.raises(UserError, match="attention map"):
        NeuronEdit(model.hook_points.get("blocks.0.attn.hook_pattern"), *one)


def test_transformerlens_4_and_hooked_encoder_names_are_aliases(tiny_model_dir):
    get = load(tiny_model_dir("llama")).hook_points.get
    for bridge, legacy in [
        ("blocks.0.hook_in", "blocks.0.hook_resid_pre"),
        ("blocks.0.ln2.hook_in", "blocks.0.hook_resid_mid"),
        ("blocks.1.hook_out", "blocks.1.hook_resid_post"),
        ("blocks.0.attn.q.hook_out", "blocks.0.attn.hook_q"),
        ("blocks.0.attn.o.hook_in", "blocks.0.attn.hook_z"),
        ("blocks.0.mlp.gate.hook_out", "blocks.0.mlp.hook_pre"),
        ("blocks.0.mlp.in.hook_out", "blocks.0.mlp.hook_pre_linear"),
        ("blocks.0.mlp.out.hook_in", "blocks.0.mlp.hook_post"),
        ("embed.hook_out", "hook_embed"),
    ]:
        assert get(bridge) is get(legacy), bridge
    bert = load(tiny_model_dir("bert")).hook_points.get
    assert bert("embed.hook_embed") is bert("hook_embed")
    assert bert("embed.hook_token_type_embed") is bert("hook_token_type_embed")
    assert bert("blocks.1.hook_out") is bert("blocks.1.hook_normalized_resid_post")


def test_prepend_bos(tiny_model_dir):
    folder = tiny_model_dir("gpt2")
    plain, with_bos = load(folder), load(folder, prepend_bos=True)
    ids = plain.text_inputs(TEXTS).kwargs["input_ids"]
    bos_inputs = with_bos.text_inputs(TEXTS)
    bos = with_bos.tokenizer.bos_token_id
    assert (bos_inputs.kwargs["input_ids"][:, 0] == bos).all()
    assert torch.equal(bos_inputs.kwargs["input_ids"][:, 1:], ids)
    assert bos_inputs.masks["input"].sum().item() == plain.text_inputs(TEXTS).masks["input"].sum().item() + 2
    with pytest.raises(UserError, match="prepend_bos applies to"):
        load(tiny_model_dir("whisper"), prepend_bos=True)


def test_max_bytes_refuses_before_writing(tiny_model_dir, texts_manifest, tmp_path, run_cli):
    manifest, store = texts_manifest(6), tmp_path / "store"
    common = ["record", "--model", str(tiny_model_dir("gpt2")), "--data", str(manifest), "--store", str(store)]
    pattern = ["--hooks", "blocks.*.attn.hook_pattern", "--pooling", "none"]
    code, _, err = run_cli(*common, "--run", "big", *pattern, "--max-bytes", "64k")
    assert code == 2 and "over --max-bytes 64.0 KiB" in err and "blocks." in err and len(err.strip().splitlines()) == 1
    assert not store.exists() or Store.open(store).run_info("big") is None  # nothing written
    code, _, err = run_cli(*common, "--run", "bad", *pattern, "--max-bytes", "lots")
    assert code == 2 and "--max-bytes must be a size" in err
    code, out, err = run_cli(*common, "--run", "fits", *pattern, "--max-bytes", "64M", "--prepend-bos")
    assert code == 0, err
    opened = Store.open(store)
    hooks = {row["hook"]: row for row in opened.run_hooks("fits").to_pylist()}
    assert hooks["blocks.0.attn.hook_pattern"]["width"] == 4 * 256
    rows = opened.dataset("activations").to_table(filter=None).to_pylist()
    pattern_rows = [r for r in rows if r["run"] == "fits" and r["hook"] == "blocks.0.attn.hook_pattern"]
    first = [r for r in pattern_rows if r["example_id"] == "ex0000"]
    # one row per query position (BOS first: 1 + the text's tokens), each summing to 1 over its heads' keys
    assert len(first) == 1 + len(load(tiny_model_dir("gpt2")).text_inputs(["the quick brown"]).kwargs["input_ids"][0])
    for row in first:
        vector = torch.tensor(row["activation"]).view(4, 256)
        torch.testing.assert_close(vector.sum(-1), torch.ones(4))


def test_seamless_speech_maps_keep_the_output_and_sum_to_one(tiny_model_dir):
    """The Conformer hands a boolean chunk mask and a relative position bias to its attention function."""
    import numpy as np

    folder = tiny_model_dir("seamless_m4t_v2")
    model = load(folder, modality="speech")
    rng = np.random.default_rng(0)
    inputs = model.speech_inputs([rng.standard_normal(16_000 * s).astype("float32") * 0.1 for s in (1, 2)])
    kwargs = {**inputs.kwargs, "decoder_input_ids": torch.tensor([[3, 5, 6], [3, 5, 6]])}
    stock = tf.SeamlessM4Tv2ForSpeechToText.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = stock(**kwargs)
        with eager():  # the path a recording of patterns takes
            got = model.model(**kwargs)
    torch.testing.assert_close(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(got.logits, expected.logits, atol=5e-5, rtol=1e-4)
    name = "speech_encoder.layers.0.self_attn.hook_pattern"
    point = model.hook_points.get(name)
    rows = model.pooled(inputs, [point], "none")[name]  # [valid frames, head * keys]
    frames = inputs.masks[point.space]
    for example, mine in enumerate(rows_by_example(rows, frames)):
        pattern = mine.view(mine.shape[0], point.heads, point.keys)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(mine.shape[0], point.heads))
        assert (pattern[..., int(frames[example].sum()) :] == 0).all()


def test_record_max_bytes_from_python(tiny_model_dir, texts_manifest, store):
    from hookpoints.manifest import read_data
    from hookpoints.recorder import record

    model = load(tiny_model_dir("bert"))
    manifest = read_data(str(texts_manifest(4)), required=("text",))
    hooks = ["blocks.0.attn.hook_attn_scores"]
    with pytest.raises(UserError, match="over --max-bytes"):
        record(model, manifest, store, "r", hooks=hooks, pooling="none", max_bytes=1000)
    assert store.run_info("r") is None  # refused before anything was written
    summary = record(model, manifest, store, "r", hooks=hooks, pooling="mean", max_bytes=4 * 4 * 256 * 4)
    assert summary.recorded == 4  # pooled: one [head, key_pos] row per example fits the same budget


def test_whisper_patterns_keep_the_window_the_model_attends_to(tiny_model_dir):
    """Whisper attends over its whole window (30 s; 5 s here): the silence after a short utterance is no masked
    padding. Its encoder self-attention and the decoder's cross-attention maps must keep the weight on those
    keys (the model's own pattern, rows summing to 1), not zero it as padding (on the trained tiny.en, rows of a
    3 s clip kept as little as 0.1% of their weight)."""
    import numpy as np

    folder = tiny_model_dir("whisper")
    model = load(folder, modality="speech")
    rng = np.random.default_rng(0)
    inputs = model.speech_inputs([(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16_000, 30_000)])
    assert not inputs.masks["encoder"].all()  # 1 s and 1.9 s of a 5 s window
    names = ["speech_encoder.layers.1.self_attn.hook_pattern", "text_decoder.layers.0.encoder_attn.hook_pattern"]
    expected = hf_attentions(folder, "whisper", inputs)
    points = model.select(names)
    got = model.pooled(inputs, points, "none")
    for point in points:
        queries = inputs.masks[point.space]
        for example, rows in enumerate(rows_by_example(got[point.name], queries)):
            pattern = rows.view(rows.shape[0], point.heads, point.keys).transpose(0, 1)  # [head, query, keys]
            want = expected[point.name][example][:, queries[example]]  # [head, query, 250 window positions]
            torch.testing.assert_close(pattern, want, atol=2e-6, rtol=1e-5, msg=point.name)
            torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:2]), msg=point.name)
