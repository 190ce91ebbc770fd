"""``run_with_cache``: the cache's tensors against plain torch hooks, and padded batches against one example."""

from __future__ import annotations

import pytest
import torch

import hookpoints as hp
from hookpoints.errors import UserError
from tests.api_helpers import randomise, raw_tensors, sine

TEXTS = ["the quick brown fox jumps over", "a lazy dog", "seven birds sing while the fox sleeps today"]


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    model = hp.load(tiny_model_dir("gpt2"))
    randomise(model)
    return model


@pytest.fixture(scope="module")
def bert(tiny_model_dir):
    model = hp.load(tiny_model_dir("bert"))
    randomise(model)
    return model


@pytest.fixture(scope="module")
def seamless_speech(tiny_model_dir):
    model = hp.load(tiny_model_dir("seamless_m4t_v2"), modality="speech")
    randomise(model, scale=0.05)
    return model


def test_gpt2_cache_matches_plain_torch_hooks(gpt2):
    names = ["blocks.*.hook_resid_post", "blocks.1.attn.hook_k", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
    output, cache = gpt2.run_with_cache(TEXTS, names=names)
    inputs = gpt2.inputs(TEXTS)
    raw = raw_tensors(gpt2, cache.points.values(), inputs)
    batch, pos = inputs.kwargs["input_ids"].shape
    heads, d_head = gpt2.model.config.n_head, gpt2.model.config.n_embd // gpt2.model.config.n_head
    d = gpt2.model.config.n_embd
    # written out per hook, independently of the layout code: GPT-2's fused c_attn holds q, k, v side by side
    assert torch.equal(cache["blocks.0.hook_resid_post"], raw["blocks.0.hook_resid_post"])
    assert cache["blocks.0.hook_resid_post"].shape == (batch, pos, d)
    k = raw["blocks.1.attn.hook_k"][..., d : 2 * d].reshape(batch, pos, heads, d_head)
    assert torch.equal(cache["blocks.1.attn.hook_k"], k)
    z = raw["blocks.0.attn.hook_z"].reshape(batch, pos, heads, d_head)
    assert torch.equal(cache["blocks.0.attn.hook_z"], z)
    # the output is the model's own, with the hooks' values feeding it
    with torch.inference_mode():
        reference = gpt2.model(**inputs.kwargs).logits
    assert torch.allclose(output.logits, reference, atol=1e-6)
    assert torch.equal(cache.mask, inputs.kwargs["attention_mask"].bool())
    # aliases (module paths) reach the same tensor
    assert torch.equal(cache["transformer.h.0"], cache["blocks.0.hook_resid_post"])


def _check_batch_equals_single(model, examples, names, atol):
    _, batched = model.run_with_cache(examples, names=names)
    _, pooled = model.run_with_cache(examples, names=names, pooling="mean")
    _, last = model.run_with_cache(examples, names=names, pooling="last")
    checked = 0
    for i, example in enumerate(examples):
        _, alone = model.run_with_cache([example], names=names)
        for name in batched:
            mask = batched.mask_of(name)
            if mask is None:
                assert torch.allclose(batched[name][i], alone[name][0], atol=atol), name
                continue
            mine = batched[name][i][mask[i]]  # [valid positions, *d]
            single = alone[name][0][alone.mask_of(name)[0]]  # alone: SeamlessM4T pads frames to an even count
            assert mine.shape == single.shape, (name, mine.shape, single.shape)
            assert torch.allclose(mine, single, atol=atol), (name, (mine - single).abs().max())
            assert torch.allclose(pooled[name][i], single.float().mean(0), atol=atol), name
            assert torch.allclose(last[name][i], single[-1].float(), atol=atol), name
            checked += 1
    assert checked >= len(examples) * 2


def test_gpt2_padded_batch_equals_one_at_a_time(gpt2):
    _check_batch_equals_single(gpt2, TEXTS, ["blocks.*.hook_resid_post", "blocks.*.attn.hook_q"], 1e-5)


def test_bert_cache_and_padding(bert):
    names = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_v", "blocks.1.attn.hook_z"]
    _, cache = bert.run_with_cache(TEXTS, names=names)
    inputs = bert.inputs(TEXTS)
    raw = raw_tensors(bert, cache.points.values(), inputs)
    batch, pos = inputs.kwargs["input_ids"].shape
    heads = bert.model.config.num_attention_heads
    assert torch.equal(cache["blocks.0.attn.hook_v"], raw["blocks.0.attn.hook_v"].reshape(batch, pos, heads, -1))
    assert torch.equal(cache["blocks.1.attn.hook_z"], raw["blocks.1.attn.hook_z"].reshape(batch, pos, heads, -1))
    assert torch.equal(cache["blocks.1.hook_resid_post"], raw["blocks.1.hook_resid_post"])
    _check_batch_equals_single(bert, TEXTS, names, 1e-5)


def test_seamless_speech_cache_matches_torch_hooks_and_single_examples(seamless_speech):
    waves = [sine(0.9, 200.0), sine(0.45, 330.0), sine(1.3, 150.0)]
    _, cache = seamless_speech.run_with_cache(waves, names=None)
    inputs = seamless_speech.inputs(waves)
    raw = raw_tensors(seamless_speech, cache.points.values(), inputs)
    for name, tensor in cache.items():
        point = cache.points[name]
        x = raw[name]
        x = x.unsqueeze(1) if point.time_axis is None else x.movedim(point.time_axis, 1)
        x = x.reshape(*x.shape[:2], -1)
        if point.time_axis is None:
            x = x[:, 0]
        assert torch.equal(tensor.reshape(x.shape), x), name
    spaces = {cache.points[name].space for name in cache}
    assert {"input", "encoder"} <= spaces, spaces  # speech frames and the adaptor's subsampled frames
    conv = [n for n in cache if cache.points[n].time_axis not in (None, 1)]
    assert conv, "a Conformer conv hook ([batch, channels, time]) is among the listed hook points"
    names = ["speech_encoder.layers.*.hook_resid_post", *conv[:2], "text_decoder.layers.0.hook_resid_post"]
    _check_batch_equals_single(seamless_speech, waves, names, 1e-4)


def test_audio_paths_and_names_predicate(seamless_speech, tmp_path):
    import soundfile

    path = tmp_path / "tone.wav"
    soundfile.write(path, sine(0.6), 16_000, subtype="FLOAT")  # no 16-bit rounding
    _, from_path = seamless_speech.run_with_cache([str(path)], names=lambda name: name.endswith("hook_resid_post"))
    _, from_wave = seamless_speech.run_with_cache([sine(0.6)], names=lambda name: name.endswith("hook_resid_post"))
    assert list(from_path) and all(name.endswith("hook_resid_post") for name in from_path)
    for name in from_path:
        assert torch.allclose(from_path[name], from_wave[name], atol=1e-4), name


def test_raw_tensor_inputs_and_cache_methods(gpt2):
    inputs = gpt2.inputs(TEXTS)
    _, from_text = gpt2.run_with_cache(TEXTS, names="blocks.1.hook_resid_post")
    _, from_dict = gpt2.run_with_cache(dict(inputs.kwargs), names="blocks.1.hook_resid_post")
    _, from_ids = gpt2.run_with_cache(inputs.kwargs["input_ids"][:1], names="blocks.1.hook_resid_post")
    assert torch.equal(from_text["blocks.1.hook_resid_post"], from_dict["blocks.1.hook_resid_post"])
    assert from_ids["blocks.1.hook_resid_post"].shape[0] == 1
    assert from_text.to("cpu").keys() == from_text.keys()
    assert "blocks.1.hook_resid_post" in from_text and len(from_text) == 1
    mean = from_text.mean("blocks.1.hook_resid_post")
    x, mask = from_text["blocks.1.hook_resid_post"], from_text.mask
    assert torch.allclose(mean, x[mask].mean(0))
    with pytest.raises(KeyError, match="closest: blocks.1.hook_resid_post"):  # a typo names the right key
        from_text["blocks.1.hook_resid_pots"]


@pytest.mark.parametrize(
    ("inputs", "names", "pooling", "message"),
    [
        (["hi"], "blocks.*.no_such_hook", None, "matches no recordable hook point"),
        (["hi"], None, "median", "pooling must be one of mean, last, max"),
        (["hi"], 42, None, "names must be a glob"),
        (["hi"], [], None, "names is empty"),  # was every listed hook point
        ([], None, None, "not an empty list"),
        ([""], None, None, "empty string"),
        (["hi", 3], None, None, "mix"),
        (12, None, None, "inputs must be"),
        ([sine(0.5)], None, None, "(gpt2) takes text, not waveforms"),  # was: load it with modality speech
    ],
)
def test_bad_cache_arguments_are_one_line_user_errors(gpt2, inputs, names, pooling, message):
    with pytest.raises(UserError) as caught:
        gpt2.run_with_cache(inputs, names=names, pooling=pooling)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_speech_model_refuses_text_and_bad_waveforms(seamless_speech):
    with pytest.raises(UserError, match="loaded for speech"):
        seamless_speech.run_with_cache(["hello there"])
    with pytest.raises(UserError, match="1-D"):
        seamless_speech.run_with_cache([sine(0.5).reshape(2, -1)])


def test_load_and_select_bad_input(gpt2, tiny_model_dir, tmp_path):
    assert [p.name for p in gpt2.select("blocks.1.hook_resid_post")] == ["blocks.1.hook_resid_post"]
    with pytest.raises(UserError, match="does not exist"):
        hp.load(tmp_path / "no" / "such" / "model")
    with pytest.raises(UserError, match="takes text input, not speech"):
        hp.load(tiny_model_dir("gpt2"), modality="speech")
    with pytest.raises(UserError, match="dtype must be one of"):
        hp.load(tiny_model_dir("gpt2"), dtype="float8")


def transformer_lens_gpt2(gpt2):
    """TransformerLens' HookedTransformer with the (randomised) weights of the tiny GPT-2."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = gpt2.model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
        eps=c.layer_norm_epsilon, positional_embedding_type="standard", default_prepend_bos=False,
    )  # fmt: skip
    reference = HookedTransformer(cfg)
    reference.load_state_dict(convert_gpt2_weights(gpt2.model, cfg), strict=False)
    return reference


def test_gpt2_cache_equals_transformer_lens_run_with_cache(gpt2):
    """TransformerLens itself, loaded with the same (randomised) weights: same names, shapes and values."""
    reference = transformer_lens_gpt2(gpt2)
    ids = gpt2.inputs([TEXTS[0]]).kwargs["input_ids"]  # [1, tokens]
    with torch.inference_mode():
        logits, expected = reference.run_with_cache(ids)
    output, cache = gpt2.run_with_cache(ids, names=lambda n: n in expected.cache_dict)
    assert len(cache) >= 20
    torch.testing.assert_close(output.logits, logits, atol=1e-5, rtol=1e-5)
    for name, tensor in cache.items():
        reference = expected[name]
        if name.endswith("hook_attn_scores"):  # TransformerLens puts -inf at masked keys; compare the rest
            kept = torch.isfinite(reference)
            assert not kept.all()
            tensor, reference = tensor[kept], reference[kept]
        torch.testing.assert_close(tensor, reference, atol=1e-5, rtol=1e-5, msg=name)


def test_attention_pattern_in_the_cache_is_transformer_lens_layout(gpt2):
    """``hook_pattern`` comes back as [batch, head, query_pos, key_pos], rows summing to 1 over unmasked keys."""
    _, cache = gpt2.run_with_cache(TEXTS[:2], names="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"]
    mask = cache.mask  # [batch, pos]
    assert pattern.shape[:2] == (2, gpt2.model.config.n_head) and pattern.shape[2] == pattern.shape[3] == mask.shape[1]
    sums = pattern.sum(-1)  # [batch, head, query]
    for b in range(2):
        valid = mask[b].bool()
        torch.testing.assert_close(sums[b][:, valid], torch.ones_like(sums[b][:, valid]), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="attention map"):
        cache.pooled("mean")


def test_left_padded_tensors_give_what_each_example_gives_alone(gpt2):
    """A left-padded batch (a tokenizer with padding_side="left", as for generation) counts positions from each
    example's first real token, as TransformerLens and HF's generate do: GPT-2's absolute positions need it."""
    tokenizer = gpt2.tokenizer
    tokenizer.padding_side = "left"
    try:
        batch = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = "right"
    mask = batch["attention_mask"].bool()
    assert not mask[:, 0].all()  # some example is padded on the left
    name = "blocks.0.hook_resid_post"  # hidden_states[1] (the last of them is after ln_f)
    output, cache = gpt2.run_with_cache(batch, names=name)
    _, last = gpt2.run_with_cache(batch, names=name, pooling="last")
    for i in range(len(TEXTS)):
        ids = batch["input_ids"][i][mask[i]][None]  # the example alone, unpadded
        with torch.inference_mode():
            alone = gpt2.model(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(output.logits[i][mask[i]], alone.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache[name][i][mask[i]], alone.hidden_states[1][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last[name][i], alone.hidden_states[1][0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (torch.zeros(0, 5, dtype=torch.long), "no example"),
        (torch.tensor([[10**6, 2]]), "token id 1000000 is out of range"),
        (torch.ones(1, 300, dtype=torch.long), "300 positions, more than the 256"),
        (torch.tensor([5, 6, 7]), "token ids need a batch axis: give a [batch, tokens] tensor (ids[None])"),
        ([torch.tensor([5, 6, 7])], "waveform 0 holds int64 samples"),  # a list: waveforms, as for speech
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)},
            "attention_mask has shape [1, 4], input_ids [1, 3]",
        ),
    ],
)
def test_bad_token_tensors_are_one_line_user_errors(gpt2, inputs, message):
    with pytest.raises(UserError) as caught:
        gpt2.run_with_cache(inputs, names="blocks.0.hook_resid_post")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_mean_of_an_attention_map_is_a_user_error(gpt2):
    _, cache = gpt2.run_with_cache(TEXTS, names="blocks.0.attn.hook_pattern")
    with pytest.raises(UserError, match="attention map"):
        cache.mean("blocks.0.attn.hook_pattern")


