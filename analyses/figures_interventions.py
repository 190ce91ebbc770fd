"""Figure 5 of the SeamlessM4T v2 neuron paper (seeds/seamless-m4t-v2-neurons.txt):
intervention score against k, one line per neuron type.

One panel per task, scores averaged over the swept languages; the unedited generation (``none``) is a dashed
horizontal line. Translation plots the combined score (0.6 BLEU + 0.4 chrF, higher is better), ASR the error
rate (WER/CER, lower is better).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from hookpoints.analyses.arguments import table_columns
from hookpoints.analyses.figures import safe, save, subplots
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator, ScalarFormatter

TASK_TITLES = {
    "asr": "ASR",
    "s2tt": "Speech-to-text translation",
    "t2tt": "Text-to-text translation",
    "continue": "Continuation (vs unedited)",
}
METRIC_LABELS = {"combined": "0.6 BLEU + 0.4 chrF", "wer": "WER", "cer": "CER", "cer/wer": "WER / CER"}


def mean_by_type(scores: pa.Table, task: str) -> tuple[dict[str, dict[int, float]], float | None, str]:
    """Per neuron type, k -> score averaged over languages; the ``none`` level; the metric's label."""
    rows = [r for r in scores.to_pylist() if r["task"] == task]
    metrics = sorted({r["metric"] for r in rows})
    sums: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        sums.setdefault((row["neuron_type"], row["k"]), []).append(row["score"])
    lines: dict[str, dict[int, float]] = {}
    for (neuron_type, k), values in sorted(sums.items()):
        if neuron_type != "none":
            lines.setdefault(neuron_type, {})[k] = sum(values) / len(values)
    none = sums.get(("none", 0))
    return lines, (sum(none) / len(none) if none else None), "/".join(metrics)


def figure5(scores: pa.Table, title: str) -> Figure:
    """Score against k per neuron type, one panel per task (``scores``: intervention_scores rows).

    >>> figure = figure5(run_sweep(store, spec, cells), "sweep sw1")
    """
    table_columns(scores, ["task", "neuron_type", "k", "score", "metric"], "run_sweep(...) or sweep(...)")
    tasks = list(dict.fromkeys(scores["task"].to_pylist()))
    fig, axes = subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    by_metric: dict[str, list] = {}
    for ax, task in zip(axes[0], tasks, strict=True):
        lines, none, metric = mean_by_type(scores, task)
        by_metric.setdefault(metric, []).append(ax)
        for neuron_type, points in lines.items():
            ks = sorted(points)
            style = {"color": "black", "linestyle": ":"} if neuron_type == "random" else {}
            ax.plot(ks, [points[k] for k in ks], marker="o", label=neuron_type, **style)
        if none is not None:
            ax.axhline(none, color="grey", linestyle="--", linewidth=1, label="no intervention")
        ax.set_xscale("log")
        ax.set_xticks(sorted({k for points in lines.values() for k in points}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("k (neurons per module group)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(TASK_TITLES.get(task, task))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for same in by_metric.values():  # S2TT and T2TT panels are compared by eye: one scale per metric
        low = min(ax.get_ylim()[0] for ax in same)
        high = max(ax.get_ylim()[1] for ax in same)
        for ax in same:
            ax.set_ylim(low, high)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def sweep_title(scores: pa.Table, sweep: str) -> str:
    """Names the sweep, the ranking its neurons come from, the kind of edit, the ks, and sampled decoding."""
    rows = scores.to_pylist()
    rankings = sorted({r["ranking"] for r in rows if r.get("ranking")})
    kinds = sorted({r["kind"] for r in rows if r.get("kind")})
    ks = sorted({r["k"] for r in rows if r.get("k")})
    sampled = sorted({r["sampling"] for r in rows if r.get("sampling")})  # JSON; null (or no column): greedy
    parts = [f"sweep {sweep}"]
    if rankings:
        parts.append(f"neurons of ranking {', '.join(rankings)}")
    if kinds:
        parts.append(f"{'/'.join(kinds)} replacement")
    if ks:
        parts.append(f"k = {', '.join(str(k) for k in ks)}")
    for config in sampled:
        settings = ", ".join(f"{name} {value}" for name, value in json.loads(config).items() if value is not None)
        parts.append(f"sampled ({settings})")
    return "Interventions: " + "; ".join(parts)


def plot_sweep(scores: pa.Table, sweep: str, folder: Path) -> list[Path]:
    """Figure 5 of a sweep into ``folder`` (PNG and SVG)."""
    return save(figure5(scores, sweep_title(scores, sweep)), folder, f"interventions-{safe(sweep)}")
