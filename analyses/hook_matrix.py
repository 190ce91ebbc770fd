"""Hook points shared by a group of runs, and their pooled activations as ``[examples, neurons]`` matrices.

A hook's vectors are read straight from its Delta partition (run, hook) as Arrow record batches (only that
partition's files are opened), each batch's ``list<float32>`` (or float16 bit patterns) viewed as
``[rows, width]`` without a copy, and copied once into the matrix at its examples' rows. Memory: the matrix
plus one batch. A slice of the neurons can be read alone (``neurons=slice(j0, j1)``), so a hook wider than a
memory budget is read in several passes (:func:`neuron_slices`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.compute as pc
from hookpoints.analyses.arguments import name_list
from hookpoints.analyses.examples import ExampleSet
from hookpoints.analyses.hooks import StoredHook, run_hooks, select_hooks
from hookpoints.store import vectors
from hookpoints.store.catalog import Store
from hookpoints.store.query import QuerySession

from hookpoints.errors import UserError

#: Rows per Arrow batch read from the store.
BATCH_ROWS = 1024


def shared_hooks(
    session: QuerySession,
    runs: tuple[str, ...],
    *,
    patterns: list[str] | None = None,
    components: list[str] | None = None,
    layer_outputs: bool = False,
) -> list[StoredHook]:
    """The hook points every run recorded (same width), optionally narrowed by globs and components.

    Default: every shared hook except whole-layer outputs (``hook_resid_post``: the residual stream, not a
    submodule's neurons; Table 1 of the paper lists submodules only). ``patterns`` pick hooks by name, alias or
    glob (:func:`hookpoints.analyses.hooks.select_hooks`) instead.

    >>> with store.query() as session:
    ...     hooks = shared_hooks(session, ("r1",), layer_outputs=True)
    """
    runs = name_list(runs, "runs")
    if not runs:
        raise UserError("give at least one run")  # set.intersection() of nothing was a TypeError
    patterns = None if patterns is None else name_list(patterns, "hooks")
    components = None if components is None else name_list(components, "components")
    per_run = {}
    for run in runs:
        per_run[run] = run_hooks(session, run)
        if not per_run[run]:
            raise UserError(f"run {run!r} recorded no hook points")
    common = set.intersection(*({h.hook for h in hooks} for hooks in per_run.values()))
    if not common:
        raise UserError(f"runs {', '.join(runs)} share no hook point: analyse them one at a time")
    widths = {run: {h.hook: h.width for h in hooks} for run, hooks in per_run.items()}
    shared = []
    for hook in per_run[runs[0]]:
        if hook.hook not in common:
            continue
        sizes = {widths[run][hook.hook] for run in runs}
        if len(sizes) > 1:
            raise UserError(
                f"hook {hook.hook} has different widths in runs {', '.join(runs)} ({sorted(sizes)}): "
                "these runs come from different models; analyse them one at a time"
            )
        shared.append(hook)
    if patterns:
        result = select_hooks(shared, patterns, "the run(s) share")
    else:
        result = [h for h in shared if layer_outputs or not h.layer_output]
        if not result:
            raise UserError(f"run(s) {', '.join(runs)} hold only layer outputs: pick hook points with --hooks GLOB")
    if components:
        present = sorted({h.component for h in result})
        unknown = [c for c in components if c not in present]
        if unknown:
            per_run_components = [{h.component for h in hooks} for hooks in per_run.values()]
            why = ""
            if unknown[0] in set.union(*per_run_components) - set.intersection(*per_run_components):
                why = (
                    f" ({unknown[0]} is recorded in only some of the runs: it saw one modality; analyse it on "
                    "its own run, e.g. with --preset unimodal)"
                )
            raise UserError(
                f"component {unknown[0]!r} is not among the hook points of run(s) {', '.join(runs)}: they share "
                f"{', '.join(present)}{why}"
            )
        result = [h for h in result if h.component in components]
    return result


def left_out(
    session: QuerySession,
    runs: tuple[str, ...],
    chosen: list[StoredHook],
    *,
    patterns: list[str] | None = None,
    layer_outputs: bool = False,
) -> list[StoredHook]:
    """Hook points of ``chosen``'s module groups that :func:`shared_hooks` (same ``patterns``) left out because
    not every run recorded them (e.g. one run recorded layers 0-23 of the decoder, the other 0-11)."""
    if len(runs) < 2:
        return []
    union: dict[str, StoredHook] = {}
    for run in runs:
        for hook in run_hooks(session, run):
            union.setdefault(hook.hook, hook)
    hooks = list(union.values())
    if patterns:
        picked = select_hooks(hooks, patterns, "")
    else:
        picked = [h for h in hooks if layer_outputs or not h.layer_output]
    names, components = {h.hook for h in chosen}, {h.component for h in chosen}
    return [h for h in picked if h.component in components and h.hook not in names]


def neuron_slices(width: int, n_examples: int, memory_bytes: int, multiple: int = 16) -> list[slice]:
    """Neuron ranges of a hook whose float32 ``[examples, neurons]`` matrix fits ``memory_bytes`` each."""
    per_neuron = 4 * max(1, n_examples)
    step = max(multiple, memory_bytes // per_neuron // multiple * multiple)
    return [slice(j0, min(width, j0 + step)) for j0 in range(0, width, step)]


class HookMatrixReader:
    """Reads hook matrices of an :class:`ExampleSet` from one snapshot of the activations table."""

    def __init__(self, store: Store, examples: ExampleSet):
        self.examples = examples
        self.dataset = store.dataset("activations")  # one consistent version for every hook
        self._lookup = {run: examples.ids(run) for run in examples.group.runs}

    def read(self, hook: StoredHook, neurons: slice | None = None, *, out: np.ndarray | None = None) -> np.ndarray:
        """``[examples, neurons]`` float32, row i = example i of the set (every example must be there).

        ``out``: a flat float32 buffer to fill (reused across hooks: no fresh pages to fault in); the matrix is
        a view of it.
        """
        j0, j1, _ = (neurons or slice(0, hook.width)).indices(hook.width)
        shape = (len(self.examples), j1 - j0)
        if out is None:
            out = np.empty(shape, np.float32)  # [examples, neurons]
        else:
            out = out[: shape[0] * shape[1]].reshape(shape)
        filled = np.zeros(len(self.examples), np.int32)  # vectors seen per example
        for run in self.examples.group.runs:
            start, stop = self.examples.offsets[run]
            if self.examples.group.settings[run].rows_per_example(hook.space) == "steps":
                self._read_steps(run, hook, j0, j1, out[start:stop], filled[start:stop])
                self._check_complete(run, hook, filled[start:stop])
                continue
            for rows, values in self._batches(run, hook):
                keep = rows >= 0  # rows of examples outside the set (--where) are skipped
                if not keep.all():
                    rows, values = rows[keep], values[keep]
                rows += start
                if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
                    out[rows[0] : rows[-1] + 1] = values[:, j0:j1]
                else:
                    out[rows] = values[:, j0:j1]
                np.add.at(filled, rows, 1)
            self._check_complete(run, hook, filled[start:stop])
        return out

    def _batches(self, run: str, hook: StoredHook, *, positions: bool = False) -> Iterator[tuple]:
        """(row of each vector in the run's examples or -1, ``[rows, width]`` vectors) per Arrow batch; with
        ``positions``, also each vector's position (generation step)."""
        half = self.examples.group.dtypes[run] == "float16"
        wanted = ("activation_f16", "activation_f16_bytes") if half else ("activation",)
        columns = ["example_id", *(c for c in vectors.present(self.dataset.schema.names) if c in wanted)]
        scanner = self.dataset.scanner(
            columns=[*columns, "position"] if positions else columns,
            filter=(pc.field("run") == run) & (pc.field("hook") == hook.hook),
            batch_size=BATCH_ROWS,
        )
        for batch in scanner.to_batches():
            if batch.num_rows == 0:
                continue
            rows = pc.index_in(batch.column(0), value_set=self._lookup[run])
            rows = pc.fill_null(rows, -1).to_numpy(zero_copy_only=False).astype(np.int64)
            values = vectors.matrix(batch, hook.width, run=run, hook=hook.hook)  # [rows, width]
            if positions:
                steps = batch.column("position")
                if steps.null_count:
                    raise UserError(f"run {run!r} mixes pooled and per-step rows at {hook.hook}: the run is damaged")
                yield rows, values, steps.to_numpy(zero_copy_only=False).astype(np.int64)
            else:
                yield rows, values

    def _read_steps(self, run: str, hook: StoredHook, j0: int, j1: int, out: np.ndarray, filled: np.ndarray) -> None:
        """A per-step run's decoder hook: its step rows pooled per example with the run's pooling, which is what
        the recorder stores without ``--per-step`` (the mean, max or last over the generated tokens)."""
        how = self.examples.group.settings[run].pooling.value
        out.fill(-np.inf if how == "max" else 0.0)  # [run's examples, neurons]
        last = np.full(len(filled), -1, np.int64)  # step of the vector kept per example (last pooling)
        for rows, values, steps in self._batches(run, hook, positions=True):
            keep = rows >= 0
            rows, values, steps = rows[keep], values[keep, j0:j1], steps[keep]
            if not len(rows):
                continue
            order = np.lexsort((steps, rows))  # by example, then step
            rows, values, steps = rows[order], values[order], steps[order]
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            targets = rows[starts]
            if how == "mean":
                out[targets] += np.add.reduceat(values, starts, axis=0, dtype=np.float64)  # float16 sums overflow
            elif how == "max":
                out[targets] = np.maximum(out[targets], np.maximum.reduceat(values, starts, axis=0))
            else:  # last: the latest step seen so far
                ends = np.r_[starts[1:], len(rows)] - 1
                newer = steps[ends] > last[targets]
                out[targets[newer]] = values[ends[newer]]
                last[targets[newer]] = steps[ends[newer]]
            filled[targets] += np.diff(np.r_[starts, len(rows)]).astype(filled.dtype)
        if how == "mean":
            out /= np.maximum(filled, 1)[:, None]
        filled[filled > 1] = 1  # one pooled vector per example

    def _check_complete(self, run: str, hook: StoredHook, filled: np.ndarray) -> None:
        missing = np.flatnonzero(filled == 0)
        if len(missing):
            example = self.examples.ids(run)[int(missing[0])].as_py()
            raise UserError(
                f"run {run!r} has no activations at {hook.hook} for {len(missing)} of its {len(filled)} examples "
                f"(e.g. {example!r}): finish the recording (hookpoints record --resume) or leave them out with --where"
            )
        if (filled > 1).any():
            raise UserError(f"run {run!r} holds more than one vector per example at {hook.hook}: the run is damaged")