def test_the_users_tokenizer_keeps_its_padding_side(tiny_model_dir):
    """hookpoints pads on the right for its own batches without setting the tokenizer's padding side for good
    (it did: a notebook's own ``model.tokenizer(texts, padding=True)`` then padded on the right, as HF's generate
    warns against for decoder-only models)."""
    model = hp.load(tiny_model_dir("gpt2"))
    model.tokenizer.padding_side = "left"
    _, cache = model.run_with_cache(TEXTS, names="blocks.0.hook_resid_post")
    assert model.tokenizer.padding_side == "left"
    assert cache.mask[:, 0].all() and not cache.mask[:, -1].all()  # hookpoints' batch: right-padded
    left = model.tokenizer(TEXTS, padding=True, return_tensors="pt")["attention_mask"]
    assert left[:, -1].all() and not left[:, 0].all()


def test_cache_and_output_tensors_are_ordinary_tensors(gpt2):
    """As TransformerLens' cache: a probe trains on cached activations and a cached tensor can be changed in
    place (they were inference-mode tensors: 'Inference tensors cannot be saved for backward')."""
    name = "blocks.1.hook_resid_post"
    output, cache = gpt2.run_with_cache(TEXTS, names=name)
    last = cache[name][:, -1]  # [batch, d_model]
    probe = torch.nn.Linear(last.shape[-1], 2)
    torch.nn.functional.cross_entropy(probe(last), torch.tensor([0, 1, 0])).backward()
    assert probe.weight.grad is not None and not cache[name].requires_grad
    cache[name][:, 0] = 0.0
    assert not cache[name][:, 0].any()
    for logits in (output.logits, gpt2.run_with_hooks(TEXTS).logits):
        assert not logits.is_inference() and not logits.requires_grad
        torch.nn.functional.cross_entropy(probe(last) + logits[:, -1, :2], torch.tensor([0, 1, 0])).backward()


