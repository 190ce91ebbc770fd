"""Audio LLMs (Qwen2-Audio; Ultravox = Whisper encoder + projector + LLaMA) and Whisper on speech and text.

Per-layer outputs (``blocks.{l}.hook_resid_post``) pooled by ``last`` and ``mean``, as in the LALM paper, are
checked against plain torch hooks on the language model's layers with inputs built the way each model's own
processor builds them, one example at a time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from hookpoints.store.catalog import Store
from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperForConditionalGeneration

from hookpoints.loading import load
from hookpoints.models.ultravox import UltravoxConfig, UltravoxModel
from hookpoints.tiny import randomise_norms_and_biases


def speech(corpus, count: int = 4) -> list[tuple[str, np.ndarray]]:
    rows = [json.loads(line) for line in corpus.speech.read_text().splitlines()][:count]
    return [(r["id"], soundfile.read(str(corpus.speech.parent / r["audio"]), dtype="float32")[0]) for r in rows]


def layer_outputs(model, layers: str, kwargs: dict, valid: torch.Tensor) -> dict[str, dict[int, torch.Tensor]]:
    """Every LM layer's output for one example: last valid position and mean over valid positions."""
    modules = dict(model.named_modules())
    seen = {}
    handles = [
        modules[f"{layers}.{i}"].register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, out if isinstance(out, torch.Tensor) else out[0])
        )
        for i in range(len(modules[layers]))
    ]
    try:
        with torch.inference_mode():
            model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {
        "last": {i: x[valid].reshape(-1, x.shape[-1])[-1] for i, x in seen.items()},
        "mean": {i: x[valid].reshape(-1, x.shape[-1]).mean(0) for i, x in seen.items()},
    }


def recorded(run_cli, model_dir, manifest, tmp_path, pooling: str, modality: str) -> dict[tuple[str, int], list]:
    store = tmp_path / f"store-{pooling}-{modality}"
    code, _, err = run_cli(
        "record", "--model", str(model_dir), "--data", str(manifest), "--store", str(store), "--run", "r",
        "--modality", modality, "--pooling", pooling, "--batch-size", "4", "--hooks", "blocks.*.hook_resid_post",
    )  # fmt: skip
    assert code == 0, err
    with Store.open(store).query() as session:
        rows = session.sql(
            "SELECT a.example_id, h.layer, a.activation FROM activations a JOIN hooks h USING (run, hook)"
        ).to_pylist()
    return {(r["example_id"], r["layer"]): r["activation"] for r in rows}


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_qwen2_audio_layer_outputs_on_speech_and_text(run_cli, tiny_model_dir, corpus, tmp_path, pooling):
    model_dir = tiny_model_dir("qwen2_audio")
    hooked = load(model_dir, modality="speech")
    model, processor = hooked.model, hooked.processor
    stored = recorded(run_cli, model_dir, corpus.speech, tmp_path, pooling, "speech")
    for example, samples in speech(corpus):
        features = processor(samples, sampling_rate=16_000, return_tensors="pt", return_attention_mask=True)
        _, tokens = model.model.audio_tower._get_feat_extract_output_lengths(features["attention_mask"].sum(-1))
        ids = torch.full((1, int(tokens)), model.config.audio_token_id)  # what the processor expands <|AUDIO|> to
        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "input_features": features["input_features"],
            "feature_attention_mask": features["attention_mask"],
        }
        expected = layer_outputs(model, "model.language_model.layers", kwargs, torch.ones_like(ids, dtype=torch.bool))
        for layer, vector in expected[pooling].items():
            torch.testing.assert_close(torch.tensor(stored[example, layer]), vector, atol=2e-5, rtol=1e-4)

    stored = recorded(run_cli, model_dir, corpus.text, tmp_path, pooling, "text")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for row in [json.loads(line) for line in corpus.text.read_text().splitlines()][:3]:
        ids = tokenizer(row["text"], return_tensors="pt")["input_ids"]
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        expected = layer_outputs(model, "model.language_model.layers", kwargs, torch.ones_like(ids, dtype=torch.bool))
        for layer, vector in expected[pooling].items():
            torch.testing.assert_close(torch.tensor(stored[row["id"], layer]), vector, atol=2e-5, rtol=1e-4)


