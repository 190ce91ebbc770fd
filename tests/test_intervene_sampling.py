"""Intervention sweeps that sample (``SweepSpec.sampling``, ``intervene --sample``): every condition of a cell
draws each example's tokens from the stream keyed by its id (common random numbers), the settings are stored
with every row (``sampling``: JSON; null for greedy sweeps, those of an older store's tables too).

Checked against the model's own ``generate`` / ``generate_edited`` of each example alone, with the same sampling
and the example's id as its key: the stored texts cannot depend on the batch or the condition's position.
"""

from __future__ import annotations

import json

import pytest
from deltalake import write_deltalake
from hookpoints.analyses.figures_interventions import sweep_title
from hookpoints.analyses.intervention_sweep import SweepSpec, plan_sweep, run_sweep
from hookpoints.analyses.intervention_tables import INTERVENTIONS
from hookpoints.store import tables
from hookpoints.store.catalog import Store

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.settings import Sampling
from tests.intervene_helpers import make_lm_store

HOT = Sampling(temperature=1.5, top_p=0.95, seed=7)
HOT_CONFIG = {"temperature": 1.5, "top_k": None, "top_p": 0.95, "seed": 7}  # as the run config keeps it


def _load(model: str, modality: str):
    return load(model, modality=modality)


def _spec(name: str, model_dir, **options) -> SweepSpec:
    # batches of 2 over 3 examples a language: the third example is alone in its batch, at index 0
    return SweepSpec(name, runs=("lm",), tasks=("continue",), ks=(16,), languages=("de", "fr"), limit=3,
                     batch_size=2, max_new_tokens=6, model=str(model_dir), kind="constant", value=8.0,
                     **options)  # fmt: skip


def _rows(store: Store, sweep: str) -> list[dict]:
    with store.query() as session:
        return session.sql(
            "SELECT language, condition, example_id, reference, generated_text, sampling FROM interventions "
            "WHERE sweep = $s ORDER BY language, condition, example_id",
            {"s": sweep},
        ).to_pylist()


@pytest.fixture(scope="module")
def swept(tiny_model_dir, tmp_path_factory):
    """The LM store with a sampled sweep (s1) and a greedy one (g1) of the same conditions."""
    store, model_dir, _ = make_lm_store(tiny_model_dir("gpt2"), tmp_path_factory.mktemp("sampled"))
    cells = plan_sweep(store, _spec("s1", model_dir, sampling=HOT), _load)
    run_sweep(store, _spec("s1", model_dir, sampling=HOT), cells)
    run_sweep(store, _spec("g1", model_dir), plan_sweep(store, _spec("g1", model_dir), _load))
    return store, model_dir, cells


def test_the_sampled_baseline_is_each_example_sampled_alone(swept):
    store, _, cells = swept
    rows = _rows(store, "s1")
    greedy = _rows(store, "g1")
    assert {r["condition"] for r in rows} == {"none", "unimodal/top/k=16", "random/k=16"}
    differs = 0
    for cell in cells:
        model, ids, texts = cell.model, cell.examples["example_id"].to_pylist(), cell.examples["text"].to_pylist()
        stored = [r for r in rows if r["language"] == cell.language and r["condition"] == "none"]
        assert [r["example_id"] for r in stored] == ids
        for row, example_id, text in zip(stored, ids, texts, strict=True):
            alone = model.decode(model.generate([text], max_new_tokens=6, sampling=HOT, sample_keys=[example_id]))
            assert row["generated_text"] == alone[0]
            assert row["reference"] == alone[0]  # continue: the sampled unedited continuation is the reference
        plain = [r["generated_text"] for r in greedy if r["language"] == cell.language and r["condition"] == "none"]
        differs += sum(r["generated_text"] != text for r, text in zip(stored, plain, strict=True))
    assert differs  # the sweep sampled: not the greedy continuations


def test_each_edited_condition_is_generate_edited_with_the_same_draws(swept):
    store, _, cells = swept
    rows = _rows(store, "s1")
    moved = 0
    for cell in cells:
        model, ids, texts = cell.model, cell.examples["example_id"].to_pylist(), cell.examples["text"].to_pylist()
        baseline = [r["generated_text"] for r in rows if r["language"] == cell.language and r["condition"] == "none"]
        for condition in cell.conditions[1:]:
            assert condition.edits  # an edited condition
            stored = [
                r for r in rows if r["language"] == cell.language and r["condition"] == condition.fields["condition"]
            ]
            for row, example_id, text in zip(stored, ids, texts, strict=True):
                generation, _ = model.generate_edited(
                    [text], None, condition.edits, 6, sampling=HOT, sample_keys=[example_id]
                )
                assert row["example_id"] == example_id and row["generated_text"] == model.decode(generation)[0]
            moved += sum(r["generated_text"] != text for r, text in zip(stored, baseline, strict=True))
    assert moved  # the edits changed some sampled continuations (a comparison that could fail)


def test_the_sampling_settings_are_stored_with_every_row_and_greedy_is_null(swept):
    store, _, _ = swept
    with store.query() as session:
        for table in ("interventions", "intervention_scores"):
            rows = session.sql(
                f"SELECT DISTINCT sweep, sampling FROM {table} WHERE sweep IN ('g1', 's1') ORDER BY sweep"
            ).to_pylist()
            assert [r["sweep"] for r in rows] == ["g1", "s1"]  # one setting per sweep
            greedy, sampled = rows
            assert greedy["sampling"] is None
            assert json.loads(sampled["sampling"]) == HOT_CONFIG
            assert Sampling.from_config(json.loads(sampled["sampling"])) == HOT
            nulls = session.sql(f"SELECT DISTINCT sweep FROM {table} WHERE sampling IS NULL AND sweep IN ('g1', 's1')")
            assert nulls.to_pylist() == [{"sweep": "g1"}]
        titles = {
            sweep: sweep_title(session.sql(f"SELECT * FROM intervention_scores WHERE sweep = '{sweep}'"), sweep)
            for sweep in ("g1", "s1")
        }
    assert titles["s1"].endswith("; sampled (seed 7, temperature 1.5, top_p 0.95)")  # Figure 5 and the report
    assert "sampled" not in titles["g1"]


