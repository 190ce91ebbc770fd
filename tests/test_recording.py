"""Recording: values in the store equal an independent computation with plain torch forward hooks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from deltalake import DeltaTable
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, SeamlessM4Tv2ForTextToText

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import record

ROWS = [
    {"id": "a", "text": "Hello there.", "language": "en", "score": 1},
    {"id": "b", "text": "Das Wetter ist heute wirklich sehr schön, finde ich.", "language": "de", "score": 2},
    {"id": "c", "text": "Hoy hace buen tiempo.", "language": "es", "score": 3},
    {"id": "d", "text": "今日はいい天気です。", "language": "ja", "score": 4},
    {"id": "e", "text": "Il fait très beau aujourd'hui, n'est-ce pas ?", "language": "fr", "score": 5},
]

CLASSES = {"gpt2": AutoModelForCausalLM, "bert": AutoModel, "seamless_m4t_v2": SeamlessM4Tv2ForTextToText}


def reference(directory, family: str, text: str, module: str, io: str, pooling: str) -> np.ndarray:
    """Plain torch: load the checkpoint directly, run one unpadded example, hook ``module``, pool by hand."""
    model = CLASSES[family].from_pretrained(directory).eval()
    tokens = AutoTokenizer.from_pretrained(directory)(text, return_tensors="pt")
    kwargs = {"input_ids": tokens["input_ids"]}
    if family == "seamless_m4t_v2":
        kwargs["decoder_input_ids"] = torch.tensor([[model.config.decoder_start_token_id]])
    seen = []
    target = model.get_submodule(module)
    if io == "input":
        handle = target.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    else:
        handle = target.register_forward_hook(
            lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
    with torch.no_grad():
        model(**kwargs)
    handle.remove()
    x = seen[0][0].float().numpy()  # [pos, width]
    return {"mean": x.mean(0), "last": x[-1], "max": x.max(0), "none": x}[pooling]


@pytest.mark.parametrize(
    ("family", "hooks", "pooling"),
    [
        ("gpt2", ["blocks.1.mlp.hook_pre", "blocks.0.attn.hook_z"], "mean"),
        ("bert", ["blocks.1.hook_normalized_resid_post", "blocks.0.mlp.hook_post"], "last"),
        ("seamless_m4t_v2", ["text_encoder.layers.1.ffn.fc1", "text_decoder.layers.0.cross_attention.v_proj"], "max"),
        ("gpt2", ["blocks.0.hook_resid_post"], "none"),
    ],
)
def test_values_read_back_with_sql_equal_plain_torch_hooks(
    tiny_model_dir, write_manifest, tmp_path, run_cli, family, hooks, pooling
):
    directory = tiny_model_dir(family)
    manifest = write_manifest(ROWS)
    store = tmp_path / "store"
    args = ["record", "--model", str(directory), "--data", str(manifest), "--store", str(store), "--run", "r"]
    for hook in hooks:
        args += ["--hooks", hook]
    code, out, err = run_cli(*args, "--pooling", pooling, "--batch-size", "3")
    assert code == 0, err
    assert "recorded 5 examples" in out

    code, out, err = run_cli(
        "sql",
        "--store",
        str(store),
        "--format",
        "json",
        "SELECT a.hook, a.example_id, a.position, a.activation, h.module, h.io FROM activations a "
        "JOIN hooks h USING (run, hook) ORDER BY a.hook, a.example_id, a.position",
    )
    assert code == 0, err
    rows = json.loads(out)
    texts = {row["id"]: row["text"] for row in ROWS}
    for hook in hooks:
        mine = [row for row in rows if row["hook"] == hook]
        for example in texts:
            got = np.array([row["activation"] for row in mine if row["example_id"] == example], dtype=np.float32)
            module, io = mine[0]["module"], mine[0]["io"]
            expected = reference(directory, family, texts[example], module, io, pooling)
            if pooling != "none":
                got = got[0]
            else:
                positions = [row["position"] for row in mine if row["example_id"] == example]
                assert positions == list(range(len(expected)))
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"{hook} {example}")


@pytest.mark.parametrize("family", ["gpt2", "bert", "seamless_m4t_v2"])
@pytest.mark.parametrize("pooling", ["mean", "last", "max", "none"])
def test_batched_recording_equals_batch_size_one(tiny_model_dir, family, pooling):
    model = load(tiny_model_dir(family))
    points = model.select()
    texts = [row["text"] for row in ROWS]
    batched = model.pooled(model.text_inputs(texts), points, pooling)  # padded to the longest text
    singles = [model.pooled(model.text_inputs([text]), points, pooling) for text in texts]
    for point in points:
        expected = torch.cat([single[point.name] for single in singles])
        # float32 rounding of padded attention grows with the values (random norm gains and biases)
        atol = 1e-5 * max(1.0, float(expected.abs().max()) / 4)
        torch.testing.assert_close(batched[point.name], expected, atol=atol, rtol=1e-4, msg=point.name)


def test_examples_keep_every_manifest_column(tiny_model_dir, write_manifest, store):
    model = load(tiny_model_dir("gpt2"))
    record(model, read_manifest(write_manifest(ROWS)), store, "r", hooks=["blocks.0.hook_resid_post"])
    with store.query() as session:
        table = session.sql("SELECT * FROM examples ORDER BY example_id")
        assert table.column_names == ["run", "example_id", "text", "language", "score"]
        assert table.schema.field("score").type == pa.int64()
        assert table["language"].to_pylist() == ["en", "de", "es", "ja", "fr"]
        hooks = session.sql("SELECT hook, component, layer, submodule, width FROM hooks").to_pylist()
    assert hooks == [
        {"hook": "blocks.0.hook_resid_post", "component": "lm", "layer": 0, "submodule": "hook_resid_post", "width": 64}
    ]


def test_float16_storage_reads_back_as_rounded_float32(tiny_model_dir, write_manifest, tmp_path):
    from hookpoints.store.catalog import Store

    model = load(tiny_model_dir("gpt2"))
    manifest = read_manifest(write_manifest(ROWS))
    stores = {dtype: Store.open(tmp_path / dtype, create=True) for dtype in ("float32", "float16")}
    for dtype, store in stores.items():
        record(model, manifest, store, "r", hooks=["blocks.1.mlp.hook_pre"], dtype=dtype)
    query = "SELECT example_id, activation FROM activations ORDER BY example_id"
    with stores["float32"].query() as full, stores["float16"].query() as half:
        exact = np.array(full.sql(query)["activation"].to_pylist(), dtype=np.float32)
        stored = np.array(half.sql(query)["activation"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(stored, exact.astype(np.float16).astype(np.float32))
    assert not np.array_equal(stored, exact)  # it really is stored at half precision


def test_memory_is_bounded_by_the_buffer_not_the_manifest(tiny_model_dir, write_manifest, store):
    """A small buffer makes many commits of bounded size; each commit holds every hook's rows."""
    model = load(tiny_model_dir("gpt2"))
    rows = [{"id": f"x{i}", "text": f"example number {i} " * (1 + i % 4)} for i in range(40)]
    hooks = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_pre"]
    width_bytes = (64 + 256) * 4  # bytes per example across both hooks
    record(
        model,
        read_manifest(write_manifest(rows)),
        store,
        "r",
        hooks=hooks,
        batch_size=4,
        max_buffer_bytes=3 * 4 * width_bytes,
    )  # three batches
    table = DeltaTable(store.location.table_uri("activations"))
    commits = [c for c in table.history() if c["operation"] == "WRITE"]
    assert len(commits) == 4  # 40 examples / (3 batches of 4) -> 4 commits
    actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    per_hook = {}
    for action in actions:
        per_hook.setdefault(action["partition.hook"], []).append(action["num_records"])
    assert per_hook[hooks[0]] == per_hook[hooks[1]]  # every commit carries both hooks' rows
    assert max(per_hook[hooks[0]]) <= 12
    with store.query() as session:
        assert session.sql("SELECT count(*) AS n FROM activations")["n"][0].as_py() == 80