def test_ultravox_layer_outputs_on_speech(run_cli, tiny_model_dir, corpus, tmp_path):
    model_dir = tiny_model_dir("ultravox")
    hooked = load(model_dir, modality="speech")
    model, processor = hooked.model, hooked.processor
    stored = recorded(run_cli, model_dir, corpus.speech, tmp_path, "last", "speech")
    for example, samples in speech(corpus):
        features = processor(samples, sampling_rate=16_000, return_tensors="pt", padding="longest")["input_features"]
        frames = features.shape[-1]
        tokens = -(-((frames - 1) // 2 + 1) // model.config.stack_factor)  # ceil(encoder positions / stack)
        ids = torch.tensor([[hooked.tokenizer.eos_token_id] * tokens])
        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "audio_values": features,
            "audio_lens": torch.tensor([frames]),
            "audio_token_start_idx": torch.tensor([0]),
            "audio_token_len": torch.tensor([tokens]),
        }
        expected = layer_outputs(model, "language_model.model.layers", kwargs, torch.ones_like(ids, dtype=torch.bool))
        for layer, vector in expected["last"].items():
            torch.testing.assert_close(torch.tensor(stored[example, layer]), vector, atol=2e-5, rtol=1e-4)


def test_ultravox_projector_and_batching(tiny_model_dir, corpus):
    """The projector stacks 8 encoder positions per audio token; padded batches give batch-size-1 values."""
    hooked = load(tiny_model_dir("ultravox"), modality="speech")
    points = hooked.select(["audio_encoder.layers.*.hook_resid_post", "audio_projector.*", "blocks.*.hook_resid_post"])
    assert {p.space for p in points} == {"audio_encoder", "audio_tokens", "input"}
    waves = [samples for _, samples in speech(corpus, 5)]
    batched = hooked.pooled(hooked.speech_inputs(waves), points, "mean")
    for i, wave in enumerate(waves):
        alone = hooked.pooled(hooked.speech_inputs([wave]), points, "mean")
        for name, value in alone.items():
            torch.testing.assert_close(batched[name][i], value[0], atol=2e-5, rtol=1e-4, msg=name)


def test_ultravox_loads_like_the_hub_checkpoints(tiny_model_dir, tmp_path):
    """A checkpoint holding only the projector takes the encoder and the LM from audio_model_id / text_model_id."""
    whisper_dir, llama_dir = tiny_model_dir("whisper"), tiny_model_dir("llama")
    whisper = WhisperForConditionalGeneration.from_pretrained(whisper_dir)
    llama = AutoModelForCausalLM.from_pretrained(llama_dir)
    config = UltravoxConfig(
        audio_config=whisper.config.to_dict(),
        text_config=llama.config.to_dict(),
        audio_model_id=str(whisper_dir),
        text_model_id=str(llama_dir),
        hidden_size=128,
    )
    full = UltravoxModel(config)
    randomise_norms_and_biases(full)  # a projector norm gain of exactly 1 would hide a skipped weight
    projector = {f"multi_modal_projector.{k}": v for k, v in full.multi_modal_projector.state_dict().items()}
    full.save_pretrained(tmp_path / "ultravox", state_dict=projector)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(tmp_path / "ultravox")

    loaded = load(tmp_path / "ultravox", modality="text").model
    for name, value in whisper.model.encoder.state_dict().items():
        assert torch.equal(loaded.audio_tower.state_dict()[name], value), name
    for name, value in llama.state_dict().items():
        assert torch.equal(loaded.language_model.state_dict()[name], value), name
    for name, value in full.multi_modal_projector.state_dict().items():
        assert torch.equal(loaded.multi_modal_projector.state_dict()[name], value), name


@pytest.mark.parametrize("family", ["whisper", "qwen2_audio"])
def test_whisper_style_batches_equal_batch_size_one(tiny_model_dir, corpus, family):
    hooked = load(tiny_model_dir(family), modality="speech")
    points = hooked.select()
    waves = [samples for _, samples in speech(corpus, 4)]
    batched = hooked.pooled(hooked.speech_inputs(waves), points, "mean")
    for i, wave in enumerate(waves):
        alone = hooked.pooled(hooked.speech_inputs([wave]), points, "mean")
        for name, value in alone.items():
            torch.testing.assert_close(batched[name][i], value[0], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("family", "norm"), [("qwen2_audio", "model.language_model.norm"),
                                              ("ultravox", "language_model.model.norm")])  # fmt: skip
def test_audio_llm_final_norm_names_mean_what_transformerlens_says(tiny_model_dir, corpus, family, norm):
    """``ln_final.hook_normalized`` is the final RMSNorm's input over its scale, before the gain (as for LLaMA,
    docs/hook-points.md), and ``ln_final.hook_scale`` exists; both from a plain torch hook on the norm's input."""
    hooked = load(tiny_model_dir(family), modality="speech")
    module = dict(hooked.model.named_modules())[norm]
    assert not torch.allclose(module.weight, torch.ones_like(module.weight))  # a gain of 1 would hide the bug
    waves = [samples for _, samples in speech(corpus, 2)]
    got = hooked.pooled(hooked.speech_inputs(waves), hooked.select(["ln_final.*"]), "none")  # [valid positions, width]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.inference_mode():
            for wave in waves:  # one at a time, as the model's own code runs it
                hooked.model(**hooked.speech_inputs([wave]).kwargs)
    finally:
        handle.remove()
    x = torch.cat([value[0] for value in seen]).float()  # [positions, d_model]: no padding at batch size 1
    scale = (x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon).sqrt()
    torch.testing.assert_close(got["ln_final.hook_scale"], scale, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got["ln_final.hook_normalized"], x / scale, atol=2e-5, rtol=2e-5)


def test_ultravox_reads_the_audio_of_a_one_token_prompt(tiny_model_dir):
    """A short utterance (0.1 s: 5 encoder positions, one audio token) with a tokenizer that adds no BOS is a
    one-token prompt: the LM must still read the projected audio there, not the placeholder's embedding."""
    hooked = load(tiny_model_dir("ultravox"), modality="speech")
    assert hooked.tokenizer("", add_special_tokens=True)["input_ids"] == []  # no BOS: the prompt is the audio
    wave = (0.1 * np.random.default_rng(0).standard_normal(1_600)).astype(np.float32)
    inputs = hooked.speech_inputs([wave])
    assert inputs.kwargs["input_ids"].shape == (1, 1)
    got = hooked.pooled(inputs, hooked.select(["blocks.0.hook_resid_pre"]), "none")["blocks.0.hook_resid_pre"]
    model = hooked.model
    with torch.inference_mode():
        encoded = model.audio_tower(inputs.kwargs["audio_values"], audio_len=inputs.kwargs["audio_lens"])
        expected = model.multi_modal_projector(encoded.last_hidden_state)[0]  # [1 audio token, d_model]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_audio", "ultravox"])
def test_audio_encoder_maps_are_laid_out_for_the_encoder_window(tiny_model_dir, tmp_path, family):
    """An audio encoder's attention map holds a row of keys as long as its key space can be: the encoder's window
    (docs/hook-points.md), not the language model's context (Qwen2-Audio: 8,192, LLaMA 3.1: 131,072, which made
    every row 5 to 87 times too wide, and a context shorter than the window refused speech the model reads)."""
    import shutil

    folder = tmp_path / family
    shutil.copytree(tiny_model_dir(family), folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 128  # a context shorter than the 250-position window
    (folder / "config.json").write_text(json.dumps(config))
    hooked = load(folder, modality="speech")
    point = hooked.select(["audio_encoder.layers.0.self_attn.hook_pattern"])[0]
    assert point.keys == hooked.model.config.audio_config.max_source_positions == 250
    assert hooked.select(["blocks.0.attn.hook_pattern"])[0].keys == 128
    wave = (0.1 * np.random.default_rng(0).standard_normal(48_000)).astype(np.float32)  # 3 s: 150 positions
    rows = hooked.pooled(hooked.speech_inputs([wave]), [point], "none")[point.name]
    assert rows.shape == (150, point.heads * 250)
    torch.testing.assert_close(rows.view(150, point.heads, 250).sum(-1), torch.ones(150, point.heads))
