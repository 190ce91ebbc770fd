"""Decoder-only LMs generate (task ``continue``): against HF's ``generate`` alone and TransformerLens 3.9.

hookpoints left-pads a batch of unequal texts and continues it greedily; each example must get exactly the tokens
HF's ``generate`` and TransformerLens' ``generate`` give it alone (no padding at all), with and without edits at
every position of every call. Recording the continuation (one teacher-forced pass) must equal TransformerLens'
cache of each example's own sequence at the generated steps, in the Python API and through ``hookpoints record``.
The tiny models use a larger initialiser range so that greedy output differs between texts and steps.
"""

from __future__ import annotations

import json

import pytest
import torch
from hookpoints.store.catalog import Store
from test_transformerlens_names import transformerlens_model

import hookpoints as hp
from hookpoints.errors import UserError
from hookpoints.generation import Generation
from hookpoints.inputs import ModelInputs
from hookpoints.loading import load
from hookpoints.tiny import build_tiny

TEXTS = ["The weather is nice today.", "Hi", "Das Wetter ist heute", "今天天气很好。"]
STEPS = 7
FAMILIES = ["gpt2", "llama", "qwen2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a tiny seeded model whose greedy output varies (initializer range 0.3)."""
    return {
        family: build_tiny(family, tmp_path_factory.mktemp(f"{family}-varied"), sizes={"initializer_range": 0.3})
        for family in FAMILIES
    }


def with_early_eos(model) -> int:
    """Make a token generated mid-way by the first text the model's EOS (so examples stop at different steps)."""
    alone = model.generate(TEXTS[:1], max_new_tokens=STEPS)
    eos = alone.generated(0)[2]
    model.model.generation_config.eos_token_id = eos
    return eos


def hf_alone(model, text: str, steps: int) -> list[int]:
    """HF's own greedy generate on one text, no padding, no hookpoints; cut after the first EOS."""
    ids = model.tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, pad_token_id=0
        )
    new = out[0, ids.shape[1] :].tolist()
    eos = model.model.generation_config.eos_token_id
    return new[: new.index(eos) + 1] if eos in new else new


