"""A run's settings (hookpoints.settings.RunSettings): one encoding in the runs table, parsed in one place, and a
per-step run read by the analyses as its pooled twin (decoder steps pooled with the run's pooling)."""

from __future__ import annotations

import numpy as np
import pytest
from hookpoints.analyses.examples import open_runs, select_examples
from hookpoints.analyses.hook_matrix import HookMatrixReader, shared_hooks
from hookpoints.analyses.layers import layer_hooks, read_layer, resolve_pooling, run_settings
from hookpoints.analyses.ranking import plan_ranking, rank
from hookpoints.analyses.subsets import select_subset

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import record
from hookpoints.settings import POOLINGS, Pooling, RunSettings

TEXTS = {
    "de": ["Das Wetter ist heute sehr schön.", "Ich trinke gern Kaffee.", "Der Zug ist spät."],
    "fr": ["Il fait beau.", "Le chat dort sur la chaise.", "Nous allons au marché."],
}
DECODER = "text_decoder.layers.1.ffn.fc1"
ENCODER = "text_encoder.layers.0.ffn.fc1"


def test_settings_round_trip_through_the_runs_row():
    for pooling in ("mean", "last", "max"):
        settings = RunSettings(pooling=pooling, per_step=True, task="s2tt", dtype="float16", frames=300)
        row = {**settings.columns(), "config": settings.config()}
        assert row["pooling"] == f"{pooling}+steps"
        assert RunSettings.from_row(row) == settings
        assert settings.hook_pooling("decoder") is Pooling.NONE and settings.hook_pooling("encoder") == pooling
        assert settings.rows_per_example("decoder") == "steps" and settings.rows_per_example("encoder") == "one"
    plain = RunSettings.from_row({"pooling": "none", "dtype": "float32", "task": "forward", "config": "{}"})
    assert plain.rows_per_example("input") == "positions" and plain.rows_per_example(None) == "one"
    assert plain.analysis_pooling(None, "r") is Pooling.LAST and plain.analysis_pooling("max", "r") is Pooling.MAX
    assert POOLINGS == ("mean", "last", "max", "none")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pooling": "median"}, "pooling must be one of mean, last, max, none, not 'median'"),
        ({"dtype": "int8"}, "storage dtype must be one of float32, float16"),
        ({"task": "summarise"}, "task must be one of forward"),
        ({"per_step": True}, "per-step recording needs a generating task"),
        ({"per_step": True, "task": "t2tt", "pooling": "none"}, "per-step recording pools the other hook points"),
        ({"frames": 0}, "frames must be at least 1"),
    ],
)
def test_bad_settings_are_one_line_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        RunSettings(**kwargs)


def test_bad_stored_pooling_and_unavailable_analysis_pooling_are_refused():
    with pytest.raises(UserError, match="unknown pooling 'median\\+steps'"):
        RunSettings.from_row({"pooling": "median+steps"})
    with pytest.raises(UserError, match="recorded with pooling mean\\+steps, which cannot give last"):
        RunSettings(per_step=True, task="t2tt").analysis_pooling("last", "r")
    with pytest.raises(UserError, match="pooling must be one of last, mean, max"):
        RunSettings().analysis_pooling("none", "r")


@pytest.fixture(scope="module")
def step_store(tiny_model_dir, tmp_path_factory):
    """The same manifest recorded (t2tt) per step and pooled, for mean, last and max."""
    from hookpoints.store.catalog import Store

    folder = tmp_path_factory.mktemp("steps")
    rows = [
        {"id": f"{lang}{i}", "text": text, "language": lang, "modality": "text"}
        for lang, texts in TEXTS.items()
        for i, text in enumerate(texts)
    ]
    path = folder / "m.jsonl"
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = Store.open(str(folder / "store"), create=True)
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    manifest = read_manifest(path)
    for pooling in ("mean", "last", "max"):
        for per_step in (False, True):
            name = f"{pooling}-steps" if per_step else pooling
            record(model, manifest, store, name, hooks=[DECODER, ENCODER], pooling=pooling, task="t2tt",
                   per_step=per_step, max_new_tokens=6, batch_size=3)  # fmt: skip
    return store


