"""Qwen2-Audio with its ``<|audio_bos|>``/``<|AUDIO|>``/``<|audio_eos|>`` tokens (as the real checkpoint's tokenizer
has them): speech prompts, templates and continuations against HF's own Qwen2AudioProcessor and generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as tf
from hookpoints.store.catalog import Store
from test_continue_audio import waves

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.tiny import build_tiny

SPECIAL = ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Qwen2-Audio whose tokenizer has the three audio tokens, ``<|AUDIO|>`` its audio token."""
    base = build_tiny("qwen2_audio", tmp_path_factory.mktemp("qwen2-audio-base"), sizes={"initializer_range": 0.3})
    out = tmp_path_factory.mktemp("qwen2-audio-special")
    tokenizer = tf.AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    model = tf.Qwen2AudioForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    torch.manual_seed(1)
    with torch.no_grad():
        model.get_input_embeddings().weight[-3:].normal_(0, 0.3)
        model.get_output_embeddings().weight[-3:].normal_(0, 0.3)
    model.config.audio_token_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(base / "preprocessor_config.json", out)
    return out


@pytest.mark.parametrize("template", [None, "Listen: {audio} Describe it:", "<|im_start|>user\n{audio}<|im_end|>\n"])
def test_speech_prompts_equal_hf_qwen2_audio_processor(folder, template):
    model = load(folder, modality="speech")
    processor = tf.Qwen2AudioProcessor(
        feature_extractor=tf.WhisperFeatureExtractor.from_pretrained(folder), tokenizer=model.tokenizer
    )
    text = (template or "{audio}").replace("{audio}", "".join(SPECIAL))
    theirs = processor(text=[text] * 3, audio=waves(), return_tensors="pt", padding=True, sampling_rate=16_000)
    mine = model.speech_inputs(waves(), template=template)
    for i in range(3):
        assert (
            mine.kwargs["input_ids"][i][mine.masks["input"][i]].tolist()
            == theirs["input_ids"][i][theirs["attention_mask"][i].bool()].tolist()
        )
    torch.testing.assert_close(mine.kwargs["input_features"], theirs["input_features"])


@pytest.mark.parametrize(
    ("template", "held"),
    [
        ("Audio 1: <|audio_bos|>{audio}<|audio_eos|>\n", "<|audio_bos|>, <|audio_eos|>"),  # HF's chat text
        ("<|AUDIO|> {audio}", "<|AUDIO|>"),  # was HF's ValueError: tokens and features do not match
    ],
)
def test_a_template_holding_the_audio_tokens_is_one_line(run_cli, folder, tmp_path, template, held):
    """Before: the first template wrapped the audio twice without a word (``<|audio_bos|><|audio_bos|>...``)."""
    import soundfile

    model = load(folder, modality="speech")
    with pytest.raises(UserError, match=f"holds {held}"):
        model.speech_inputs(waves(1), template=template)
    soundfile.write(tmp_path / "u.wav", waves(1)[0], 16_000)
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "u", "audio": "u.wav"}) + "\n")
    store = tmp_path / "store"
    Store.open(store, create=True)
    args = ["--model", str(folder), "--data", str(tmp_path / "d.jsonl"), "--store", str(store), "--run", "r"]
    code, _, err = run_cli("record", *args, "--hooks", "blocks.0.hook_resid_post", "--template", template)
    assert code == 2 and f"holds {held}" in err and len(err.strip().splitlines()) == 1, err
    with Store.open(store).query() as session:
        assert session.sql("SELECT run FROM runs").to_pylist() == []


def test_a_continuation_that_generates_the_audio_token_is_refused_in_one_line(folder):
    """The teacher-forced pass would feed a generated ``<|AUDIO|>`` as audio: HF's forward raised a ValueError
    (tokens and features do not match); hooks at every step of generate still record it, as generate ran it."""
    model = load(folder, modality="speech")
    audio = model.model.config.audio_token_id
    first = model.generate(waves(), max_new_tokens=1).generated(0)[0]
    with torch.no_grad():  # the audio token's logit: 5 x the first generated token's, so generated after it
        model.model.lm_head.weight[audio] = 5 * model.model.lm_head.weight[first]
    generation = model.generate(waves(), max_new_tokens=3)
    assert audio in generation.generated(0)[:2]
    points = model.select(["blocks.1.hook_resid_post"])
    with pytest.raises(UserError, match=f"generated the audio token \\(id {audio}\\).*pooled_per_step"):
        model.pooled_generating(model.speech_inputs(waves()), None, points, "mean", 3)
    _, again = model.pooled_per_step(model.speech_inputs(waves()), None, points, "mean", 3)
    assert torch.equal(again.sequences, generation.sequences)


