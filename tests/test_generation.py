"""Generation-time recording: one teacher-forced pass equals hooks at every step of ``generate``.

Two references: hookpoints' own per-step recording through nnsight (``HookedModel.pooled_per_step``), and
plain torch forward hooks on the decoder modules during ``model.generate`` (no nnsight), one example at a
time, against what ``hookpoints record`` wrote to the store.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hookpoints.store.catalog import Store

from hookpoints.loading import load

STEPS = 8


def waveforms(count: int, seed: int = 0) -> list[np.ndarray]:
    """Speech-like test signals (a gliding tone in noise), 0.6 to 2.2 s: a batch with padding."""
    rng = np.random.default_rng(seed)
    waves = []
    for i in range(count):
        n = int(16_000 * (0.6 + 1.6 * i / max(1, count - 1)))
        t = np.arange(n) / 16_000
        glide = np.sin(2 * np.pi * (150 + 60 * i) * t * (1 + t))
        waves.append((0.3 * glide + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return waves


@pytest.fixture(scope="module")
def speech_model(tiny_model_dir):
    return load(tiny_model_dir("seamless_m4t_v2"), modality="speech")


@pytest.fixture(scope="module")
def text_model(tiny_model_dir):
    return load(tiny_model_dir("seamless_m4t_v2"), modality="text")


def early_stopping(model, inputs, prompt, monkeypatch) -> None:
    """Make EOS a token that some examples generate and others never: lengths then differ."""
    new = model.generate(inputs, prompt, STEPS).sequences[:, prompt.shape[1] :]  # [batch, steps]
    candidates = []
    for token in new.unique().tolist():
        found = (new == token).any(1)
        if 0 < int(found.sum()) < new.shape[0]:
            first = int((new == token).int().argmax(1)[found].max())  # the latest first appearance
            candidates.append((first, -int(found.sum()), token))
    assert candidates, "every example generates the same tokens: choose other inputs"
    monkeypatch.setattr(model.model.generation_config, "eos_token_id", max(candidates)[2])


def assert_pooled_equal(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("modality", ["speech", "text"])
def test_teacher_forced_pass_equals_per_step_recording(speech_model, text_model, modality, monkeypatch):
    if modality == "speech":
        model = speech_model
        inputs = model.speech_inputs(waveforms(5, seed=1))
    else:
        model = text_model
        texts = ["Das Wetter ist schön.", "Hoy hace buen tiempo y vamos a la playa.", "今天天气很好。", "Bonjour"]
        inputs = model.source_inputs(texts, ["deu", "spa", "cmn", "fra"])
    prompt = model.decoder_prompt(["eng"] * inputs.batch_size)
    early_stopping(model, inputs, prompt, monkeypatch)
    points = model.select()  # every Table 1 component of the encoder(s) and the decoder
    assert any(p.submodule == "cross_attention.k_proj" for p in points)  # runs at step 0 only (KV cache)
    assert sum(p.space == "decoder" for p in points) >= 20

    # what the recorder does: encoder once, generate from its output, one teacher-forced decoder pass
    ours, generation = model.pooled_generating(inputs, prompt, points, "mean", STEPS)
    lengths = generation.lengths.tolist()
    assert min(lengths) < STEPS and max(lengths) == STEPS, lengths  # some stopped early, some did not
    # reference: hooks at every step of generate (encoder hooks and cross-attention keys/values at step 0)
    reference, stepped = model.pooled_per_step(inputs, prompt, points, "mean", STEPS)
    assert torch.equal(stepped.sequences, generation.sequences)
    assert_pooled_equal(ours, reference)
    # every step kept: the teacher-forced rows at the step positions are the per-step rows (so any pooling
    # of them agrees too: pooling is one function of these rows and the step mask)
    decoder = [p for p in points if p.space == "decoder"]
    ours, _ = model.pooled_generating(inputs, prompt, decoder, "none", STEPS)
    reference, _ = model.pooled_per_step(inputs, prompt, decoder, "none", STEPS)
    assert_pooled_equal(ours, reference)
    assert reference[decoder[0].name].shape[0] == sum(lengths)
    # and the teacher-forced pass over the whole model (encoder run again) agrees as well
    assert_pooled_equal(model.pooled(generation.teacher_forced(inputs), decoder, "none"), reference)


def plain_hook_reference(model, waveform: np.ndarray, modules: list[str], steps: int) -> dict[str, torch.Tensor]:
    """Decoder modules' outputs at every step of plain ``generate`` (torch hooks, batch size 1), mean-pooled."""
    inner = model.model
    batch = model.processor([waveform], sampling_rate=16_000, return_tensors="pt")
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    lookup = dict(inner.named_modules())
    handles = [
        lookup[name].register_forward_hook(lambda m, a, out, name=name: seen[name].append(out[0, -1].clone()))
        for name in modules
    ]
    try:
        with torch.inference_mode():
            sequences = inner.generate(
                input_features=batch["input_features"],
                attention_mask=batch["attention_mask"],
                tgt_lang="eng",
                max_new_tokens=steps,
                do_sample=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    new = sequences[0, 2:].tolist()
    eos = inner.generation_config.eos_token_id
    used = new.index(eos) + 1 if eos in new else len(new)
    return {name: torch.stack(values[:used]).mean(0) for name, values in seen.items()}, used


def test_recorded_decoder_values_match_plain_hooks_during_generate(tiny_model_dir, tmp_path, write_manifest, run_cli):
    """hookpoints record (batched, teacher-forced) -> SQL == torch hooks during HF generate, one example at a time."""
    import soundfile

    rows = []
    for i, wave in enumerate(waveforms(4, seed=1)):
        soundfile.write(tmp_path / f"u{i}.wav", wave, 16_000, subtype="FLOAT")
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "language": "de"})
    manifest = write_manifest(rows)
    hooks = ["text_decoder.layers.*.ffn.fc1", "text_decoder.layers.*.self_attn.v_proj"]
    code, _, err = run_cli(
        "record", "--model", str(tiny_model_dir("seamless_m4t_v2")), "--data", str(manifest),
        "--store", str(tmp_path / "store"), "--run", "s2tt", "--task", "s2tt", "--max-new-tokens", str(STEPS),
        "--batch-size", "4", *[arg for hook in hooks for arg in ("--hooks", hook)],
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(
        "sql", "--store", str(tmp_path / "store"), "--format", "json",
        "SELECT a.example_id, h.module, a.activation, e.generated_tokens FROM activations a "
        "JOIN hooks h USING (run, hook) JOIN examples e USING (run, example_id) WHERE a.run = 's2tt'",
    )  # fmt: skip
    assert code == 0, err
    stored = json.loads(out)
    assert len(stored) == 4 * 4
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="speech")
    modules = sorted({row["module"] for row in stored})
    for i, wave in enumerate(waveforms(4, seed=1)):
        reference, used = plain_hook_reference(model, wave, modules, STEPS)
        for row in (r for r in stored if r["example_id"] == f"u{i}"):
            assert row["generated_tokens"] == used
            expected = reference[row["module"]].flatten()
            torch.testing.assert_close(torch.tensor(row["activation"]), expected, atol=2e-5, rtol=1e-4)


