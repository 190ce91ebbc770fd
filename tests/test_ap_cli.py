"""hookpoints ap / selection / magnitudes from the command line, the demo's stage, and bad input as one line."""

from __future__ import annotations

import io
import json
from importlib import resources

import pytest
from hookpoints.store.catalog import Store
from selectivity_helpers import DECODER, ENCODER, examples_table, hook_rows, write_run


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "store"
    store = Store.open(path, create=True)
    speech = examples_table(6, "speech", seed=1, prefix="s")
    text = examples_table(6, "text", seed=2, prefix="t")
    write_run(store, "s2tt", speech, hook_rows("speech_encoder", 2, ENCODER) + hook_rows("text_decoder", 2, DECODER))
    write_run(store, "t2tt", text, hook_rows("text_encoder", 2, ENCODER) + hook_rows("text_decoder", 2, DECODER))
    return str(path)


def test_ap_ranks_reports_plots_and_stores(store_path, tmp_path, run_cli):
    plots = tmp_path / "plots"
    code, out, err = run_cli(
        "ap", "--store", store_path, "--run", "s2tt", "--run", "t2tt", "--preset", "unimodal", "--preset", "modality",
        "--k", "4", "--k", "8", "--plots", str(plots),
    )  # fmt: skip
    assert code == 0, err
    assert "ranking 40 neurons (text_decoder 40) of run(s) s2tt+t2tt over 36 examples against 8 label set(s)" in out
    for name in ("unimodal/speech/de", "unimodal/text/ja", "modality/text"):
        assert name in out
    assert "neurons shared by bottom-4 unimodal language sets, speech vs text" in out  # Figure 3's matrix
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert "ap-s2tt_t2tt-modality_speech-text_decoder-k4.png" in pngs
    assert "overlap-s2tt_t2tt-text_decoder-top4.png" in pngs
    assert len(list(plots.glob("*.svg"))) == len(pngs) == 8 + 2
    code, out, _ = run_cli(
        "sql", "--store", store_path, "--format", "json",
        "SELECT label_set, count(*) AS n, count(*) FILTER (WHERE top_rank <= 4) AS top4 FROM scores "
        "WHERE run = 's2tt+t2tt' GROUP BY label_set ORDER BY label_set",
    )  # fmt: skip
    rows = json.loads(out)
    assert len(rows) == 8 and all(r["n"] == 40 and r["top4"] == 4 for r in rows)


def test_selection_lists_overlaps_and_neurons(store_path, tmp_path, run_cli):
    code, _, err = run_cli("ap", "--store", store_path, "--run", "s2tt", "--preset", "unimodal", "--k", "5")
    assert code == 0, err
    code, out, err = run_cli(
        "selection", "--store", store_path, "--run", "s2tt", "--k", "5", "--component", "speech_encoder",
        "--overlap", "unimodal/speech/*", "unimodal/speech/*", "--side", "top", "--plots", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    assert "speech_encoder" in out and "neurons shared by top-5 selections" in out
    code, out, err = run_cli(
        "selection", "--store", store_path, "--run", "s2tt", "--label-set", "unimodal/speech/en", "--list",
        "--k", "3", "--side", "top", "--component", "text_decoder", "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    listed = json.loads(out)
    assert sorted(r["top_rank"] for r in listed) == [1, 2, 3]


def test_magnitudes_table_and_plots(store_path, tmp_path, run_cli):
    code, out, err = run_cli(
        "magnitudes", "--store", store_path, "--run", "s2tt", "--run", "t2tt", "--plots", str(tmp_path), "--absolute"
    )
    assert code == 0, err
    assert "layer-wise mean |activation| of run(s) s2tt+t2tt by language, modality" in out
    assert "deviation x1000" in out and "Gini over each layer" in out
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "magnitudes-s2tt_t2tt-text_decoder.png",
        "activation-gini-s2tt_t2tt-text_decoder.png",
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ap", "--run", "s2tt", "--among", "language = 'de'"], "give --positive too"),
        (["ap", "--run", "s2tt"], "give a label set"),
        (["ap", "--run", "s2tt", "--positive", "language = = 'de'"], "does not parse as SQL"),
        (["ap", "--run", "s2tt", "--positive", "language = 'xx'"], "no positive examples"),
        (["ap", "--run", "s2tt", "--preset", "unimodal", "--k", "500"], "k=500 is larger than module group"),
        (["ap", "--run", "s2tt", "--preset", "modality"], "shared decoder"),
        (["ap", "--run", "s2tt", "--preset", "unimodal", "--memory-gb", "0"], "--memory-gb must be positive"),
        (["ap", "--run", "s2tt", "--preset", "unimodal", "--k", "2", "--report-k", "0"], "--report-k"),
        (["ap", "--run", "s2tt", "--preset", "unimodal", "--k", "2", "--plots", "/proc/plots"], "cannot write plots"),
        (["selection", "--run", "nope"], "no ranking of run"),
        (["magnitudes", "--run", "s2tt", "--by", "speaker"], "--by 'speaker' is not a column"),
        (["magnitudes", "--run", "s2tt", "--where", "language = "], "--where"),
    ],
)
def test_bad_input_is_one_line(store_path, run_cli, args, expected):
    code, out, err = run_cli(args[0], "--store", store_path, *args[1:])
    assert code == 2, (out, err)
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or err.count("error:") == 1