def test_an_input_hook_in_generate_leaves_the_callers_encoder_outputs_untouched(tiny_model_dir):
    """``generate(encoder_outputs=..., fwd_hooks=[(k_proj:input, fn)])``: cross-attention's keys read the given
    encoder output itself; a hook changing it in place changed the caller's tensor (a second call added twice)."""
    from transformers.modeling_outputs import BaseModelOutput

    model = load(tiny_model_dir("whisper"))
    inputs = model.speech_inputs(waves(2))
    prompt = torch.full((2, 1), model.model.config.decoder_start_token_id)
    with torch.inference_mode():
        encoded = model.model.get_encoder()(inputs.kwargs["input_features"]).last_hidden_state
    kept = encoded.clone()
    name = "model.decoder.layers.0.encoder_attn.k_proj:input"

    def shift(x, hook):
        x += 0.5

    given = BaseModelOutput(last_hidden_state=encoded)
    first = model.generate(inputs, prompt, 4, encoder_outputs=given, fwd_hooks=[(name, shift)])
    assert torch.equal(encoded, kept)
    second = model.generate(inputs, prompt, 4, encoder_outputs=given, fwd_hooks=[(name, shift)])
    module = model.model.model.decoder.layers[0].encoder_attn.k_proj  # peer: a plain torch pre-hook on a copy
    handle = module.register_forward_pre_hook(lambda _, args: [args[0].add_(0.5)] and None)  # in place (gotchas)
    try:
        theirs = model.generate(inputs, prompt, 4, encoder_outputs=BaseModelOutput(last_hidden_state=kept.clone()))
    finally:
        handle.remove()
    for ours in (first, second):  # the top logits of every step, as well as the tokens
        assert torch.equal(ours.sequences, theirs.sequences)
        torch.testing.assert_close(ours.fingerprint.values, theirs.fingerprint.values)
    plain = model.generate(
        inputs, prompt, 4, encoder_outputs=BaseModelOutput(last_hidden_state=kept)
    ).fingerprint.values
    assert not torch.allclose(plain, theirs.fingerprint.values, atol=1e-3)  # the hook changed the logits


def test_attention_maps_at_every_step_of_a_padded_continuation_are_each_utterances_alone(folder):
    """``pooled_per_step`` (hooks at every step of generate, the documented reference) stored an attention map's
    keys in the left-padded batch's positions: a shorter utterance's keys moved by its padding (0.06 off here,
    0.97 for texts). Now as each utterance gives alone (no padding) and as the teacher-forced pass stores them."""
    model = load(folder, modality="speech")
    name = "blocks.0.attn.hook_pattern"
    points = model.select([name])
    batch, _ = model.pooled_per_step(model.speech_inputs(waves()), None, points, "mean", 4)
    forced, _ = model.pooled_generating(model.speech_inputs(waves()), None, points, "mean", 4)
    for i, wave in enumerate(waves()):
        alone, _ = model.pooled_per_step(model.speech_inputs([wave]), None, points, "mean", 4)
        torch.testing.assert_close(batch[name][i], alone[name][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(forced[name][i], alone[name][0], atol=1e-6, rtol=1e-5)


def test_an_encoder_hook_with_given_encoder_outputs_is_one_line(tiny_model_dir):
    """With ``encoder_outputs`` the encoder does not run: a hook function on it was never called, without a word
    (the caller believed the encoder ablated)."""
    from transformers.modeling_outputs import BaseModelOutput

    model = load(tiny_model_dir("whisper"))
    inputs = model.speech_inputs(waves(1))
    prompt = torch.full((1, 1), model.model.config.decoder_start_token_id)
    with torch.inference_mode():
        given = BaseModelOutput(last_hidden_state=model.model.get_encoder()(inputs.kwargs["input_features"])[0])
    calls = []
    for name in ("speech_encoder.layers.0.fc1", "model:input"):
        with pytest.raises(UserError, match=f"hook {name} is read in the encoder"):
            model.generate(
                inputs, prompt, 2, encoder_outputs=given, fwd_hooks=[(name, lambda x, hook: calls.append(1))]
            )
    model.generate(inputs, prompt, 2, fwd_hooks=[("speech_encoder.layers.0.fc1", lambda x, hook: calls.append(1))])
    assert calls == [1]  # without encoder_outputs it runs, once


def test_record_continue_refuses_a_speech_prompt_past_the_positions_before_writing(run_cli, folder, tmp_path):
    """A template (or ``--max-new-tokens``) that runs the longest utterance's prompt past the LM's positions was
    refused at the first batch, with the run already opened; now in planning, naming the example."""
    import soundfile

    for i, wave in enumerate(waves()):
        soundfile.write(tmp_path / f"u{i}.wav", wave, 16_000)
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"id": f"u{i}", "audio": f"u{i}.wav"}) + "\n" for i in range(3))
    )
    store = tmp_path / "store"
    Store.open(store, create=True)
    model = load(folder, modality="speech")
    template = "word " * 100 + "{audio}"
    longest = model.speech_inputs(waves()[:1], template=template).kwargs["input_ids"].shape[1]  # u0: 1.5 s
    args = ["--model", str(folder), "--data", str(tmp_path / "d.jsonl"), "--store", str(store), "--run", "r"]
    args += ["--task", "continue", "--max-new-tokens", "4", "--hooks", "blocks.0.hook_resid_post"]
    code, _, err = run_cli("record", *args, "--template", template)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"example 'u0': the input alone holds {longest} tokens, as many as the 256 positions" in err
    with Store.open(store).query() as session:
        assert session.sql("SELECT run FROM runs").to_pylist() == []