def test_per_step_option_stores_one_row_per_generation_step(tiny_model_dir, tmp_path, write_manifest, run_cli):
    texts = {"de": "Das Wetter ist heute sehr schön.", "fr": "Il fait beau.", "ja": "今日はいい天気です。"}
    manifest = write_manifest([{"id": lang, "text": text, "language": lang} for lang, text in texts.items()])
    store_path = str(tmp_path / "store")
    code, _, err = run_cli(
        "record", "--model", str(tiny_model_dir("seamless_m4t_v2")), "--data", str(manifest), "--store", store_path,
        "--run", "steps", "--task", "t2tt", "--per-step", "--max-new-tokens", "5",
        "--hooks", "text_decoder.layers.1.ffn.fc2", "--hooks", "text_encoder.layers.0.ffn.fc1",
    )  # fmt: skip
    assert code == 0, err
    store = Store.open(store_path)
    with store.query() as session:
        runs = session.sql("SELECT pooling FROM runs").to_pylist()
        rows = session.sql(
            "SELECT a.example_id, a.hook, a.position, a.activation, e.generated_tokens FROM activations a "
            "JOIN examples e USING (run, example_id) ORDER BY a.hook, a.example_id, a.position"
        ).to_pylist()
    assert runs == [{"pooling": "mean+steps"}]
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    points = model.select(["text_decoder.layers.1.ffn.fc2", "text_encoder.layers.0.ffn.fc1"])
    for example, text in texts.items():
        inputs = model.source_inputs([text], [{"de": "deu", "fr": "fra", "ja": "jpn"}[example]])
        reference, generation = model.pooled_per_step(inputs, model.decoder_prompt(["eng"]), points, "none", 5)
        decoder = [r for r in rows if r["example_id"] == example and r["hook"].startswith("text_decoder")]
        assert [r["position"] for r in decoder] == list(range(int(generation.lengths[0])))
        assert decoder[0]["generated_tokens"] == len(decoder)
        stored = torch.tensor([r["activation"] for r in decoder])
        torch.testing.assert_close(stored, reference[points[1].name], atol=2e-5, rtol=1e-4)
        encoder = [r for r in rows if r["example_id"] == example and r["hook"].startswith("text_encoder")]
        assert len(encoder) == 1 and encoder[0]["position"] is None  # encoder hooks stay pooled (mean)


