"""Per-layer representations of a run, read from the store one hook point at a time.

A layer's representation of an example is the output of the whole layer (the hooks table's ``layer_output``
rows: ``blocks.{l}.hook_resid_post`` of decoder LMs and SeamlessM4T, ``blocks.{l}.hook_normalized_resid_post`` of
BERT), which is the output of its last sublayer (seeds/lalm-representation-spaces.txt, section 3.1), pooled
over the example's positions by ``last`` token (the paper's choice) or ``mean``.

Pooling: a run recorded pooled (mean, last or max) gives only that pooling. A run recorded with pooling
``none`` keeps every valid position, and any pooling is derived from it here: ``last`` in SQL
(``arg_max(activation, position)``), ``mean`` and ``max`` by streaming the positions through numpy. Both
equal what the recorder would have stored (padding is never stored, so it never counts).

Activations stream from DuckDB as Arrow record batches; each batch's ``list<float32>`` column is viewed as a
``[rows, width]`` numpy array without a copy and copied once into the layer's matrix, so reading a layer
needs its matrix plus one batch of memory.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hookpoints.analyses.subsets import Subset
from hookpoints.store.query import QuerySession

from hookpoints.errors import UserError

POOLINGS = ("last", "mean", "max")


@dataclass(frozen=True)
class LayerHook:
    """One hook point of a run that stands for a layer."""

    hook: str
    component: str | None
    layer: int | None
    width: int
    positional: bool  # the hook has positions (a token or frame axis), so pooling applies


@dataclass(frozen=True)
class RunSettings:
    run: str
    pooling: str  # as recorded: mean | last | max | none
    dtype: str  # float32 | float16


def run_settings(session: QuerySession, run: str) -> RunSettings:
    rows = session.sql("SELECT pooling, dtype FROM runs WHERE run = $run", {"run": run}).to_pylist()
    if not rows:
        runs = session.sql("SELECT run FROM runs ORDER BY run")["run"].to_pylist()
        listed = ", ".join(runs[:10]) + (" ..." if len(runs) > 10 else "") if runs else "none"
        raise UserError(f"there is no run {run!r} in this store (runs: {listed})")
    return RunSettings(run, rows[0]["pooling"], rows[0]["dtype"])


def resolve_pooling(settings: RunSettings, requested: str | None) -> str:
    """The pooling to analyse: the requested one if the run can give it (default: last, or the run's own)."""
    if requested is not None and requested not in POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, not {requested!r}")
    if settings.pooling == "none":
        return requested or "last"
    if requested in (None, settings.pooling):
        return settings.pooling
    raise UserError(
        f"run {settings.run!r} was recorded with pooling {settings.pooling}, which cannot give {requested}: "
        f"analyse it with --pooling {settings.pooling}, or record it again with --pooling {requested} "
        "(or --pooling none, which keeps every position)"
    )


def layer_hooks(session: QuerySession, run: str, patterns: list[str] | None = None) -> list[LayerHook]:
    """The run's layer-output hooks (or those matching glob ``patterns``), by component and layer."""
    rows = session.sql(
        "SELECT hook, component, layer, width, space, layer_output FROM hooks WHERE run = $run", {"run": run}
    ).to_pylist()
    if patterns:
        chosen = [row for row in rows if any(fnmatch.fnmatchcase(row["hook"], p) for p in patterns)]
        if not chosen:
            raise UserError(
                f"--hooks {' '.join(patterns)} matches no hook point of run {run!r}; it recorded "
                f"{', '.join(sorted(row['hook'] for row in rows)[:8])}{' ...' if len(rows) > 8 else ''}"
            )
    else:
        chosen = [row for row in rows if row["layer_output"]]
        if not chosen:
            raise UserError(
                f"run {run!r} recorded no layer outputs (hooks like blocks.*.hook_resid_post): record them, or "
                "pick the hook points to compare with --hooks GLOB"
            )
    chosen.sort(key=lambda row: (row["component"] or "", row["layer"] if row["layer"] is not None else -1, row["hook"]))
    return [
        LayerHook(row["hook"], row["component"], row["layer"], int(row["width"]), row["space"] is not None)
        for row in chosen
    ]


def read_layer(
    session: QuerySession, subset: Subset, hook: LayerHook, settings: RunSettings, pooling: str
) -> np.ndarray:
    """The hook's pooled vectors of the subset's examples, ``[examples, width]`` float32, row i = example i."""
    if settings.run != subset.run:
        raise ValueError(f"settings of run {settings.run!r} given for a subset of run {subset.run!r}")
    params = {"run": subset.run, "hook": hook.hook}
    source = f"""
        FROM _activations a JOIN ({subset.sql()}) s USING (example_id)
        WHERE a.run = $run AND a.hook = $hook"""
    if settings.pooling != "none" or not hook.positional:
        query, reduce = f"SELECT s.row, a.activation, a.activation_f16 {source}", None
    elif pooling == "last":
        query = (
            "SELECT s.row, arg_max(a.activation, a.position) AS activation, "
            f"arg_max(a.activation_f16, a.position) AS activation_f16 {source} GROUP BY s.row"
        )
        reduce = None
    else:
        query, reduce = f"SELECT s.row, a.activation, a.activation_f16 {source}", pooling
    matrix = np.zeros((len(subset), hook.width), np.float32)  # [examples, width]
    filled = np.zeros(len(subset), np.int64)  # rows (positions) seen per example
    if reduce == "max":
        matrix.fill(-np.inf)
    for batch in session.batches(query, params):
        rows = batch.column("row").to_numpy().astype(np.int64)  # [batch]
        values = _vectors(batch, hook)  # [batch, width]
        finite = np.isfinite(values).all(1)
        if not finite.all():
            bad = subset.example_ids[int(rows[np.flatnonzero(~finite)[0]])]
            raise UserError(
                f"hook {hook.hook} of run {subset.run!r} holds NaN or infinite activations (example {bad!r}): "
                "leave such examples out with --where, or record them again"
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


def _vectors(batch: pa.RecordBatch, hook: LayerHook) -> np.ndarray:
    """The batch's vectors as ``[rows, width]`` float32 (a zero-copy view for float32 runs)."""
    column = batch.column("activation")
    if column.null_count == len(column):  # a float16 run: IEEE half bit patterns
        bits = pc.list_flatten(batch.column("activation_f16")).to_numpy(zero_copy_only=False)
        flat = bits.astype(np.int16, copy=False).view(np.float16).astype(np.float32)
    else:
        flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    if flat.size != len(batch) * hook.width:
        raise UserError(f"hook {hook.hook} holds vectors whose width is not {hook.width}: the run is damaged")
    return flat.reshape(len(batch), hook.width)


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


def _check_complete(subset: Subset, hook: LayerHook, filled: np.ndarray, *, positions: bool) -> None:
    missing = np.flatnonzero(filled == 0)
    if len(missing):
        example = subset.example_ids[int(missing[0])]
        raise UserError(
            f"run {subset.run!r} has no activations at {hook.hook} for {len(missing)} of the {len(subset)} "
            f"examples (e.g. {example!r}): finish the recording (hookpoints record --resume) or narrow --where"
        )
    if not positions and (filled > 1).any():
        raise UserError(f"run {subset.run!r} holds more than one vector per example at {hook.hook}: the run is damaged")
