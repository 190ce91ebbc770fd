"""An intervention sweep: neuron type x k x task x language, N generations each, scored, into the store.

The paper's Experiment 2 (seeds/seamless-m4t-v2-neurons.txt, 3.3 and 5.2): replace the selected neurons with
their median during generation and compare ASR (WER/CER) and translation (0.6 BLEU + 0.4 chrF) with random
neurons of the same number per module group. Every condition of a (task, language) runs on the same
examples and the same inputs; ``none`` (no edit, through the same traced generation) is the reference level.
Decoding is greedy, or sampled (``SweepSpec.sampling``) with each example's stream keyed by its id in every
condition: the edited and unedited generations share their draws (common random numbers).

:func:`plan_sweep` checks everything and computes every edit's values before anything is generated or
written; :func:`run_sweep` generates, scores and commits each (task, language) as it finishes. What to sweep
and its checks: hookpoints.analyses.sweep_spec; the examples and references: hookpoints.analyses.sweep_examples.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import torch
from hookpoints.analyses.arguments import as_store
from hookpoints.analyses.examples import recorded_modalities, run_key, run_settings
from hookpoints.analyses.intervention_tables import INTERVENTION_NEURONS, INTERVENTION_SCORES, INTERVENTIONS, TABLES
from hookpoints.analyses.interventions import (
    Selection,
    explicit_selection,
    label_set_for,
    random_selection,
    replacement_values,
    scored_selection,
)
from hookpoints.analyses.labels import slug
from hookpoints.analyses.sweep_examples import examples_by_language, stats_run_for, sweep_manifest
from hookpoints.analyses.sweep_spec import PAPER_SEED, SweepSpec, check_spec, neuron_types
from hookpoints.analyses.text_scores import corpus_scores, sentence_scores
from hookpoints.store import tables
from hookpoints.store.catalog import Store
from hookpoints.store.run_marks import RunMarks
from hookpoints.store.runs import config_json
from hookpoints.store.tables import sql_string

from hookpoints.editing import NeuronEdit
from hookpoints.errors import UserError
from hookpoints.languages import model_code
from hookpoints.manifest import Manifest
from hookpoints.model import HookedModel
from hookpoints.model_digest import check_weights
from hookpoints.record_plan import known_sources, plan_examples
from hookpoints.recorder import BatchJob, batch_inputs
from hookpoints.tasks import CONTINUE, DEFAULT_TARGET, get_task

__all__ = ["PAPER_SEED", "Cell", "Condition", "SweepSpec", "neuron_types", "plan_sweep", "run_sweep"]


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
    marks: RunMarks | None = None  # the runs' events when the sweep was planned: a cell is written only if unchanged


# -- planning ---------------------------------------------------------------------------------------------


def plan_sweep(store: Store, spec: SweepSpec, load_model: Callable[[str, str], HookedModel]) -> list[Cell]:
    """Every (task, language) cell with its conditions, checked, and every edit's values computed.

    >>> cells = plan_sweep(store, spec, lambda model, modality: hp.load(model, modality=modality))
    >>> scores = run_sweep(store, spec, cells)
    """
    store = as_store(store)
    check_spec(spec)
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
        run_settings(session, sorted({*spec.runs, *spec.stats_runs}))  # each complete: else medians of a part
        marks = RunMarks.read(session, {*spec.runs, *spec.stats_runs})
        for task_name in spec.tasks:
            task = get_task(task_name)
            if not task.generates:
                raise UserError(f"interventions score generated text: use asr, s2tt, t2tt or continue, not {task_name}")
            stats_run = stats_run_for(spec, task_name, runs)
            source = spec.model or runs[stats_run]["model"]
            # continue: the modality the stats run was recorded in (an audio LLM continues speech or text)
            modality = task.modality or recorded_modalities(session, [stats_run])[stats_run]
            if spec.frames is not None and modality != "speech":  # as record refuses it (hookpoints.recorder)
                raise UserError(f"--frames applies to speech input; task {task_name} reads {modality} here")
            model = load_model(source, modality)
            if (task_name == CONTINUE) != model.continues:
                raise UserError(
                    f"{source} cannot {task_name}: a decoder-only LM (or an audio LLM) continues its input, "
                    "a speech-text model decodes into a target language (asr, s2tt, t2tt)"
                    if task_name == CONTINUE
                    else f"{source} is a decoder-only LM: it continues its input; sweep --task continue"
                )
            # its medians are this model's values only if its weights are those the stats run was recorded with
            check_weights(model.model, json.loads(runs[stats_run]["config"] or "{}"), stats_run, source)
            manifest = sweep_manifest(spec, runs[stats_run], modality)
            # an audio LLM's speech prompt as the run recorded it (its --template), not the bare audio
            template = json.loads(runs[stats_run]["config"] or "{}").get("template") if modality == "speech" else None
            hooks = {p.name: (p.component, p.width) for p in model.hook_points if p.unavailable is None}
            explicit = explicit_selection(list(spec.neurons), hooks) if spec.neurons else None
            tgt = model_code(spec.tgt_lang or DEFAULT_TARGET) if task.target == "given" else None
            for language, examples, references in examples_by_language(spec, manifest, task_name, tgt):
                target = tgt or model_code(language)
                sub = Manifest(manifest.path, examples)
                # audio files, texts, language codes, room for the tokens, the prompt template, --frames
                plan_examples(model, sub, task, spec.tgt_lang, spec.max_new_tokens, template, spec.frames)
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
                    "sampling": None if spec.sampling is None else config_json(spec.sampling.config()),
                }
                conditions = _conditions(session, spec, ranking, common, modality, language, explicit)
                for condition in conditions:
                    condition.edits = _edits(model, condition)
                job = BatchJob(
                    task_name, "mean", frames=spec.frames, max_new_tokens=spec.max_new_tokens,
                    tgt_lang=spec.tgt_lang, base=str(manifest.base), template=template, sampling=spec.sampling,
                )  # fmt: skip
                cells.append(Cell(task_name, language, target, examples, references, model, job, conditions, marks))
    return cells


def _where(where: str | None, language: str) -> str | None:
    return None if where is None else where.replace("{language}", str(language).replace("'", "''"))


def _conditions(session, spec: SweepSpec, ranking: str, common: dict, modality: str, language: str, explicit):
    """The conditions of one (task, language), in the order they are run: none, ranked types, random, explicit."""
    base = {"side": None, "k": 0, "seed": None, "matched": None, "label_set": None, "n_neurons": 0}
    conditions = []
    # The reference level (no edit, through the same traced generation) is always measured.
    none = {**common, **base, "condition": "none", "neuron_type": "none", "kind": None, "value": None}
    conditions.append(Condition(none, None, np.zeros(0)))
    types = neuron_types(spec)
    # (neuron type or None, label set, the name --random-like may give): presets first, then label sets by name
    ranked = [
        (t, _preset_set(session, ranking, t, language, modality), t) for t in types if t not in ("random", "none")
    ]
    ranked += [(None, _named(name, language, modality), name) for name in spec.label_sets]
    like_name = spec.random_like or (ranked[0][2] if ranked else None)
    for k in spec.ks if ranked else ():
        like = None
        for neuron_type, label_set, given in ranked:
            # a --label-set is its own neuron type (as given, {language} unfilled): one line of Figure 5 each
            kind = neuron_type or f"label-set:{given}"
            selection = scored_selection(session, ranking, label_set, k, spec.side, kind)
            name = f"{neuron_type}/{spec.side}/k={k}" if neuron_type else f"label-set:{label_set}/{spec.side}/k={k}"
            if like is None and like_name in (given, label_set):
                like = selection
            conditions.append(_condition(session, spec, common, selection, name))
        if "random" in types and like is not None:
            selection = random_selection(session, ranking, like, spec.seed)
            conditions.append(_condition(session, spec, common, selection, f"random/k={k}"))
    if explicit is not None:
        conditions.append(_condition(session, spec, common, explicit, "explicit"))
        if "random" in types and not ranked:  # random neurons as many per module group as the explicit ones
            universe = _any_label_set(session, ranking)
            selection = random_selection(session, ranking, explicit, spec.seed, label_set=universe)
            conditions.append(_condition(session, spec, common, selection, "random/explicit"))
    return conditions


def _preset_set(session, ranking: str, neuron_type: str, language: str, modality: str) -> str:
    """The label set of a neuron type for the generation; a unimodal ranking of examples without a modality
    column wrote ``unimodal/{language}`` (one modality: the same comparison), which is used when it is there."""
    name = label_set_for(neuron_type, language, modality)
    if neuron_type == "unimodal" and "scores" in session.store.table_names():
        plain = label_set_for(neuron_type, language, None)
        stored = session.sql(
            "SELECT DISTINCT label_set FROM scores WHERE run = $run AND label_set IN ($a, $b) AND top_rank = 1",
            {"run": ranking, "a": name, "b": plain},
        )["label_set"].to_pylist()
        if plain in stored and name not in stored:
            return plain
    return name


def _named(name: str, language: str, modality: str | None) -> str:
    """A label set name as given, ``{language}`` / ``{modality}`` filled in (slugged as ap writes them)."""
    return name.replace("{language}", slug(str(language))).replace("{modality}", slug(str(modality or "")))


def _any_label_set(session, ranking: str) -> str:
    """A label set ranked in ``ranking`` (its scores list every ranked neuron: the random draws' universe)."""
    rows = session.sql(
        "SELECT label_set FROM scores WHERE run = $run ORDER BY label_set LIMIT 1", {"run": ranking}
    ).to_pylist()
    if not rows:
        raise UserError(f"nothing is ranked over {ranking!r}: random neurons are drawn from a ranking's neurons")
    return rows[0]["label_set"]


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
    for cell in cells:  # continue: the none condition's continuation is the reference of those after it
        cell.model.check_no_added_hooks("the sweep")  # before stored rows go (generate_edited refuses too)
        if cell.task == CONTINUE and (not cell.conditions or cell.conditions[0].fields["condition"] != "none"):
            raise UserError(
                f"the continuation cell of {cell.language!r} does not start with the none condition, whose unedited "
                "continuation is every condition's reference: keep plan_sweep's conditions in their order"
            )
    for table in TABLES:
        store.ensure_table(table)
        tables.add_columns(store.location, table)  # an older store's tables: sampling (null for their greedy rows)
    if spec.if_exists == "overwrite":
        _check_runs(store, spec, cells, 0)  # before the sweep's stored rows go: a run changed since planning
        for table in TABLES:
            if tables.exists(store.location, table.name):
                tables.delete(store.location, table.name, f"sweep = {sql_string(spec.sweep)}")
    all_scores = []
    for done, cell in enumerate(cells):
        now = datetime.now(UTC)
        batches = [cell.examples.slice(i, spec.batch_size) for i in range(0, cell.examples.num_rows, spec.batch_size)]
        prepared = []
        for examples in batches:
            inputs, targets = batch_inputs(cell.model, examples, cell.job)
            prompt = (
                None
                if cell.model.continues
                else cell.model.decoder_prompt(targets, task=cell.job.task, sources=known_sources(examples))
            )
            # sampled: each example's stream keyed by its id, in every condition (common random numbers)
            keys = examples["example_id"].to_pylist() if cell.job.sampling is not None else None
            prepared.append((examples, inputs, prompt, keys))
        rows, scores, neurons = [], [], []
        for condition in cell.conditions:
            texts, lengths = [], []
            for examples, inputs, prompt, keys in prepared:
                generation, _ = cell.model.generate_edited(
                    inputs, prompt, condition.edits, spec.max_new_tokens, sampling=cell.job.sampling, sample_keys=keys
                )
                texts += cell.model.decode(generation)
                lengths += generation.lengths.tolist()
                if on_generations:
                    on_generations(examples.num_rows)
            if cell.task == CONTINUE and condition.fields["condition"] == "none":
                cell.references = texts  # the unedited continuation (none, run first): every condition's reference
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
        _check_runs(store, spec, [cell], done, len(cells))  # the medians came from the runs as planned
        store.append(INTERVENTIONS, pa.Table.from_pylist(rows, INTERVENTIONS.schema))
        store.append(INTERVENTION_NEURONS, pa.Table.from_pylist(neurons, INTERVENTION_NEURONS.schema))
        store.append(INTERVENTION_SCORES, pa.Table.from_pylist(scores, INTERVENTION_SCORES.schema))
        all_scores += scores
    return pa.Table.from_pylist(all_scores, INTERVENTION_SCORES.schema)


def _check_runs(store: Store, spec: SweepSpec, cells: list[Cell], done: int, total: int | None = None) -> None:
    """A UserError if a run of ``cells`` changed since the sweep was planned (``done`` cells stored so far)."""
    marks = {id(cell.marks): cell.marks for cell in cells if cell.marks is not None}
    changed = next((run for mark in marks.values() if (run := mark.changed(store)) is not None), None)
    if changed is not None:
        raise UserError(
            f"run {changed!r} changed during sweep {spec.sweep!r} (a teammate overwrote, deleted or resumed it): "
            f"{done} of its {total or len(cells)} (task, language) cells were stored, computed from the run as it "
            "was; nothing more was written. Run the sweep again with --overwrite"
        )


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
