"""Recording: a manifest through a model, pooled activations at the chosen hook points into a store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import torch

import hookpoints
from hookpoints.manifest import Manifest
from hookpoints.model import HookedModel
from hookpoints.points import HookPoint
from hookpoints.pooling import POOLINGS
from store.catalog import Store
from store.errors import UserError
from store.runs import check_shard, in_shard
from store.writer import DEFAULT_BUFFER_BYTES, HookRows, open_run

STORAGE_DTYPES = ("float32", "float16")

#: Runs batches somewhere else (hookpoints.scale_out: a Ray actor pool): gets the example batches, the hook
#: points and the pooling, yields each batch's examples with their rows (in any order).
BatchRunner = Callable[[Iterable[pa.Table], list[HookPoint], str], Iterator[tuple[pa.Table, dict[str, HookRows]]]]


@dataclass(frozen=True)
class RecordSummary:
    run: str
    recorded: int  # examples recorded by this call
    skipped: int  # examples of this shard already in the run (resume)
    hooks: int
    seconds: float
    shard: tuple[int, int] = (0, 1)
    other_shards: int = 0  # examples of the manifest that other shards record


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
    if_exists: str = "error",
    max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    shard: tuple[int, int] = (0, 1),
    run_batches: BatchRunner | None = None,
) -> RecordSummary:
    """Record every example of ``manifest`` at ``hooks`` (globs; default: the model's listed hook points).

    One nnsight trace per batch; each hook is pooled per example over its valid positions (``pooling``:
    mean, last, max, or none to keep every position). Batches are formed from examples of similar length,
    which gives the same values as batch size 1 (to float tolerance) with less padding.
    ``if_exists``: error, resume (record only what is missing) or overwrite. ``shard=(I, N)`` records only
    the examples of shard I of N (several processes can record one run side by side). ``run_batches`` runs
    the model somewhere else (hookpoints.scale_out); the rows are committed here either way.
    ``on_start(n)`` is called once everything is checked and ``n`` examples are about to be recorded;
    ``on_batch(k)`` after each batch.
    """
    if pooling not in POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if dtype not in STORAGE_DTYPES:
        raise UserError(f"storage dtype must be float32 or float16, not {dtype!r}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size}")
    check_shard(shard)
    points = model.select(hooks)
    started = time.perf_counter()
    settings = {"model": model.source, "task": task, "pooling": pooling, "dtype": dtype}
    config = {
        "hooks": hooks or [],
        "batch_size": batch_size,
        "modality": model.modality,
        "model_class": type(model.model).__name__,
        "adapter": model.adapter.name,
        "manifest": str(manifest.path),
        "versions": {"hookpoints": hookpoints.__version__, "torch": torch.__version__},
    }
    writer = open_run(
        store,
        run,
        settings=settings,
        config=config,
        hooks=[point.row() for point in points],
        examples_schema=manifest.table.schema,
        if_exists=if_exists,
        shard=shard,
        max_buffer_bytes=max_buffer_bytes,
    )
    mine = [row for row, example in enumerate(manifest.ids) if in_shard(example, shard)]
    todo = [row for row in mine if manifest.ids[row] not in writer.done]
    lengths = [len(text) for text in manifest.column("text")]
    todo.sort(key=lambda row: lengths[row])  # similar lengths together: less padding
    batches = (manifest.table.take(todo[start : start + batch_size]) for start in range(0, len(todo), batch_size))
    if run_batches is None:
        results = ((examples, _record_batch(model, examples, points, pooling)) for examples in batches)
    else:
        results = run_batches(batches, points, pooling)
    if on_start:
        on_start(len(todo))
    try:
        for examples, rows in results:
            writer.add(examples, rows)
            if on_batch:
                on_batch(examples.num_rows)
    except BaseException as error:
        _finish_quietly(writer, f"{type(error).__name__}: {error}")
        raise
    writer.finish("complete")
    seconds = time.perf_counter() - started
    skipped, others = len(mine) - len(todo), len(manifest) - len(mine)
    return RecordSummary(run, len(todo), skipped, len(points), seconds, shard, others)


def _record_batch(model: HookedModel, examples: pa.Table, points: list[HookPoint], pooling: str) -> dict[str, HookRows]:
    ids = examples["example_id"].to_pylist()
    inputs = model.text_inputs(examples["text"].to_pylist())
    pooled = model.pooled(inputs, points, pooling)
    rows = {}
    for point in points:
        values = pooled[point.name].cpu().numpy()
        if pooling != "none":
            rows[point.name] = HookRows(ids, values)  # [batch, width]
        elif point.time_axis is None:
            rows[point.name] = HookRows(ids, values)  # one vector per example: no positions
        else:
            where = inputs.masks[point.space].nonzero().cpu().numpy()  # [valid positions, (example, position)]
            rows[point.name] = HookRows([ids[i] for i in where[:, 0]], values, where[:, 1])
    return rows


def _finish_quietly(writer, message: str) -> None:
    """Keep what was recorded and mark the run failed, without hiding the original error."""
    try:
        writer.finish("failed", message=message[:500])
    except Exception:  # noqa: BLE001 - the original error matters more
        pass