@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_batch_continues_each_text_as_hf_generate_does_alone(folders, family):
    model = load(folders[family])
    eos = with_early_eos(model)
    generation = model.generate(TEXTS, max_new_tokens=STEPS)  # right-padded inputs, left-padded for generate
    assert isinstance(generation, Generation) and generation.space == "input"
    assert not generation.prompt_inputs.masks["input"].all()  # the batch was padded
    lengths = generation.lengths.tolist()
    assert 3 in lengths and max(lengths) == STEPS  # one example stopped at its EOS, another ran on
    for i, text in enumerate(TEXTS):
        assert generation.generated(i) == hf_alone(model, text, STEPS), f"{family} example {i}"
    assert generation.generated(lengths.index(3))[-1] == eos
    texts = model.decode(generation)
    assert texts == [model.tokenizer.decode(generation.generated(i), skip_special_tokens=True) for i in range(4)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_and_edited_generation_equal_transformerlens(folders, tmp_path, family):
    """TransformerLens' greedy generate, one text at a time with its KV cache, with hooks doing what the edits do
    (replace two MLP neurons; add a steering vector to the residual stream) at every position of every call."""
    model = load(folders[family])
    peer = transformerlens_model(family, folders[family], tmp_path)
    width = model.hook_points.get("blocks.1.hook_resid_post").width
    direction = torch.linspace(-3, 3, width)
    edits = [
        model.edit("blocks.0.mlp.hook_post", [1, 5], [2.5, -1.5]),
        model.edit("blocks.1.hook_resid_post", list(range(width)), direction.tolist(), add=True),
    ]

    def replace(x, hook):  # [batch, pos, d_mlp]
        x[..., [1, 5]] = torch.tensor([2.5, -1.5])
        return x

    def add(x, hook):  # [batch, pos, d_model]
        return x + direction

    hooks = [("blocks.0.mlp.hook_post", replace), ("blocks.1.hook_resid_post", add)]
    plain = model.generate(TEXTS, max_new_tokens=STEPS)
    edited = model.generate(TEXTS, max_new_tokens=STEPS, edits=edits)  # torch hooks, Linear outputs folded
    # the same as TransformerLens-style hook functions, the steering by hp.steer
    steered = [("blocks.0.mlp.hook_post", replace), ("blocks.1.hook_resid_post", hp.steer(direction))]
    hooked = model.generate(TEXTS, max_new_tokens=STEPS, fwd_hooks=steered)
    watched = [model.hook_points.get("blocks.0.hook_resid_post")]
    recorded, _ = model.generate_edited(TEXTS, None, edits, STEPS, record=watched)  # through nnsight
    for i, text in enumerate(TEXTS):
        tokens = model.tokenizer([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = peer.generate(tokens, max_new_tokens=STEPS, do_sample=False, stop_at_eos=False, verbose=False)
            with peer.hooks(fwd_hooks=hooks):
                want_edited = peer.generate(
                    tokens, max_new_tokens=STEPS, do_sample=False, stop_at_eos=False, verbose=False
                )
        assert plain.generated(i) == want[0, tokens.shape[1] :].tolist()[: int(plain.lengths[i])], f"{family} {i}"
        assert edited.generated(i) == want_edited[0, tokens.shape[1] :].tolist()[: int(edited.lengths[i])]
        assert recorded.generated(i) == edited.generated(i)  # nnsight's edits equal the torch hooks'
        assert hooked.generated(i) == want_edited[0, tokens.shape[1] :].tolist()[: int(hooked.lengths[i])]
    assert any(plain.generated(i) != edited.generated(i) for i in range(len(TEXTS)))  # the edits changed text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_recording_a_continuation_equals_transformerlens_at_the_generated_steps(folders, tmp_path):
    """``pooled_generating`` (one teacher-forced pass over a left-padded batch) against TransformerLens'
    cache of each example's own unpadded sequence, mean over the generated steps; and against hookpoints'
    hooks at every step of ``generate`` (nnsight)."""
    model = load(folders["gpt2"])
    with_early_eos(model)
    peer = transformerlens_model("gpt2", folders["gpt2"], tmp_path)
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post", "ln_final.hook_normalized"]
    points = model.select(names)
    pooled, generation = model.pooled_generating(model.inputs(TEXTS), None, points, "mean", STEPS)
    per_step, again = model.pooled_per_step(model.inputs(TEXTS), None, points, "mean", STEPS)
    assert torch.equal(again.sequences, generation.sequences)
    for i, text in enumerate(TEXTS):
        prompt = model.tokenizer([text], return_tensors="pt")["input_ids"][0].tolist()
        steps = generation.generated(i)
        sequence = torch.tensor([prompt + steps[:-1]])  # step k reads position len(prompt) - 1 + k
        with torch.no_grad():
            _, cache = peer.run_with_cache(sequence)
        at_steps = slice(len(prompt) - 1, len(prompt) - 1 + len(steps))
        for name in names:
            want = cache[name][0, at_steps].reshape(len(steps), -1).mean(0)
            torch.testing.assert_close(pooled[name][i], want, atol=5e-5, rtol=5e-5, msg=f"{name} example {i}")
            torch.testing.assert_close(per_step[name][i], want, atol=5e-5, rtol=5e-5, msg=f"{name} per step {i}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_recorded_attention_maps_index_keys_as_each_example_alone(folders, tmp_path):
    """An attention map's stored key ``j`` is key ``j`` of the example's own sequence, as in TransformerLens' cache
    of that sequence alone: the left padding generate needs does not shift a shorter example's keys (it did: key
    0, the text's first token, was stored at key ``padding``)."""
    model = load(folders["gpt2"])
    peer = transformerlens_model("gpt2", folders["gpt2"], tmp_path)
    names = ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"]
    mean, generation = model.pooled_generating(model.inputs(TEXTS), None, model.select(names[:1]), "mean", STEPS)
    last, _ = model.pooled_generating(model.inputs(TEXTS), None, model.select(names), "last", STEPS)
    assert not generation.prompt_inputs.masks["input"].all()  # the batch was padded
    for i, text in enumerate(TEXTS):
        prompt = model.tokenizer([text], return_tensors="pt")["input_ids"][0].tolist()
        steps = generation.generated(i)
        with torch.no_grad():
            _, cache = peer.run_with_cache(torch.tensor([prompt + steps[:-1]]))
        keys = len(prompt) + len(steps) - 1
        at_steps = slice(len(prompt) - 1, keys)
        got = mean[names[0]][i].reshape(4, -1)  # [head, keys laid out to the model's positions]
        torch.testing.assert_close(got[:, :keys], cache[names[0]][0, :, at_steps].mean(1), atol=5e-5, rtol=5e-5)
        assert not got[:, keys:].any()
        for name in names:  # the last step reads every key
            got = last[name][i].reshape(4, -1)
            torch.testing.assert_close(got[:, :keys], cache[name][0, :, keys - 1], atol=5e-5, rtol=5e-5, msg=name)


def test_the_alignment_check_catches_positions_counted_over_the_padding(folders, monkeypatch):
    """GPT-2's absolute positions: a teacher-forced pass that counted positions from the padding (not from each
    example's first token) would record shifted values; the run-time check refuses it."""
    import hookpoints.generation as generation_module

    model = load(folders["gpt2"])
    monkeypatch.setattr(generation_module, "positions", lambda mask: torch.arange(mask.shape[1]).expand(mask.shape))
    with pytest.raises(RuntimeError, match="does not reproduce generate"):
        model.pooled_generating(model.inputs(TEXTS), None, model.select(["blocks.1.hook_resid_post"]), "mean", 4)


def test_record_continue_stores_text_and_steps_equal_to_transformerlens(run_cli, folders, tmp_path):
    """``hookpoints record --task continue --per-step``: the generated text, and one row per generated step
    (``position`` = step) equal to TransformerLens' cache of each example's sequence at that step."""
    model = load(folders["gpt2"])
    peer = transformerlens_model("gpt2", folders["gpt2"], tmp_path)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    store = tmp_path / "store"
    name = "blocks.1.hook_resid_post"
    args = ["--model", str(folders["gpt2"]), "--data", str(data), "--store", str(store), "--hooks", name]
    code, _, err = run_cli("record", *args, "--run", "c", "--task", "continue", "--max-new-tokens", "5", "--per-step")
    assert code == 0, err
    with Store.open(store).query() as session:
        examples = session.sql("SELECT example_id, task, tgt_lang, generated_text, generated_tokens FROM examples")
        rows = session.sql(f"SELECT example_id, position, activation FROM activations WHERE hook = '{name}'")
        examples, rows = examples.to_pylist(), rows.to_pylist()
    generation = model.generate(TEXTS, max_new_tokens=5)
    decoded = model.decode(generation)
    for row in examples:
        i = int(row["example_id"][1:])
        assert (row["task"], row["tgt_lang"]) == ("continue", None)
        assert row["generated_text"] == decoded[i] and row["generated_tokens"] == int(generation.lengths[i])
    assert len(rows) == int(generation.lengths.sum())
    for row in rows:
        i = int(row["example_id"][1:])
        prompt = model.tokenizer([TEXTS[i]], return_tensors="pt")["input_ids"][0].tolist()
        with torch.no_grad():
            _, cache = peer.run_with_cache(torch.tensor([prompt + generation.generated(i)[:-1]]))
        want = cache[name][0, len(prompt) - 1 + row["position"]]
        torch.testing.assert_close(torch.tensor(row["activation"]), want, atol=5e-5, rtol=5e-5)

    # intervention sweeps of a continuation: tests/test_intervene_continue.py


def test_max_bytes_counts_a_continuations_steps_not_its_text(run_cli, folders, tmp_path):
    """--max-bytes of a ``continue`` run with pooling none: the rows are the generated steps (at most
    max-new-tokens per example), not the text's positions (the estimate counted 150 text tokens + 4 steps and
    refused a recording of 4 rows)."""
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "x " * 75}) + "\n")
    name = "blocks.1.hook_resid_post"
    args = ["--model", str(folders["gpt2"]), "--data", str(data), "--store", str(tmp_path / "store")]
    args += ["--task", "continue", "--max-new-tokens", "4", "--hooks", name, "--pooling", "none"]
    code, _, err = run_cli("record", *args, "--run", "fits", "--max-bytes", str(5 * 64 * 4))  # 5 rows of 64 floats
    assert code == 0, err
    with Store.open(tmp_path / "store").query() as session:
        rows = session.sql(f"SELECT count(*) AS n FROM activations WHERE run = 'fits' AND hook = '{name}'")
    # one row per generated step, EOS included: as many as generate gives the text
    assert rows["n"][0].as_py() == int(load(folders["gpt2"]).generate(["x " * 75], max_new_tokens=4).lengths[0])
    code, _, err = run_cli("record", *args, "--run", "over", "--max-bytes", str(3 * 64 * 4))
    assert code == 2 and "over --max-bytes 768 B" in err and "(1 examples x up to 1.0 KiB each" in err


# -- bad input: one line each, nothing written ----------------------------------------------------------------


def test_bad_generation_requests_get_one_line(folders, tiny_model_dir):
    model = load(folders["gpt2"])
    prompt = torch.tensor([[2, 5]] * len(TEXTS))
    with pytest.raises(UserError, match="decoder-only LM: it continues its inputs and takes no decoder prompt"):
        model.generate(TEXTS, prompt, 5)
    with pytest.raises(UserError, match="give max_new_tokens=5"):
        model.generate(TEXTS, 5)  # TransformerLens' positional max_new_tokens
    with pytest.raises(UserError, match="max new tokens must be a whole number of at least 1, not None"):
        model.generate(TEXTS)
    with pytest.raises(UserError, match="max new tokens must be a whole number of at least 1, not 2.5"):
        model.generate(TEXTS, max_new_tokens=2.5)
    with pytest.raises(UserError, match="has no decoder prompt"):
        model.decoder_prompt(["eng"])
    whole = "x " * 128  # 256 tokens: the model's positions, none left
    assert len(model.tokenizer(whole)["input_ids"]) == 256
    with pytest.raises(UserError, match="the input alone holds 256 tokens, as many as the 256 positions .* shorten"):
        model.generate([whole], max_new_tokens=1)
    long = "x " * 125
    room = 256 - len(model.tokenizer(long)["input_ids"])
    with pytest.raises(UserError, match=f"max new tokens 10 after a .* runs past the 256 positions .* at most {room}$"):
        model.generate([long], max_new_tokens=10)
    embeds = {"inputs_embeds": torch.zeros(1, 3, 64), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(UserError, match="generates from token ids: .*not inputs_embeds"):
        model.generate(embeds, max_new_tokens=3)
    hook = [("blocks.0.mlp.hook_post", hp.ablate([1]))]
    with pytest.raises(UserError, match="give edits, or encoder_outputs or fwd_hooks, not both"):
        model.generate(
            TEXTS, max_new_tokens=3, edits=[model.edit("blocks.0.mlp.hook_post", [1], [0.0])], fwd_hooks=hook
        )
    with pytest.raises(UserError, match="blocks.9.mlp.hook_post"):
        model.generate(TEXTS, max_new_tokens=3, fwd_hooks=[("blocks.9.mlp.hook_post", hp.ablate([1]))])
    with pytest.raises(UserError, match=r"does not generate here"):
        load(tiny_model_dir("bert")).generate(["Hi"], max_new_tokens=3)
    seamless = load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    with pytest.raises(UserError, match="decoder prompt must be a .* not None"):
        seamless.generate(seamless.source_inputs(["Hallo"], ["deu"]), max_new_tokens=3)


def test_bad_continue_recordings_are_refused_before_anything_is_written(run_cli, folders, tiny_model_dir, tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "Hi"}) + "\n" + json.dumps({"id": "b", "text": "x " * 125}) + "\n")
    store = tmp_path / "store"

    def record(model, *extra):
        args = ["--model", str(model), "--data", str(data), "--store", str(store), "--run", "r", "--task", "continue"]
        return run_cli("record", *args, *extra)

    code, _, err = record(folders["gpt2"], "--max-new-tokens", "20")
    assert code != 0 and "example 'b' has" in err and "runs past the 256 positions" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = record(folders["gpt2"], "--max-new-tokens", "2", "--tgt-lang", "deu")
    assert code != 0 and "--tgt-lang applies to generating tasks into a language" in err
    code, _, err = record(tiny_model_dir("bert"), "--max-new-tokens", "2")
    assert code != 0 and "cannot do task continue" in err
    if store.exists():
        with Store.open(store).query() as session:
            assert session.sql("SELECT * FROM runs").num_rows == 0  # no run was opened


