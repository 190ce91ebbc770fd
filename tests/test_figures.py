"""What a reader notices in the figures: integer layer ticks, speech and text told apart in the magnitudes
legend, integer ticks on count colorbars, a legend or labelled centroids on t-SNE maps, titles naming the run,
label set and k; and every figure function returns a Figure that analyses.figures saves or embeds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hookpoints.analyses.figures import png_bytes, save
from hookpoints.analyses.figures_clusters import ClusterMaps, MapLabelling, MapLayer, measures_figure, tsne_figure
from hookpoints.analyses.figures_selectivity import distribution_figure, magnitude_figure, overlap_figure
from hookpoints.analyses.selection import Overlap
from matplotlib.figure import Figure


def tick_values(axis) -> list[float]:
    low, high = axis.get_view_interval()
    return [t for t in axis.get_majorticklocs() if low - 1e-9 <= t <= high + 1e-9]


def all_integers(values) -> bool:
    return bool(values) and all(float(v).is_integer() for v in values)


def magnitudes_table() -> pa.Table:
    rows = []
    rng = np.random.default_rng(0)
    for layer in range(3):  # 3 layers: matplotlib's default locator would put ticks at 0.5, 1.5
        for language in ("de", "en"):
            for modality in ("speech", "text"):
                rows.append(
                    {
                        "component": "text_decoder",
                        "layer": layer,
                        "language": language,
                        "modality": modality,
                        "magnitude": float(rng.normal()),
                        "deviation": float(rng.normal()),
                    }
                )
    return pa.Table.from_pylist(rows)


def test_magnitudes_layers_are_integers_and_speech_and_text_are_told_apart():
    fig = magnitude_figure(magnitudes_table(), ["language", "modality"], "text_decoder", 1000.0, "run(s) a+b")
    assert isinstance(fig, Figure)
    ax = fig.axes[1]
    for axes in fig.axes:
        assert all_integers(tick_values(axes.xaxis))
    titles = [legend.get_title().get_text() for legend in ax.findobj(lambda o: o.__class__.__name__ == "Legend")]
    assert sorted(titles) == ["language", "modality"]
    lines = {line.get_label(): line for line in ax.get_lines() if "·" in line.get_label()}
    speech, text = lines["de · speech"], lines["de · text"]
    assert speech.get_color() == text.get_color()  # same language, same colour
    assert (speech.get_linestyle(), speech.get_marker()) != (text.get_linestyle(), text.get_marker())
    assert lines["en · speech"].get_marker() == speech.get_marker()


def test_magnitude_axes_say_what_is_plotted_and_its_scale():
    """The magnitude figure had no y-axis labels: neither the quantity nor the x1000 of the deviation showed."""
    fig = magnitude_figure(magnitudes_table(), ["language", "modality"], "text_decoder", 1000.0, "r")
    assert [ax.get_xlabel() for ax in fig.axes[:2]] == ["Layer index", "Layer index"]
    assert fig.axes[0].get_ylabel() == "Mean activation (over neurons, submodules, examples)"
    assert fig.axes[1].get_ylabel() == "Group mean activation minus mean over groups (x1000)"
    fig = magnitude_figure(magnitudes_table(), ["language"], "text_decoder", 1.0, "r", absolute=True)
    assert fig.axes[0].get_ylabel() == "Mean |activation| (over neurons, submodules, examples)"
    assert fig.axes[1].get_ylabel().endswith("|activation| minus mean over groups (x1)")


def test_overlap_colorbar_counts_are_integers():
    result = Overlap(
        ["u/speech/de", "u/speech/en"],
        ["u/text/de", "u/text/en"],
        np.array([[3, 0], [1, 2]]),
        "text_decoder",
        "top",
        500,
    )
    fig = overlap_figure(result, "unimodal language neurons (run a+b)")
    colorbar = fig.axes[-1]
    assert all_integers(tick_values(colorbar.yaxis))
    assert "top-500" in fig.axes[0].get_title() and "run a+b" in fig.axes[0].get_title()


def test_distribution_title_names_label_set_run_and_k():
    counts = pa.Table.from_pylist(
        [
            {"layer": layer, "submodule": sub, "neurons": 8, "top": layer + 1, "bottom": 2}
            for layer in range(3)
            for sub in ("self_attn.q_proj", "ffn.fc1")
        ]
    )
    fig = distribution_figure(counts, "text_decoder", 50, "label set modality/text (run a+b)")
    title = fig._suptitle.get_text()
    assert "modality/text" in title and "run a+b" in title and "top-50" in title
    for ax in fig.axes:
        assert all_integers(tick_values(ax.xaxis)) and all_integers(tick_values(ax.yaxis))


def maps(classes: int, points: int = 4) -> tuple[ClusterMaps, MapLabelling]:
    rng = np.random.default_rng(1)
    codes = np.repeat(np.arange(classes), points)
    layers = [MapLayer(f"blocks.{i}.hook_resid_post", "lm", i, rng.normal(size=(len(codes), 2))) for i in range(3)]
    labelling = MapLabelling("speaker", [f"spk{c:02d}" for c in range(classes)], codes)
    rows = [
        {"component": "lm", "layer": i, "label": "speaker", "measure": m, "space": "original", "value": 0.1 * i}
        for i in range(3)
        for m in ("silhouette", "davies_bouldin")
    ]
    return ClusterMaps("run-x", "run run-x, mean pooling, 12 examples", rows, [labelling], layers), labelling


def test_tsne_gets_a_legend_when_colours_are_distinct_and_names_at_centroids_when_they_repeat():
    few, labelling = maps(5)
    fig = tsne_figure(few, labelling)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == labelling.classes
    assert "run run-x" in fig._suptitle.get_text() and "speaker" in fig._suptitle.get_text()
    many, labelling = maps(30)
    fig = tsne_figure(many, labelling)
    assert fig.legends == []
    for ax in fig.axes[:3]:
        names = sorted(t.get_text() for t in ax.texts)
        assert names == sorted(labelling.classes)  # every class named once per map


def test_cluster_measures_have_integer_layer_ticks_and_save_writes_png_and_svg(tmp_path):
    fig = measures_figure(maps(3)[0])
    assert all(all_integers(tick_values(ax.xaxis)) for ax in fig.axes)
    assert "speaker" in fig._suptitle.get_text() and "run-x" in fig._suptitle.get_text()
    paths = save(fig, tmp_path, "m")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in paths)
    png = png_bytes(measures_figure(maps(3)[0]))
    assert png.startswith(b"\x89PNG")


def test_dendrograms_of_several_layers_share_one_distance_scale():
    """The first, middle and last layer's trees are drawn side by side to be compared; each had its own distance
    axis (scipy fits it to the tree), so a last layer whose centroids sit half as far apart looked as spread."""
    from hookpoints.analyses.figures_clusters import dendrogram_figure
    from scipy.cluster.hierarchy import linkage

    few, labelling = maps(4)
    rng = np.random.default_rng(2)
    for scale, layer in zip((6.0, 3.0, 1.0), few.layers, strict=True):
        layer.linkages["speaker"] = linkage(rng.normal(size=(4, 5)) * scale, method="average")
    fig = dendrogram_figure(few, labelling, few.layers)
    reach = max(layer.linkages["speaker"][:, 2].max() for layer in few.layers)
    limits = [ax.get_xlim() for ax in fig.axes]
    assert len(set(limits)) == 1 and limits[0][1] == 0 and limits[0][0] >= reach
    assert all(ax.get_xlabel() == "Euclidean distance between centroids" for ax in fig.axes)


def test_distribution_draws_the_selected_neurons_of_hook_points_outside_the_layers():
    """Neurons of hook points without a layer (hook_embed, hook_pos_embed ...) were in the legend but had no bar:
    a top-50 figure of a BERT-style encoder showed 35 neurons where the summary table counted 50."""
    counts = pa.Table.from_pylist(
        [{"layer": None, "submodule": "hook_embed", "neurons": 8, "top": 4, "bottom": 1}]
        + [
            {"layer": layer, "submodule": sub, "neurons": 8, "top": 2, "bottom": 3}
            for layer in range(3)
            for sub in ("attn.hook_q", "mlp.hook_post")
        ]
    )
    fig = distribution_figure(counts, "encoder", 16, "top-16")
    drawn = {ax.get_title(): sum(bar.get_height() for bar in ax.patches) for ax in fig.axes if ax.patches}
    assert sum(v for title, v in drawn.items() if "Top" in title) == 4 + 2 * 6
    assert sum(v for title, v in drawn.items() if "Bottom" in title) == 1 + 3 * 6
    other = next(ax for ax in fig.axes if ax.get_title().endswith("Top Other"))
    assert [t.get_text() for t in other.get_xticklabels()] == ["no layer", "0", "1", "2"]


def test_figure5_panels_of_one_metric_share_their_scale():
    """S2TT and T2TT (both 0.6 BLEU + 0.4 chrF) are set side by side to compare how much each degrades; each panel
    had its own y range, so a drop of 1 point and one of 20 looked alike. ASR's WER keeps its own scale."""
    from hookpoints.analyses.figures_interventions import figure5

    rows = []
    for task, metric, scores in (("s2tt", "combined", (40.0, 39.0)), ("t2tt", "combined", (60.0, 40.0)),
                                 ("asr", "wer", (0.2, 0.9))):  # fmt: skip
        rows.append({"task": task, "metric": metric, "neuron_type": "none", "k": 0, "score": scores[0]})
        for k, score in ((500, scores[0]), (1000, scores[1])):
            rows.append({"task": task, "metric": metric, "neuron_type": "unimodal", "k": k, "score": score})
    s2tt, t2tt, asr = figure5(pa.Table.from_pylist(rows), "sweep").axes
    assert s2tt.get_ylim() == t2tt.get_ylim() and s2tt.get_ylim()[0] <= 39.0 and s2tt.get_ylim()[1] >= 60.0
    assert asr.get_ylim()[1] < 2 and asr.get_ylabel() == "WER" and s2tt.get_ylabel() == "0.6 BLEU + 0.4 chrF"


