"""Sampled decoding (hookpoints.settings.Sampling, hookpoints.sampling): the distribution, one stream per
example, and every path that generates (plain, edits, fwd_hooks, recording, the CLI).

The distribution is checked against a numpy computation of temperature, top-k and top-p written here from their
definitions (not transformers' warpers, which the code under test uses).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hookpoints.store.catalog import Store

import hookpoints as hp
from hookpoints.errors import UserError
from hookpoints.sampling import SampledChoice, example_seed
from hookpoints.settings import RunSettings, Sampling

TEXTS = ["the cat sat on the mat", "hello", "a b c d"]


def expected(scores: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The probability of each token: softmax(scores / T), then the top k, then the fewest (most likely first)
    holding top_p of what is left, renormalised each time."""
    p = np.exp((scores - scores.max()) / sampling.temperature)
    p /= p.sum()
    order = np.argsort(-p)
    if sampling.top_k is not None:
        p[order[sampling.top_k :]] = 0
        p /= p.sum()
    if sampling.top_p is not None:
        kept = np.searchsorted(np.cumsum(p[order]), sampling.top_p) + 1  # through the token that reaches top_p
        p[order[kept:]] = 0
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(),
        Sampling(temperature=0.5, seed=1),
        Sampling(top_k=3, seed=2),
        Sampling(top_p=0.8, seed=3),
        Sampling(temperature=1.7, top_k=6, top_p=0.9, seed=4),
    ],
)
def test_each_token_is_drawn_with_its_probability(sampling):
    scores = np.random.default_rng(0).normal(scale=1.5, size=8)  # [vocab]
    draws = 40_000
    choice = SampledChoice(sampling, [f"e{i}" for i in range(draws)])
    out = choice(None, torch.tensor(scores, dtype=torch.float32).expand(draws, -1).clone())  # [draws, vocab]
    assert bool((out == 0).sum(-1).eq(1).all()) and bool(torch.isinf(out).sum(-1).eq(7).all())  # one token each
    frequency = np.bincount(out.argmax(-1).numpy(), minlength=8) / draws
    want = expected(scores, sampling)
    assert np.all(frequency[want == 0] == 0)  # never a token the warpers removed
    np.testing.assert_allclose(frequency, want, atol=0.012)  # 4.8 sigma at most (p(1-p)/n <= 0.0025**2)