def _numpy_pooled(store, run: str, hook: str, how: str) -> dict[str, np.ndarray]:
    """Reference: the per-step rows from SQL, pooled per example with numpy."""
    with store.query() as session:
        rows = session.sql(
            "SELECT example_id, position, activation FROM activations WHERE run = $run AND hook = $hook",
            {"run": run, "hook": hook},
        ).to_pylist()
    per_example: dict[str, list] = {}
    for row in rows:
        per_example.setdefault(row["example_id"], []).append((row["position"], row["activation"]))
    result = {}
    for example, steps in per_example.items():
        steps.sort()
        x = np.array([v for _, v in steps], np.float64)  # [steps, width]
        assert len(x) > 1 or how == "last"  # the tiny model generates several tokens
        result[example] = {"mean": x.mean(0), "max": x.max(0), "last": x[-1]}[how]
    return result


@pytest.mark.parametrize("how", ["mean", "last", "max"])
def test_per_step_run_reads_as_its_pooled_twin(step_store, how):
    run = f"{how}-steps"
    with step_store.query() as session:
        group = open_runs(session, [run])
        examples = select_examples(session, group)
        hooks = {h.hook: h for h in shared_hooks(session, group.runs, patterns=[DECODER, ENCODER])}
        twin_group = open_runs(session, [how])
        twin_examples = select_examples(session, twin_group)
    assert group.settings[run].per_step and group.pooling == how
    matrix = HookMatrixReader(step_store, examples).read(hooks[DECODER])  # [examples, width]
    reference = _numpy_pooled(step_store, run, DECODER, how)
    ids = examples.ids(run).to_pylist()
    np.testing.assert_allclose(matrix, np.stack([reference[i] for i in ids]), rtol=1e-5, atol=1e-6)
    # The pooled twin (recorded without --per-step) holds the same vectors, at the decoder and the encoder.
    for hook in (DECODER, ENCODER):
        twin = HookMatrixReader(step_store, twin_examples).read(hooks[hook])
        np.testing.assert_allclose(HookMatrixReader(step_store, examples).read(hooks[hook]), twin, atol=2e-5, rtol=1e-4)
    # The layer-wise reader (clusters) pools the steps the same way.
    with step_store.query() as session:
        settings = run_settings(session, run)
        pooling = resolve_pooling(settings, None, run)
        subset = select_subset(session, run, "", ["language"])
        (decoder,) = layer_hooks(session, run, [DECODER])
        layer = read_layer(session, subset, decoder, settings, pooling)
    rows = [subset.example_ids.index(i) for i in ids]
    np.testing.assert_allclose(layer[rows], matrix, rtol=1e-5, atol=1e-6)


def test_per_step_run_ranks_like_its_pooled_twin_and_joins_it(step_store):
    """The error this fixes: "holds more than one vector per example ... the run is damaged"."""
    scores = {}
    for run in ("mean-steps", "mean"):
        job = plan_ranking(step_store, [run], presets=["unimodal"], hooks=[DECODER], ks=(4,))
        scores[run] = rank(step_store, job).ap
    np.testing.assert_allclose(scores["mean-steps"], scores["mean"], atol=1e-9)
    assert np.isfinite(scores["mean"]).all() and scores["mean"].std() > 0
    job = plan_ranking(step_store, ["mean-steps", "mean"], presets=["unimodal"], hooks=[DECODER], ks=(4,))
    assert job.group.key == "mean+mean-steps"
    with pytest.raises(UserError, match="must share their pooling \\(last-steps: last\\+steps, mean: mean\\)"):
        plan_ranking(step_store, ["mean", "last-steps"], presets=["unimodal"], hooks=[DECODER], ks=(4,))


def test_hookpoints_ap_ranks_a_per_step_run(step_store, run_cli):
    code, out, err = run_cli(
        "ap", "--store", step_store.location.uri, "--run", "max-steps", "--preset", "unimodal",
        "--hooks", DECODER, "--k", "4",
    )  # fmt: skip
    assert code == 0, err
    assert "damaged" not in out + err and "rows in table scores" in " ".join(out.split())
    with step_store.query() as session:
        n = session.sql("SELECT count(*) AS n FROM scores WHERE run = 'max-steps'")["n"][0].as_py()
    width = next(h.width for h in run_hooks_of(step_store, "max-steps") if h.hook == DECODER)
    assert n == 2 * width  # two unimodal language sets (de, fr) x the decoder hook's neurons


def run_hooks_of(store, run: str):
    from hookpoints.analyses.hooks import run_hooks

    with store.query() as session:
        return run_hooks(session, run)
