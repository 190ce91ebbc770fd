"""Streaming a run's activations into the store with bounded memory.

A :class:`RunWriter` buffers recorded rows until ``max_buffer_bytes`` and then commits them: first the
examples, then the activations of every hook in one Delta commit. A reader therefore never sees an example
at some hooks and not others, and a killed recording loses at most the unflushed buffer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from store.catalog import RUN_SETTINGS, Store, validate_run_name
from store.errors import UserError
from store.schema import ACTIVATIONS, CORE_TABLES, HOOKS, RESERVED_EXAMPLE_COLUMNS

DEFAULT_BUFFER_BYTES = 64 * 2**20


@dataclass
class HookRows:
    """One hook's recorded vectors for a batch: a row per example (pooled) or per position (pooling none)."""

    example_ids: list[str]  # [rows]
    values: np.ndarray  # [rows, width] float32
    positions: np.ndarray | None = None  # [rows] int32, only when every position is kept


def open_run(
    store: Store,
    run: str,
    *,
    settings: dict[str, str],
    config: dict,
    hooks: list[dict],
    examples_schema: pa.Schema,
    if_exists: str = "error",
    max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> RunWriter:
    """Start (or resume, or overwrite) a run and return its writer.

    ``settings`` holds model, task, pooling and dtype; ``hooks`` one dict per hook point (the ``hooks``
    table's columns); ``examples_schema`` the manifest columns that go into ``examples``. Everything is
    checked before anything is written, so a refused run leaves the store as it was.
    """
    validate_run_name(run)
    if if_exists not in ("error", "resume", "overwrite"):
        raise ValueError(f"if_exists must be error, resume or overwrite, not {if_exists!r}")
    examples_cast = _examples_casts(store, examples_schema)
    info = store.run_info(run)
    if info is not None and if_exists == "error":
        raise UserError(
            f"run {run!r} already exists in {store.location.uri} (status {info.status}): pass --resume to "
            "continue it or --overwrite to replace it, or choose another run name"
        )
    if info is not None and if_exists == "resume":
        _check_resumable(store, run, info, settings, hooks)
    if info is not None and if_exists == "overwrite":
        store.delete_run(run)
        info = None

    hook_names = [hook["hook"] for hook in hooks]
    done: set[str] = set()
    present: set[str] = set()
    if info is None:
        store.log_run_event(run, "recording", settings, config)
    else:
        store.log_run_event(run, "resumed", settings, config)
        done = store.recorded_example_ids(run, len(hook_names))
        present = set(
            store.dataset("examples")
            .to_table(columns=["example_id"], filter=pc.field("run") == run)["example_id"]
            .to_pylist()
        )
    if store.run_hooks(run).num_rows == 0:  # a new run, or one killed before its hooks were committed
        store.append(CORE_TABLES["hooks"], pa.Table.from_pylist([{"run": run, **h} for h in hooks], schema=HOOKS))
    return RunWriter(store, run, settings, config, hook_names, done, present, examples_cast, max_buffer_bytes)


class RunWriter:
    """Buffers a run's rows and commits them atomically; use :func:`open_run` to get one."""

    def __init__(
        self,
        store: Store,
        run: str,
        settings: dict[str, str],
        config: dict,
        hooks: list[str],
        done: set[str],
        examples_present: set[str],
        examples_cast: pa.Schema,
        max_buffer_bytes: int,
    ):
        self.store, self.run, self.settings, self.config = store, run, settings, config
        self.hooks = hooks
        self.done = done  # example ids committed at every hook
        self.float16 = settings["dtype"] == "float16"
        self.max_buffer_bytes = max_buffer_bytes
        self._examples_cast = examples_cast
        self._examples: list[pa.Table] = []
        self._rows: dict[str, list[HookRows]] = defaultdict(list)
        self._buffered = 0
        self._examples_present = examples_present  # example ids already in the examples table

    def add(self, examples: pa.Table, rows: dict[str, HookRows]) -> None:
        """Buffer one batch: its manifest rows (``example_id`` + labels) and every hook's vectors."""
        missing = set(self.hooks) - set(rows)
        if missing:
            raise ValueError(f"batch is missing hooks {sorted(missing)[:3]}")
        self._examples.append(examples)
        for hook in self.hooks:
            self._rows[hook].append(rows[hook])
            self._buffered += rows[hook].values.nbytes
        if self._buffered >= self.max_buffer_bytes:
            self.flush()

    def flush(self) -> None:
        """Commit the buffer: examples first, then all hooks' activations in one commit."""
        if not self._examples:
            return
        examples = pa.concat_tables(self._examples)
        new = [i for i, ex in enumerate(examples["example_id"].to_pylist()) if ex not in self._examples_present]
        if new:
            rows = examples.take(new).cast(self._examples_cast)
            rows = rows.add_column(0, "run", pa.array([self.run] * rows.num_rows, pa.string()))
            self.store.append(CORE_TABLES["examples"], rows, merge_schema=True)
        self.store.append(CORE_TABLES["activations"], self._activations_table())
        ids = examples["example_id"].to_pylist()
        self._examples_present.update(ids)
        self.done.update(ids)
        self._examples, self._rows, self._buffered = [], defaultdict(list), 0

    def finish(self, status: str = "complete", message: str = "") -> None:
        """Flush what is buffered and log the run's new status (complete, or failed with a message)."""
        self.flush()
        self.store.log_run_event(self.run, status, self.settings, self.config, message)

    def _activations_table(self) -> pa.Table:
        pieces = []
        for hook, chunks in self._rows.items():
            values = np.concatenate([chunk.values for chunk in chunks]).astype(np.float32, copy=False)
            n, width = values.shape  # [rows, width]
            if n * width >= 2**31:
                raise ValueError("one flush holds more than 2**31 values: lower max_buffer_bytes")
            offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
            if self.float16:
                bits = values.astype(np.float16).view(np.int16).ravel()
                f32 = pa.nulls(n, ACTIVATIONS.field("activation").type)
                f16 = pa.ListArray.from_arrays(offsets, pa.array(bits))
            else:
                f32 = pa.ListArray.from_arrays(offsets, pa.array(values.ravel()))
                f16 = pa.nulls(n, ACTIVATIONS.field("activation_f16").type)
            positions = [chunk.positions for chunk in chunks]
            position = (
                pa.nulls(n, pa.int32())
                if positions[0] is None
                else pa.array(np.concatenate(positions).astype(np.int32))
            )
            ids = [example for chunk in chunks for example in chunk.example_ids]
            pieces.append(
                pa.table(
                    [
                        pa.array([self.run] * n),
                        pa.array([hook] * n),
                        pa.array(ids, pa.string()),
                        position,
                        f32,
                        f16,
                    ],
                    schema=ACTIVATIONS,
                )
            )
        return pa.concat_tables(pieces)


def _examples_casts(store: Store, schema: pa.Schema) -> pa.Schema:
    """The schema manifest columns are written with, checked against the store's examples table."""
    reserved = RESERVED_EXAMPLE_COLUMNS.intersection(schema.names) - {"example_id"}
    if reserved:
        raise UserError(f"manifest column {sorted(reserved)[0]!r} is reserved by the store: rename it")
    current = store.dataset("examples").schema
    fields = []
    for field in schema:
        target = pa.string() if pa.types.is_null(field.type) else field.type
        if pa.types.is_large_string(target):
            target = pa.string()
        if field.name in current.names and field.name != "run":
            stored = current.field(field.name).type
            if stored != target and not _castable(target, stored):
                raise UserError(
                    f"manifest column {field.name!r} holds {target} but the store's examples table holds "
                    f"{stored} in that column: convert the column in the manifest, or rename it"
                )
            target = stored
        fields.append(pa.field(field.name, target))
    return pa.schema(fields)


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    numeric = pa.types.is_integer(source) or pa.types.is_floating(source)
    if numeric and (pa.types.is_integer(target) or pa.types.is_floating(target)):
        return pa.types.is_floating(target) or pa.types.is_integer(source)
    return pa.types.is_null(source)


def _check_resumable(store: Store, run: str, info, settings: dict[str, str], hooks: list[dict]) -> None:
    for key in RUN_SETTINGS:
        if getattr(info, key) != settings[key]:
            raise UserError(
                f"cannot resume run {run!r} with {key}={settings[key]}: it was recorded with "
                f"{key}={getattr(info, key)} (use --overwrite to start it again)"
            )
    stored = sorted(store.run_hooks(run)["hook"].to_pylist())
    if stored and stored != sorted(hook["hook"] for hook in hooks):
        raise UserError(
            f"cannot resume run {run!r} with other hook points ({len(hooks)} asked, {len(stored)} recorded): "
            "pass the same --hooks, or --overwrite"
        )
