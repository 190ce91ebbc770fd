"""Streaming a run's activations into the store with bounded memory, exactly once per example and hook.

A :class:`RunWriter` buffers recorded rows until ``max_buffer_bytes`` and then commits them: first the
examples, then the activations of every hook in one Delta commit, so a reader never sees an example at some
hooks and not others. Every commit carries the writer's numbered application transaction
(store/commits.py), which makes a killed-and-resumed recording exactly once:

- SIGKILL at any moment loses at most the uncommitted buffer; each commit is all or nothing;
- killed between the examples commit and the activations commit: the resumed writer finds the examples
  already there and records their activations without adding the examples again;
- ``--resume`` records the examples not yet committed at every hook, counted in the same table snapshot the
  writer's first commit builds on, so a process that commits to the same shard in the meantime fences this
  one (:class:`store.commits.WriterFenced`) instead of duplicating rows.

Shards of one run (``shard=(I, N)``) record disjoint examples (store.runs.in_shard) under their own
application ids, so they commit side by side; the run is complete when every shard is.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake.exceptions import CommitFailedError, DeltaError
from hookpoints.store import overwrite
from hookpoints.store.catalog import RUN_SETTINGS, Store, validate_run_name
from hookpoints.store.commits import FencedAppender, WriterFenced, app_id, append_once
from hookpoints.store.runs import check_shard
from hookpoints.store.schema import ACTIVATIONS, CORE_TABLES, HOOKS, RESERVED_EXAMPLE_COLUMNS
from hookpoints.store.verify_logs import one_line

from hookpoints.errors import UserError

DEFAULT_BUFFER_BYTES = 64 * 2**20


@dataclass
class HookRows:
    """One hook's recorded vectors for a batch: a row per example (pooled) or per position (pooling none)."""

    example_ids: list[str]  # [rows]
    values: np.ndarray  # [rows, width] float32
    positions: np.ndarray | None = None  # [rows] int32, only when every position is kept

    def without(self, skip: set[str]) -> HookRows:
        """The rows of examples not in ``skip``."""
        keep = np.array([example not in skip for example in self.example_ids], dtype=bool)
        return HookRows(
            [example for example, kept in zip(self.example_ids, keep, strict=True) if kept],
            self.values[keep],
            None if self.positions is None else self.positions[keep],
        )


