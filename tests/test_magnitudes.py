"""Layer-wise magnitudes (SQL) and activation Gini (numpy) against a direct computation from the written values."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
from hookpoints.analyses import gini
from hookpoints.analyses.examples import open_runs, select_examples
from hookpoints.analyses.hook_matrix import shared_hooks
from hookpoints.analyses.magnitudes import activation_gini, example_groups, group_columns, layer_magnitudes
from hookpoints.store.catalog import Store
from selectivity_helpers import DECODER, examples_table, hook_rows, write_run

from hookpoints.errors import UserError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("magnitudes") / "store", create=True)
    speech = examples_table(5, "speech", seed=1, prefix="s")
    text = examples_table(4, "text", seed=2, prefix="t")
    hooks = hook_rows("text_decoder", 3, DECODER)
    written = {
        "s2tt": (speech, write_run(store, "s2tt", speech, hooks, seed=0)),
        "t2tt": (text, write_run(store, "t2tt", text, hooks, seed=9, dtype="float16")),
    }
    return store, written


def expected_magnitudes(written, absolute: bool) -> dict[tuple, float]:
    """(layer, language, modality) -> mean over the group's examples of the mean over submodules of the
    mean over neurons (float16 runs as stored)."""
    per_group: dict[tuple, list[float]] = {}
    for run, (examples, values) in written.items():
        for i, (language, modality) in enumerate(
            zip(examples["language"].to_pylist(), examples["modality"].to_pylist(), strict=True)
        ):
            for layer in range(3):
                means = []
                for sub in DECODER:
                    v = values[f"text_decoder.layers.{layer}.{sub}"][i].astype(np.float64)
                    if run == "t2tt":
                        v = v.astype(np.float16).astype(np.float64)
                    means.append(np.abs(v).mean() if absolute else v.mean())
                per_group.setdefault((layer, language, modality), []).append(np.mean(means))
    return {key: float(np.mean(v)) for key, v in per_group.items()}


@pytest.mark.parametrize("absolute", [False, True])
def test_layer_magnitudes_and_deviation_from_the_mean_trend(runs, absolute):
    store, written = runs
    with store.query() as session:
        group = open_runs(session, ["s2tt", "t2tt"])
        examples = select_examples(session, group)
        hooks = shared_hooks(session, group.runs)
        columns = group_columns(session, examples, None)
        assert columns == ["language", "modality"]
        table = layer_magnitudes(session, examples, hooks, columns, absolute=absolute)
    expected = expected_magnitudes(written, absolute)
    rows = table.to_pylist()
    assert len(rows) == len(expected) == 3 * 3 * 2
    for row in rows:
        key = (row["layer"], row["language"], row["modality"])
        assert row["magnitude"] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)
        layer_mean = np.mean([v for k, v in expected.items() if k[0] == row["layer"]])
        assert row["deviation"] == pytest.approx(expected[key] - layer_mean, rel=1e-4, abs=1e-6)
        assert row["examples"] == (5 if row["modality"] == "speech" else 4)


def test_activation_gini_over_each_layers_neurons(runs):
    store, written = runs
    with store.query() as session:
        group = open_runs(session, ["s2tt", "t2tt"])
        examples = select_examples(session, group, "language <> 'ja'")
        hooks = shared_hooks(session, group.runs)
        groups = example_groups(session, examples, ["modality"])
    table = activation_gini(store, examples, hooks, groups, memory_bytes=64)
    assert groups.labels == [("speech",), ("text",)]
    for row in table.to_pylist():
        run = "s2tt" if row["modality"] == "speech" else "t2tt"
        ex, values = written[run]
        keep = np.array([language != "ja" for language in ex["language"].to_pylist()])
        means = []
        for sub in DECODER:
            v = values[f"text_decoder.layers.{row['layer']}.{sub}"][keep]
            if run == "t2tt":
                v = v.astype(np.float16).astype(np.float32)
            means.append(np.abs(v).mean(axis=0))
        assert row["gini"] == pytest.approx(gini(np.concatenate(means)), rel=1e-5)
        assert row["neurons"] == sum(DECODER.values())


def test_bad_group_columns_are_refused(runs):
    store, _ = runs
    with store.query() as session:
        examples = select_examples(session, open_runs(session, ["s2tt"]))
        with pytest.raises(UserError, match="--by 'speaker' is not a column"):
            group_columns(session, examples, ["speaker"])


def _per_step_run(store, run: str, pooling: str, examples, steps: int, seed: int) -> dict[str, np.ndarray]:
    """A per-step run: a decoder hook with one row per step and an encoder-space hook with one row, one layer."""
    from hookpoints.store.writer import HookRows, open_run

    hooks = hook_rows("text_decoder", 1, {"ffn.fc1": 5, "encoder_attn.k_proj": 3}, layer_output=False)
    hooks[0]["space"], hooks[1]["space"] = "decoder", "encoder"
    rng = np.random.default_rng(seed)
    ids = examples["example_id"].to_pylist()
    decoder = rng.normal(size=(len(ids), steps, 5)).astype(np.float32)
    encoder = rng.normal(size=(len(ids), 3)).astype(np.float32)
    settings = {"model": "synthetic", "task": "t2tt", "pooling": f"{pooling}+steps", "dtype": "float32"}
    writer = open_run(store, run, settings=settings, config={}, hooks=hooks, examples_schema=examples.schema)
    step_ids = [i for i in ids for _ in range(steps)]
    positions = np.tile(np.arange(steps, dtype=np.int32), len(ids))
    order = np.random.default_rng(seed + 1).permutation(len(step_ids))  # rows not in step order
    writer.add(
        examples,
        {
            hooks[0]["hook"]: HookRows([step_ids[i] for i in order], decoder.reshape(-1, 5)[order], positions[order]),
            hooks[1]["hook"]: HookRows(ids, encoder),
        },
    )
    writer.finish()
    return {"decoder": decoder, "encoder": encoder}


@pytest.mark.parametrize("pooling", ["mean", "last", "max"])
@pytest.mark.parametrize("absolute", [False, True])
def test_per_step_run_magnitudes_pool_the_steps_like_its_pooled_twin(tmp_path, pooling, absolute):
    """Each decoder hook's step rows are pooled with the run's pooling before the mean over neurons, and the
    layer averages its hooks (not its rows): the steps used to count as separate hook vectors."""
    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(2, "text", seed=3)
    values = _per_step_run(store, "steps", pooling, examples, steps=4, seed=5)
    pool = {"mean": lambda v: v.mean(1), "last": lambda v: v[:, -1], "max": lambda v: v.max(1)}[pooling]
    f = np.abs if absolute else (lambda v: v)
    per_example = (f(pool(values["decoder"].astype(np.float64))).mean(1) + f(values["encoder"]).mean(1)) / 2
    languages = np.array(examples["language"].to_pylist())
    with store.query() as session:
        group = open_runs(session, ["steps"])
        examples_set = select_examples(session, group)
        hooks = shared_hooks(session, group.runs)
        table = layer_magnitudes(session, examples_set, hooks, ["language"], absolute=absolute)
    rows = table.to_pylist()
    assert len(rows) == len(set(languages))
    for row in rows:
        assert row["magnitude"] == pytest.approx(per_example[languages == row["language"]].mean(), rel=1e-5)
        assert row["examples"] == 2


def test_non_finite_activations_are_refused_not_averaged_into_nan(tmp_path):
    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(2, "speech", seed=1)
    hooks = hook_rows("text_decoder", 2, DECODER)
    values = {h["hook"]: np.ones((examples.num_rows, h["width"]), np.float32) for h in hooks}
    bad = examples["example_id"].to_pylist()[3]
    values["text_decoder.layers.1.ffn.fc1"][3, 2] = np.nan
    write_run(store, "r", examples, hooks, values=values)
    with store.query() as session:
        group = open_runs(session, ["r"])
        hooks_ = shared_hooks(session, group.runs)
        with pytest.raises(UserError, match=f"hook text_decoder.layers.1.ffn.fc1 holds NaN .*1 example.*{bad}"):
            layer_magnitudes(session, select_examples(session, group), hooks_, ["language"])
        # the example left out: every magnitude is the finite 1.0
        subset = select_examples(session, group, f"example_id <> '{bad}'")
        table = layer_magnitudes(session, subset, hooks_, ["language"])
    assert table["magnitude"].to_pylist() == pytest.approx([1.0] * table.num_rows)


def test_an_example_stored_twice_at_a_hook_is_refused(tmp_path):
    """A second vector of an example at a hook (rows appended by another tool) was averaged in as one more
    submodule of its layer."""
    from deltalake import write_deltalake
    from hookpoints.store.schema import ACTIVATIONS

    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(2, "text", seed=4)
    write_run(store, "r", examples, hook_rows("text_decoder", 1, DECODER))
    extra = pa.table(
        {"run": ["r"], "hook": ["text_decoder.layers.0.ffn.fc1"], "example_id": [examples["example_id"][0].as_py()],
         "position": pa.nulls(1, pa.int32()), "activation": pa.array([[50.0] * 9], pa.list_(pa.float32())),
         "activation_f16": pa.nulls(1, pa.list_(pa.int16())), "finite": [True],
         "activation_f16_bytes": pa.nulls(1, pa.binary())},
        schema=ACTIVATIONS,
    )  # fmt: skip
    write_deltalake(store.location.table_uri("activations"), extra, mode="append", partition_by=["run", "hook"])
    with store.query() as session:
        group = open_runs(session, ["r"])
        with pytest.raises(UserError, match=r"^run\(s\) r hold more than one vector of an example at a hook: "):
            layer_magnitudes(session, select_examples(session, group), shared_hooks(session, group.runs), ["language"])


@pytest.mark.parametrize("gap", ["example", "hook"])
def test_examples_without_activations_are_refused_not_left_out_of_the_averages(tmp_path, gap):
    """An example in the examples table with no activations at all (a recording killed between commits), or
    none at one hook of a layer: its layer magnitude came from the hooks it had, or it dropped out of its
    group's average (and `examples` count) silently, while ap and the activation Gini refused the run. Now
    magnitudes refuses it the same way; left out with --where, the rest equals numpy's."""
    from deltalake import DeltaTable
    from hookpoints.store.schema import CORE_TABLES

    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(2, "text", seed=4)
    hooks = hook_rows("text_decoder", 2, DECODER)
    values = write_run(store, "r", examples, hooks)
    ids = examples["example_id"].to_pylist()
    hook = "text_decoder.layers.1.ffn.fc1"
    if gap == "example":
        late = {"run": ["r"], "example_id": ["late"], "text": ["x"], "language": ["de"], "modality": ["text"]}
        store.append(CORE_TABLES["examples"], pa.table(late), merge_schema=True)  # an example recorded nowhere
        missing, hook, n = "late", "text_decoder.layers.0.cross_attention.v_proj", 7
    else:
        missing, n = ids[2], 6
        DeltaTable(store.location.table_uri("activations")).delete(f"hook = '{hook}' AND example_id = '{missing}'")
    message = (
        f"run 'r' has no activations at {hook} for 1 of its {n} examples (e.g. '{missing}'): finish the "
        "recording (hookpoints record --resume) or leave them out with --where"
    )
    with store.query() as session:
        group = open_runs(session, ["r"])
        chosen = shared_hooks(session, group.runs)
        with pytest.raises(UserError, match=rf"^{re.escape(message)}$"):
            layer_magnitudes(session, select_examples(session, group), chosen, ["language"])
        table = layer_magnitudes(
            session, select_examples(session, group, f"example_id <> '{missing}'"), chosen, ["language"]
        )
    keep = np.array(ids) != missing
    languages = np.array(examples["language"].to_pylist())[keep]
    for row in table.to_pylist():
        layer = [values[f"text_decoder.layers.{row['layer']}.{sub}"][keep].astype(np.float64) for sub in DECODER]
        per_example = np.mean([v.mean(1) for v in layer], axis=0)
        assert row["magnitude"] == pytest.approx(per_example[languages == row["language"]].mean(), rel=1e-6)
        assert row["examples"] == (languages == row["language"]).sum()