def test_a_tiny_temperature_draws_the_best_token_and_scores_without_a_distribution_are_refused():
    """Scores divided by 1e-38 overflowed to inf: softmax gave NaN and the vocabulary's last token (probability
    ~0) was taken, without a word. A NaN or +inf logit, or a row without a finite score, has nothing to draw from."""
    scores = torch.tensor([[1.0, 5.0, 3.0, -2.0], [0.0, -1.0, 2.0, float("-inf")]])  # [batch, vocab]
    for temperature in (1e-4, 1e-38, 1e-300):
        choice = SampledChoice(Sampling(temperature=temperature), ["a", "b"])
        assert choice(None, scores.clone()).argmax(-1).tolist() == [1, 2]
    for bad in (float("nan"), float("inf")):
        row = torch.tensor([[1.0, bad, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
        with pytest.raises(RuntimeError, match="example 0's scores hold NaN or no finite value"):
            SampledChoice(Sampling(), ["a", "b"])(None, row)
    with pytest.raises(RuntimeError, match="example 1's scores hold NaN or no finite value"):
        SampledChoice(Sampling(), ["a", "b"])(None, torch.tensor([[0.0, 1.0], [float("-inf")] * 2]))


def test_an_example_draws_from_its_own_stream():
    scores = torch.zeros(3, 50)  # uniform: the draws alone decide
    first = SampledChoice(Sampling(seed=5), ["a", "b", "c"])
    alone = SampledChoice(Sampling(seed=5), ["b"])
    other_seed = SampledChoice(Sampling(seed=6), ["a", "b", "c"])
    steps = [first(None, scores).argmax(-1) for _ in range(4)]  # [batch] per step
    assert [int(alone(None, scores[:1]).argmax()) for _ in range(4)] == [int(step[1]) for step in steps]
    assert [other_seed(None, scores).argmax(-1).tolist() for _ in range(4)] != [s.tolist() for s in steps]
    assert example_seed(5, "b") != example_seed(5, "c")
    with pytest.raises(RuntimeError, match="3 example streams for a batch of 2"):
        first(None, scores[:2])


def test_sampled_continuations_do_not_depend_on_the_batch(tiny_model_dir):
    gpt2 = hp.load(tiny_model_dir("gpt2"))
    sampling = hp.Sampling(temperature=1.3, top_p=0.95, seed=11)
    batch = gpt2.generate(TEXTS, max_new_tokens=8, sampling=sampling, sample_keys=["x", "y", "z"])
    for i, (text, key) in enumerate(zip(TEXTS, ["x", "y", "z"], strict=True)):
        assert gpt2.generate([text], max_new_tokens=8, sampling=sampling, sample_keys=[key]).generated(0) == (
            batch.generated(i)
        )
    again = gpt2.generate(TEXTS, max_new_tokens=8, sampling=sampling, sample_keys=["x", "y", "z"])
    assert torch.equal(again.sequences, batch.sequences)  # the same seed and keys: the same tokens
    greedy = gpt2.generate(TEXTS, max_new_tokens=8)
    assert not torch.equal(greedy.sequences, batch.sequences)
    by_index = gpt2.generate(TEXTS, max_new_tokens=8, sampling=sampling)  # keys 0, 1, 2
    assert by_index.generated(0) == gpt2.generate(TEXTS[:1], max_new_tokens=8, sampling=sampling).generated(0)


def test_sampled_generation_with_edits_and_hooks_agrees_on_every_path(tiny_model_dir):
    """Edits by torch hooks (folded or not) and by the nnsight trace, and a TransformerLens-style fwd_hook
    doing the same change, draw the same tokens: the edit is the only difference, the draws are shared."""
    gpt2 = hp.load(tiny_model_dir("gpt2"))
    sampling = hp.Sampling(seed=3)
    edit = gpt2.edit("blocks.1.mlp.hook_post", [0, 3, 7], [6.0, -6.0, 6.0])
    folded = gpt2.generate(TEXTS, max_new_tokens=8, edits=[edit], sampling=sampling)
    hooked, _ = gpt2.generate_edited(gpt2.inputs(TEXTS), None, [edit], 8, fold=False, sampling=sampling)
    traced, _ = gpt2.generate_edited(gpt2.inputs(TEXTS), None, [edit], 8, record=["blocks.0.hook_resid_post"],
                                     sampling=sampling)  # fmt: skip

    def change(x, hook):  # [batch, pos, d_mlp]
        x[..., [0, 3, 7]] = torch.tensor([6.0, -6.0, 6.0])

    patched = gpt2.generate(TEXTS, max_new_tokens=8, fwd_hooks=[("blocks.1.mlp.hook_post", change)], sampling=sampling)
    for other in (hooked, traced, patched):
        assert torch.equal(other.sequences, folded.sequences)
    plain = gpt2.generate(TEXTS, max_new_tokens=8, sampling=sampling)
    assert not torch.equal(plain.sequences, folded.sequences)  # the edit changed what was drawn


def test_an_encoder_decoder_samples_and_records_its_sampled_steps(tiny_model_dir):
    """SeamlessM4T v2 (text): the teacher-forced pass reproduces generate's logits at every sampled step (the
    run-time alignment check), and equals hooks at every step of the same sampled generate."""
    from tests.api_helpers import randomise

    model = hp.load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    randomise(model, seed=7, scale=0.05)  # every parameter, norm gains and biases included
    sentences, languages = ["Das Wetter ist heute sehr schön.", "Il fait beau.", "Hola"], ["deu", "fra", "spa"]
    prompt = model.decoder_prompt(["eng"] * 3, task="t2tt")
    sampling = hp.Sampling(temperature=2.0, seed=1)
    keys = ["u0", "u1", "u2"]
    points = model.select(["text_decoder.layers.*.ffn.fc1", "text_encoder.layers.0.ffn.fc1"])
    inputs = model.source_inputs(sentences, languages)
    pooled, generation = model.pooled_generating(inputs, prompt, points, "mean", 6, sampling=sampling,
                                                 sample_keys=keys)  # fmt: skip
    per_step, again = model.pooled_per_step(model.source_inputs(sentences, languages), prompt, points, "mean", 6,
                                            sampling=sampling, sample_keys=keys)  # fmt: skip
    assert torch.equal(generation.sequences, again.sequences)
    for point in points:
        torch.testing.assert_close(pooled[point.name], per_step[point.name], atol=2e-5, rtol=2e-5)
    greedy = model.generate(inputs, prompt, 6)
    assert not torch.equal(greedy.sequences, generation.sequences)
    alone = model.generate(model.source_inputs(sentences[1:2], languages[1:2]), prompt[:1], 6, sampling=sampling,
                           sample_keys=["u1"])  # fmt: skip
    assert alone.generated(0) == generation.generated(1)


def test_record_samples_each_example_as_in_any_batch(tiny_model_dir, tmp_path):
    gpt2 = hp.load(tiny_model_dir("gpt2"))
    data = [{"id": f"t{i}", "text": text} for i, text in enumerate(TEXTS)]
    store = Store.open(tmp_path / "store", create=True)
    sampling = hp.Sampling(temperature=1.5, top_k=50, seed=9)
    for run, size in (("b3", 3), ("b1", 1)):
        hp.record(gpt2, data, store, run, hooks="blocks.1.hook_resid_post", task="continue", max_new_tokens=6,
                  batch_size=size, sampling=sampling, progress=False)  # fmt: skip
    with store.query() as session:
        texts = session.sql("SELECT run, example_id, generated_text FROM examples ORDER BY 2, 1").to_pylist()
        vectors = session.sql("SELECT run, example_id, activation FROM activations ORDER BY 2, 1").to_pylist()
        config = json.loads(session.sql("SELECT config FROM runs WHERE run = 'b1'").to_pylist()[0]["config"])
    for a, b in zip(texts[::2], texts[1::2], strict=True):
        assert a["example_id"] == b["example_id"] and a["generated_text"] == b["generated_text"]
    for a, b in zip(vectors[::2], vectors[1::2], strict=True):
        np.testing.assert_allclose(a["activation"], b["activation"], atol=1e-5)
    assert config["sampling"] == {"temperature": 1.5, "top_k": 50, "top_p": None, "seed": 9}
    want = gpt2.decode(gpt2.generate(TEXTS, max_new_tokens=6, sampling=sampling, sample_keys=["t0", "t1", "t2"]))
    assert [row["generated_text"] for row in texts[::2]] == want
    assert RunSettings.from_row({"task": "continue", "pooling": "mean", "config": config}).sampling == sampling
    for other, message in ((hp.Sampling(seed=10), "sampling="), (None, "sampling=None")):
        with pytest.raises(UserError, match=message):
            hp.record(gpt2, data, store, "b1", hooks="blocks.1.hook_resid_post", task="continue", max_new_tokens=6,
                      sampling=other, if_exists="resume", progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"temperature": 0}, "temperature must be a number above 0"),
        ({"temperature": float("nan")}, "temperature must be a number above 0"),
        ({"temperature": "hot"}, "temperature must be a number above 0"),
        ({"top_k": 0}, "top_k must be a whole number of at least 1"),
        ({"top_k": 2.5}, "top_k must be a whole number of at least 1"),
        ({"top_p": 0}, "top_p must be a number above 0 and at most 1"),
        ({"top_p": 1.5}, "top_p must be a number above 0 and at most 1"),
        ({"seed": -1}, "seed must be a whole number of at least 0"),
        ({"seed": True}, "seed must be a whole number of at least 0"),
    ],
)
def test_bad_sampling_settings_are_one_line(given, message):
    with pytest.raises(UserError, match=message) as caught:
        Sampling(**given)
    assert "\n" not in str(caught.value)


