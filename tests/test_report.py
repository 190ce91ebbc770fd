"""``hookpoints report``: one HTML file from the store alone, checked in headless Chromium; stored t-SNE maps and
linkages equal the analysis' own; partial stores name what is absent; store text is escaped; bad input is one
clear error."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
from browser_check import check_page, pixel_spread, screenshot
from hookpoints.analyses.report import write_report
from hookpoints.store.catalog import Store
from report_helpers import write_report_store

from hookpoints.errors import UserError


@pytest.fixture(scope="module")
def full_store_recorded(tmp_path_factory):
    """A store of every analysis (write_report_store: a run, its ranking, clustering and a sweep), made once."""
    folder = tmp_path_factory.mktemp("full") / "store"
    write_report_store(Store.open(folder, create=True))
    return folder


@pytest.fixture
def full_store(full_store_recorded, tmp_path):
    """Each test's own copy of that store (byte for byte its files): a test may add runs to it."""
    shutil.copytree(full_store_recorded, tmp_path / "store")
    return Store.open(tmp_path / "store")


def assert_renders(html, tmp_path, artefact: str | None = None, *, images: bool = True) -> dict:
    """The page loads in Chromium without console errors, every image has a size, every contents link has its
    section, and a screenshot is not blank. Returns the probe's findings."""
    found = check_page(html, tmp_path)
    assert found["errors"] == [] and found["console"] == [], found
    assert (found["images"] > 0) == images and found["broken"] == [], found
    assert found["toc"] >= 4 and found["missing"] == [], found
    png = screenshot(html, tmp_path / f"{html.stem}.png")
    assert pixel_spread(png) > 10, "the screenshot is blank"
    if artefact and os.environ.get("HOOKPOINTS_ARTEFACTS"):
        folder = os.environ["HOOKPOINTS_ARTEFACTS"]
        os.makedirs(folder, exist_ok=True)
        shutil.copy(png, os.path.join(folder, artefact))
    return found


def test_report_of_every_analysis_renders_in_chromium(full_store, tmp_path):
    path = write_report(full_store, out=tmp_path / "report.html")
    html = path.read_text()
    for title in (
        "Runs",
        "Run syn",
        "AP ranking syn",
        "Where the top-5 and bottom-5 neurons are (Figures 2 and 4)",
        "Gini of the selections",
        "Speech vs text: shared language neurons (Figure 3)",
        "deviation from the mean trend (Figure 6)",
        "Sweep syn-sweep",
        "Silhouette and Davies-Bouldin by layer (Figures 4 and 13)",
        "t-SNE maps per layer (Figures 3, 8 and 10)",
        "Dendrograms of class centroids (Figure 13c)",
        "Distances between chosen examples (Tables 1-2)",
    ):
        assert title in html, title
    assert "This store holds no" not in html
    # store text is escaped: a language label and generated text holding tags
    assert "<b>fr</b>" not in html and "<i>output</i>" not in html
    assert "&lt;b&gt;fr&lt;/b&gt;" in html and "&lt;i&gt;output&lt;/i&gt;" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    found = assert_renders(path, tmp_path, "report-synthetic.png")
    # 8 label sets (6 unimodal, 2 modality) x 1 component + 2 overlaps (bottom, top) + magnitudes + the sweep
    # + measures + t-SNE and dendrograms of 2 labels
    assert found["images"] == html.count("<img") == 8 + 2 + 1 + 1 + 1 + 2 + 2


