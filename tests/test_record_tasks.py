"""``hookpoints record --task asr|s2tt|t2tt`` on the bundled corpus: generated text, batching, frames, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile
import torch
from hookpoints.store.catalog import Store

from hookpoints.loading import load


def record(run_cli, model, data, store, run, *args):
    return run_cli("record", "--model", str(model), "--data", str(data), "--store", str(store), "--run", run, *args)


def sql(store, query: str) -> list[dict]:
    with Store.open(store).query() as session:
        return session.sql(query).to_pylist()


@pytest.fixture(scope="module")
def seamless(tiny_model_dir):
    return tiny_model_dir("seamless_m4t_v2")


def test_generating_tasks_save_the_text_hf_generate_gives(run_cli, seamless, corpus, tmp_path):
    store = tmp_path / "store"
    for run, task, data in (
        ("asr", "asr", corpus.speech),
        ("s2tt", "s2tt", corpus.speech),
        ("t2tt", "t2tt", corpus.text),
    ):
        code, out, err = record(run_cli, seamless, data, store, run, "--task", task, "--max-new-tokens", "6")
        assert code == 0, err
    rows = sql(store, "SELECT run, example_id, language, modality, voice, task, tgt_lang, generated_text, "
                      "generated_tokens FROM examples ORDER BY run, example_id")  # fmt: skip
    assert [r["run"] for r in rows].count("asr") == 12 and [r["run"] for r in rows].count("t2tt") == 6
    codes = {"en": "eng", "de": "deu", "es": "spa", "fr": "fra", "zh": "cmn", "ja": "jpn"}
    for row in rows:
        assert row["task"] == row["run"]
        assert row["tgt_lang"] == (codes[row["language"]] if row["run"] == "asr" else "eng")
        assert row["modality"] == ("text" if row["run"] == "t2tt" else "speech")
        assert 1 <= row["generated_tokens"] <= 6

    # the same text as HF generate with tgt_lang, one example at a time (no hookpoints involved)
    model = load(seamless, modality="speech")
    manifest = [json.loads(line) for line in corpus.speech.read_text().splitlines()]
    for example in manifest[:4]:
        samples, rate = soundfile.read(str(corpus.speech.parent / example["audio"]), dtype="float32")
        features = model.processor([samples], sampling_rate=rate, return_tensors="pt")
        with torch.inference_mode():
            ids = model.model.generate(**features, tgt_lang=codes[example["language"]], max_new_tokens=6)
        expected = model.tokenizer.decode(ids[0, 2:], skip_special_tokens=True)
        stored = next(r for r in rows if r["run"] == "asr" and r["example_id"] == example["id"])
        assert stored["generated_text"] == expected


def test_batched_speech_recording_equals_batch_size_one(run_cli, seamless, corpus, tmp_path):
    store = tmp_path / "store"
    for run, batch in (("batched", "12"), ("single", "1")):
        code, _, err = record(run_cli, seamless, corpus.speech, store, run, "--task", "s2tt", "--max-new-tokens", "5",
                              "--batch-size", batch)  # fmt: skip
        assert code == 0, err
    pairs = sql(
        store,
        "SELECT b.hook, b.example_id, b.activation AS batched, s.activation AS single FROM activations b "
        "JOIN activations s USING (hook, example_id) WHERE b.run = 'batched' AND s.run = 'single'",
    )
    assert len(pairs) == 12 * 64  # every Table 1 component of the speech encoder and the decoder
    worst = max(float(np.abs(np.subtract(p["batched"], p["single"])).max()) for p in pairs)
    assert worst < 1e-4
    texts = sql(store, "SELECT run, example_id, generated_text FROM examples")
    assert {(r["example_id"], r["generated_text"]) for r in texts if r["run"] == "batched"} == {
        (r["example_id"], r["generated_text"]) for r in texts if r["run"] == "single"
    }


def test_frames_truncate_and_pad_speech_features(run_cli, seamless, corpus, tmp_path):
    store = tmp_path / "store"
    hook = "speech_encoder.layers.0.ffn1.intermediate_dense"
    for run, frames in (("t40", "40"), ("t1000", "1000"), ("free", None)):
        args = ["--hooks", hook, "--modality", "speech", *(["--frames", frames] if frames else [])]
        code, _, err = record(run_cli, seamless, corpus.speech, store, run, *args)
        assert code == 0, err
    rows = {(r["run"], r["example_id"]): r["activation"] for r in sql(store, "SELECT * FROM activations")}
    model = load(seamless, modality="speech")
    module = dict(model.model.named_modules())["speech_encoder.encoder.layers.0.ffn1.intermediate_dense"]
    for example in [json.loads(line) for line in corpus.speech.read_text().splitlines()][:3]:
        samples, rate = soundfile.read(str(corpus.speech.parent / example["audio"]), dtype="float32")
        batch = model.processor([samples], sampling_rate=rate, return_tensors="pt")
        seen = []
        handle = module.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out))
        with torch.inference_mode():  # plain HF forward on the first 40 frames
            model.model(input_features=batch["input_features"][:, :40], attention_mask=batch["attention_mask"][:, :40],
                        decoder_input_ids=torch.tensor([[3]]))  # fmt: skip
        handle.remove()
        valid = batch["attention_mask"][0, :40].bool()
        expected = seen[0][0][valid].mean(0)
        torch.testing.assert_close(torch.tensor(rows["t40", example["id"]]), expected, atol=2e-5, rtol=1e-4)
        # zero-padding is masked: a window longer than the utterance changes nothing
        np.testing.assert_allclose(rows["t1000", example["id"]], rows["free", example["id"]], atol=2e-5)


def assert_refused(result, *fragments: str, started: bool = False) -> None:
    """Exit 2 with one ``error:`` line (after the progress bar if recording had ``started``), no traceback."""
    code, out, err = result
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error:") and len(lines) == (2 if started else 1), err
    for fragment in fragments:
        assert fragment in " ".join(lines[-1].split()), err


def test_task_the_model_cannot_do(run_cli, tiny_model_dir, corpus, tmp_path):
    store = tmp_path / "store"
    assert_refused(record(run_cli, tiny_model_dir("bert"), corpus.speech, store, "r", "--task", "asr"),
                   "takes text input, not speech")  # fmt: skip
    # a text manifest: the model's input is what is wrong, not the manifest's missing audio column
    assert_refused(record(run_cli, tiny_model_dir("bert"), corpus.text, store, "r", "--task", "asr"),
                   "takes text input, not speech")  # fmt: skip
    assert_refused(record(run_cli, tiny_model_dir("qwen2_audio"), corpus.speech, store, "r", "--task", "asr"),
                   "cannot do task asr", "it can do: forward")  # fmt: skip
    assert_refused(record(run_cli, tiny_model_dir("whisper"), corpus.text, store, "r", "--task", "t2tt"),
                   "takes speech input, not text")  # fmt: skip
    assert not store.exists() or sql(store, "SELECT * FROM runs") == []


def test_bad_task_options(run_cli, seamless, corpus, tmp_path):
    store = tmp_path / "store"
    assert_refused(record(run_cli, seamless, corpus.text, store, "r", "--task", "t2tt", "--tgt-lang", "xx"),
                   "unknown target language 'xx'", "it knows: cmn, deu, eng")  # fmt: skip
    assert_refused(record(run_cli, seamless, corpus.text, store, "r", "--per-step"), "per-step recording needs")
    assert_refused(record(run_cli, seamless, corpus.text, store, "r", "--tgt-lang", "deu"),
                   "--tgt-lang applies to generating tasks")  # fmt: skip
    assert_refused(record(run_cli, seamless, corpus.text, store, "r", "--frames", "30"), "frames applies to speech")
    assert_refused(record(run_cli, seamless, corpus.speech, store, "r", "--task", "asr", "--max-new-tokens", "0"),
                   "max new tokens must be a whole number of at least 1")  # fmt: skip
    assert_refused(record(run_cli, seamless, corpus.text, store, "r", "--limit", "3"), "apply to a FLEURS folder")
    assert not store.exists()  # nothing was written: not even an empty store


def test_bad_examples_are_named(run_cli, seamless, corpus, tmp_path, write_manifest):
    store = tmp_path / "store"
    base = {"language": "de", "text": "Guten Tag."}
    audio = corpus.speech.parent / "audio" / "s001-de-m3.flac"
    stereo = tmp_path / "stereo.wav"
    soundfile.write(stereo, np.zeros((8000, 2), dtype=np.float32), 16_000)
    low = tmp_path / "low.wav"
    soundfile.write(low, np.zeros(4000, dtype=np.float32), 4_000)
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    cases = [
        ({"id": "a", "audio": "missing.wav"}, ["example 'a'", "does not exist"]),
        ({"id": "u", "audio": str(broken)}, ["example 'u'", "cannot read audio file", "give a WAV or FLAC file"]),
        ({"id": "b", "audio": str(stereo)}, ["example 'b'", "2 channels; give mono audio"]),
        ({"id": "c", "audio": str(low)}, ["example 'c'", "4000 Hz"]),
        ({"id": "d", "audio": str(audio), "language": "tlh"}, ["example 'd'", "unknown target language 'tlh'"]),
    ]
    for row, fragments in cases:
        manifest = write_manifest([{"id": "ok", "audio": str(audio), **base}, {**base, **row}])
        assert_refused(record(run_cli, seamless, manifest, store, "r", "--task", "asr"), *fragments)
    manifest = write_manifest([{"id": "e", "text": " ", "language": "de"}], name="text.jsonl")
    assert_refused(record(run_cli, seamless, manifest, store, "r", "--task", "t2tt"), "example 'e' has empty text")
    manifest = write_manifest([{"id": "f", "text": "Hallo"}], name="nolang.jsonl")
    assert_refused(record(run_cli, seamless, manifest, store, "r", "--task", "t2tt"), "needs a 'language' column")
    manifest = write_manifest([{"id": "g", "text": "Hallo", "language": "de"}], name="noaudio.jsonl")
    assert_refused(record(run_cli, seamless, manifest, store, "r", "--task", "asr"), "has no 'audio' column")
    assert not store.exists()  # nothing was written: not even an empty store


def test_audio_lost_mid_run_keeps_what_was_recorded(run_cli, seamless, corpus, tmp_path, monkeypatch):
    """A file that disappears while recording: a one-line error, earlier batches kept, --resume finishes."""
    from hookpoints import recorder

    data = tmp_path / "data"
    shutil.copytree(corpus.speech.parent, data)
    manifest = data / corpus.speech.name
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    longest = max(rows, key=lambda row: soundfile.info(str(data / row["audio"])).duration)
    original = recorder.start_batch  # (record() runs batches through start_batch, one batch behind)
    calls = []

    def first_batch_then_lose_a_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # batches go shortest first: the longest utterance is in a later batch
            (data / longest["audio"]).rename(data / "moved.flac")
        return original(*args, **kwargs)

    monkeypatch.setattr(recorder, "start_batch", first_batch_then_lose_a_file)
    store = tmp_path / "store"
    assert_refused(record(run_cli, seamless, manifest, store, "r", "--task", "asr", "--batch-size", "6",
                          "--max-new-tokens", "3"),
                   f"example {longest['id']!r}", "does not exist", started=True)  # fmt: skip
    assert sql(store, "SELECT status FROM runs") == [{"status": "failed"}]
    kept = sql(store, "SELECT DISTINCT example_id FROM activations")
    assert len(kept) == 6 and longest["id"] not in {row["example_id"] for row in kept}
    (data / "moved.flac").rename(data / longest["audio"])
    # resumed with other settings, the run would mix two recordings: refused, the run as it was
    for other, named in (
        (["--max-new-tokens", "4"], "max_new_tokens=4"),
        (["--max-new-tokens", "3", "--frames", "120"], "frames=120"),
        (["--max-new-tokens", "3", "--tgt-lang", "fra"], "tgt_lang=fra"),
    ):
        assert_refused(record(run_cli, seamless, manifest, store, "r", "--task", "asr", "--batch-size", "6", *other,
                              "--resume"), f"cannot resume run 'r' with {named}: it was recorded with")  # fmt: skip
    assert sql(store, "SELECT count(DISTINCT example_id) AS n FROM activations") == [{"n": 6}]
    code, out, err = record(run_cli, seamless, manifest, store, "r", "--task", "asr", "--batch-size", "6",
                            "--max-new-tokens", "3", "--resume")  # fmt: skip
    assert code == 0, err
    assert "recorded 6 examples (6 already there)" in " ".join(out.split())
    assert sql(store, "SELECT count(DISTINCT example_id) AS n FROM activations") == [{"n": 12}]


def test_null_filters_on_columns_a_later_run_added(run_cli, seamless, corpus, tmp_path):
    """A forward run's examples lack generated_text; SQL must count them as NULL (pushdown got this wrong)."""
    store = tmp_path / "store"
    hook = ["--hooks", "text_decoder.layers.0.ffn.fc1"]
    assert record(run_cli, seamless, corpus.text, store, "fwd", *hook)[0] == 0
    assert (
        record(run_cli, seamless, corpus.text, store, "gen", "--task", "t2tt", "--max-new-tokens", "2", *hook)[0] == 0
    )
    rows = sql(
        store,
        "SELECT run, count(*) FILTER (WHERE generated_text IS NOT NULL) AS filled, "
        "count(*) FILTER (WHERE generated_text IS NULL) AS empty FROM examples GROUP BY run ORDER BY run",
    )
    assert rows == [{"run": "fwd", "filled": 0, "empty": 6}, {"run": "gen", "filled": 6, "empty": 0}]
    assert sql(store, "SELECT count(*) AS n FROM examples WHERE generated_text IS NOT NULL") == [{"n": 6}]


