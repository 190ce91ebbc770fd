"""``hookpoints clusters``: table and JSON output, the sample statement, plots, the stored rows, bad input."""

from __future__ import annotations

import json

import pytest
from clusters_helpers import clustered, write_run


@pytest.fixture
def store_path(store):
    examples, vectors = clustered()
    write_run(store, "syn", examples, vectors)
    return store.location.uri


def test_table_output_plots_and_stored_rows(store_path, tmp_path, run_cli):
    plots = tmp_path / "plots"
    code, out, err = run_cli(
        "clusters", "--store", store_path, "--run", "syn", "--label", "language", "--label", "semantic_id",
        "--perplexity", "5", "--examples", "s00-l0,s00-l1,s01-l0", "--plots", str(plots),
    )  # fmt: skip
    assert code == 0, err
    out = " ".join(out.split())
    assert "every measure on all 24 examples" in out and "last pooling" in out
    assert "Euclidean distances at blocks.0.hook_resid_post" in out and "s01-l0" in out
    for stem in ("measures", "tsne-language", "tsne-semantic_id", "dendrogram-language", "dendrogram-semantic_id"):
        for suffix in ("png", "svg"):
            path = plots / f"clusters-syn-{stem}.{suffix}"
            assert path.stat().st_size > 1000, path
    assert str(plots) in out
    code, out, _ = run_cli(
        "sql", "--store", store_path, "--format", "json",
        "SELECT measure, space, count(*) AS n FROM clusters WHERE label = 'language' GROUP BY ALL ORDER BY ALL",
    )  # fmt: skip
    counts = {(row["measure"], row["space"]): row["n"] for row in json.loads(out)}
    assert counts == {
        ("between_distance", "original"): 3,
        ("centroid_distance", "original"): 9,  # 3 language pairs x 3 layers
        ("davies_bouldin", "original"): 3,
        ("davies_bouldin", "tsne"): 3,
        ("silhouette", "original"): 3,
        ("silhouette", "tsne"): 3,
        ("within_distance", "original"): 3,
    }


def test_json_output_and_the_sample_statement(store_path, run_cli):
    code, out, err = run_cli(
        "clusters", "--store", store_path, "--run", "syn", "--label", "language", "--sample", "12", "--seed", "5",
        "--no-tsne", "--no-plots", "--format", "json", "--where", "semantic_id <> 's07'",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)
    assert {row["measure"] for row in rows} == {
        "silhouette", "davies_bouldin", "within_distance", "between_distance", "centroid_distance"
    }  # fmt: skip
    silhouette = [row for row in rows if row["measure"] == "silhouette"]
    assert {(row["n_examples"], row["n_subset"], row["sample_size"], row["seed"]) for row in silhouette} == {
        (12, 21, 12, 5)
    }
    assert all(row["subset"] == "semantic_id <> 's07'" for row in rows)
    assert "seeded sample of 12 of the 21 examples" in " ".join(err.split())
    assert "plots" not in err


def test_default_plot_folder_is_next_to_the_store(store_path, run_cli):
    code, out, _ = run_cli(
        "clusters", "--store", store_path, "--run", "syn", "--label", "language", "--no-tsne",
        "--dendrogram-layers", "2",
    )  # fmt: skip
    assert code == 0
    folder = store_path + "-plots"
    assert folder in " ".join(out.split())
    from pathlib import Path

    assert (Path(folder) / "clusters-syn-dendrogram-language.png").is_file()
    assert not (Path(folder) / "clusters-syn-tsne-language.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label", "dialect"], "label column 'dialect' is not in the examples table"),
        (["--label", "language", "--where", "language ="], "does not parse as SQL"),
        (["--label", "language", "--where", "nope = 1"], "does not work on the examples table"),
        (["--label", "language", "--where", "language = 'l0'"], "has one class only"),
        (["--label", "example_id"], "with a single example"),
        (["--label", "language"], "t-SNE with perplexity 30 needs more than 30 examples"),
        (["--label", "language", "--no-tsne", "--tsne-threads", "-1"], "--tsne-threads must be 0"),
        (["--label", "language", "--no-tsne", "--dendrogram-layers", "x"], "--dendrogram-layers takes layer numbers"),
        (["--label", "language", "--no-tsne", "--dendrogram-layers", "0,7"], "--dendrogram-layers 7 is not a layer"),
        (["--label", "language", "--no-tsne", "--plots", "figs"], "give --plots DIR or --no-plots, not both"),
        (["--label", "language", "--no-tsne", "--pooling", "mean"], "cannot give mean"),
        (["--label", "language", "--no-tsne", "--examples", "s00-l0"], "at least 2 example ids"),
    ],
)
def test_bad_input_prints_one_line_and_stores_nothing(store_path, run_cli, args, message):
    code, out, err = run_cli("clusters", "--store", store_path, "--run", "syn", "--no-plots", *args)
    assert code == 2
    text = " ".join(err.split())
    assert text.startswith("error:") and message in text and "Traceback" not in err
    code, _, err = run_cli("sql", "--store", store_path, "SELECT count(*) FROM clusters")
    assert code == 2 and "clusters" in err  # the table was never created


def test_unknown_run_and_store(store_path, tmp_path, run_cli):
    code, _, err = run_cli("clusters", "--store", store_path, "--run", "nope", "--label", "language")
    assert code == 2 and "there is no run 'nope'" in err
    code, _, err = run_cli("clusters", "--store", str(tmp_path / "none"), "--run", "syn", "--label", "language")
    assert code == 2 and "is not a hookpoints store" in err


def test_a_plot_folder_that_cannot_be_written_is_refused_before_the_analysis(store_path, tmp_path, run_cli):
    """`clusters --plots /proc/x` measured every layer, stored the analysis, then failed with FileNotFoundError
    (exit 1) when it came to the plots."""
    (tmp_path / "file").write_text("not a folder")
    for folder in ("/proc/plots", str(tmp_path / "file" / "plots")):
        code, out, err = run_cli("clusters", "--store", store_path, "--run", "syn", "--label", "language",
                                 "--no-tsne", "--plots", folder)  # fmt: skip
        assert code == 2 and f"cannot write plots to {folder}" in " ".join(err.split()) and out == "", err
    code, _, err = run_cli("sql", "--store", store_path, "SELECT count(*) FROM clusters")
    assert code == 2 and "clusters" in err  # nothing was stored