def test_a_remote_lm_refuses_to_generate_before_anything_is_written(folders, tmp_path):
    """A model on NDIF (``--remote``) has its weights there and a meta-device stand-in here: generating ran HF's
    ``generate`` on the stand-in (a RuntimeError about the meta device; the run was opened and left failed). One line
    instead, and no run in the store."""
    from transformers import AutoConfig

    from hookpoints.adapters import adapter_for
    from hookpoints.manifest import read_manifest
    from hookpoints.model import HookedModel
    from hookpoints.recorder import record

    config = AutoConfig.from_pretrained(folders["llama"])
    adapter = adapter_for(config.model_type)
    with torch.device("meta"):
        stand_in = adapter.model_class(config, "text").from_config(config)
    local = load(folders["llama"])
    remote = HookedModel(stand_in, adapter, tokenizer=local.tokenizer, source="meta-llama/x", remote=True)
    with pytest.raises(UserError, match=r"runs on NDIF \(--remote\), where hookpoints records forward passes only"):
        remote.generate(["Hi"], max_new_tokens=3)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "text": "Hi"}) + "\n")
    store = Store.open(tmp_path / "store", create=True)
    with pytest.raises(UserError, match="records forward passes only"):
        record(remote, read_manifest(tmp_path / "m.jsonl"), store, "r", hooks=["blocks.0.hook_resid_post"],
               task="continue", max_new_tokens=3)  # fmt: skip
    with store.query() as session:
        assert session.sql("SELECT * FROM runs").num_rows == 0