def test_decoder_self_attention_maps_keep_the_prompt_keys(speech_model, tiny_model_dir, monkeypatch):
    """The teacher-forced pass's decoder positions are the generation steps (the queries), but every step attends
    to the whole prompt too (``</s>`` first, often an attention sink): its self-attention pattern must keep
    those keys, as HF's eager attention weights over ``prompt + generated[:-1]`` (one example at a time) have
    them. They were zeroed as padding: rows summed to as little as 0.001."""
    import transformers as tf

    inputs = speech_model.speech_inputs(waveforms(5, seed=1))
    prompt = speech_model.decoder_prompt(["eng"] * 5)
    early_stopping(speech_model, inputs, prompt, monkeypatch)  # examples of different lengths
    name = "text_decoder.layers.1.self_attn.hook_pattern"
    points = speech_model.select([name])
    pooled, generation = speech_model.pooled_generating(inputs, prompt, points, "none", STEPS)
    assert len(set(generation.lengths.tolist())) > 1
    folder = tiny_model_dir("seamless_m4t_v2")
    stock = tf.SeamlessM4Tv2ForSpeechToText.from_pretrained(folder, attn_implementation="eager")
    heads, keys = points[0].heads, points[0].keys
    rows = pooled[name].split(generation.lengths.tolist())  # [steps, head * keys] per example
    for i, wave in enumerate(waveforms(5, seed=1)):
        one = speech_model.speech_inputs([wave])
        used = generation.prompt_length - 1 + int(generation.lengths[i])  # positions the pass reads: prompt + steps
        with torch.no_grad():
            out = stock.eval()(**{**one.kwargs, "decoder_input_ids": generation.sequences[i : i + 1, :used]},
                               output_attentions=True)  # fmt: skip
        want = out.decoder_attentions[1][0][:, generation.prompt_length - 1 :]  # [head, steps, used keys]
        got = rows[i].view(-1, heads, keys).transpose(0, 1)  # [head, steps, keys]
        torch.testing.assert_close(got[..., :used], want, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:2]))


