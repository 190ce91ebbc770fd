"""An intervention sweep: neuron type x k x task x language, N generations each, scored, into the store.

The paper's Experiment 2 (seeds/seamless-m4t-v2-neurons.txt, 3.3 and 5.2): replace the selected neurons with
their median during generation and compare ASR (WER/CER) and translation (0.6 BLEU + 0.4 chrF) with random
neurons of the same number per module group. Every condition of a (task, language) runs on the same
examples and the same inputs; ``none`` (no edit, through the same traced generation) is the reference level.

:func:`plan_sweep` checks everything and computes every edit's values before anything is generated or
written; :func:`run_sweep` generates, scores and commits each (task, language) as it finishes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from hookpoints.analyses.examples import run_key
from hookpoints.analyses.intervention_tables import INTERVENTION_NEURONS, INTERVENTION_SCORES, INTERVENTIONS, TABLES
from hookpoints.analyses.interventions import (
    KINDS,
    NEURON_TYPES,
    Selection,
    explicit_selection,
    label_set_for,
    random_selection,
    replacement_values,
    scored_selection,
)
from hookpoints.analyses.labels import check_name
from hookpoints.analyses.selection import PAPER_KS, SIDE_CHOICES, check_ks, check_side
from hookpoints.analyses.text_scores import corpus_scores, sentence_scores
from hookpoints.store import tables
from hookpoints.store.catalog import Store
from hookpoints.store.tables import sql_string

from hookpoints.editing import NeuronEdit
from hookpoints.errors import UserError
from hookpoints.languages import model_code
from hookpoints.manifest import Manifest, read_data
from hookpoints.model import HookedModel
from hookpoints.recorder import BatchJob, batch_inputs, plan_examples
from hookpoints.tasks import DEFAULT_TARGET, get_task

PAPER_SEED = 1234  # "a fixed random seed of 1234" (Appendix G)


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep (the CLI's options).

    >>> spec = SweepSpec("sw1", runs=("s2tt", "t2tt"), tasks=("s2tt",), ks=(500,), limit=10)
    """

    sweep: str
    runs: tuple[str, ...]  # the ranking's runs (the scores' key), and default statistics runs
    tasks: tuple[str, ...]
    neuron_types: tuple[str, ...] = ("unimodal", "random")
    ks: tuple[int, ...] = PAPER_KS
    side: str = "top"
    kind: str = "median"
    value: float | None = None
    seed: int = PAPER_SEED
    random_like: str | None = None  # the neuron type random draws match (default: the first ranked one)
    neurons: tuple[str, ...] = ()  # explicit HOOK:INDICES
    languages: tuple[str, ...] = ()  # manifest labels (default: every language of the data but the target)
    limit: int = 100  # generations per language
    stats_runs: tuple[str, ...] = ()
    stats_where: str | None = None  # may name {language}
    data: str | None = None
    model: str | None = None
    tgt_lang: str | None = None
    max_new_tokens: int = 128
    batch_size: int = 8
    frames: int | None = None
    reference_column: str | None = None
    pair_column: str = "semantic_id"
    if_exists: str = "error"


@dataclass
class Condition:
    """One condition of one (task, language): its row fields, its neurons and their edits."""

    fields: dict
    selection: Selection | None
    values: np.ndarray
    edits: list[NeuronEdit] = field(default_factory=list)


@dataclass
class Cell:
    """One (task, language) of the sweep: its examples, references and conditions."""

    task: str
    language: str
    target: str  # the model code generated into
    examples: pa.Table
    references: list[str]
    model: HookedModel
    job: BatchJob
    conditions: list[Condition]


# -- planning ---------------------------------------------------------------------------------------------