def test_numpy_and_torch_numbers_are_sampling_settings():
    """As every other count takes them: np.int64(5) was refused as "not a whole number"."""
    given = Sampling(temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.75), seed=torch.tensor(3))
    assert given == Sampling(temperature=0.5, top_k=5, top_p=0.75, seed=3)
    assert [type(value) for value in given.config().values()] == [float, int, float, int]
    for bad in ({"top_k": np.True_}, {"seed": torch.tensor(2.5)}, {"temperature": np.bool_(True)}):
        with pytest.raises(UserError, match="must be"):
            Sampling(**bad)


def test_bad_sampling_requests_are_one_line(tiny_model_dir):
    gpt2 = hp.load(tiny_model_dir("gpt2"))
    for call, message in (
        (lambda: gpt2.generate(TEXTS, max_new_tokens=3, sampling="hot"), "sampling must be a hookpoints.Sampling"),
        (lambda: gpt2.generate(TEXTS, max_new_tokens=3, sample_keys=["a", "b", "c"]), "give sampling="),
        (lambda: gpt2.generate(TEXTS, max_new_tokens=3, sampling=Sampling(), sample_keys=["a"]), "holds 1 keys"),
        (lambda: RunSettings(task="forward", sampling=Sampling()), "sampling applies to generating tasks"),
        (lambda: Sampling.from_config({"temperature": 1.0, "beams": 4}), "unknown sampling"),
    ):
        with pytest.raises(UserError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_sample_keys_are_a_list_of_keys(tiny_model_dir):
    """A string was split into one key per character, without a word; a number (or a 0-d tensor) was a
    TypeError, a key with a lone surrogate a UnicodeEncodeError. A tensor or an array keys as its numbers."""
    gpt2 = hp.load(tiny_model_dir("gpt2"))
    sampling = Sampling(temperature=1.5, seed=2)
    listed = gpt2.generate(TEXTS[:2], max_new_tokens=6, sampling=sampling, sample_keys=[7, 8])
    for keys in (torch.tensor([7, 8]), np.array([7, 8])):
        given = gpt2.generate(TEXTS[:2], max_new_tokens=6, sampling=sampling, sample_keys=keys)
        assert torch.equal(given.sequences, listed.sequences)
    odd = gpt2.generate(TEXTS[:2], max_new_tokens=2, sampling=sampling, sample_keys=["\ud800", "été"])  # any text
    assert odd.sequences.shape == (2, listed.prompt_length + 2)
    for keys in (5, "ab", b"ab", torch.tensor(3)):
        with pytest.raises(UserError, match="sample_keys is a list of keys, one per example") as caught:
            gpt2.generate(TEXTS[:2], max_new_tokens=2, sampling=sampling, sample_keys=keys)
        assert "\n" not in str(caught.value)


def test_record_cli_samples_and_refuses_sampling_options_without_sample(run_cli, tiny_model_dir, tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "text": text}) + "\n" for i, text in enumerate(TEXTS)))
    model = str(tiny_model_dir("gpt2"))
    base = ["record", "--model", model, "--data", str(data), "--store", str(tmp_path / "s"), "--task", "continue",
            "--max-new-tokens", "5", "--hooks", "blocks.0.hook_resid_post"]  # fmt: skip
    code, _, err = run_cli(*base, "--run", "r", "--sample", "--temperature", "0.8", "--top-p", "0.9")
    assert code == 0, err
    gpt2 = hp.load(model)
    want = gpt2.decode(gpt2.generate(TEXTS, max_new_tokens=5, sampling=Sampling(temperature=0.8, top_p=0.9),
                                     sample_keys=["t0", "t1", "t2"]))  # fmt: skip
    with Store.open(tmp_path / "s").query() as session:
        got = session.sql("SELECT generated_text FROM examples ORDER BY example_id").to_pylist()
    assert [row["generated_text"] for row in got] == want
    for extra, message in (
        (["--temperature", "0.8"], "--temperature sets sampled decoding: add --sample"),
        (["--sample-seed", "3"], "--sample-seed sets sampled decoding: add --sample"),
        (["--sample", "--top-p", "2"], "top_p must be a number above 0 and at most 1"),
        (["--sample", "--task", "forward"], "sampling applies to generating tasks"),
    ):
        code, _, err = run_cli(*base, "--run", "x", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    with Store.open(tmp_path / "s").query() as session:
        assert session.sql("SELECT DISTINCT run FROM examples").to_pylist() == [{"run": "r"}]  # nothing of x