def test_a_tensor_whose_size_follows_the_input_but_no_position_space_is_refused(seamless_speech, tmp_path):
    """A Conformer's depthwise conv input carries a causal left pad (kernel - 1 frames): its time axis lines up
    with no position space, so the probe measured it as one [channels * probe frames] vector. Other inputs then
    raised bare reshape RuntimeErrors (run_with_cache, run_with_hooks, e.g. from a names predicate) and
    ``hp.record`` silently stored vectors of every length under the hook's one width."""
    name = "speech_encoder.encoder.layers.0.conv_module.depthwise_conv:input"
    point = seamless_speech.hook_points.get(name)
    assert point.time_axis is None  # the probe could not place its positions
    waves = [sine(0.9, 200.0), sine(0.45, 330.0)]
    expected = f"hook {name} has "
    with pytest.raises(UserError, match=expected) as caught:
        seamless_speech.run_with_cache(waves, names=lambda hook: "depthwise_conv" in hook)
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match=expected):
        seamless_speech.run_with_hooks(waves, fwd_hooks=[(name, lambda x, hook: x)])
    import soundfile

    soundfile.write(tmp_path / "a.wav", waves[0], 16_000, subtype="FLOAT")
    with pytest.raises(UserError, match=expected):
        hp.record(seamless_speech, [{"id": "a", "audio": str(tmp_path / "a.wav")}], tmp_path / "store", run="r1",
                  hooks=name, progress=False)  # fmt: skip


