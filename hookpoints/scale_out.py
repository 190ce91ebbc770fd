"""Scale-out recording with Ray Data: one model per actor (one per GPU on a cluster), one writer.

``hookpoints record --ray --workers N`` sends the examples still to record through a Ray Data pipeline: a
pool of N actors, each loading the model once, runs the recorder's per-batch trace and pooling and returns
the pooled vectors; the driver streams them into the run's :class:`store.writer.RunWriter` as they arrive.
Every commit therefore goes through the one writer with its exactly-once guarantees (store/writer.py): a
batch Ray retries after an actor died is dropped if it was already stored, and a killed driver is resumed
with ``--resume`` like any recording. Several drivers (``--shard I/N``) can share a run.

On one machine without GPUs, actors get fractional CPUs so the pool never holds every CPU (Ray Data's read
stage would wait forever for one); on a cluster each actor takes a GPU. See docs/team-store.md.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from hookpoints.errors import UserError
from hookpoints.points import HookPoint
from hookpoints.recorder import BatchJob, record_batch
from hookpoints.store.writer import HookRows


def ray_runner(
    source: str,
    *,
    load_options: dict | None = None,
    workers: int = 1,
    batch_size: int = 8,
    gpus_per_worker: float | None = None,
):
    """A ``run_batches`` for :func:`hookpoints.recorder.record` that runs the model in a Ray actor pool.

    ``source`` and ``load_options`` (modality, dtype, device) are what each actor passes to
    :func:`hookpoints.loading.load`. ``gpus_per_worker`` defaults to 1 when the device is CUDA, else 0.
    Connects to the cluster in ``RAY_ADDRESS`` if set, otherwise starts Ray on this machine (and stops it).
    """
    if workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    options = dict(load_options or {})
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if str(options.get("device", "cpu")).startswith("cuda") else 0.0

    def run(batches: Iterable[pa.Table], points: list[HookPoint], job: BatchJob) -> Iterator:
        pending = [batch for batch in batches if batch.num_rows]
        if not pending:
            return
        todo = pa.concat_tables(pending)
        row_of = {example: row for row, example in enumerate(todo["example_id"].to_pylist())}
        names = [point.name for point in points]
        widths = [point.width for point in points]
        ray, started = _connect(workers, gpus_per_worker)
        try:
            cpus, threads = _actor_cpus(ray, workers, gpus_per_worker)
            dataset = ray.data.from_arrow(pending).map_batches(  # a block per batch: spread over the actors
                _Recorder,
                fn_constructor_kwargs={
                    "source": source,
                    "options": options,
                    "hooks": names,
                    "job": job,
                    "threads": threads,
                },
                batch_size=batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=cpus,
                num_gpus=gpus_per_worker or None,
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", module=r"ray\.")  # e.g. fewer blocks than actors
                for out in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    examples = todo.take([row_of[example] for example in out["example_id"].to_pylist()])
                    yield examples, *decode(out, names, widths)
        finally:
            if started:
                ray.shutdown()

    return run


class _Recorder:
    """A Ray actor: loads the model once, then records batches of examples (manifest rows)."""

    def __init__(self, source: str, options: dict, hooks: list[str], job: BatchJob, threads: int):
        import torch

        from hookpoints.loading import load

        torch.set_num_threads(threads)
        self.model = load(source, **options)
        by_name = {point.name: point for point in self.model.select(hooks)}
        self.points = [by_name[name] for name in hooks]
        self.job = job

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, added = record_batch(self.model, batch, self.points, self.job)
        return encode(batch["example_id"].to_pylist(), rows, [point.name for point in self.points], added)


def encode(
    example_ids: list[str], rows: dict[str, HookRows], hooks: list[str], added: dict[str, list] | None = None
) -> pa.Table:
    """One row per example: per hook ``i`` its vectors flattened (``h{i}``) and, if kept, positions (``p{i}``),
    plus the columns the task adds to the example (``c:{name}``: generated text ...).

    An example is the unit Ray may split blocks at, so every example arrives with all its hooks.
    """
    columns = {"example_id": pa.array(example_ids, pa.string())}
    for i, hook in enumerate(hooks):
        hook_rows = rows[hook]
        index = {example: n for n, example in enumerate(example_ids)}
        owner = np.array([index[example] for example in hook_rows.example_ids], dtype=np.int64)  # [rows]
        order = np.argsort(owner, kind="stable")
        counts = np.bincount(owner, minlength=len(example_ids))  # rows per example
        width = hook_rows.values.shape[1]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        values = hook_rows.values[order].astype(np.float32, copy=False)  # [rows, width]
        columns[f"h{i}"] = pa.ListArray.from_arrays(pa.array(offsets * width), pa.array(values.ravel()))
        if hook_rows.positions is not None:
            positions = hook_rows.positions[order].astype(np.int32)
            columns[f"p{i}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(positions))
    for name, values in (added or {}).items():
        columns[f"c:{name}"] = pa.array(values)
    return pa.table(columns)


def decode(batch: pa.Table, hooks: list[str], widths: list[int]) -> tuple[dict[str, HookRows], dict[str, list]]:
    """The inverse of :func:`encode`: hook name -> its rows (as the writer takes them), and the added columns."""
    example_ids = batch["example_id"].to_pylist()
    rows = {}
    for i, (hook, width) in enumerate(zip(hooks, widths, strict=True)):
        column = batch[f"h{i}"].combine_chunks()
        values = np.asarray(column.flatten(), dtype=np.float32).reshape(-1, width)  # [rows, width]
        per_example = np.asarray(column.value_lengths()) // width
        ids = [example for example, n in zip(example_ids, per_example, strict=True) for _ in range(n)]
        positions = None
        if f"p{i}" in batch.column_names:
            positions = np.asarray(batch[f"p{i}"].combine_chunks().flatten(), dtype=np.int32)
        rows[hook] = HookRows(ids, values, positions)
    added = {name[2:]: batch[name].to_pylist() for name in batch.column_names if name.startswith("c:")}
    return rows, added


def _connect(workers: int, gpus_per_worker: float):
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray Data: pip install 'hookpoints[ray]'") from None
    import ray.data

    # hookpoints shows its own progress bar; Ray's notes still go to its log files (/tmp/ray/session_*)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray", "ray.data"):  # set after ray.data is imported: importing it configures its logger
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return ray, False
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
    runtime_env = {"env_vars": env} if env else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level="WARNING",
            log_to_driver=False,
        )
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_per_worker * workers > gpus and gpus_per_worker:
        ray.shutdown()
        raise UserError(f"{workers} workers with a GPU each need {workers} GPUs; the Ray cluster has {gpus:g}")
    return ray, True


def _actor_cpus(ray, workers: int, gpus_per_worker: float) -> tuple[float, int]:
    """CPUs each actor reserves, and torch threads it uses: leave one CPU for Ray Data's other stages."""
    cpus = ray.cluster_resources().get("CPU", 1)
    if gpus_per_worker:
        return 1.0, max(1, int(cpus // workers))
    reserve = max(0.1, min(1.0, (cpus - 1) / workers))
    return round(reserve, 2), max(1, int(cpus // workers))