def plan_sweep(store: Store, spec: SweepSpec, load_model: Callable[[str, str], HookedModel]) -> list[Cell]:
    """Every (task, language) cell with its conditions, checked, and every edit's values computed.

    >>> cells = plan_sweep(store, spec, lambda model, modality: hp.load(model, modality=modality))
    >>> scores = run_sweep(store, spec, cells)
    """
    _check_spec(spec)
    ranking = run_key(spec.runs)
    cells = []
    with store.query() as session:
        if "interventions" in store.table_names() and spec.if_exists != "overwrite":
            taken = session.sql("SELECT count(*) AS n FROM interventions WHERE sweep = $s", {"s": spec.sweep})
            if taken["n"][0].as_py():
                raise UserError(f"sweep {spec.sweep!r} is already in the store: choose another --sweep, or --overwrite")
        runs = {row["run"]: row for row in session.sql("SELECT run, model, task, config FROM runs").to_pylist()}
        for name in (*spec.runs, *spec.stats_runs):
            if name not in runs:
                raise UserError(f"no run {name!r} in the store; it has: {', '.join(sorted(runs)) or 'none'}")
        for task_name in spec.tasks:
            task = get_task(task_name)
            if not task.generates:
                raise UserError(f"interventions score generated text: use asr, s2tt or t2tt, not {task_name}")
            stats_run = _stats_run(spec, task_name, runs)
            source = spec.model or runs[stats_run]["model"]
            model = load_model(source, task.modality)
            manifest = _manifest(spec, runs[stats_run], task.modality)
            hooks = {p.name: (p.component, p.width) for p in model.hook_points if p.unavailable is None}
            explicit = explicit_selection(list(spec.neurons), hooks) if spec.neurons else None
            tgt = model_code(spec.tgt_lang or DEFAULT_TARGET) if task.target == "given" else None
            for language, examples, references in _examples_by_language(spec, manifest, task_name, tgt):
                target = tgt or model_code(language)
                sub = Manifest(manifest.path, examples)
                plan_examples(model, sub, task, spec.tgt_lang)  # audio files, texts, language codes
                common = {
                    "sweep": spec.sweep,
                    "kind": spec.kind,
                    "value": spec.value,
                    "ranking": ranking,
                    "stats_run": stats_run,
                    "stats_where": _where(spec.stats_where, language),
                    "model": source,
                    "task": task_name,
                    "language": language,
                    "tgt_lang": target,
                }
                conditions = _conditions(session, spec, ranking, common, task.modality, language, explicit)
                for condition in conditions:
                    condition.edits = _edits(model, condition)
                job = BatchJob(
                    task_name, "mean", frames=spec.frames, max_new_tokens=spec.max_new_tokens,
                    tgt_lang=spec.tgt_lang, base=str(manifest.base),
                )  # fmt: skip
                cells.append(Cell(task_name, language, target, examples, references, model, job, conditions))
    return cells


def _check_spec(spec: SweepSpec) -> None:
    check_name(spec.sweep)
    if not spec.tasks:
        raise UserError("give at least one --task (asr, s2tt, t2tt)")
    for neuron_type in spec.neuron_types:
        if neuron_type not in NEURON_TYPES:
            raise UserError(f"--type must be one of {', '.join(NEURON_TYPES)}, not {neuron_type!r}")
    if spec.kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, not {spec.kind!r}")
    check_side(spec.side, SIDE_CHOICES)
    check_ks(spec.ks)
    if spec.limit < 1 or spec.batch_size < 1 or spec.max_new_tokens < 1:
        raise UserError("--limit, --batch-size and --max-new-tokens must be at least 1")
    ranked = [t for t in spec.neuron_types if t not in ("random", "none")]
    if "random" in spec.neuron_types and not ranked:
        raise UserError("random neurons match the counts of a ranked neuron type: add one (e.g. --type unimodal)")
    if spec.random_like and spec.random_like not in ranked:
        raise UserError(f"--random-like {spec.random_like!r} is not one of the swept types ({', '.join(ranked)})")
    if spec.if_exists not in ("error", "overwrite"):
        raise UserError(f"if_exists must be error or overwrite, not {spec.if_exists!r}")


def _stats_run(spec: SweepSpec, task: str, runs: dict[str, dict]) -> str:
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