def test_attention_maps_recorded_during_generate_are_kept_at_every_step(speech_model, tiny_model_dir):
    """``generate_edited(record=[...hook_pattern])`` keeps each step's attention row, equal to HF's eager attention
    weights over ``prompt + generated`` (one example at a time). The maps' hook modules run only with eager
    attention, so the 3-step watch that finds what runs at every step missed them: the maps were recorded at step 0
    only (one call, silently), and ``pooled_per_step`` raised a RuntimeError on them."""
    import transformers as tf

    inputs = speech_model.speech_inputs(waveforms(2, seed=1))
    prompt = speech_model.decoder_prompt(["eng"] * 2)
    names = ["text_decoder.layers.1.self_attn.hook_pattern", "text_decoder.layers.0.cross_attention.hook_pattern"]
    points = speech_model.select(names)
    generation, seen = speech_model.generate_edited(inputs, prompt, [], STEPS, record=points)
    assert [len(seen[name]) for name in names] == [generation.steps] * 2
    folder = tiny_model_dir("seamless_m4t_v2")
    stock = tf.SeamlessM4Tv2ForSpeechToText.from_pretrained(folder, attn_implementation="eager")
    for i, wave in enumerate(waveforms(2, seed=1)):
        one = speech_model.speech_inputs([wave])
        used = generation.prompt_length - 1 + int(generation.lengths[i])
        with torch.no_grad():
            out = stock.eval()(**{**one.kwargs, "decoder_input_ids": generation.sequences[i : i + 1, :used]},
                               output_attentions=True)  # fmt: skip
        for name, attentions in zip(names, (out.decoder_attentions[1], out.cross_attentions[0]), strict=True):
            point = speech_model.hook_points.get(name)
            for step in range(int(generation.lengths[i])):
                query = generation.prompt_length - 1 + step
                want = attentions[0, :, query]  # [head, keys]
                got = seen[point.name][step][i, -1].view(point.heads, point.keys)[:, : want.shape[-1]]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    reference, _ = speech_model.pooled_per_step(inputs, prompt, points, "mean", STEPS)
    ours, _ = speech_model.pooled_generating(inputs, prompt, points, "mean", STEPS)
    assert_pooled_equal(ours, reference)


def test_a_prompt_that_does_not_fit_the_batch_is_a_user_error(text_model):
    """A one-row prompt for three examples (``decoder_prompt(["eng"])``) raised torch's "mat1 and mat2 shapes cannot
    be multiplied" from inside the decoder; a prompt is one row of token ids per example."""
    from hookpoints.errors import UserError

    texts = ["Das Wetter ist schön.", "Il fait beau.", "Hoy hace buen tiempo."]
    inputs = text_model.source_inputs(texts, ["deu", "fra", "spa"])
    edit = text_model.edit("text_decoder.layers.0.ffn.fc1", [1], [0.0])
    points = text_model.select(["text_decoder.layers.0.ffn.fc1"])
    vocab = text_model.model.get_output_embeddings().out_features
    cases = [
        (text_model.decoder_prompt(["eng"]), "the decoder prompt has 1 rows for 3 examples"),
        (text_model.decoder_prompt(["eng"] * 4), "the decoder prompt has 4 rows for 3 examples"),
        (text_model.decoder_prompt(["eng"] * 3)[0], "must be a \\[batch, tokens\\] tensor of token ids"),
        ([[3, 4]] * 3, "must be a \\[batch, tokens\\] tensor of token ids"),
        (torch.full((3, 2), vocab), f"decoder prompt token {vocab} is out of range"),
    ]
    for prompt, message in cases:
        for call in (
            lambda p: text_model.generate(inputs, p, 3),
            lambda p: text_model.generate(inputs, p, 3, edits=[edit]),
            lambda p: text_model.generate_edited(inputs, p, [edit], 3, record=points),
            lambda p: text_model.pooled_generating(inputs, p, points, "mean", 3),
        ):
            with pytest.raises(UserError, match=message) as caught:
                call(prompt)
            assert "\n" not in str(caught.value)
    # the right prompt, as the documented calls build it, still generates what each example generates alone
    prompt = text_model.decoder_prompt(["eng"] * 3)
    batch = text_model.generate(inputs, prompt, 4)
    for i, text in enumerate(texts):
        one = text_model.generate(text_model.source_inputs([text], [["deu", "fra", "spa"][i]]), prompt[:1], 4)
        assert batch.generated(i) == one.generated(0)