def test_demo_stage_on_a_recorded_seamless_run(tiny_model_dir, tmp_path, capsys):
    """The demo's ranking stage is a library function returning data; the CLI prints it and saves the figures."""
    from hookpoints.analyses.demo import Demo, rank_neurons
    from hookpoints.cli.demo_cmd import show_stage

    from hookpoints.loading import load
    from hookpoints.manifest import read_manifest
    from hookpoints.recorder import record

    corpus = read_manifest(resources.files("hookpoints") / "data" / "corpus.jsonl")
    manifest = type(corpus)(corpus.path, corpus.table.slice(0, 60))  # 10 meanings x 6 languages
    store = Store.open(tmp_path / "store", create=True)
    hooked = load(str(tiny_model_dir("seamless_m4t_v2")), modality="text")
    record(hooked, manifest, store, "seamless-text", batch_size=20)
    demo = Demo(store, tmp_path)
    ranked = rank_neurons(demo, ("seamless-text",), ks=(20, 50))
    assert capsys.readouterr().out == ""  # the library prints nothing
    assert ranked.presets == ("unimodal",) and len(ranked.job.masks.label_sets) == 6
    report = ranked.report
    assert report.k == 20 and report.overlaps == []  # one modality: no speech-vs-text overlap
    assert {(r.component, r.label_set.split("/")[0]) for r in report.rows} == {
        ("text_encoder", "unimodal"),
        ("text_decoder", "unimodal"),
    }
    for row in report.rows:  # the top-20 of each group is counted in full, by panel and by layer
        assert sum(row.top.values()) == 20 and sum(row.bottom.values()) == 20
        assert row.counts.column("top").to_numpy().sum() == 20
        assert row.min_ap <= row.median_ap <= row.max_ap
    show_stage("rank_neurons", demo, ranked, tmp_path / "plots")
    out = capsys.readouterr().out
    assert "against 6 label sets (preset unimodal)" in out
    assert "unimodal/" in out and "text_encoder" in out and "text_decoder" in out
    paths = sorted((tmp_path / "plots").iterdir())
    assert len(paths) == 2 * 6 * 2 and all(p.stat().st_size > 0 for p in paths)  # 6 languages x 2 groups, PNG+SVG


def test_library_entry_points_refuse_bad_input(tmp_path):
    from hookpoints.analyses.ap_report import selectivity_report
    from hookpoints.analyses.demo import run_demo

    from hookpoints.errors import UserError

    store = Store.open(tmp_path / "store", create=True)
    with pytest.raises(UserError, match="scores table holds no AP of run 'nothing'"):
        selectivity_report(store, "nothing", ["unimodal/text/de"], 10)
    with pytest.raises(UserError, match="give at least one label set"):
        selectivity_report(store, "nothing", [], 10)
    with pytest.raises(UserError, match="k must be at least 1, not 0"):
        selectivity_report(store, "nothing", ["unimodal/text/de"], 0)
    with pytest.raises(UserError, match="limit must be at least 1, not 0"):
        run_demo(store, limit=0)
    assert store.table_names() == sorted(store.table_names()) and "scores" not in store.table_names()