def _manifest(spec: SweepSpec, run: dict, modality: str) -> Manifest:
    path = spec.data or json.loads(run["config"] or "{}").get("manifest")
    if not path:
        raise UserError(f"run {run['run']!r} does not say which manifest it recorded: give --data")
    if not Path(path).exists():
        raise UserError(f"the manifest of run {run['run']!r} ({path}) is not here: give --data")
    return read_data(path, required=("audio",) if modality == "speech" else ("text",))


def _examples_by_language(spec: SweepSpec, manifest: Manifest, task: str, target: str | None):
    """(language, the first ``limit`` examples by id, their references) per swept language."""
    table = manifest.table
    if "language" not in table.column_names:
        raise UserError(f"{manifest.path} has no 'language' column: the sweep compares languages")
    languages = [str(v) for v in table["language"].to_pylist()]
    present = sorted(set(languages))
    chosen = list(spec.languages) or [lang for lang in present if target is None or model_code(lang) != target]
    for language in chosen:
        if language not in present:
            raise UserError(f"no example in language {language!r} in {manifest.path}; it has {', '.join(present)}")
        rows = sorted(
            (i for i, lang in enumerate(languages) if lang == language), key=lambda i: table["example_id"][i].as_py()
        )
        examples = table.take(rows[: spec.limit])
        yield language, examples, _references(spec, table, examples, task, target)


def _references(spec: SweepSpec, table: pa.Table, examples: pa.Table, task: str, target: str | None) -> list[str]:
    """ASR: each example's own text; translation: ``--reference-column``, else the target-language example
    with the same ``--pair-column`` value (the corpus' and FLEURS' ``semantic_id``)."""
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


def _where(where: str | None, language: str) -> str | None:
    return None if where is None else where.replace("{language}", str(language).replace("'", "''"))


def _conditions(session, spec: SweepSpec, ranking: str, common: dict, modality: str, language: str, explicit):
    """The conditions of one (task, language), in the order they are run: none, ranked types, random, explicit."""
    base = {"side": None, "k": 0, "seed": None, "matched": None, "label_set": None, "n_neurons": 0}
    conditions = []
    # The reference level (no edit, through the same traced generation) is always measured.
    none = {**common, **base, "condition": "none", "neuron_type": "none", "kind": None, "value": None}
    conditions.append(Condition(none, None, np.zeros(0)))
    ranked = [t for t in spec.neuron_types if t not in ("random", "none")]
    like_type = spec.random_like or (ranked[0] if ranked else None)
    for k in spec.ks:
        like = None
        for neuron_type in ranked:
            label_set = label_set_for(neuron_type, language, modality)
            selection = scored_selection(session, ranking, label_set, k, spec.side, neuron_type)
            if neuron_type == like_type:
                like = selection
            conditions.append(_condition(session, spec, common, selection, f"{neuron_type}/{spec.side}/k={k}"))
        if "random" in spec.neuron_types and like is not None:
            selection = random_selection(session, ranking, like, spec.seed)
            conditions.append(_condition(session, spec, common, selection, f"random/k={k}"))
    if explicit is not None:
        conditions.append(_condition(session, spec, common, explicit, "explicit"))
    return conditions


def _condition(session, spec: SweepSpec, common: dict, selection: Selection, name: str) -> Condition:
    values = replacement_values(
        session, selection, spec.kind, run=common["stats_run"], where=common["stats_where"], value=spec.value
    )
    fields = {
        **common,
        "condition": name,
        "neuron_type": selection.neuron_type,
        "side": selection.side,
        "k": selection.k,
        "seed": selection.seed,
        "matched": selection.matched,
        "label_set": selection.label_set,
        "n_neurons": selection.neurons.num_rows,
    }
    return Condition(fields, selection, values)