def test_a_model_code_with_capitals_is_found(seamless, write_manifest, tmp_path):
    """SeamlessM4T v2's ``cmn_Hant`` (Traditional Chinese): labels are lower-cased (``DE`` -> ``deu``), so the
    model's own mixed-case code must still be found, and generate the same text as HF ``generate(tgt_lang=...)``."""
    from hookpoints.languages import model_code
    from hookpoints.manifest import read_manifest
    from hookpoints.recorder import record as record_api

    model = load(seamless, modality="text")
    mapping = model.model.generation_config.text_decoder_lang_to_code_id
    mapping["cmn_Hant"] = model.tokenizer.convert_tokens_to_ids("__jpn__")  # a token of its own in the tiny vocab
    assert model.decoder_prompt([model_code("cmn_Hant")], task="t2tt")[0].tolist() == [3, mapping["cmn_Hant"]]
    path = write_manifest([{"id": "a", "text": "Das Wetter ist schön.", "language": "de"}])
    store = Store.open(tmp_path / "store", create=True)
    record_api(model, read_manifest(path), store, "r", hooks=["text_decoder.layers.0.ffn.fc1"], task="t2tt",
               tgt_lang="cmn_Hant", max_new_tokens=6)  # fmt: skip
    inputs = model.source_inputs(["Das Wetter ist schön."], ["deu"])
    with torch.inference_mode():
        ids = model.model.generate(
            input_ids=inputs.kwargs["input_ids"], attention_mask=inputs.kwargs["attention_mask"],
            tgt_lang="cmn_Hant", max_new_tokens=6, do_sample=False,
        )  # fmt: skip
    [stored] = sql(tmp_path / "store", "SELECT generated_text FROM examples")
    assert stored["generated_text"] == model.tokenizer.decode(ids[0, 2:], skip_special_tokens=True)


def test_decoder_prompt_takes_the_labels_a_manifest_may_hold_and_names_an_unknown_one(seamless):
    """The Python API's ``decoder_prompt`` reads language labels as the recorder does (``de``, ``de_de``, ``DEU``:
    docs/recording-speech.md) and refuses an unknown one in one line (it raised torch's "Could not infer dtype of
    NoneType")."""
    from hookpoints.errors import UserError

    model = load(seamless, modality="speech")
    expected = torch.tensor([[model.model.config.decoder_start_token_id, model.language_token("deu")]])
    for label in ("deu", "de", "de_de", "DEU"):
        assert torch.equal(model.decoder_prompt([label]), expected), label
    with pytest.raises(UserError, match="unknown target language 'xyz' for model .*; it knows: .*deu"):
        model.decoder_prompt(["eng", "xyz"])