def test_maps_and_linkages_are_stored_and_redrawn_not_recomputed(store, tmp_path, monkeypatch):
    from hookpoints.analyses import clusters
    from hookpoints.analyses.clusters import ClusterSettings, cluster_layers, write_clusters
    from hookpoints.analyses.report_clusters import analyses_of, load_maps
    from scipy.cluster.hierarchy import linkage
    from sklearn.manifold import TSNE  # noqa: F401 - loaded here so that the patch below is what counts

    write_report_store(store)
    settings = ClusterSettings(labels=("language",), perplexity=5.0, linkage="complete")
    result = cluster_layers(store, "syn", settings)
    write_clusters(store, result)
    monkeypatch.setattr(clusters, "tsne_map", lambda *a, **k: pytest.fail("the report recomputed a t-SNE map"))
    with store.query() as session:
        (info,) = [a for a in analyses_of(session, None) if a["analysis"] == result.analysis]
        maps = load_maps(session, info)
        vectors = session.sql(
            "SELECT a.example_id, a.activation, e.language FROM activations a JOIN examples e USING (run, example_id)"
            " WHERE a.run = 'syn' AND a.hook = 'text_decoder.layers.2.hook_resid_post' ORDER BY a.example_id"
        ).to_pylist()
    assert maps.linkage == "complete"
    by_hook = {layer.hook: layer for layer in maps.layers}
    ids = sorted(result.subset.example_ids[row] for row in result.sample)
    for layer in result.layers:
        stored = by_hook[layer.hook.hook]
        order = np.argsort([result.subset.example_ids[row] for row in result.sample])  # the store's id order
        np.testing.assert_allclose(stored.tsne, layer.tsne[order])
        np.testing.assert_allclose(stored.linkages["language"], layer.linkages["language"])
    # the stored linkage of the last layer is scipy's over class centroids computed here from the activations
    (labelling,) = maps.labellings
    x = np.array([row["activation"] for row in vectors])  # [examples, width]
    languages = [row["language"] for row in vectors]
    centroids = np.array([x[[lang == c for lang in languages]].mean(axis=0) for c in labelling.classes])
    expected = linkage(centroids, method="complete")
    np.testing.assert_allclose(by_hook["text_decoder.layers.2.hook_resid_post"].linkages["language"], expected)
    codes = labelling.codes
    assert [labelling.classes[c] for c in codes] == [dict(zip(ids, languages, strict=False))[i] for i in ids]


def test_a_store_with_only_runs_says_what_is_absent_and_how_to_make_it(store, tmp_path):
    from clusters_helpers import clustered, write_run

    examples, vectors = clustered()
    write_run(store, "only", examples, vectors)
    html = write_report(store, out=tmp_path / "r.html").read_text()
    assert "Run only" in html
    for what, command in (
        ("AP ranking", "hookpoints ap --store"),
        ("intervention sweep", "hookpoints intervene --store"),
        ("clustering analysis", "hookpoints clusters --store"),
    ):
        assert re.search(f"This store holds no {what}.*?<code>{command}", html), what
    assert_renders(tmp_path / "r.html", tmp_path, images=False)


def test_runs_narrow_the_report_to_their_analyses(full_store, tmp_path):
    from clusters_helpers import clustered, write_run

    examples, vectors = clustered()
    write_run(full_store, "other", examples, vectors)
    html = write_report(full_store, ["other"], tmp_path / "r.html").read_text()
    assert "Run other" in html and "Run syn" not in html and "AP ranking syn" not in html


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run", "nope"], "run 'nope' is not in store"),
        (["--out", "{tmp}"], "is a folder"),
        (["--out", "{tmp}/report.txt"], "must end in .html"),
        (["--out", "{tmp}/store/report.html"], "is inside the store: write the report elsewhere"),
        (["--out", "{tmp}/store/../store/scores/x.html"], "is inside the store"),
        (["--out", "/proc/report.html"], "cannot write the report to /proc/report.html"),
        (["--out", "{tmp}/file/report.html"], "cannot write the report to"),
    ],
)
def test_bad_input_is_one_clear_error(store, tmp_path, run_cli, args, message):
    from clusters_helpers import clustered, write_run

    write_run(store, "only", *clustered())
    (tmp_path / "file").write_text("a file where a folder is asked for")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run_cli("report", "--store", str(store.location.uri), *args)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_cli_writes_the_report_and_prints_its_path(full_store, tmp_path, run_cli):
    target = tmp_path / "out" / "store.html"
    code, out, err = run_cli("report", "--store", full_store.location.uri, "--out", str(target), "--no-magnitudes")
    assert code == 0, err
    assert f"report: {target}" in " ".join(out.split())
    html = target.read_text()
    assert "Left out (report --no-magnitudes)" in html