def test_the_input_of_a_module_holding_the_encoder_is_recorded_while_generating(tiny_model_dir):
    """Whisper's ``model:input`` is the features (``WhisperModel`` holds encoder and decoder). The teacher-forced pass
    gets the encoder's output instead, so recording it in a generating task raised an AttributeError on None; it is
    read in the encoder's pass, as a forward pass reads it (a plain torch pre-hook here). Hooks at every step of
    ``generate`` never see it (generate runs the encoder itself): a one-line UserError."""
    from hookpoints.errors import UserError

    model = load(tiny_model_dir("whisper"), modality="speech")
    inputs = model.speech_inputs(waveforms(2, seed=1))
    prompt = torch.tensor([[model.model.config.decoder_start_token_id, 5]] * 2)
    seen = {}

    def keep(module, args, kwargs):
        seen["features"] = (args[0] if args else kwargs["input_features"]).clone()  # [batch, mel, frames]

    handle = model.model.model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.inference_mode():
            model.model(**inputs.kwargs)
    finally:
        handle.remove()
    mask = inputs.masks["input"].float()  # [batch, frames]
    want = (seen["features"] * mask[:, None, :]).sum(-1) / mask.sum(-1, keepdim=True)  # [batch, mel]
    points = model.select(["model:input", "model.decoder.layers.0.fc1"])
    pooled, _ = model.pooled_generating(inputs, prompt, points, "mean", 4)
    torch.testing.assert_close(pooled["model:input"], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="hook model:input: module model gets no tensor in generate") as caught:
        model.generate_edited(inputs, prompt, [], 4, record=points)
    assert "\n" not in str(caught.value)


def test_max_new_tokens_must_be_a_whole_number(text_model):
    """2.5 generated 3 tokens without a word (HF's loop ran while the length was below prompt + 2.5); "4" and None
    raised a TypeError from a comparison."""
    from hookpoints.errors import UserError

    inputs = text_model.source_inputs(["Das Wetter ist schön."], ["deu"])
    prompt = text_model.decoder_prompt(["eng"])
    for bad in (2.5, "4", None, True, 0):
        with pytest.raises(UserError, match=f"max new tokens must be a whole number of at least 1, not {bad!r}"):
            text_model.generate(inputs, prompt, bad)
    assert text_model.generate(inputs, prompt, np.int64(3)).steps == 3  # numpy's integers are whole numbers


def test_a_nan_in_the_teacher_forced_pass_is_a_misalignment():
    """NaN compares false with everything, so ``|got - want| > tol`` let a NaN logit pass the alignment check;
    a NaN where generate saw a number (or the reverse) must fail it, and equal values (inf too) must not."""
    from types import SimpleNamespace

    from hookpoints.alignment import Fingerprint, check_alignment

    want = torch.tensor([[[5.0, 1.0], [4.0, float("inf")]]])  # [batch, steps, top]
    generation = SimpleNamespace(
        fingerprint=Fingerprint(want, torch.zeros(want.shape, dtype=torch.long)),
        step_mask=torch.ones(1, 2, dtype=torch.bool),
    )
    check_alignment(generation, want.clone())  # equal, inf included: no error
    got = want.clone()
    got[0, 1, 0] = float("nan")
    with pytest.raises(RuntimeError, match="at step 1 of example 0"):
        check_alignment(generation, got)
    nan_want = want.clone()
    nan_want[0, 0, 1] = float("nan")
    generation.fingerprint = Fingerprint(nan_want, generation.fingerprint.indices)
    with pytest.raises(RuntimeError, match="at step 0 of example 0"):
        check_alignment(generation, want.clone())
    check_alignment(generation, nan_want.clone())  # NaN where generate saw NaN: the same pass


def test_bare_strings_to_generate_from_a_seamless_text_model_are_refused(text_model):
    """SeamlessM4T's tokenizer marks a bare string with its default source language (``__eng__``), so
    ``generate(["Das Wetter ist schön."], ...)`` translated German as English without a word; the text must come
    with its language (``source_inputs``), whose batch starts with that language's token."""
    from hookpoints.errors import UserError

    text = "Das Wetter ist schön."
    prompt = text_model.decoder_prompt(["eng"])
    edit = text_model.edit("text_decoder.layers.0.ffn.fc1", [1], [0.0])
    for call in (
        lambda: text_model.generate([text], prompt, 3),
        lambda: text_model.generate(text, prompt, 3, edits=[edit]),
        lambda: text_model.generate_edited([text], prompt, [edit], 3),
    ):
        with pytest.raises(UserError, match=r"give model.source_inputs\(texts, languages\)") as caught:
            call()
        assert "\n" not in str(caught.value)
    marked = text_model.source_inputs([text], ["deu"])
    first = int(marked.kwargs["input_ids"][0, 0])
    assert first == text_model.language_token("deu") != text_model.language_token("eng")
    assert text_model.generate(marked, prompt, 3).generated(0)  # the documented call generates
