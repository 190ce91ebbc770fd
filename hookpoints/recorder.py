"""Recording: a manifest through a model, pooled activations at the chosen hook points into a store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

import hookpoints
from hookpoints.audio import load_audio
from hookpoints.errors import UserError, check_count
from hookpoints.heap_trim import HeapTrim
from hookpoints.host_copy import HostCopy, one_behind
from hookpoints.inputs import ModelInputs
from hookpoints.manifest import Manifest, audio_path
from hookpoints.mask_skips import MASK_CHECK, check_claims
from hookpoints.model import HookedModel
from hookpoints.model_digest import model_config, model_digests, part_digests, weights_dtype
from hookpoints.points import HookPoint
from hookpoints.pooling import is_scores, scores_for_half
from hookpoints.record_plan import DEFAULT_MAX_NEW_TOKENS, known_sources, plan_examples
from hookpoints.settings import RunSettings, Sampling
from hookpoints.sizes import check_budget, example_bytes
from hookpoints.store.catalog import Store
from hookpoints.store.run_checks import check_open_options
from hookpoints.store.runs import check_shard, in_shard
from hookpoints.store.writer import DEFAULT_BUFFER_BYTES, HookRows, WriteStats, open_run
from hookpoints.tasks import Task, get_task, source_languages, target_languages

#: Columns generating tasks add to each example row (forward runs keep exactly the manifest's columns).
_TEXT = pa.string()
GENERATION_COLUMNS = {"task": _TEXT, "tgt_lang": _TEXT, "generated_text": _TEXT, "generated_tokens": pa.int32()}


@dataclass(frozen=True)
class RecordSummary:
    """What a recording did (``hp.record`` returns it).

    >>> summary = hp.record(model, "manifest.jsonl", "my-store", run="r1")
    >>> summary.recorded, summary.seconds
    """

    run: str
    recorded: int  # examples recorded by this call
    skipped: int  # examples of this shard already in the run (resume)
    hooks: int
    seconds: float
    shard: tuple[int, int] = (0, 1)
    other_shards: int = 0  # examples of the manifest that other shards record
    store: WriteStats = field(default_factory=WriteStats)  # what was written, and how long recording waited for it


@dataclass(frozen=True)
class BatchJob:
    """How to record a batch, besides the model, the hook points and the examples (a Ray actor gets it too)."""

    task: str
    pooling: str
    per_step: bool = False  # decoder hooks keep one row per generation step
    frames: int | None = None  # speech features fixed to this many frames
    max_new_tokens: int = 128
    tgt_lang: str | None = None
    base: str = "."  # the manifest's folder: relative audio paths start there
    storage: str = "float32"  # the run's --dtype: float16 rows are cast where they were pooled (half the copy)
    template: str | None = None  # an audio LLM's prompt text around the audio ({audio})
    sampling: Sampling | None = None  # sampled decoding, each example's stream keyed by its id; None: greedy

    @cached_property
    def settings(self) -> RunSettings:
        return RunSettings(pooling=self.pooling, per_step=self.per_step, task=self.task, frames=self.frames)

    def method(self, point: HookPoint) -> str:
        """The pooling of one hook point (with per_step, decoder hooks keep every step)."""
        return self.settings.hook_pooling(point.space).value


#: Runs batches somewhere else (hookpoints.scale_out: a Ray actor pool): gets the example batches, the hook
#: points and the job, yields each batch's examples with its hook rows and added columns (in any order).
BatchRunner = Callable[
    [Iterable[pa.Table], list[HookPoint], BatchJob], Iterator[tuple[pa.Table, dict[str, HookRows], dict[str, list]]]
]


def record(
    model: HookedModel,
    manifest: Manifest,
    store: Store | Callable[[], Store],
    run: str,
    *,
    hooks: list[str] | None = None,
    pooling: str = "mean",
    batch_size: int = 8,
    dtype: str = "float32",
    task: str = "forward",
    tgt_lang: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    per_step: bool = False,
    frames: int | None = None,
    if_exists: str = "error",
    max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    shard: tuple[int, int] = (0, 1),
    run_batches: BatchRunner | None = None,
    max_bytes: int | None = None,
    template: str | None = None,
    sampling: Sampling | None = None,
) -> RecordSummary:
    """Record every example of ``manifest`` at ``hooks`` (globs; default: the model's listed hook points).

    One nnsight trace per batch; each hook is pooled per example over its valid positions (``pooling``:
    mean, last, max, or none to keep every position). Batches are formed from examples of similar length,
    which gives the same values as batch size 1 (to float tolerance) with less padding.

    ``task`` (forward, asr, s2tt, t2tt; see hookpoints.tasks): generating tasks decode greedily (at most
    ``max_new_tokens``), save the text with the example, and pool decoder hooks over the generated tokens;
    with ``per_step`` decoder hooks keep one row per generation step instead (``position`` = step).
    ``frames`` fixes speech features to that many frames (truncation / masked zero-padding; the paper: 300).
    ``template`` (audio LLMs): the prompt's text around the audio, at ``{audio}``. ``sampling``
    (:class:`~hookpoints.settings.Sampling`): generating tasks sample instead, each example from its own stream
    keyed by its id (the same tokens in any batch, shard or resume).
    ``if_exists``: error, resume (record only what is missing) or overwrite. ``shard=(I, N)`` records only
    the examples of shard I of N (several processes can record one run side by side). ``run_batches`` runs
    the model somewhere else (hookpoints.scale_out); the rows are committed here either way.
    ``max_bytes`` refuses, before anything is written, a recording whose estimated size is larger
    (hookpoints.sizes: every example as long as the longest batch's longest; attention maps with pooling
    ``none`` grow with the square of the length). ``on_start(n)`` is called once everything is checked and
    ``n`` examples are about to be recorded; ``on_batch(k)`` after each batch.
    """
    model.check_no_added_hooks()  # before the store is touched (HookedModel.pooled refuses too)
    check_count("batch size", batch_size)
    check_count("max new tokens", max_new_tokens)
    if max_bytes is not None:
        check_count("max_bytes", max_bytes)
    generates = get_task(task).generates
    settings = RunSettings(
        pooling=pooling,
        per_step=per_step,
        dtype=dtype,
        task=task,
        model=model.source,
        tgt_lang=tgt_lang,
        frames=frames,
        max_new_tokens=max_new_tokens if generates else None,
        template=template,
        sampling=sampling,
    )
    check_shard(shard)
    check_open_options(if_exists, max_buffer_bytes)  # before a new store is created for it
    for name, value in (("frames", frames), ("a prompt template", template)):
        if value is not None and model.modality != "speech":
            raise UserError(f"{name} applies to speech input; this run reads text")
    plan = plan_examples(model, manifest, get_task(task), tgt_lang, max_new_tokens, template, frames)
    points = model.select(hooks)
    started = time.perf_counter()
    config = {
        "hooks": hooks or [],
        "batch_size": batch_size,
        "modality": model.modality,
        "model_class": type(model.model).__name__,
        "model_digest": model_digests(model.model),
        "model_config": model_config(model.model),  # compared key by key: not in the digest
        "model_digest_parts": part_digests(model.model),  # a sweep's model of another class shares some
        "model_dtype": weights_dtype(model.model),
        "adapter": model.adapter.name,
        "manifest": str(manifest.path),
        **settings.config(),
        "prepend_bos": model.prepend_bos,
        "versions": {"hookpoints": hookpoints.__version__, "torch": torch.__version__},
    }
    job = BatchJob(
        task, pooling, per_step, frames, max_new_tokens, tgt_lang, str(manifest.base), dtype, template, sampling
    )
    if max_bytes is not None:  # before anything is written (resume: counts the shard's examples already there)
        rows = [r for r, example in enumerate(manifest.ids) if in_shard(example, shard)]
        rows.sort(key=plan.sizes.__getitem__)
        if rows:
            _check_size(model, manifest.table.take(rows[-batch_size:]), points, job, len(rows), max_bytes, dtype)
    added = _added_columns(manifest, plan.task)
    schema = manifest.table.schema
    for name, kind in added.items():
        schema = schema.append(pa.field(name, kind))
    if callable(store):  # created only now: a recording refused above leaves no empty store behind
        store = store()
    writer = open_run(
        store,
        run,
        settings=settings.columns(),
        config=config,
        hooks=[point.row() for point in points],
        examples_schema=schema,
        if_exists=if_exists,
        shard=shard,
        max_buffer_bytes=max_buffer_bytes,
    )
    mine = [row for row, example in enumerate(manifest.ids) if in_shard(example, shard)]
    todo = [row for row in mine if manifest.ids[row] not in writer.done]
    todo.sort(key=lambda row: plan.sizes[row])  # similar lengths together: less padding
    batches = (manifest.table.take(todo[start : start + batch_size]) for start in range(0, len(todo), batch_size))
    if run_batches is None:  # batch k's rows reach the host while batch k + 1 runs
        running = (start_batch(model, examples, points, job) for examples in batches)
        results = one_behind(running, lambda batch: (batch.examples, *batch.finish()))
    else:
        results = run_batches(batches, points, job)
    if on_start:
        on_start(len(todo))
    trim = HeapTrim()  # the CPU heap's freed activations back to the OS (hookpoints/heap_trim.py)
    try:
        for examples, activations, columns in results:
            for name, kind in added.items():
                examples = examples.append_column(pa.field(name, kind), pa.array(columns[name], kind))
            writer.add(examples, activations)
            trim()
            if on_batch:
                on_batch(examples.num_rows)
        writer.flush()  # the last rows, and the error of a background flush, while the run can be logged failed
    except BaseException as error:
        _finish_quietly(writer, f"{type(error).__name__}: {error}")
        raise
    writer.finish("complete")
    seconds = time.perf_counter() - started
    others = len(manifest) - len(mine)
    return RecordSummary(run, len(todo), len(mine) - len(todo), len(points), seconds, shard, others, writer.stats)


def _check_size(
    model: HookedModel,
    longest: pa.Table,
    points: list[HookPoint],
    job: BatchJob,
    examples: int,
    budget: int,
    dtype: str,
) -> None:
    """Refuse a recording over ``budget`` bytes, estimated from the inputs of the longest examples."""
    inputs, _ = batch_inputs(model, longest, job)
    positions = {space: int(mask.sum(1).max()) for space, mask in inputs.masks.items()}
    task = get_task(job.task)
    if task.generates:  # the steps' positions: the prompt and every generated token
        # a continuation stores only its steps' positions, not the text's (the input space held the text)
        prompt = positions.get(task.step_space, 1) if task.step_space == "decoder" else 0
        positions[task.step_space] = prompt + job.max_new_tokens
    per_example = example_bytes(points, job.method, positions, dtype)
    biggest = max(points, key=lambda p: example_bytes([p], job.method, positions, dtype), default=None)
    check_budget(per_example * examples, budget, examples, per_example, biggest)


def _added_columns(manifest: Manifest, task: Task) -> dict[str, pa.DataType]:
    added = dict(GENERATION_COLUMNS) if task.generates else {}
    clash = [name for name in added if name in manifest.table.column_names]
    if clash:
        raise UserError(
            f"manifest column {clash[0]!r} is written by the recorder (task {task.name}): rename that column"
        )
    return added


def batch_inputs(model: HookedModel, examples: pa.Table, job: BatchJob) -> tuple[ModelInputs, list[str] | None]:
    """A batch's model inputs (speech, or text marked with its source language where the task needs it) and
    the model code of the language each example is generated into (None for tasks that do not generate)."""
    task = get_task(job.task)
    ids = examples["example_id"].to_pylist()
    languages = examples["language"].to_pylist() if "language" in examples.column_names else None
    if model.modality == "speech":
        paths = [audio_path(Path(job.base), value) for value in examples["audio"].to_pylist()]
        waveforms = [load_audio(path, example) for path, example in zip(paths, ids, strict=True)]
        inputs = model.speech_inputs(waveforms, frames=job.frames, template=job.template)
    elif task.needs_source_language:
        inputs = model.source_inputs(examples["text"].to_pylist(), source_languages(task, languages, ids))
    else:
        inputs = model.text_inputs(examples["text"].to_pylist())
    targets = target_languages(task, languages, job.tgt_lang, ids) if task.generates else None
    return inputs, targets


def record_batch(
    model: HookedModel, examples: pa.Table, points: list[HookPoint], job: BatchJob
) -> tuple[dict[str, HookRows], dict[str, list]]:
    """One batch: inputs, generation if the task generates, one traced pass; the hooks' rows and new columns.

    Everything is read from the batch's own columns (audio, text, language), so a Ray actor can run it too.
    """
    return start_batch(model, examples, points, job).finish()


@dataclass
class StartedBatch:
    """A batch whose pooled rows are on their way to the host (:class:`hookpoints.host_copy.HostCopy`)."""

    examples: pa.Table
    copy: HostCopy
    rows: dict[str, tuple[list[str], np.ndarray | None]]  # hook -> (example id per row, position per row)
    added: dict[str, list]

    def finish(self) -> tuple[dict[str, HookRows], dict[str, list]]:
        """Wait for the copies; the hooks' rows and the batch's new columns."""
        values = check_claims(self.copy.wait())  # a wrong attention-mask claim raises before anything is written
        activations = {
            name: HookRows(ids, values[name]) if positions is None else HookRows(ids, values[name], positions)
            for name, (ids, positions) in self.rows.items()
        }
        return activations, self.added


def start_batch(model: HookedModel, examples: pa.Table, points: list[HookPoint], job: BatchJob) -> StartedBatch:
    """Run one batch and start its pooled rows' copies to the host (see :func:`record_batch`)."""
    task = get_task(job.task)
    ids = examples["example_id"].to_pylist()
    inputs, targets = batch_inputs(model, examples, job)
    added: dict[str, list] = {}
    step_offset = 0
    if task.generates:
        prompt = None  # a decoder-only LM continues its input
        if task.target is not None:
            prompt = model.decoder_prompt(targets, task=task.name, sources=known_sources(examples))
        keys = ids if job.sampling is not None else None  # each example's stream: its id, whatever the batch
        pooled, generation = model.pooled_generating(
            inputs, prompt, points, job.method, job.max_new_tokens, sampling=job.sampling, sample_keys=keys
        )
        inputs = generation.teacher_forced(inputs)  # for its masks: the steps' positions
        step_offset = generation.prompt_length - 1  # position of step 0 (task.step_space)
        added = {
            "task": [task.name] * len(ids),
            "tgt_lang": targets if targets is not None else [None] * len(ids),
            "generated_text": model.decode(generation),
            "generated_tokens": generation.lengths.tolist(),
        }
    else:
        pooled = model.pooled(inputs, points, job.method, defer_check=True)
    storage = torch.float16 if job.storage == "float16" else None  # the writer stores float16 rows as given
    if storage is not None:  # attention scores' mask: float16's minimum, not -inf (which marks the row non-finite)
        pooled.update({point.name: scores_for_half(pooled[point.name]) for point in points if is_scores(point)})
    checks = {MASK_CHECK: pooled[MASK_CHECK]} if MASK_CHECK in pooled else {}
    copy = HostCopy({**{point.name: pooled[point.name] for point in points}, **checks}, dtype=storage)
    rows: dict[str, tuple[list[str], np.ndarray | None]] = {}
    per_space: dict[str, tuple[list[str], np.ndarray]] = {}  # once per space, not per hook (a host sync each)
    for point in points:
        if job.method(point) != "none" or point.time_axis is None:
            rows[point.name] = (ids, None)  # [batch, width]: one vector per example
            continue
        if point.space not in per_space:
            where = inputs.masks[point.space].nonzero().cpu().numpy()  # [valid positions, (example, position)]
            positions = where[:, 1] - (step_offset if point.space == task.step_space else 0)
            per_space[point.space] = ([ids[i] for i in where[:, 0]], positions)
        rows[point.name] = per_space[point.space]
    return StartedBatch(examples, copy, rows, added)


def _finish_quietly(writer, message: str) -> None:
    """Keep what was recorded and mark the run failed, without hiding the original error."""
    try:
        writer.finish("failed", message=message[:500])
    except Exception:  # noqa: BLE001 - the original error matters more
        pass