def test_hooks_recorded_by_only_some_runs_are_named_not_dropped_silently(tmp_path, run_cli):
    """The ranking and the magnitudes use the hook points every run recorded; a decoder layer one run lacks used
    to vanish from both without a word."""
    path = str(tmp_path / "store")
    store = Store.open(path, create=True)
    speech = examples_table(3, "speech", seed=1, prefix="s")
    text = examples_table(3, "text", seed=2, prefix="t")
    write_run(store, "s2tt", speech, hook_rows("speech_encoder", 1, ENCODER) + hook_rows("text_decoder", 2, DECODER))
    write_run(store, "t2tt", text, hook_rows("text_decoder", 1, DECODER))  # layer 0 only
    note = "note: 3 hook point(s) of text_decoder are left out: not every run recorded them"
    ap = ("ap", "--store", path, "--preset", "unimodal", "--k", "2")
    code, out, err = run_cli(*ap, "--run", "s2tt", "--run", "t2tt")
    assert code == 0, err
    assert note in " ".join(out.split()) and "text_decoder.layers.1.ffn.fc1" in out
    assert "speech_encoder" not in out  # a module group of one run is not ranked over both (documented), not a note
    code, out, err = run_cli("magnitudes", "--store", path, "--run", "s2tt", "--run", "t2tt", "--no-gini")
    assert code == 0, err
    assert note in " ".join(out.split())
    code, out, err = run_cli(*ap, "--run", "s2tt")
    assert code == 0, err
    assert "left out" not in out


def test_selection_refuses_a_bad_overlap_before_printing_the_summary(store_path, run_cli):
    code, _, err = run_cli("ap", "--store", store_path, "--run", "s2tt", "--preset", "unimodal", "--k", "5")
    assert code == 0, err
    code, out, err = run_cli(
        "selection", "--store", store_path, "--run", "s2tt", "--k", "5",
        "--overlap", "unimodal/speech/*", "unimodal/speech/*", "--overlap-run", "nope",
    )  # fmt: skip
    assert code == 2 and "has no ranking of run(s) 'nope'" in err
    assert out == ""  # the summary used to be printed first, the error after it


def test_selection_csv_and_json_are_one_clean_table(store_path, tmp_path, run_cli):
    """`selection --format csv` printed the rich summary table (and json with --overlap two arrays after it):
    neither parsed. Now stdout holds one table: the summary's rows, or with --overlap the overlaps."""
    import csv
    import io

    from hookpoints.analyses.ap_report import selectivity_report

    code, _, err = run_cli("ap", "--store", store_path, "--run", "s2tt", "--preset", "unimodal", "--k", "5")
    assert code == 0, err
    base = ["selection", "--store", store_path, "--run", "s2tt", "--k", "4"]
    code, out, err = run_cli(*base, "--format", "csv", "--plots", str(tmp_path))
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    expected = selectivity_report(Store.open(store_path), "s2tt", [r["label_set"] for r in rows], 4, overlaps=False)
    assert [(r["label_set"], r["component"]) for r in rows] == [(r.label_set, r.component) for r in expected.rows]
    for row, want in zip(rows, expected.rows, strict=True):
        assert float(row["gini_top"]) == pytest.approx(want.gini_top) and row["best_neuron"] == want.best_neuron
        assert sum(int(row[f"top_{p}"]) for p in want.top) == 4 and int(row["n_among"]) == want.n_among
    assert "plots:" in err and "plots:" not in out
    code, out, err = run_cli(*base, "--format", "json", "--overlap", "unimodal/speech/*", "unimodal/speech/*")
    assert code == 0, err
    overlaps = json.loads(out)  # one JSON document: both sides of every module group
    assert {(r["component"], r["side"]) for r in overlaps} == {
        (c, s) for c in ("speech_encoder", "text_decoder") for s in ("bottom", "top")
    }
    assert all(r[r["row"]] == 4 for r in overlaps)  # a selection shares all its k neurons with itself
    code, _, err = run_cli(*base, "--overlap-run", "s2tt")
    assert code == 2 and "give --overlap ROWS COLUMNS too" in err


