"""Streaming a run's activations into the store with bounded memory, exactly once per example and hook.

A :class:`RunWriter` buffers recorded rows until ``max_buffer_bytes`` (or until its first rows are
``max_buffer_seconds`` old) and then commits them in a background
thread while the producer fills the next buffer (one flush in flight at most): first the examples, then the
activations of every hook in one Delta commit (their files written by Arrow's threads), so a reader never sees
an example at some hooks and not others. Every commit carries the writer's numbered application transaction
(store/commits.py), which makes a killed-and-resumed recording exactly once:

- SIGKILL at any moment loses at most the uncommitted buffers (the one filling, the one committing); each
  commit is all or nothing;
- killed between the examples commit and the activations commit: the resumed writer finds the examples
  already there and records their activations without adding the examples again;
- ``--resume`` records the examples not yet committed at every hook, counted in the same table snapshot the
  writer's first commit builds on, so a process that commits to the same shard in the meantime fences this
  one (:class:`store.commits.WriterFenced`) instead of duplicating rows.

Shards of one run (``shard=(I, N)``) record disjoint examples (store.runs.in_shard) under their own
application ids, so they commit side by side; the run is complete when every shard is.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake.exceptions import CommitFailedError, DeltaError
from hookpoints.store import overwrite
from hookpoints.store.buffer import DEFAULT_BUFFER_BYTES, DEFAULT_BUFFER_SECONDS, Buffer, HookRows
from hookpoints.store.catalog import Store, validate_run_name
from hookpoints.store.commits import FencedAppender, WriterFenced, app_id, append_once
from hookpoints.store.example_columns import examples_casts
from hookpoints.store.run_checks import check_no_rows_left, check_open_options, check_resumable, check_shards
from hookpoints.store.runs import check_shard
from hookpoints.store.schema import CORE_TABLES, HOOKS
from hookpoints.store.verify_logs import one_line

from hookpoints.errors import UserError


@dataclass
class WriteStats:
    """What a run writer committed, and how long its producer waited for the store (:attr:`RunWriter.stats`).

    ``waited_seconds`` is the time ``add``, ``flush`` and ``finish`` blocked the producer: with a GPU recording
    most of it means the store, not the model, sets the pace (docs/gpu.md).

    >>> WriteStats(flushes=2, bytes=300_000_000, flush_seconds=2.0).mb_per_second
    150.0
    """

    flushes: int = 0  # commits of buffered rows
    bytes: int = 0  # the committed vectors' bytes (float16 or float32, as buffered)
    flush_seconds: float = 0.0  # time spent committing them (examples, files, Delta commits)
    build_seconds: float = 0.0  # of which building each flush's Arrow table (one core; the files: several)
    waited_seconds: float = 0.0  # time the producer was blocked on the store

    @property
    def mb_per_second(self) -> float:
        """Vector megabytes committed per second of flushing (0 before the first flush)."""
        return self.bytes / self.flush_seconds / 1e6 if self.flush_seconds else 0.0


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
    max_buffer_seconds: float = DEFAULT_BUFFER_SECONDS,
    background: bool = True,
) -> RunWriter:
    """Start (or resume, or overwrite) a run, or one shard of it, and return its writer.

    ``settings`` holds model, task, pooling and dtype; ``hooks`` one dict per hook point (the ``hooks``
    table's columns); ``examples_schema`` the manifest columns that go into ``examples``; ``shard`` which of
    the run's ``N`` shards this writer records; a buffer is committed at ``max_buffer_bytes`` of vectors or
    once its first rows are ``max_buffer_seconds`` old; ``background=False`` commits in the caller's thread (the writer
    of before: for comparisons). Everything is checked before anything is written, so a refused run leaves the
    store as it was. Example::

        writer = open_run(store, "r1", settings=..., config={}, hooks=rows, examples_schema=schema)
        writer.add(examples, {"blocks.0.hook_resid_post": HookRows(ids, values)})
        writer.finish()
    """
    validate_run_name(run)
    index, count = check_shard(shard)
    check_open_options(if_exists, max_buffer_bytes, max_buffer_seconds)
    twice = [name for name, n in Counter(hook.get("hook") for hook in hooks).items() if n > 1 and name is not None]
    if twice:
        raise UserError(f"hooks lists {twice[0]!r} twice: give each hook point once")
    with damage_said(store, run):
        examples_cast = examples_casts(store, examples_schema)
        overwrite.recover(store, run)  # an earlier overwrite killed while swapping in: finish it first
        info = store.run_info(run)
    replaces = None  # the run an overwrite records aside and swaps in when complete (store/overwrite.py)
    if info is not None and if_exists == "resume":
        with damage_said(store, run):
            staged = store.run_info(overwrite.staging_name(run))
        if staged is not None:  # an overwrite killed (or failed) while recording: --resume continues it
            replaces, run, info = run, overwrite.staging_name(run), staged
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
        if info is None:
            check_no_rows_left(store, run)
        if info is not None:
            check_shards(run, info, count)
    if info is not None:
        if index in states and if_exists == "error":  # before the resume checks: no --resume was asked for
            part = f"run {run!r}" if count == 1 else f"shard {index}/{count} of run {run!r}"
            also = " or --overwrite (if_exists='overwrite') to replace it" if count == 1 else ""
            raise UserError(
                f"{part} already exists in {store.location.uri} (status {states[index]}): pass --resume "
                f"(in Python: if_exists='resume') to continue it{also}, or choose another run name"
            )
        with damage_said(store, run):
            check_resumable(store, run, info, settings, hooks, config)

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
        max_buffer_seconds=max_buffer_seconds,
        shard=(index, count),
        appenders=(examples, activations),
        replaces=replaces,
        background=background,
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
    """Buffers a run's (or shard's) rows and commits them atomically; use :func:`open_run` to get one.

    A full buffer is committed by a background thread while the producer goes on filling the next one
    (``background=True``): at most one flush is in flight, so :meth:`add` blocks only while the previous
    flush still runs, and memory stays at about three buffers (one filling, one being written, and the copy
    of it that the files are written from). An error of a background flush is raised by the
    next :meth:`add`, :meth:`flush` or :meth:`finish` (the same exception), and its rows are kept in the buffer
    for a later flush. Each flush writes its per-hook files on Arrow's threads (store/files.py).
    """

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
        max_buffer_seconds: float = DEFAULT_BUFFER_SECONDS,
        appenders: tuple[FencedAppender, FencedAppender],
        replaces: str | None = None,
        background: bool = True,
    ):
        self.store, self.run, self.settings, self.config = store, run, settings, config
        self.hooks = hooks
        self.shard = shard
        self.replaces = replaces  # an overwrite: the run this staging run is swapped in as once complete
        self.done = done  # example ids committed at every hook
        self.float16 = settings["dtype"] == "float16"
        self.max_buffer_bytes = max_buffer_bytes
        self.max_buffer_seconds = max_buffer_seconds
        self._filled_since: float | None = None  # time.monotonic() of the buffer's first rows
        self.fenced = False  # another process took over this shard (and the caller was told): commit nothing more
        self._examples_cast = examples_cast
        self._examples_appender, self._activations_appender = appenders
        self._buffer = Buffer()
        self._buffered_ids: set[str] = set()  # buffered or in flight: not committed yet
        self._examples_present = examples_present  # example ids already in the examples table (flush's own)
        self._committer = ThreadPoolExecutor(1, "hookpoints-flush") if background else None
        self._in_flight: tuple[Buffer, Future] | None = None
        self.stats = WriteStats()

    def add(self, examples: pa.Table, rows: dict[str, HookRows]) -> None:
        """Buffer one batch: its manifest rows (``example_id`` + labels) and every hook's vectors.

        Examples already committed or buffered are dropped (a retried batch is never stored twice). When the
        buffer is full its flush starts in the background; an ``add`` that raises the error of the previous
        flush has not taken its batch.
        """
        self._settle(block=False)
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
        now = time.monotonic()
        full = (
            self._buffer.nbytes + sum(rows[hook].values.nbytes for hook in self.hooks) >= self.max_buffer_bytes
            or now - (self._filled_since or now) >= self.max_buffer_seconds
        )
        if full and self._committer is not None:
            with self._waiting():
                self._settle(block=True)  # the producer waits only while the previous flush still runs
        self._buffer.add(examples, {hook: rows[hook] for hook in self.hooks})
        self._buffered_ids.update(ids)
        if not full:
            self._filled_since = self._filled_since or now
            return
        self._filled_since = None
        if self._committer is None:
            self.flush()
            return
        buffer, self._buffer = self._buffer, Buffer()
        self._in_flight = buffer, self._committer.submit(self._commit, buffer)

    def flush(self) -> None:
        """Commit the buffer now and wait for it (after any flush in flight): examples first, then all hooks'
        activations in one commit. On an error the rows stay buffered, so a later flush commits them."""
        with self._waiting():
            self._settle(block=True)
            buffer, self._buffer = self._buffer, Buffer()
            self._filled_since = None
            try:
                self._commit(buffer)
            except BaseException as error:
                self._buffer.prepend(buffer)
                if isinstance(error, WriterFenced):
                    self.fenced = True
                raise
            self._committed(buffer)

    def finish(self, status: str = "complete", message: str = "") -> None:
        """Flush what is buffered and log the shard's new status (complete, or failed with a message).

        A failed shard is logged failed even when its last flush fails too (the flush's error joins the
        message): a run never stays ``recording`` after its process ended with an error.
        """
        if self.fenced:
            return self._close()
        if status == "failed":
            retried = ""
            try:
                self._settle(block=True)
            except Exception as error:  # noqa: BLE001 - its rows are buffered again and retried just below
                retried = f"; a flush failed and was retried ({one_line(error)})"
            try:
                if not self.fenced:
                    self.flush()
            except Exception as error:  # noqa: BLE001 - logged with the failure, the original error is raised
                retried = f"; the last {len(self._buffered_ids)} examples were not saved: {one_line(error)}"
            if self.fenced:
                return self._close()
            message += retried
            if self.replaces is not None:
                message = f"overwrite of run {self.replaces!r} failed, the old run is kept: {message}"
        else:
            self.flush()
        self._close()
        self.store.log_run_event(self.run, status, self.settings, self.config, message[:1000], shard=self.shard)
        if status == "complete" and self.replaces is not None:
            overwrite.swap(self.store, self.replaces, self.settings, self.config)

    def _settle(self, *, block: bool) -> None:
        """Collect the flush in flight (waiting for it if ``block``); raise its error, its rows kept buffered."""
        if self._in_flight is None:
            return
        buffer, future = self._in_flight
        if not block and not future.done():
            return
        error = future.exception()  # waits (an interrupt while waiting leaves the flush in flight)
        self._in_flight = None
        if error is None:
            self._committed(buffer)
            return
        self._buffer.prepend(buffer)
        if isinstance(error, WriterFenced):
            self.fenced = True
        raise error

    def _commit(self, buffer: Buffer) -> None:
        """Examples first, then every hook's activations in one commit (runs in the flush thread)."""
        if not buffer.ids:
            return
        started = time.perf_counter()
        new = [i for i, example in enumerate(buffer.ids) if example not in self._examples_present]
        if new:
            rows = pa.concat_tables(buffer.examples).take(new).cast(self._examples_cast)
            rows = rows.add_column(0, "run", pa.array([self.run] * rows.num_rows, pa.string()))
            self._examples_appender.append(rows, merge_schema=True)
            self._examples_present.update(buffer.ids)
        building = time.perf_counter()
        table = buffer.table(self.run, self.hooks, float16=self.float16)
        built = time.perf_counter() - building  # counted with the flush once it committed, as flush_seconds
        self._activations_appender.append(table)
        self.stats.build_seconds += built
        self.stats.flushes += 1  # (one flush at a time: the flush thread or, without one, the caller)
        self.stats.bytes += buffer.nbytes
        self.stats.flush_seconds += time.perf_counter() - started

    @contextmanager
    def _waiting(self):
        """Count the time inside as the producer blocked on the store (``stats.waited_seconds``)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stats.waited_seconds += time.perf_counter() - started

    def _committed(self, buffer: Buffer) -> None:
        self.done.update(buffer.ids)
        self._buffered_ids.difference_update(buffer.ids)

    def _close(self) -> None:
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        self._committer = None


def _has_run(run: str):
    def present(dataset) -> bool:
        return dataset.count_rows(filter=pc.field("run") == run) > 0

    return present
