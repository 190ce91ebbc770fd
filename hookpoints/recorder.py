"""Recording: a manifest through a model, pooled activations at the chosen hook points into a store."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

import hookpoints
from hookpoints.audio import inspect_audio, load_audio
from hookpoints.manifest import Manifest
from hookpoints.model import HookedModel, Pooling
from hookpoints.points import HookPoint
from hookpoints.pooling import POOLINGS
from hookpoints.tasks import Task, get_task, source_languages, target_languages
from store.catalog import Store
from store.errors import UserError
from store.writer import DEFAULT_BUFFER_BYTES, HookRows, open_run

STORAGE_DTYPES = ("float32", "float16")


DEFAULT_MAX_NEW_TOKENS = 128

#: Columns generating tasks add to each example row (forward runs keep exactly the manifest's columns).
GENERATION_COLUMNS = {
    "task": pa.string(),
    "tgt_lang": pa.string(),
    "generated_text": pa.string(),
    "generated_tokens": pa.int32(),
}


@dataclass(frozen=True)
class RecordSummary:
    run: str
    recorded: int  # examples recorded by this call
    skipped: int  # examples already in the run (resume)
    hooks: int
    seconds: float


@dataclass(frozen=True)
class _Plan:
    """What every example needs, checked before anything is written."""

    task: Task
    sizes: list[float]  # per manifest row: characters or seconds (batches group similar sizes)
    audio: list[Path] | None  # per row, for speech input
    sources: list[str] | None  # per row: source language codes (t2tt)
    targets: list[str] | None  # per row: target language codes (generating tasks)


def record(
    model: HookedModel,
    manifest: Manifest,
    store: Store,
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
) -> RecordSummary:
    """Record every example of ``manifest`` at ``hooks`` (globs; default: the model's listed hook points).

    One nnsight trace per batch; each hook is pooled per example over its valid positions (``pooling``:
    mean, last, max, or none to keep every position). Batches are formed from examples of similar length,
    which gives the same values as batch size 1 (to float tolerance) with less padding.

    ``task`` (forward, asr, s2tt, t2tt; see hookpoints.tasks): generating tasks decode greedily (at most
    ``max_new_tokens``), save the text with the example, and pool decoder hooks over the generated tokens;
    with ``per_step`` decoder hooks keep one row per generation step instead (``position`` = step).
    ``frames`` fixes speech features to that many frames (truncation / masked zero-padding; the paper: 300).
    ``if_exists``: error, resume (record only what is missing) or overwrite. ``on_start(n)`` is called once
    everything is checked and ``n`` examples are about to be recorded; ``on_batch(k)`` after each batch.
    """
    if pooling not in POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if dtype not in STORAGE_DTYPES:
        raise UserError(f"storage dtype must be float32 or float16, not {dtype!r}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size}")
    if max_new_tokens < 1:
        raise UserError(f"max new tokens must be at least 1, not {max_new_tokens}")
    if frames is not None and frames < 1:
        raise UserError(f"frames must be at least 1, not {frames}")
    plan = _plan(model, manifest, get_task(task), tgt_lang)
    if per_step and not plan.task.generates:
        raise UserError(f"per-step recording needs a generating task (asr, s2tt, t2tt), not {task}")
    if frames is not None and model.modality != "speech":
        raise UserError("frames applies to speech input; this run reads text")
    points = model.select(hooks)
    started = time.perf_counter()
    stored_pooling = f"{pooling}+steps" if per_step else pooling
    settings = {"model": model.source, "task": task, "pooling": stored_pooling, "dtype": dtype}
    config = {
        "hooks": hooks or [],
        "batch_size": batch_size,
        "modality": model.modality,
        "model_class": type(model.model).__name__,
        "adapter": model.adapter.name,
        "manifest": str(manifest.path),
        "tgt_lang": tgt_lang,
        "max_new_tokens": max_new_tokens if plan.task.generates else None,
        "per_step": per_step,
        "frames": frames,
        "versions": {"hookpoints": hookpoints.__version__, "torch": torch.__version__},
    }
    added = _added_columns(manifest, plan.task)
    schema = manifest.table.schema
    for name, kind in added.items():
        schema = schema.append(pa.field(name, kind))
    writer = open_run(
        store,
        run,
        settings=settings,
        config=config,
        hooks=[point.row() for point in points],
        examples_schema=schema,
        if_exists=if_exists,
        max_buffer_bytes=max_buffer_bytes,
    )
    todo = [row for row, example in enumerate(manifest.ids) if example not in writer.done]
    todo.sort(key=lambda row: plan.sizes[row])  # similar lengths together: less padding
    step_pooling = (lambda point: "none" if point.space == "decoder" else pooling) if per_step else pooling
    if on_start:
        on_start(len(todo))
    try:
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            examples = manifest.table.take(rows)
            activations, columns = _record_batch(
                model, examples, rows, plan, points, step_pooling, frames=frames, max_new_tokens=max_new_tokens
            )
            for name, kind in added.items():
                examples = examples.append_column(pa.field(name, kind), pa.array(columns[name], kind))
            writer.add(examples, activations)
            if on_batch:
                on_batch(examples.num_rows)
    except BaseException as error:
        _finish_quietly(writer, f"{type(error).__name__}: {error}")
        raise
    writer.finish("complete")
    return RecordSummary(run, len(todo), len(manifest) - len(todo), len(points), time.perf_counter() - started)


def _plan(model: HookedModel, manifest: Manifest, task: Task, tgt_lang: str | None) -> _Plan:
    """Check the task against the model and every example's input; nothing is written before this passes."""
    if task.name not in model.tasks:
        raise UserError(
            f"model {model.source} ({model.adapter.name}, {model.modality} input) cannot do task {task.name}; "
            f"it can do: {', '.join(model.tasks)}"
            + ("" if model.modality != "text" or task.modality != "speech" else " (task needs speech input)")
        )
    ids = manifest.ids
    columns = manifest.table.column_names
    audio = None
    if model.modality == "speech":
        if "audio" not in columns:
            raise UserError(f"{manifest.path} has no 'audio' column: speech input needs a WAV/FLAC path per example")
        values = manifest.column("audio")
        audio = []
        for example, value in zip(ids, values, strict=True):
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"example {example!r} has no audio file; give one or remove the example")
            audio.append(manifest.audio_path(value))
        sizes = [inspect_audio(path, example).seconds for path, example in zip(audio, ids, strict=True)]
    else:
        if "text" not in columns:
            raise UserError(f"{manifest.path} has no 'text' column: text input needs one")
        texts = manifest.column("text")
        for example, text in zip(ids, texts, strict=True):
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"example {example!r} has empty text; give it text or remove it")
        sizes = [len(text) for text in texts]
    languages = manifest.column("language") if "language" in columns else None
    sources = source_languages(task, languages, ids) if task.needs_source_language else None
    targets = target_languages(task, languages, tgt_lang, ids)
    for kind, codes in (("source", sources), ("target", targets)):
        for example, code in zip(ids, codes or [], strict=False):
            if model.language_token(code) is None:
                known = model.languages
                listed = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
                raise UserError(
                    f"example {example!r}: unknown {kind} language {code!r} for model {model.source}"
                    + (f"; it knows: {listed}" if known else "")
                )
    return _Plan(task, sizes, audio, sources, targets)