def open_run(
    store: Store,
    run: str,
    *,
    settings: dict[str, str],
    config: dict,
    hooks: list[dict],
    examples_schema: pa.Schema,
    if_exists: str = "error",
    shard: tuple[int, int] = (0, 1),
    max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> RunWriter:
    """Start (or resume, or overwrite) a run, or one shard of it, and return its writer.

    ``settings`` holds model, task, pooling and dtype; ``hooks`` one dict per hook point (the ``hooks``
    table's columns); ``examples_schema`` the manifest columns that go into ``examples``; ``shard`` which of
    the run's ``N`` shards this writer records. Everything is checked before anything is written, so a
    refused run leaves the store as it was.
    """
    validate_run_name(run)
    index, count = check_shard(shard)
    if if_exists not in ("error", "resume", "overwrite"):
        raise ValueError(f"if_exists must be error, resume or overwrite, not {if_exists!r}")
    with damage_said(store, run):
        examples_cast = _examples_casts(store, examples_schema)
        overwrite.recover(store, run)  # an earlier overwrite killed while swapping in: finish it first
        info = store.run_info(run)
    replaces = None  # the run an overwrite records aside and swaps in when complete (store/overwrite.py)
    if info is not None and if_exists == "overwrite":
        if count > 1:
            raise UserError(
                f"--overwrite deletes all of run {run!r}, which other shards may be recording: delete it first "
                f"(`hookpoints store delete {store.location.uri} --run {run}`), then start its shards"
            )
        overwrite.discard(store, run)
        replaces, run, info = run, overwrite.staging_name(run), None
    with damage_said(store, run):
        states = {} if info is None else store.shard_states(run)
        if info is not None:
            _check_shards(store, run, info, count)
            _check_resumable(store, run, info, settings, hooks)
    if info is not None:
        if index in states and if_exists == "error":
            part = f"run {run!r}" if count == 1 else f"shard {index}/{count} of run {run!r}"
            also = " or --overwrite to replace it" if count == 1 else ""
            raise UserError(
                f"{part} already exists in {store.location.uri} (status {states[index]}): pass --resume to "
                f"continue it{also}, or choose another run name"
            )

    what = f"run {run!r}" if count == 1 else f"shard {index}/{count} of run {run!r}"
    resuming = index in states
    store.log_run_event(run, "resumed" if resuming else "recording", settings, config, shard=(index, count))
    rows = pa.Table.from_pylist([{"run": run, **hook} for hook in hooks], schema=HOOKS)
    append_once(store.location, CORE_TABLES["hooks"], f"run={run}/hooks", rows, present=_has_run(run))
    app = app_id(run, (index, count))
    examples = FencedAppender(store.location, CORE_TABLES["examples"], app, what=what)
    activations = FencedAppender(store.location, CORE_TABLES["activations"], app, what=what)
    # What is already there is read from the very snapshots the writer's commits build on (see the docstring).
    done, present = set(), set()
    if info is not None:
        with damage_said(store, run, log=(settings, config, (index, count))):
            done = store.recorded_example_ids(run, len(hooks), activations.dataset())
            present = set(
                examples.dataset()
                .to_table(columns=["example_id"], filter=pc.field("run") == run)["example_id"]
                .to_pylist()
            )
    return RunWriter(
        store,
        run,
        settings,
        config,
        [hook["hook"] for hook in hooks],
        done=done,
        examples_present=present,
        examples_cast=examples_cast,
        max_buffer_bytes=max_buffer_bytes,
        shard=(index, count),
        appenders=(examples, activations),
        replaces=replaces,
    )


@contextmanager
def damage_said(store: Store, run: str, *, log: tuple | None = None):
    """Turn a failure to read what the store holds into a UserError saying the store is damaged and what to run.

    ``log=(settings, config, shard)``: also log the shard failed with that message (it was already started).
    """
    try:
        yield
    except (OSError, pa.ArrowException, duckdb.Error, DeltaError) as error:
        if isinstance(error, CommitFailedError):
            raise
        uri = store.location.uri
        message = (
            f"store {uri} is damaged, so run {run!r} cannot be continued ({one_line(error)[:200]}): run "
            f"`hookpoints store verify {uri}` to see what is damaged"
        )
        if log is not None:
            settings, config, shard = log
            store.log_run_event(run, "failed", settings, config, message[:1000], shard=shard)
        raise UserError(message) from None


class RunWriter:
    """Buffers a run's (or shard's) rows and commits them atomically; use :func:`open_run` to get one."""

    def __init__(
        self,
        store: Store,
        run: str,
        settings: dict[str, str],
        config: dict,
        hooks: list[str],
        *,
        done: set[str],
        examples_present: set[str],
        examples_cast: pa.Schema,
        max_buffer_bytes: int,
        shard: tuple[int, int],
        appenders: tuple[FencedAppender, FencedAppender],
        replaces: str | None = None,
    ):
        self.store, self.run, self.settings, self.config = store, run, settings, config
        self.hooks = hooks
        self.shard = shard
        self.replaces = replaces  # an overwrite: the run this staging run is swapped in as once complete
        self.done = done  # example ids committed at every hook
        self.float16 = settings["dtype"] == "float16"
        self.max_buffer_bytes = max_buffer_bytes
        self.fenced = False  # another process took over this shard: commit and log nothing more
        self._examples_cast = examples_cast
        self._examples_appender, self._activations_appender = appenders
        self._examples: list[pa.Table] = []
        self._rows: dict[str, list[HookRows]] = defaultdict(list)
        self._buffered_ids: set[str] = set()
        self._buffered = 0
        self._examples_present = examples_present  # example ids already in the examples table

    def add(self, examples: pa.Table, rows: dict[str, HookRows]) -> None:
        """Buffer one batch: its manifest rows (``example_id`` + labels) and every hook's vectors.

        Examples already committed or buffered are dropped (a retried batch is never stored twice).
        """
        missing = set(self.hooks) - set(rows)
        if missing:
            raise ValueError(f"batch is missing hooks {sorted(missing)[:3]}")
        ids = examples["example_id"].to_pylist()
        seen = {example for example in ids if example in self.done or example in self._buffered_ids}
        if seen:
            examples = examples.filter(pa.array([example not in seen for example in ids]))
            rows = {hook: rows[hook].without(seen) for hook in self.hooks}
            ids = examples["example_id"].to_pylist()
        if not ids:
            return
        self._examples.append(examples)
        self._buffered_ids.update(ids)
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
        ids = examples["example_id"].to_pylist()
        new = [i for i, example in enumerate(ids) if example not in self._examples_present]
        try:
            if new:
                rows = examples.take(new).cast(self._examples_cast)
                rows = rows.add_column(0, "run", pa.array([self.run] * rows.num_rows, pa.string()))
                self._examples_appender.append(rows, merge_schema=True)
                self._examples_present.update(ids)
            self._activations_appender.append(self._activations_table())
        except WriterFenced:
            self.fenced = True
            raise
        self.done.update(ids)
        self._examples, self._rows, self._buffered_ids, self._buffered = [], defaultdict(list), set(), 0

    def finish(self, status: str = "complete", message: str = "") -> None:
        """Flush what is buffered and log the shard's new status (complete, or failed with a message).

        A failed shard is logged failed even when its last flush fails too (the flush's error joins the
        message): a run never stays ``recording`` after its process ended with an error.
        """
        if self.fenced:
            return
        if status == "failed":
            try:
                self.flush()
            except Exception as error:  # noqa: BLE001 - logged with the failure, the original error is raised
                message = f"{message}; the last {len(self._buffered_ids)} examples were not saved: {error}"
            if self.replaces is not None:
                message = f"overwrite of run {self.replaces!r} failed, the old run is kept: {message}"
        else:
            self.flush()
        self.store.log_run_event(self.run, status, self.settings, self.config, message[:1000], shard=self.shard)
        if status == "complete" and self.replaces is not None:
            overwrite.swap(self.store, self.replaces, self.settings, self.config)

    def _activations_table(self) -> pa.Table:
        pieces = []
        for hook, chunks in self._rows.items():
            values = np.concatenate([chunk.values for chunk in chunks]).astype(np.float32, copy=False)
            n, width = values.shape  # [rows, width]
            if n * width >= 2**31:
                raise ValueError("one flush holds more than 2**31 values: lower max_buffer_bytes")
            offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
            if self.float16:
                with np.errstate(over="ignore"):  # values beyond float16's range become inf (and are flagged)
                    half = values.astype(np.float16)  # [rows, width]
                finite = np.isfinite(half).all(axis=1)
                f32 = pa.nulls(n, ACTIVATIONS.field("activation").type)
                f16 = pa.ListArray.from_arrays(offsets, pa.array(half.view(np.int16).ravel()))
            else:
                finite = np.isfinite(values).all(axis=1)
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
                        pa.array(finite, pa.bool_()),
                    ],
                    schema=ACTIVATIONS,
                )
            )
        return pa.concat_tables(pieces)


