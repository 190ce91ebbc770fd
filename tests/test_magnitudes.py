"""Layer-wise magnitudes (SQL) and activation Gini (numpy) against a direct computation from the written values."""

from __future__ import annotations

import numpy as np
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