def test_existing_run_is_refused_resumed_or_overwritten(tiny_model_dir, write_manifest, store):
    model = load(tiny_model_dir("gpt2"))
    hooks = ["blocks.0.hook_resid_post"]
    first = read_manifest(write_manifest(ROWS[:3], "first.jsonl"))
    record(model, first, store, "r", hooks=hooks)

    def counts():
        with store.query() as session:
            return session.sql(
                "SELECT (SELECT count(*) FROM activations) AS acts, (SELECT count(*) FROM examples) AS examples"
            ).to_pylist()[0]

    before = counts()
    with pytest.raises(UserError, match="run 'r' already exists .* --resume .* --overwrite"):
        record(model, first, store, "r", hooks=hooks)
    assert counts() == before  # refused before anything was written

    everything = read_manifest(write_manifest(ROWS, "all.jsonl"))
    summary = record(model, everything, store, "r", hooks=hooks, if_exists="resume")
    assert (summary.recorded, summary.skipped) == (2, 3)
    assert counts() == {"acts": 5, "examples": 5}

    with pytest.raises(UserError, match="cannot resume run 'r' with pooling=max"):
        record(model, everything, store, "r", hooks=hooks, pooling="max", if_exists="resume")
    with pytest.raises(UserError, match="cannot resume run 'r' with other hook points"):
        record(model, everything, store, "r", hooks=["blocks.1.hook_resid_post"], if_exists="resume")

    record(model, first, store, "r", hooks=hooks, pooling="max", if_exists="overwrite")
    assert counts() == {"acts": 3, "examples": 3}
    assert store.run_info("r").pooling == "max"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pooling": "median"}, "pooling must be one of mean, last, max, none"),
        ({"dtype": "int8"}, "storage dtype must be one of float32, float16"),
        ({"batch_size": 0}, "batch size must be a whole number of at least 1"),
        ({"hooks": ["blocks.9.*"]}, "matches no recordable hook point"),
    ],
)
def test_bad_recording_options_leave_the_store_empty(tiny_model_dir, write_manifest, store, kwargs, message):
    model = load(tiny_model_dir("gpt2"))
    with pytest.raises(UserError, match=message):
        record(model, read_manifest(write_manifest(ROWS)), store, "r", **kwargs)
    assert store.run_info("r") is None
    assert store.dataset("activations").count_rows() == 0