def test_selection_csv_keeps_every_digit_of_the_ap(store_path, run_cli):
    """csv cells of `selection --list` were rounded to 6 significant digits (`hookpoints sql --format csv` keeps
    them all): APs that differ in the 7th digit printed equal."""
    import csv
    import io

    code, _, err = run_cli("ap", "--store", store_path, "--run", "s2tt", "--preset", "unimodal", "--k", "5")
    assert code == 0, err
    args = ["--store", store_path, "--run", "s2tt", "--label-set", "unimodal/speech/de", "--k", "5", "--side", "top"]
    code, out, err = run_cli("selection", *args, "--list", "--format", "csv")
    assert code == 0, err
    listed = {(r["hook"], int(r["neuron"])): float(r["ap"]) for r in csv.DictReader(io.StringIO(out))}
    with Store.open(store_path).query() as session:
        stored = session.sql(
            "SELECT hook, neuron, ap FROM scores WHERE run = 's2tt' AND label_set = 'unimodal/speech/de' "
            "AND top_rank <= 5"
        )
    assert listed == {(r["hook"], r["neuron"]): r["ap"] for r in stored.to_pylist()}


def test_magnitudes_shows_that_it_is_working_during_its_aggregate(store_path, run_cli, monkeypatch):
    """The one SQL aggregate over every activation (minutes on a full store, docs/report.md) ran without a word in
    a terminal; only the Gini after it had a bar."""
    from hookpoints.cli import magnitudes_cmd
    from rich.console import Console

    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    monkeypatch.setattr(magnitudes_cmd, "err", terminal)
    code, _, err = run_cli("magnitudes", "--store", store_path, "--run", "s2tt", "--no-gini")
    assert code == 0, err
    assert "layer-wise magnitudes: one aggregate over the runs' activations" in terminal.file.getvalue()


def test_selection_defaults_to_the_k_ap_and_the_report_show(store_path, run_cli):
    """`selection` without --k asked for top-1000 selections of a ranking that stored ks 5 and 10 and was refused
    ("k=1000 is larger than module group"), while ap and the report showed top-5."""
    args = ["ap", "--store", store_path, "--run", "s2tt", "--preset", "unimodal"]
    code, out, err = run_cli(*args, "--k", "5", "--k", "10")
    assert code == 0 and "top-5" in out, err
    code, out, err = run_cli("selection", "--store", store_path, "--run", "s2tt", "--label-set", "unimodal/speech/de")
    assert code == 0, err
    assert "top-5" in out and "top-1000" not in out


def test_selection_overlap_covers_the_module_groups_of_its_own_label_sets(tmp_path, run_cli):
    """The overlap's module groups were those of the first --label-set summary row, not of the overlapped sets:
    with --label-set naming a set ranked on the speech encoder alone, the decoder's overlap was left out."""
    path = str(tmp_path / "store")
    store = Store.open(path, create=True)
    speech = examples_table(6, "speech", seed=1, prefix="s")
    write_run(store, "s2tt", speech, hook_rows("speech_encoder", 2, ENCODER) + hook_rows("text_decoder", 2, DECODER))
    base = ["--store", path, "--run", "s2tt", "--k", "3"]
    assert run_cli("ap", *base, "--preset", "unimodal")[0] == 0
    assert run_cli("ap", *base, "--positive", "language = 'de'", "--name", "a", "--component", "speech_encoder")[0] == 0
    code, out, err = run_cli(
        "selection", "--store", path, "--run", "s2tt", "--label-set", "a", "--k", "3", "--format", "json",
        "--overlap", "unimodal/speech/de", "unimodal/speech/*",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)
    assert {row["component"] for row in rows} == {"speech_encoder", "text_decoder"}