def test_more_generation_requests_get_one_line_or_work_as_named(folders):
    """An example whose attention_mask is all 0 was continued from nothing (garbage tokens, no word);
    encoder_outputs for a decoder-only LM was HF's ValueError about unused model_kwargs; ``record`` given hook
    names (as run_with_cache takes them) was an AttributeError."""
    model = load(folders["gpt2"])
    ids = model.inputs(TEXTS[:2]).kwargs["input_ids"]
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(UserError, match=r"^example 1 has no tokens \(its attention_mask is all 0\)"):
        model.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=3)
    with pytest.raises(UserError, match="continues its inputs: its generate takes no encoder_outputs"):
        model.generate(TEXTS, max_new_tokens=3, encoder_outputs=torch.zeros(4, 2, 64))
    with pytest.raises(UserError, match="a ModelInputs with an 'input' mask"):  # a KeyError
        model.generate(ModelInputs({"input_ids": ids}, {}), max_new_tokens=3)
    name = "blocks.0.hook_resid_post"
    by_name = model.generate_edited(TEXTS, None, [], 3, record=[name])
    by_point = model.generate_edited(TEXTS, None, [], 3, record=model.select([name]))
    assert torch.equal(by_name[0].sequences, by_point[0].sequences)
    assert len(by_name[1][name]) == 3
    from_texts, _ = model.pooled_generating(TEXTS, None, model.select([name]), "mean", 3)  # an AttributeError
    from_batch, _ = model.pooled_generating(model.inputs(TEXTS), None, model.select([name]), "mean", 3)
    torch.testing.assert_close(from_texts[name], from_batch[name], atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(by_name[1][name], by_point[1][name], strict=True))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_checkpoints_logits_processors_do_not_change_the_greedy_continuation(folders, tmp_path):
    """A checkpoint's generation_config may carry a repetition penalty (Qwen2.5-Instruct: 1.05) or n-gram and
    token bans: HF's generate applied them, so the "greedy" continuation was not the argmax TransformerLens'
    generate picks (and the alignment check, which compares logits, could not see it)."""
    model = load(folders["gpt2"])
    peer = transformerlens_model("gpt2", folders["gpt2"], tmp_path)
    config = model.model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size, config.min_new_tokens = 1.5, 2, STEPS
    config.suppress_tokens = list(range(200, 300))
    generation = model.generate(TEXTS, max_new_tokens=STEPS)
    recorded, again = model.pooled_generating(model.inputs(TEXTS), None, model.select(["blocks.0.hook_resid_post"]),
                                              "mean", STEPS)  # fmt: skip
    assert torch.equal(again.sequences, generation.sequences)
    for i, text in enumerate(TEXTS):
        tokens = model.tokenizer([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = peer.generate(tokens, max_new_tokens=STEPS, do_sample=False, stop_at_eos=False, verbose=False)
        assert generation.generated(i) == want[0, tokens.shape[1] :].tolist()[: int(generation.lengths[i])], i


def test_a_shard_or_resume_repeats_what_the_run_generated_with(run_cli, folders, tmp_path):
    """A second shard recorded with another --max-new-tokens (or --prepend-bos) was mixed into the run without a
    word: rows of 5-token and 6-token continuations under one run. Refused, naming the value to repeat."""
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    args = ["--model", str(folders["gpt2"]), "--data", str(data), "--store", str(tmp_path / "store"), "--run", "c"]
    args += ["--task", "continue", "--hooks", "blocks.1.hook_resid_post"]
    code, _, err = run_cli("record", *args, "--max-new-tokens", "5", "--shard", "0/2")
    assert code == 0, err
    code, _, err = run_cli("record", *args, "--max-new-tokens", "6", "--shard", "1/2")
    assert code == 2 and "cannot resume run 'c' with max_new_tokens=6: it was recorded with max_new_tokens=5" in err
    code, _, err = run_cli("record", *args, "--max-new-tokens", "5", "--shard", "1/2", "--prepend-bos")
    assert code == 2 and "with prepend_bos=True: it was recorded with prepend_bos=False" in err
    code, _, err = run_cli("record", *args, "--max-new-tokens", "5", "--shard", "1/2")
    assert code == 0, err
    with Store.open(tmp_path / "store").query() as session:
        tokens = session.sql("SELECT generated_tokens AS n FROM examples WHERE run = 'c'")["n"].to_pylist()
    assert len(tokens) == len(TEXTS) and max(tokens) <= 5


def test_position_ids_of_ones_own_are_refused_not_dropped(folders):
    """generate counts positions from each example's first token; position_ids that say otherwise (an offset)
    were dropped without a word. The ones it would count itself are taken."""
    model = load(folders["gpt2"])
    model.tokenizer.padding_side = "left"
    batch = model.tokenizer(TEXTS, return_tensors="pt", padding=True)
    model.tokenizer.padding_side = "right"
    counted = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    same = model.generate({**batch, "position_ids": counted}, max_new_tokens=3)
    assert torch.equal(same.sequences, model.generate(TEXTS, max_new_tokens=3).sequences)
    with pytest.raises(UserError, match=r"positions from its first token .* without position_ids"):
        model.generate({**batch, "position_ids": counted + 5}, max_new_tokens=3)