def test_python_entry_point_refuses_unknown_runs(full_store, tmp_path):
    with pytest.raises(UserError, match="not in store"):
        write_report(full_store, ["ghost"], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def _suggested_commands(html: str) -> list[list[str]]:
    """Every ``hookpoints ...`` command the report suggests, as arguments, with the optional ``[...]`` parts and
    the trailing ``...`` left out."""
    import html as html_module
    import shlex

    commands = []
    for code in re.findall(r"<code>(hookpoints .*?)</code>", html):
        text = re.sub(r"\[[^\]]*\]", "", html_module.unescape(code)).replace("...", "")
        commands.append(shlex.split(text)[1:])
    return commands


def test_every_command_the_report_suggests_parses_and_names_what_it_needs(store, tmp_path):
    """A reader copies the command the report names for an absent analysis: its options exist, its required
    options are there (click parses it as the CLI would), and ``ap`` names a label set."""
    from clusters_helpers import clustered, write_run
    from hookpoints.analyses.clusters import ClusterSettings, cluster_layers, write_clusters
    from hookpoints.analyses.labels import custom_label_set
    from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
    from hookpoints.cli.main import cli
    from hookpoints.store.catalog import Store

    empty = Store.open(tmp_path / "empty", create=True)
    pages = [write_report(empty, out=tmp_path / "empty.html").read_text()]
    write_run(store, "only", *clustered())
    pages.append(write_report(store, out=tmp_path / "runs.html").read_text())
    write_clusters(store, cluster_layers(store, "only", ClusterSettings(labels=("language",), tsne=False)))
    label_set = custom_label_set("language = 'l0'", None, "l0")
    job = plan_ranking(store, ["only"], custom=[label_set], hooks=["blocks.*.hook_resid_post"], ks=(2,))
    write_scores(store, rank(store, job))
    pages.append(write_report(store, out=tmp_path / "analyses.html").read_text())
    commands = [command for page in pages for command in _suggested_commands(page)]
    assert {command[0] for command in commands} == {"record", "ap", "intervene", "clusters"}, commands
    # empty: record, ap, intervene, clusters; runs only: ap, intervene, clusters; analyses: intervene, overlaps,
    # t-SNE maps, distances
    assert len(commands) == 11, commands
    for name, *args in commands:
        command = cli.get_command(None, name)
        command.make_context(name, list(args))  # raises click's UsageError for an unknown or missing option
        if name == "ap":
            assert "--preset" in args or "--positive" in args, args


def test_report_shows_the_k_that_ap_prints_the_papers_1000(tmp_path, run_cli):
    """With the paper's ks (500 ... 5000) `hookpoints ap` prints top-1000 selections (the paper's Figures 2-4) but
    the report drew top-500 ones: its Gini table disagreed with the CLI's for the same ranking."""
    from hookpoints.analyses.ap_report import selectivity_report
    from hookpoints.store.catalog import Store
    from selectivity_helpers import examples_table, hook_rows, write_run

    store = Store.open(tmp_path / "store", create=True)
    write_run(store, "big", examples_table(3, "text"), hook_rows("lm", 2, {"ffn.fc1": 600}, layer_output=False))
    args = ["ap", "--store", str(tmp_path / "store"), "--run", "big", "--preset", "unimodal", "--k", "500"]
    code, out, err = run_cli(*args, "--k", "1000")
    assert code == 0, err
    assert "top-1000" in out
    html = write_report(store, out=tmp_path / "r.html", magnitudes=False).read_text()
    assert "Where the top-1000 and bottom-1000 neurons are" in html and "top-500" not in html
    expected = selectivity_report(store, "big", ["unimodal/text/de"], 1000, overlaps=False).rows[0]
    row = re.search(r"<tr><td>unimodal/text/de</td><td>lm</td><td[^>]*>([\d.]+)</td><td[^>]*>([\d.]+)</td>", html)
    assert (float(row.group(1)), float(row.group(2))) == (round(expected.gini_top, 3), round(expected.gini_bottom, 3))


def test_the_sweep_table_names_both_asr_metrics_it_averages():
    """ASR over a WER language (de) and a CER one (ja), averaged into one row: the row named one metric only
    (``any_value``), the figure both (rv3-edits' report)."""
    import duckdb
    import pyarrow as pa
    from hookpoints.analyses.report_html import Section
    from hookpoints.analyses.report_selectivity import add_sweep

    rows = [
        {"sweep": "s", "task": "asr", "language": language, "metric": metric, "neuron_type": kind, "k": k,
         "score": 0.25, "n_generations": 2}
        for language, metric in (("de", "wer"), ("ja", "cer"))
        for kind, k in (("none", 0), ("unimodal", 5))
    ]  # fmt: skip
    connection = duckdb.connect()
    connection.register("intervention_scores", pa.Table.from_pylist(rows))

    class Session:
        def sql(self, query, params=None):
            return connection.sql(query).to_arrow_table()

    section = Section("sweep", "sweep")
    add_sweep(section, Session(), "s")
    table_html = section.parts[-1]
    assert "cer/wer" in table_html and table_html.count("<tr>") >= 3, table_html[:400]