def test_a_text_model_refuses_audio_files_instead_of_reading_their_names(tiny_model_dir, gpt2, tmp_path):
    """SeamlessM4T loads for text by default: an audio file's path was tokenised as the text '/.../a.wav' and
    its activations returned without a word. A Path, or a string naming an existing audio file, is refused; a
    text that merely ends like a file name is still text."""
    import soundfile

    path = tmp_path / "a.wav"
    soundfile.write(path, sine(0.5), 16_000)
    seamless_text = hp.load(tiny_model_dir("seamless_m4t_v2"))
    assert seamless_text.modality == "text"
    for inputs in ([str(path)], [path], path):
        with pytest.raises(UserError, match="was loaded for text input: load it with modality='speech'") as caught:
            seamless_text.run_with_cache(inputs, names="text_encoder.layers.0.hook_resid_post")
        assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="takes text, not audio files"):
        gpt2.run_with_cache([path])
    _, cache = gpt2.run_with_cache(["my favourite song.mp3"], names="blocks.0.hook_resid_post")  # no such file
    assert cache["blocks.0.hook_resid_post"].shape[0] == 1


def test_transformer_lens_shorthand_names_filter_and_remove_batch_dim(gpt2):
    """TransformerLens' habits, against TransformerLens itself: ``get_act_name``'s shorthand (``cache["resid_pre",
    0]``), ``names_filter=`` and ``remove_batch_dim=True`` (TransformerLens' own run_with_cache on the same weights)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens.utils import get_act_name

    names = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "k", "v", "z", "pattern", "attn",
             "attn_scores", "attn_logits", "key", "query", "value", "pre", "post", "mlp_pre", "mlp_post", "scale",
             "normalized", "embed", "pos_embed", "rot_k"]  # fmt: skip
    cases = [(n, layer, kind) for n in names for layer in (None, 0, 3) for kind in (None, "ln1", "ln2", "a", "m")]
    cases += [("k6",), ("scale4ln1",), ("pre5",), ("blocks.0.hook_resid_pre",), ("hook_embed",)]
    for case in cases:
        assert hp.act_name(*case) == get_act_name(*case), case
    with pytest.raises(UserError, match="a hook name is a string"):
        hp.act_name(0)

    reference = transformer_lens_gpt2(gpt2)
    ids = gpt2.inputs([TEXTS[0]]).kwargs["input_ids"]  # [1, tokens]

    def wanted(name: str) -> bool:
        return name.endswith(("hook_resid_pre", "hook_q", "ln1.hook_scale", "hook_embed"))

    with torch.inference_mode():
        _, expected = reference.run_with_cache(ids, names_filter=wanted, remove_batch_dim=True)
    _, cache = gpt2.run_with_cache(ids, names_filter=wanted, remove_batch_dim=True)
    assert set(cache) == set(expected.cache_dict)
    keys = [("resid_pre", 0), ("q", 1), ("scale", 1, "ln1"), ("q1",), "q1", "embed", "scale1ln1"]
    keys += [("resid_pre", -1), ("q", -2), ("scale", -1, "ln1")]  # TransformerLens counts negative layers from the end
    for key in keys:
        assert cache[key].shape == expected[key].shape, key  # [pos, d_model], [pos, head, d_head], [pos, 1]
        torch.testing.assert_close(cache[key], expected[key], atol=1e-5, rtol=1e-5, msg=str(key))
    layers = reference.cfg.n_layers
    assert cache.layers == layers
    torch.testing.assert_close(cache["resid_pre", -1], cache["resid_pre", layers - 1])
    with pytest.raises(UserError, match=f"layer {-layers - 1} is not a block of this model"):
        cache["resid_pre", -layers - 1]
    with pytest.raises(UserError, match="cannot pool a cache without its batch axis"):
        cache.pooled("mean")
    with pytest.raises(UserError, match="remove_batch_dim needs one example, not 2"):
        gpt2.run_with_cache(TEXTS[:2], names_filter=wanted, remove_batch_dim=True)
    with pytest.raises(UserError, match="not both"):
        gpt2.run_with_cache(ids, names="blocks.0.*", names_filter=wanted)


def test_mean_of_a_space_whose_padding_raw_inputs_do_not_say_is_refused(tiny_model_dir):
    """A dict of forward arguments gives only the ``input`` space's mask: an audio encoder's mean over positions
    averaged the padded frames of shorter utterances in (0.018 off here), without a word; pooling refused it."""
    from test_continue_audio import waves

    ultravox = hp.load(tiny_model_dir("ultravox"), modality="speech")
    built = ultravox.speech_inputs(waves())
    name = "audio_encoder.layers.0.hook_resid_post"
    _, raw = ultravox.run_with_cache(dict(built.kwargs), names=[name, "blocks.0.hook_resid_post"])
    with pytest.raises(hp.UserError, match=f"cannot average hook {name} over positions: the padding mask"):
        raw.mean(name)
    _, cache = ultravox.run_with_cache(built, names=[name, "blocks.0.hook_resid_post"])
    torch.testing.assert_close(raw.mean("blocks.0.hook_resid_post"), cache.mean("blocks.0.hook_resid_post"))
    assert raw.mask_of(name) is None and cache.mask_of(name) is not None
