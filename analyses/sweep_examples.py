"""Which examples an intervention sweep generates from, and the references its generations are scored against.

Part of planning (hookpoints.analyses.intervention_sweep): the statistics run of each task, its manifest, the
first ``limit`` examples of each swept language and their reference texts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from hookpoints.analyses.sweep_spec import SweepSpec

from hookpoints.errors import UserError
from hookpoints.languages import model_code
from hookpoints.manifest import Manifest, read_data
from hookpoints.tasks import CONTINUE


def stats_run_for(spec: SweepSpec, task: str, runs: dict[str, dict]) -> str:
    """The run statistics (and, by default, model and examples) come from: the one recorded with ``task``."""
    candidates = spec.stats_runs or spec.runs
    same = [name for name in candidates if runs[name]["task"] == task]
    if len(same) == 1 or (same and spec.stats_runs):
        return same[0]
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(
        f"which run's activations give the {spec.kind} values for task {task}? None of "
        f"{', '.join(candidates)} was recorded with it: give --stats-run RUN"
    )


def sweep_manifest(spec: SweepSpec, run: dict, modality: str) -> Manifest:
    path = spec.data or json.loads(run["config"] or "{}").get("manifest")
    if not path:
        raise UserError(f"run {run['run']!r} does not say which manifest it recorded: give --data")
    if not Path(path).exists():
        raise UserError(f"the manifest of run {run['run']!r} ({path}) is not here: give --data")
    return read_data(path, required=("audio",) if modality == "speech" else ("text",))


def examples_by_language(spec: SweepSpec, manifest: Manifest, task: str, target: str | None):
    """(language, the first ``limit`` examples by id, their references) per swept language."""
    table = manifest.table
    if "language" not in table.column_names:
        raise UserError(f"{manifest.path} has no 'language' column: the sweep compares languages")
    languages = [str(v) for v in table["language"].to_pylist()]
    present = sorted(set(languages))
    chosen = list(spec.languages) or [lang for lang in present if target is None or model_code(lang) != target]
    chosen = chosen or present  # single-language data: its own language, even where it is the target
    for language in chosen:
        if language not in present:
            raise UserError(f"no example in language {language!r} in {manifest.path}; it has {', '.join(present)}")
        rows = sorted(
            (i for i, lang in enumerate(languages) if lang == language), key=lambda i: table["example_id"][i].as_py()
        )
        examples = table.take(rows[: spec.limit])
        yield language, examples, reference_texts(spec, table, examples, task, target)


def reference_texts(spec: SweepSpec, table: pa.Table, examples: pa.Table, task: str, target: str | None) -> list[str]:
    """ASR: each example's own text; translation: ``--reference-column``, else the target-language example
    with the same ``--pair-column`` value (the corpus' and FLEURS' ``semantic_id``); continue: none yet (the
    sweep's unedited continuation, generated first, is the reference of every condition)."""
    if task == CONTINUE:
        if spec.reference_column:
            raise UserError("a continuation is scored against the unedited continuation: leave out --reference-column")
        return []
    ids = examples["example_id"].to_pylist()
    if spec.reference_column:
        if spec.reference_column not in examples.column_names:
            raise UserError(f"the data has no column {spec.reference_column!r} (--reference-column)")
        refs = examples[spec.reference_column].to_pylist()
    elif target is None:  # asr: the transcript
        if "text" not in examples.column_names:
            raise UserError("ASR is scored against the 'text' column (the transcript): the data has none")
        refs = examples["text"].to_pylist()
    else:
        pair = spec.pair_column
        if pair not in table.column_names or "text" not in table.column_names:
            raise UserError(
                f"translation needs references: give --reference-column, or data with {pair!r} and 'text' columns "
                f"holding the {target} sentences"
            )
        in_target = {
            key: text
            for key, text, lang in zip(
                table[pair].to_pylist(), table["text"].to_pylist(), table["language"].to_pylist(), strict=True
            )
            if lang is not None and model_code(str(lang)) == target
        }
        refs = [in_target.get(key) for key in examples[pair].to_pylist()]
    missing = [example for example, ref in zip(ids, refs, strict=True) if not isinstance(ref, str) or not ref.strip()]
    if missing:
        raise UserError(f"example {missing[0]!r} has no reference text to score against ({target or 'transcript'})")
    return refs
