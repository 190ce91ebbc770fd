"""Shared by the continuation sweep tests: a tiny GPT-2 recorded on short texts in three languages and ranked
by language (label sets ``unimodal/{language}``), the store those sweeps run over."""

from __future__ import annotations

import json
from pathlib import Path

from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
from hookpoints.store.catalog import Store

from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import record

WORDS = {
    "de": "der die das und ist nicht ein eine mit von zu auf".split(),
    "en": "the a and is not one with of to on in at".split(),
    "fr": "le la les et est pas un une avec de sur dans".split(),
}


def make_lm_store(model_dir: Path, folder: Path) -> tuple[Store, Path, Path]:
    """The GPT-2 at ``model_dir`` recorded (run ``lm``) on 8 texts per language, ranked: (store, model, manifest)."""
    rows = [
        {"id": f"{lang}{i}", "text": " ".join(words[(i + j) % len(words)] for j in range(4 + i % 3)), "language": lang}
        for lang, words in WORDS.items()
        for i in range(8)
    ]
    manifest = folder / "texts.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = Store.open(folder / "store", create=True)
    record(load(model_dir), read_manifest(manifest, required=("text",)), store, "lm", hooks=["blocks.*.mlp.hook_post"])
    write_scores(store, rank(store, plan_ranking(store, ["lm"], presets=["unimodal"], ks=(16,))))
    return store, model_dir, manifest