def test_figure5_asr_over_wer_and_cer_languages_says_so():
    """ASR of de (WER) and ja (CER) averaged in one panel: its y label read 'cer/wer' (the label 'WER / CER' was
    keyed 'wer/cer', which the sorted metrics never give)."""
    from hookpoints.analyses.figures_interventions import figure5

    rows = [
        {"task": "asr", "metric": metric, "neuron_type": kind, "k": k, "score": 0.3}
        for metric in ("wer", "cer")
        for kind, k in (("none", 0), ("unimodal", 500))
    ]
    (asr,) = figure5(pa.Table.from_pylist(rows), "sweep").axes
    assert asr.get_ylabel() == "WER / CER"


def test_figures_leave_the_notebooks_matplotlib_alone():
    """Importing the figure functions switched the process to Agg (``matplotlib.use``), so a Jupyter notebook's
    own ``plt.plot`` cells showed nothing afterwards; and each figure was a pyplot figure, which the inline
    backend shows at the end of the cell besides the returned one. Now: the backend stays, pyplot knows none."""
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt; import hookpoints as hp; "
        "hp.distribution_figure, hp.measures_figure, hp.figure5; import hookpoints.analyses.figures; "
        "print(matplotlib.get_backend())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "svg"
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    figure = magnitude_figure(magnitudes_table(), ["language", "modality"], "text_decoder", 1.0, "r1")
    assert isinstance(figure, Figure) and plt.get_fignums() == before
    assert png_bytes(figure).startswith(b"\x89PNG")