def _has_run(run: str):
    def present(dataset) -> bool:
        return dataset.count_rows(filter=pc.field("run") == run) > 0

    return present


def _check_shards(store: Store, run: str, info, count: int) -> None:
    if info.shards == count:
        return
    if info.shards == 1:
        raise UserError(
            f"run {run!r} is recorded without --shard: resume it without --shard (or --overwrite it, or "
            "choose another run name)"
        )
    raise UserError(
        f"run {run!r} is recorded in {info.shards} shards: pass --shard I/{info.shards} "
        f"(0 <= I < {info.shards}) to record or resume one of them"
    )


def _examples_casts(store: Store, schema: pa.Schema) -> pa.Schema:
    """The schema manifest columns are written with, checked against the store's examples table."""
    check_column_names(schema.names)
    current = store.dataset("examples").schema
    stored_names = {name.lower(): name for name in current.names}
    fields = []
    for field in schema:
        same = stored_names.get(field.name.lower(), field.name)
        if same != field.name:  # Delta and DuckDB match column names case-insensitively
            raise UserError(
                f"manifest column {field.name!r} clashes with the store's examples column {same!r} (names are "
                f"matched case-insensitively): rename it to {same!r} or to another name"
            )
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


def check_column_names(names: list[str]) -> None:
    """Refuse manifest columns the store reserves, or two that differ only in case (compared like DuckDB)."""
    seen: dict[str, str] = {}
    for name in names:
        if name.lower() in RESERVED_EXAMPLE_COLUMNS and name != "example_id":
            raise UserError(f"manifest column {name!r} is reserved by the store (names ignore case): rename it")
        if name.lower() in seen:
            raise UserError(
                f"manifest columns {seen[name.lower()]!r} and {name!r} differ only in case, which SQL does not "
                "tell apart: rename one"
            )
        seen[name.lower()] = name


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