def test_patch_during_generate_of_a_padded_batch_is_refused(gpt2_dir):
    """Patching a generation with its own prompts' cache must change nothing (TransformerLens' activation patching
    of a run with itself). run_with_cache pads last, generate first: a shorter prompt got another position's
    values (another next token for "hi" with a tiny GPT-2), without a word. A batch of one still patches."""
    import hookpoints as hp

    model = load(gpt2_dir)
    name = "blocks.0.hook_resid_post"
    texts = ["hello there", "hi"]
    _, clean = model.run_with_cache(texts, names=name)
    with pytest.raises(UserError, match="left-pads prompts of different lengths"):
        model.generate(texts, max_new_tokens=1, fwd_hooks=[(name, hp.patch(clean))])
    _, own = model.run_with_cache(texts[1:], names=name)
    patched = model.generate(texts[1:], max_new_tokens=1, fwd_hooks=[(name, hp.patch(own))])
    plain = model.generate(texts[1:], max_new_tokens=1)
    assert torch.equal(patched.sequences, plain.sequences)
    torch.testing.assert_close(patched.fingerprint.values, plain.fingerprint.values)


def test_an_audio_path_given_to_speech_inputs_is_one_line(folder, tmp_path):
    """A path was read as a waveform of one sample per character ("waveform 0 holds 13 samples ...")."""
    import soundfile

    soundfile.write(tmp_path / "u.wav", waves(1)[0], 16_000)
    model = load(folder, modality="speech")
    for given in ([str(tmp_path / "u.wav")], [tmp_path / "u.wav"], str(tmp_path / "u.wav")):
        with pytest.raises(UserError, match="takes waveforms .* not audio paths"):
            model.speech_inputs(given, template="{audio} Describe it:")
    generation = model.generate([str(tmp_path / "u.wav")], max_new_tokens=2)  # generate reads paths
    assert generation.generated(0) == model.generate(waves(1), max_new_tokens=2).generated(0)


def test_a_template_for_a_model_without_a_tokenizer_is_one_line(tiny_model_dir):
    """Ultravox runs without a tokenizer (its placeholders from the config); a template's text was a TypeError."""
    model = load(tiny_model_dir("ultravox"), modality="speech")
    model.tokenizer = None  # as a checkpoint saved without one loads
    assert model.speech_inputs(waves(1)).kwargs["input_ids"].shape[0] == 1
    with pytest.raises(UserError, match="a prompt template needs .*tokenizer"):
        model.speech_inputs(waves(1), template="Listen: {audio}")


def test_record_frames_on_a_fixed_window_model_writes_nothing(run_cli, folder, tmp_path):
    """``--frames`` on Qwen2-Audio (a Whisper window) was refused at the first batch: the run was left 'failed'."""
    import soundfile

    soundfile.write(tmp_path / "u.wav", waves(1)[0], 16_000)
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "u", "audio": "u.wav"}) + "\n")
    store = tmp_path / "store"
    Store.open(store, create=True)
    args = ["--model", str(folder), "--data", str(tmp_path / "d.jsonl"), "--store", str(store), "--run", "r"]
    code, _, err = run_cli("record", *args, "--hooks", "blocks.0.hook_resid_post", "--frames", "100")
    assert code == 2 and "drop --frames" in err and len(err.strip().splitlines()) == 1, err
    with Store.open(store).query() as session:
        assert session.sql("SELECT run FROM runs").to_pylist() == []