def test_cluster_figures_refuse_what_the_clustering_lacks_in_one_line():
    """tsne_figure of a clustering made without t-SNE was a ZeroDivisionError, and a label or layer it lacks (the
    docstring's own ``[0, 5]`` on a 2-layer model) a bare StopIteration; now each is a UserError naming what exists."""
    from hookpoints.analyses.figures_clusters import dendrogram_figure
    from scipy.cluster.hierarchy import linkage

    from hookpoints.errors import UserError

    few, labelling = maps(4)
    for layer in few.layers:
        layer.linkages["speaker"] = linkage(np.eye(4), method="average")
    with pytest.raises(UserError, match=r"layer 5 was not clustered in run run-x; its layers: 0, 1, 2"):
        dendrogram_figure(few, labelling, [0, 5])
    with pytest.raises(UserError, match=r"label 'language' was not clustered in run run-x; its labels: speaker"):
        tsne_figure(few, "language")
    assert len(dendrogram_figure(few, "speaker", [0, 2]).axes) == 2
    del few.layers[1].linkages["speaker"]  # a label of more than 100 classes has no linkage
    with pytest.raises(UserError, match="no dendrogram of 'speaker'"):
        dendrogram_figure(few, "speaker", [1])
    for layer in few.layers:
        layer.tsne = None
    with pytest.raises(UserError, match="has no t-SNE maps"):
        tsne_figure(few, labelling)