def test_manifest_column_type_conflicting_with_the_store_is_refused(tiny_model_dir, write_manifest, store):
    model = load(tiny_model_dir("gpt2"))
    hooks = ["blocks.0.hook_resid_post"]
    halves = [dict(row, score=row["score"] + 0.5) for row in ROWS]
    record(model, read_manifest(write_manifest(halves)), store, "first", hooks=hooks)
    clash = [dict(row, score=f"s{row['score']}") for row in ROWS]
    with pytest.raises(
        UserError, match="manifest column 'score' holds string but the store's examples table holds double"
    ):
        record(model, read_manifest(write_manifest(clash, "clash.jsonl")), store, "second", hooks=hooks)
    assert store.run_info("second") is None
    # a widening type (integers into a float column) is cast to the store's type
    record(model, read_manifest(write_manifest(ROWS, "ints.jsonl")), store, "third", hooks=hooks)
    with store.query() as session:
        assert session.sql("SELECT DISTINCT typeof(score) AS t FROM examples")["t"].to_pylist() == ["DOUBLE"]
        assert (
            session.sql("SELECT score FROM examples WHERE run = 'third' AND example_id = 'a'")["score"][0].as_py()
            == 1.0
        )


def text_of(tokenizer, tokens: int, *, special: bool = True) -> str:
    """A text the tokenizer makes exactly ``tokens`` tokens of (its own special tokens counted if ``special``)."""
    for length in range(tokens - 4, tokens + 4):
        text = "x" * length  # no merge of the tiny tokenizers holds an x: one token per character
        if len(tokenizer(text, add_special_tokens=special)["input_ids"]) == tokens:
            return text
    raise AssertionError(f"no text of {tokens} tokens")


@pytest.mark.parametrize(
    ("family", "prepend_bos", "task", "extra"),
    [("gpt2", False, "forward", 0), ("gpt2", True, "forward", 1), ("bert", False, "forward", 0),
     ("seamless_m4t_v2", False, "t2tt", 2)],
)  # fmt: skip
def test_a_text_longer_than_the_model_takes_is_refused_not_cut(
    tiny_model_dir, write_manifest, store, family, prepend_bos, task, extra
):
    """Tokenising cut such a text to the model's positions without a word (activations of its start only)."""
    model = load(tiny_model_dir(family), modality="text", prepend_bos=prepend_bos)
    limit = model.model.config.get_text_config().max_position_embeddings if family != "gpt2" else 256
    fits = text_of(model.tokenizer, limit - extra, special=task != "t2tt")
    longer = text_of(model.tokenizer, limit - extra + 1, special=task != "t2tt")
    rows = [{"id": "fits", "text": fits, "language": "de"}, {"id": "long", "text": longer, "language": "de"}]
    hooks = ["text_encoder.layers.0.ffn.fc1"] if task == "t2tt" else ["blocks.0.hook_resid_post"]
    with pytest.raises(UserError, match=f"example 'long' has {limit + 1} tokens, more than the {limit} positions"):
        record(model, read_manifest(write_manifest(rows)), store, "r", hooks=hooks, task=task, max_new_tokens=2)
    assert store.run_info("r") is None
    record(model, read_manifest(write_manifest(rows[:1])), store, "r", hooks=hooks, task=task, max_new_tokens=2,
           pooling="none")  # fmt: skip
    with store.query() as session:
        [row] = session.sql(f"SELECT max(position) + 1 AS n FROM activations WHERE hook = '{hooks[0]}'").to_pylist()
    assert row["n"] == limit  # every token of the text that fits
    with pytest.raises(UserError, match=f"text 0 has {limit + 1} tokens"):
        model.run_with_cache([longer] if task != "t2tt" else model.source_inputs([longer], ["deu"]))