def test_speech_and_text_runs_without_a_modality_column_stay_apart(tmp_path):
    """Figure 6 compares languages x modalities. Examples of a speech run and a text run without a modality column
    were grouped by language alone: each group's magnitude averaged S2T and T2T together, silently. The runs'
    recorded input modality keeps them apart (grouped by language and run)."""
    from hookpoints.store.writer import HookRows, open_run

    store = Store.open(tmp_path / "store", create=True)
    hooks = hook_rows("text_decoder", 2, DECODER, layer_output=False)
    rng = np.random.default_rng(0)
    written = {}
    for run, modality, shift in (("s2tt", "speech", 5.0), ("t2tt", "text", -5.0)):
        examples = examples_table(2, None, seed=1, prefix=run)  # language only
        writer = open_run(
            store, run, settings={"model": "m", "task": run, "pooling": "mean", "dtype": "float32"},
            config={"modality": modality}, hooks=hooks, examples_schema=examples.schema,
        )  # fmt: skip
        ids = examples["example_id"].to_pylist()
        values = {h["hook"]: (rng.normal(size=(6, h["width"])) + shift).astype(np.float32) for h in hooks}
        writer.add(examples, {hook: HookRows(ids, x) for hook, x in values.items()})
        writer.finish()
        written[run] = (examples["language"].to_pylist(), values)
    with store.query() as session:
        examples = select_examples(session, open_runs(session, ["s2tt", "t2tt"]))
        columns = group_columns(session, examples, None)
        table = layer_magnitudes(session, examples, shared_hooks(session, ("s2tt", "t2tt")), columns)
    assert columns == ["language", "run"]
    for row in table.to_pylist():
        languages, values = written[row["run"]]
        chosen = np.array(languages) == row["language"]
        subs = [x[chosen].astype(np.float64).mean(axis=1) for h, x in values.items() if f".{row['layer']}." in h]
        assert row["magnitude"] == pytest.approx(np.mean(subs, axis=0).mean(), rel=1e-9)


def test_the_cli_prints_tiny_magnitudes_with_their_digits(tmp_path, run_cli):
    """Magnitudes were rounded to 6 decimal places: a layer whose activations are ~3e-9 printed as 0."""
    import numpy as np
    import pyarrow as pa
    from hookpoints.store.catalog import Store
    from hookpoints.store.writer import HookRows, open_run

    from tests.hostile_helpers import SETTINGS, hooks

    store = Store.open(tmp_path / "store", create=True)
    examples = pa.table({"example_id": ["a", "b"], "language": ["en", "de"]})
    writer = open_run(store, "tiny", settings=SETTINGS, config={}, hooks=hooks(), examples_schema=examples.schema)
    values = np.full((2, 4), 3.25e-9, np.float32)
    writer.add(examples, {h["hook"]: HookRows(["a", "b"], values) for h in hooks()})
    writer.finish()
    code, out, err = run_cli("magnitudes", "--store", str(tmp_path / "store"), "--run", "tiny", "--by", "language")
    assert code == 0, err
    assert "3.25e-09" in out.replace("\n", " ") and " 0.0 " not in out, out
