"""A NULL or NaN label is in no group: neither positive nor negative (left out, and counted), and a NaN never
passes a --where; checked against pandas on the same examples.

DuckDB orders NaN above every number (``NaN > 0.5`` is true), so a NaN score was a positive of
``--positive "score > 0.5"`` and passed ``--where "score > 0.5"``; a NULL label was a negative.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hookpoints.analyses.labels import custom_label_set
from hookpoints.analyses.ranking import plan_ranking, rank
from hookpoints.store.catalog import Store
from selectivity_helpers import DECODER, examples_table, hook_rows, write_run
from sklearn.metrics import average_precision_score

from hookpoints.errors import UserError


@pytest.fixture(scope="module")
def store_with_missing_labels(tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("nulls") / "store", create=True)
    examples = examples_table(5, "speech", seed=3)  # 15 examples
    score = np.linspace(0.0, 1.0, 15)
    score[[1, 9]] = np.nan
    scores = [None if i == 12 else float(v) for i, v in enumerate(score)]
    languages = examples["language"].to_pylist()
    languages[4] = None
    examples = examples.set_column(2, "language", pa.array(languages)).append_column(
        "score", pa.array(scores, pa.float64())
    )
    hooks = hook_rows("text_decoder", 1, DECODER)
    rng = np.random.default_rng(0)
    values = {h["hook"]: rng.normal(size=(15, h["width"])) for h in hooks}
    write_run(store, "r", examples, hooks, values=values)
    frame = examples.to_pandas().sort_values("example_id").reset_index(drop=True)  # the job's example order
    order = [examples["example_id"].to_pylist().index(i) for i in frame["example_id"]]
    return store, frame, {hook: x[order] for hook, x in values.items()}


@pytest.mark.parametrize("predicate", ["score > 0.5", "score <= 0.5", "score = 'NaN'::DOUBLE OR score > 0.9"])
def test_a_nan_or_null_label_is_neither_positive_nor_negative(store_with_missing_labels, predicate):
    store, frame, values = store_with_missing_labels
    job = plan_ranking(store, ["r"], custom=[custom_label_set(predicate, name="s")], ks=(2,))
    known = frame["score"].notna().to_numpy()  # pandas reads NaN and None alike: missing
    expected = frame.eval(predicate.replace(" = 'NaN'::DOUBLE", " != score").replace("OR", "or")).to_numpy()
    np.testing.assert_array_equal(job.masks.among[0], known)
    np.testing.assert_array_equal(job.masks.positive[0], expected & known)
    assert job.masks.left_out.tolist() == [3]
    assert job.masks.n_among.tolist() == [12]
    ranking = rank(store, job)
    hook = job.hooks[0]
    x = values[hook.hook]
    expected_ap = [average_precision_score(expected[known], x[known, j]) for j in range(hook.width)]
    np.testing.assert_allclose(ranking.ap[0, : hook.width], expected_ap, rtol=1e-12)


def test_a_null_language_is_left_out_of_the_preset_label_sets(store_with_missing_labels):
    store, frame, _ = store_with_missing_labels
    job = plan_ranking(store, ["r"], presets=["unimodal"], ks=(2,))
    known = frame["language"].notna().to_numpy()
    for s, label_set in enumerate(job.masks.label_sets):
        language = label_set.name.rsplit("/", 1)[-1]
        np.testing.assert_array_equal(job.masks.among[s], known)
        np.testing.assert_array_equal(job.masks.positive[s], (frame["language"] == language).to_numpy())
    assert job.masks.left_out.tolist() == [1, 1, 1]


def test_a_nan_never_passes_a_where(store_with_missing_labels):
    store, frame, _ = store_with_missing_labels
    job = plan_ranking(store, ["r"], presets=["unimodal"], where="score > 0.5", ks=(2,))
    expected = frame[frame["score"] > 0.5]["example_id"].tolist()
    assert job.examples.table["example_id"].to_pylist() == expected


def test_a_positive_null_for_every_example_says_so(store_with_missing_labels):
    store, _, _ = store_with_missing_labels
    with pytest.raises(UserError, match=r"--positive 'score > 0.5' is NULL for every example"):
        plan_ranking(store, ["r"], custom=[custom_label_set("score > 0.5", name="s")], where="score IS NULL", ks=(2,))


def test_nan_labels_form_one_group_with_the_nulls_as_pandas_groups_them(store_with_missing_labels):
    """Each NaN example was a group of its own in the magnitudes' groups (Python's nan != nan)."""
    from hookpoints.analyses.examples import open_runs, select_examples
    from hookpoints.analyses.magnitudes import example_groups

    store, frame, _ = store_with_missing_labels
    with store.query() as session:
        groups = example_groups(session, select_examples(session, open_runs(session, ["r"])), ["score"])
    expected = frame.groupby("score", dropna=False, sort=False).ngroup().to_numpy()
    assert len(groups) == frame["score"].nunique(dropna=False) == 13
    # the same partition of the examples (group numbers may differ)
    assert len({(a, b) for a, b in zip(groups.index, expected, strict=True)}) == 13


def test_the_ap_command_says_how_many_examples_are_left_out(store_with_missing_labels, run_cli):
    store, _, _ = store_with_missing_labels
    code, out, err = run_cli(
        "ap", "--store", store.location.uri, "--run", "r", "--positive", "score > 0.5", "--name", "s", "--k", "2"
    )
    assert code == 0, err
    assert "label set s: 3 example(s) are left out: --positive 'score > 0.5' is NULL for them" in " ".join(out.split())


def test_a_nan_never_passes_the_where_of_clusters(store_with_missing_labels):
    from hookpoints.analyses.subsets import select_subset

    store, frame, _ = store_with_missing_labels
    with store.query() as session:
        subset = select_subset(session, "r", "score > 0.5 OR language = 'ja'", ["language"])
    chosen = frame[(frame["score"] > 0.5) | (frame["language"] == "ja")]
    assert subset.example_ids == sorted(chosen["example_id"])


def test_the_note_is_one_line_for_the_label_sets_of_a_preset(store_with_missing_labels, run_cli):
    store, _, _ = store_with_missing_labels
    code, out, err = run_cli("ap", "--store", store.location.uri, "--run", "r", "--preset", "unimodal", "--k", "2")
    assert code == 0, err
    text = " ".join(out.split())
    assert "note: 3 label sets (e.g. unimodal/speech/de, unimodal/speech/en): 1 example(s) are left out" in text
    assert text.count("are left out") == 1