def test_a_sweep_name_taken_is_refused_and_an_overwrite_leaves_no_greedy_row(swept):
    store, model_dir, _ = swept
    run_sweep(store, _spec("g2", model_dir), plan_sweep(store, _spec("g2", model_dir), _load))
    before = len(_rows(store, "g2"))
    with pytest.raises(UserError, match="sweep 'g2' is already in the store: choose another --sweep, or --overwrite"):
        plan_sweep(store, _spec("g2", model_dir, sampling=HOT), _load)
    assert {r["sampling"] for r in _rows(store, "g2")} == {None}
    spec = _spec("g2", model_dir, sampling=HOT, if_exists="overwrite")
    run_sweep(store, spec, plan_sweep(store, spec, _load))
    after = _rows(store, "g2")
    assert len(after) == before and {json.loads(r["sampling"]) == HOT_CONFIG for r in after} == {True}


def test_bad_sampling_is_refused_in_one_line_from_python(swept):
    store, model_dir, _ = swept
    for sampling, message in (
        ({"temperature": 0.5}, "sampling must be a hookpoints.Sampling"),
        ("greedy", "sampling must be a hookpoints.Sampling"),
    ):
        with pytest.raises(UserError, match=message) as caught:
            plan_sweep(store, _spec("bad", model_dir, sampling=sampling), _load)
        assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="temperature must be a number above 0"):
        _spec("bad", model_dir, sampling=Sampling(temperature=0))
    assert _rows(store, "bad") == []


def test_the_cli_samples_as_python_and_refuses_sampling_options_without_sample(swept, run_cli):
    store, model_dir, _ = swept
    base = ["intervene", "--store", str(store.location.uri), "--run", "lm", "--task", "continue", "--k", "16",
            "--language", "de", "--language", "fr", "--limit", "3", "--max-new-tokens", "6", "--model",
            str(model_dir), "--kind", "constant", "--value", "8"]  # fmt: skip
    code, _, err = run_cli(*base, "--sweep", "cli", "--sample", "--temperature", "1.5", "--top-p", "0.95",
                           "--sample-seed", "7")  # fmt: skip
    assert code == 0, err
    python = [{**r, "sampling": json.loads(r["sampling"])} for r in _rows(store, "s1")]  # batches of 2, not 8
    assert [{**r, "sampling": json.loads(r["sampling"])} for r in _rows(store, "cli")] == python
    for extra, message in (
        (["--temperature", "0.8"], "--temperature sets sampled decoding: add --sample"),
        (["--top-k", "5"], "--top-k sets sampled decoding: add --sample"),
        (["--sample-seed", "3"], "--sample-seed sets sampled decoding: add --sample"),
        (["--sample", "--top-k", "0"], "top_k must be a whole number of at least 1"),
        (["--sample", "--top-p", "2"], "top_p must be a number above 0 and at most 1"),
    ):
        code, _, err = run_cli(*base, "--sweep", "cli-bad", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert _rows(store, "cli-bad") == []


def test_an_older_stores_tables_gain_the_column_and_their_rows_read_as_greedy(tiny_model_dir, tmp_path):
    """Intervention tables written before ``sampling`` existed (files without the column): a sampled sweep
    appends to them, and the old rows read null, also through ``IS NULL`` (pyarrow misfilters a column a file
    lacks: the tables are rewritten with it)."""
    store, model_dir, _ = make_lm_store(tiny_model_dir("gpt2"), tmp_path)
    run_sweep(store, _spec("old", model_dir), plan_sweep(store, _spec("old", model_dir), _load))
    old = _rows(store, "old")
    for name in ("interventions", "intervention_scores"):  # as an older hookpoints wrote them
        delta = tables.open_table(store.location, name)
        rows = tables.dataset(store.location, name, delta).to_table().drop_columns(["sampling"])
        write_deltalake(delta, rows, partition_by=["sweep"], mode="overwrite", schema_mode="overwrite")
        assert "sampling" not in tables.open_table(store.location, name).schema().to_arrow().names
    store = Store.open(store.location.uri)
    with store.query() as session:
        n_scores = session.sql("SELECT count(*) AS n FROM intervention_scores")["n"][0].as_py()
    spec = _spec("new", model_dir, sampling=HOT)
    run_sweep(store, spec, plan_sweep(store, spec, _load))
    run_sweep(store, _spec("after", model_dir), plan_sweep(store, _spec("after", model_dir), _load))
    assert [{**r, "sampling": None} for r in _rows(store, "old")] == old  # every old row kept as it was
    with store.query() as session:
        for table, n_old in (("interventions", len(old)), ("intervention_scores", n_scores)):
            nulls = session.sql(f"SELECT sweep, count(*) AS n FROM {table} WHERE sampling IS NULL GROUP BY ALL")
            assert sorted((r["sweep"], r["n"]) for r in nulls.to_pylist()) == [("after", n_old), ("old", n_old)]
            sampled = session.sql(f"SELECT DISTINCT sweep, sampling FROM {table} WHERE sampling IS NOT NULL")
            assert [(r["sweep"], json.loads(r["sampling"])) for r in sampled.to_pylist()] == [("new", HOT_CONFIG)]
    assert tables.add_columns(store.location, INTERVENTIONS) == []  # added once