def _added_columns(manifest: Manifest, task: Task) -> dict[str, pa.DataType]:
    added = dict(GENERATION_COLUMNS) if task.generates else {}
    clash = [name for name in added if name in manifest.table.column_names]
    if clash:
        raise UserError(
            f"manifest column {clash[0]!r} is written by the recorder (task {task.name}): rename that column"
        )
    return added


def _record_batch(
    model: HookedModel,
    examples: pa.Table,
    rows: list[int],
    plan: _Plan,
    points: list[HookPoint],
    pooling: Pooling,
    *,
    frames: int | None,
    max_new_tokens: int,
) -> tuple[dict[str, HookRows], dict[str, list]]:
    """One batch: inputs, generation if the task generates, one traced pass; the hooks' rows and new columns."""
    ids = examples["example_id"].to_pylist()
    if plan.audio is not None:
        waveforms = [load_audio(plan.audio[row], example) for row, example in zip(rows, ids, strict=True)]
        inputs = model.speech_inputs(waveforms, frames=frames)
    elif plan.sources is not None:
        inputs = model.source_inputs(examples["text"].to_pylist(), [plan.sources[row] for row in rows])
    else:
        inputs = model.text_inputs(examples["text"].to_pylist())
    columns: dict[str, list] = {}
    step_offset = 0
    method = pooling if callable(pooling) else (lambda point: pooling)
    if plan.task.generates:
        targets = [plan.targets[row] for row in rows]
        pooled, generation = model.pooled_generating(
            inputs, model.decoder_prompt(targets), points, method, max_new_tokens
        )
        inputs = generation.teacher_forced(inputs)  # for its masks: decoder positions = generation steps
        step_offset = generation.prompt_length - 1  # decoder position of step 0
        columns = {
            "task": [plan.task.name] * len(rows),
            "tgt_lang": targets,
            "generated_text": model.decode(generation),
            "generated_tokens": generation.lengths.tolist(),
        }
    else:
        pooled = model.pooled(inputs, points, method)
    activations = {}
    for point in points:
        values = pooled[point.name].cpu().numpy()
        if method(point) != "none" or point.time_axis is None:
            activations[point.name] = HookRows(ids, values)  # [batch, width]: one vector per example
            continue
        where = inputs.masks[point.space].nonzero().cpu().numpy()  # [valid positions, (example, position)]
        positions = where[:, 1] - (step_offset if point.space == "decoder" else 0)
        activations[point.name] = HookRows([ids[i] for i in where[:, 0]], values, positions)
    return activations, columns


def _finish_quietly(writer, message: str) -> None:
    """Keep what was recorded and mark the run failed, without hiding the original error."""
    try:
        writer.finish("failed", message=message[:500])
    except Exception:  # noqa: BLE001 - the original error matters more
        pass