def _edits(model: HookedModel, condition: Condition) -> list[NeuronEdit]:
    """One edit per hook point of the condition's neurons (hook names checked against the model)."""
    if condition.selection is None:
        return []
    hooks = condition.selection.neurons["hook"].to_pylist()
    neurons = np.asarray(condition.selection.neurons["neuron"].to_pylist(), np.int64)
    edits = []
    for hook in dict.fromkeys(hooks):
        rows = np.flatnonzero(np.asarray(hooks) == hook)
        point = model.hook_points.get(hook)
        edits.append(
            NeuronEdit(
                point,
                torch.from_numpy(neurons[rows]),
                torch.from_numpy(condition.values[rows]).float(),
                add=condition.fields["kind"] == "steer",
            )
        )
    return edits


# -- running ------------------------------------------------------------------------------------------------


def run_sweep(
    store: Store, spec: SweepSpec, cells: list[Cell], on_generations: Callable[[int], None] | None = None
) -> pa.Table:
    """Generate every condition of every cell, score, and commit each cell; returns the corpus scores.

    >>> scores = run_sweep(store, spec, plan_sweep(store, spec, load_model))
    >>> figure5(scores, "sw1")
    """
    for table in TABLES:
        store.ensure_table(table)
    if spec.if_exists == "overwrite":
        for table in TABLES:
            if tables.exists(store.location, table.name):
                tables.delete(store.location, table.name, f"sweep = {sql_string(spec.sweep)}")
    all_scores = []
    for cell in cells:
        now = datetime.now(UTC)
        batches = [cell.examples.slice(i, spec.batch_size) for i in range(0, cell.examples.num_rows, spec.batch_size)]
        prepared = []
        for examples in batches:
            inputs, targets = batch_inputs(cell.model, examples, cell.job)
            prepared.append((examples, inputs, cell.model.decoder_prompt(targets)))
        rows, scores, neurons = [], [], []
        for condition in cell.conditions:
            texts, lengths = [], []
            for examples, inputs, prompt in prepared:
                generation, _ = cell.model.generate_edited(inputs, prompt, condition.edits, spec.max_new_tokens)
                texts += cell.model.decode(generation)
                lengths += generation.lengths.tolist()
                if on_generations:
                    on_generations(examples.num_rows)
            for example_id, reference, text, length in zip(
                cell.examples["example_id"].to_pylist(), cell.references, texts, lengths, strict=True
            ):
                rows.append(
                    {
                        **condition.fields,
                        "example_id": example_id,
                        "reference": reference,
                        "generated_text": text,
                        "generated_tokens": length,
                        **_score_fields(sentence_scores(cell.task, reference, text, cell.target)),
                        "created_at": now,
                    }
                )
            corpus = corpus_scores(cell.task, cell.references, texts, cell.target)
            scores.append({**condition.fields, "n_generations": len(texts), **_score_fields(corpus), "created_at": now})
            neurons += _neuron_rows(condition)
        store.append(INTERVENTIONS, pa.Table.from_pylist(rows, INTERVENTIONS.schema))
        store.append(INTERVENTION_NEURONS, pa.Table.from_pylist(neurons, INTERVENTION_NEURONS.schema))
        store.append(INTERVENTION_SCORES, pa.Table.from_pylist(scores, INTERVENTION_SCORES.schema))
        all_scores += scores
    return pa.Table.from_pylist(all_scores, INTERVENTION_SCORES.schema)


def _score_fields(scores: dict) -> dict:
    return {name: scores[name] for name in ("metric", "score", "error_rate", "bleu", "chrf")}


def _neuron_rows(condition: Condition) -> list[dict]:
    if condition.selection is None:
        return []
    table = condition.selection.neurons
    fields = condition.fields
    return [
        {
            "sweep": fields["sweep"],
            "condition": fields["condition"],
            "task": fields["task"],
            "language": fields["language"],
            "component": component,
            "hook": hook,
            "neuron": neuron,
            "value": float(value),
            "add": fields["kind"] == "steer",
        }
        for component, hook, neuron, value in zip(
            table["component"].to_pylist(),
            table["hook"].to_pylist(),
            table["neuron"].to_pylist(),
            condition.values,
            strict=True,
        )
    ]
