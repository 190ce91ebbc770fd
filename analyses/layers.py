"""Per-layer representations of a run, read from the store one hook point at a time.

A layer's representation of an example is the output of the whole layer (the hooks table's ``layer_output``
rows: ``blocks.{l}.hook_resid_post`` of decoder LMs and SeamlessM4T, ``blocks.{l}.hook_normalized_resid_post`` of
BERT), which is the output of its last sublayer (seeds/lalm-representation-spaces.txt, section 3.1), pooled
over the example's positions by ``last`` token (the paper's choice) or ``mean``.

Pooling (:meth:`hookpoints.settings.RunSettings.analysis_pooling`): a run recorded pooled (mean, last or max)
gives only that pooling; a per-step run (``mean+steps``) gives its own, its decoder hooks' steps pooled here.
A run recorded with pooling
``none`` keeps every valid position, and any pooling is derived from it here: ``last`` in SQL
(``arg_max(activation, position)``), ``mean`` and ``max`` by streaming the positions through numpy. Both
equal what the recorder would have stored (padding is never stored, so it never counts).

Activations stream from DuckDB as Arrow record batches; each batch's ``list<float32>`` column is viewed as a
``[rows, width]`` numpy array without a copy and copied once into the layer's matrix, so reading a layer
needs its matrix plus one batch of memory.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hookpoints.analyses import examples
from hookpoints.analyses.hooks import StoredHook, run_hooks, select_hooks
from hookpoints.analyses.subsets import Subset
from hookpoints.store import vectors
from hookpoints.store.query import QuerySession

from hookpoints.errors import UserError
from hookpoints.settings import RunSettings


def run_settings(session: QuerySession, run: str) -> RunSettings:
    """What ``run`` was recorded with (a UserError if the store has no such run)."""
    return examples.run_settings(session, [run])[run]


def resolve_pooling(settings: RunSettings, requested: str | None, run: str = "this run") -> str:
    """The pooling to analyse: the requested one if the run can give it (default: last, or the run's own)."""
    return settings.analysis_pooling(requested, run).value


def layer_hooks(session: QuerySession, run: str, patterns: list[str] | None = None) -> list[StoredHook]:
    """The run's layer-output hooks (or those ``patterns`` select), by component and layer."""
    hooks = run_hooks(session, run)
    if patterns:
        chosen = select_hooks(hooks, patterns, f"of run {run!r}")
    else:
        chosen = [h for h in hooks if h.layer_output]
        if not chosen:
            raise UserError(
                f"run {run!r} recorded no layer outputs (hooks like blocks.*.hook_resid_post): record them, or "
                "pick the hook points to compare with --hooks GLOB"
            )
    return sorted(chosen, key=lambda h: (h.component, h.layer if h.layer is not None else -1, h.hook))


def read_layer(
    session: QuerySession, subset: Subset, hook: StoredHook, settings: RunSettings, pooling: str
) -> np.ndarray:
    """The hook's pooled vectors of the subset's examples, ``[examples, width]`` float32, row i = example i.

    ``pooling`` comes from :func:`resolve_pooling`: rows per position (pooling none) or per generation step
    (a per-step run's decoder hooks) are pooled here; a pooled hook is read as it is.
    """
    params = {"run": subset.run, "hook": hook.hook}
    source = f"""
        FROM _activations a JOIN ({subset.sql()}) s USING (example_id)
        WHERE a.run = $run AND a.hook = $hook"""
    if settings.rows_per_example(hook.space) == "one":
        query, reduce = f"SELECT s.row, a.activation, a.activation_f16, a.activation_f16_bytes {source}", None
    elif pooling == "last":
        query = (
            "SELECT s.row, arg_max(a.activation, a.position) AS activation, "
            "arg_max(a.activation_f16, a.position) AS activation_f16, "
            f"arg_max(a.activation_f16_bytes, a.position) AS activation_f16_bytes {source} GROUP BY s.row"
        )
        reduce = None
    else:
        query, reduce = f"SELECT s.row, a.activation, a.activation_f16, a.activation_f16_bytes {source}", pooling
    matrix = np.zeros((len(subset), hook.width), np.float32)  # [examples, width]
    filled = np.zeros(len(subset), np.int64)  # rows (positions) seen per example
    if reduce == "max":
        matrix.fill(-np.inf)
    for batch in session.batches(query, params):
        rows = batch.column("row").to_numpy().astype(np.int64)  # [batch]
        values = _vectors(batch, hook, subset.run)  # [batch, width]
        finite = np.isfinite(values).all(1)
        if not finite.all():
            bad = subset.example_ids[int(rows[np.flatnonzero(~finite)[0]])]
            raise UserError(
                f"hook {hook.hook} of run {subset.run!r} holds NaN or infinite activations (example {bad!r}): "
                f"leave such examples out with --where, or {examples.record_again([settings.dtype.value])}"
            )
        if reduce is None:
            matrix[rows] = values
            filled[rows] += 1
        else:
            _reduce_into(matrix, filled, rows, values, reduce)
    _check_complete(subset, hook, filled, positions=reduce is not None)
    if reduce == "mean":
        matrix /= filled[:, None]
    return matrix


def _vectors(batch: pa.RecordBatch, hook: StoredHook, run: str) -> np.ndarray:
    """The batch's vectors as ``[rows, width]`` float32 (a zero-copy view for float32 runs)."""
    return vectors.matrix(batch, hook.width, run=run, hook=hook.hook).astype(np.float32, copy=False)


def _reduce_into(matrix: np.ndarray, filled: np.ndarray, rows: np.ndarray, values: np.ndarray, how: str) -> None:
    """Add (mean) or take the maximum of (max) position vectors into their examples' rows."""
    order = np.argsort(rows, kind="stable")
    rows, values = rows[order], values[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    targets = rows[starts]
    if how == "mean":
        matrix[targets] += np.add.reduceat(values, starts, axis=0)
    else:
        matrix[targets] = np.maximum(matrix[targets], np.maximum.reduceat(values, starts, axis=0))
    filled[targets] += np.diff(np.r_[starts, len(rows)])


def _check_complete(subset: Subset, hook: StoredHook, filled: np.ndarray, *, positions: bool) -> None:
    missing = np.flatnonzero(filled == 0)
    if len(missing):
        example = subset.example_ids[int(missing[0])]
        raise UserError(
            f"run {subset.run!r} has no activations at {hook.hook} for {len(missing)} of the {len(subset)} "
            f"examples (e.g. {example!r}): finish the recording (hookpoints record --resume) or narrow --where"
        )
    if not positions and (filled > 1).any():
        raise UserError(f"run {subset.run!r} holds more than one vector per example at {hook.hook}: the run is damaged")
