"""Per-neuron statistics at numpy speed in bounded memory: ``neuron_stats(...)`` in SQL and in Python.

The ``neurons`` view is the long form (one row per example x neuron): DuckDB unnests every vector, joins every
value to its example's labels and hashes it into a group: 2.7x (no join) to 30x numpy's time over the same data
(docs/store.md, "Per-neuron statistics"). ``neuron_stats`` computes the common statistics the way numpy does:
it streams each hook's Delta partition as Arrow batches, views each batch's vectors as ``[rows, width]``
without a copy, and adds them into per-group accumulators. Memory: one batch plus ``[groups, width]``
accumulators, whatever the number of examples. Quantiles need every value of a neuron at once: they are
taken over neuron slices whose ``[rows, neurons]`` block fits ``memory_bytes``; when there are several, the
hook is decoded once and its slices spilled to temporary files (more examples: more disk, not more memory).

In SQL (every session, the CLI's ``hookpoints sql`` included) it is a table macro (store/neuron_surface.py)::

    SELECT * FROM neuron_stats('text_decoder.layers.0.%', group_by := 'language', stats := 'avg, median')

The session finds each call in the statement's parse tree before running it, computes it here, and registers
the result under the name the macro reads (``query_table``), so the rest of the statement (joins, filters,
ORDER BY) is plain DuckDB over a small table.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from hookpoints.errors import UserError

#: Arguments of ``neuron_stats`` after the hook pattern, in the order the macro hashes them.
ARGUMENTS = ("group_by", "stats", "run", "examples_where")
MOMENTS = ("count", "sum", "avg", "stddev", "variance", "min", "max")
DEFAULT_STATS = "count, avg, stddev, min, max"
_PERCENTILE = re.compile(r"^p(\d{1,2}(\.\d+)?|100)$")
_BATCH_ROWS = 1024
#: Arrow's scan reads ahead this many files and batches (its defaults, 4 and 16, hold up to 64 batches).
READAHEAD = {"fragment_readahead": 1, "batch_readahead": 2}


@dataclass(frozen=True)
class StatSpec:
    """The statistics asked for: moments (one pass) and percentiles (neuron-slice passes)."""

    moments: tuple[str, ...]
    percentiles: tuple[tuple[str, float], ...]  # (column name, q in [0, 1])

    @classmethod
    def parse(cls, text: str) -> StatSpec:
        names = [name.strip().lower() for name in (text or DEFAULT_STATS).split(",") if name.strip()]
        moments, percentiles = [], []
        for name in names:
            if name in ("mean", "avg"):
                moments.append("avg")
            elif name in MOMENTS:
                moments.append(name)
            elif name == "median":
                percentiles.append(("median", 0.5))
            elif _PERCENTILE.match(name):
                percentiles.append((name, float(name[1:]) / 100))
            else:
                raise UserError(
                    f"neuron_stats: unknown statistic {name!r}; use {', '.join(MOMENTS)}, median or pNN "
                    "(a percentile, e.g. p5, p99.9), comma-separated"
                )
        if not names:
            raise UserError(f"neuron_stats: stats is empty; give e.g. '{DEFAULT_STATS}'")
        return cls(tuple(dict.fromkeys(moments)), tuple(dict.fromkeys(percentiles)))


def neuron_stats(
    session,
    hooks: str,
    *,
    group_by: str = "",
    stats: str = "",
    run: str = "",
    examples_where: str = "",
    memory_bytes: int = 256 * 2**20,
) -> pa.Table:
    """Per (run, hook, group, neuron) statistics over the stored rows of the hooks matching ``hooks``.

    ``hooks``: a hook name (exactly) or a SQL LIKE pattern (``'text_decoder.layers.0.%'``); ``group_by``: examples
    columns, comma-separated; ``stats``: any of count, sum, avg, stddev (sample), variance (sample), min, max,
    median, pNN (linear interpolation, as DuckDB's ``quantile_cont``); ``run``: one run (default: every run
    holding a matching hook); ``examples_where``: a predicate over the examples' columns. The same numbers as
    ``SELECT ... avg(value) ... FROM neurons JOIN examples USING (run, example_id) GROUP BY ALL``.

    >>> with store.query() as session:  # doctest: +SKIP
    ...     table = neuron_stats(session, "encoder.layers.3.%", group_by="language", stats="avg, median")
    """
    spec = StatSpec.parse(stats)
    if memory_bytes < 4096:
        raise UserError(f"neuron_stats: memory_bytes {memory_bytes} is too small; give at least 4096")
    columns = _group_columns(session, group_by)
    where = _checked_predicate(session, examples_where)
    targets = session.sql(
        "SELECT run, hook, width FROM hooks WHERE hook LIKE $hooks AND ($run = '' OR run = $run) ORDER BY run, hook",
        {"hooks": hooks, "run": run},
    ).to_pylist()
    if any(row["hook"] == hooks for row in targets):  # an exact name: not a pattern ('_' is a LIKE wildcard)
        targets = [row for row in targets if row["hook"] == hooks]
    if not targets:
        scope = f"run {run!r}" if run else "any run"
        raise UserError(
            f"neuron_stats: no hook of {scope} matches {hooks!r} (a hook name or LIKE pattern, '%' for any)"
        )
    parts = []
    for run_name in dict.fromkeys(row["run"] for row in targets):
        groups = _example_groups(session, run_name, columns, where)
        for row in (r for r in targets if r["run"] == run_name):
            with np.errstate(invalid="ignore"):  # NaN and inf give NaN as in numpy, without a RuntimeWarning
                part = _hook_stats(session, row["run"], row["hook"], int(row["width"]), groups, spec, memory_bytes)
            parts.append(part)
    return _assemble(parts, columns, spec)


@dataclass(frozen=True)
class _Groups:
    ids: pa.Array  # [examples] example_id of each chosen example
    group: np.ndarray  # [examples] group index of each
    labels: pa.Table  # [groups] the group_by values of each group


def _group_columns(session, group_by: str) -> list[str]:
    names = [name.strip() for name in (group_by or "").split(",") if name.strip()]
    known = session.sql("SELECT * FROM examples LIMIT 0").column_names
    for name in names:
        if name not in known or name in ("run", "example_id"):
            shown = ", ".join(c for c in known if c not in ("run", "example_id"))
            raise UserError(f"neuron_stats: group_by {name!r} is not a column of the examples; they have {shown}")
    return list(dict.fromkeys(names))


def _checked_predicate(session, where: str) -> str:
    """``where`` as DuckDB renders its parse tree, in parentheses: one expression whatever its text does with
    parentheses (``a) OR (b`` would otherwise escape the ``run = ...  AND (...)`` it is put into and choose
    examples of every run) or comments (a trailing ``-- note`` would swallow the closing parenthesis)."""
    where = (where or "").strip()
    if not where:
        return "TRUE"
    text = f"SELECT 1 FROM examples WHERE ({where}\n)"
    tree = json.loads(session.con.execute("SELECT json_serialize_sql($q)", {"q": text}).fetchall()[0][0])
    statements = tree.get("statements", [])
    node = statements[0]["node"] if len(statements) == 1 else {}
    extra = ("modifiers", "group_expressions", "having", "qualify", "sample")
    if tree.get("error") or node.get("type") != "SELECT_NODE" or any(node.get(part) for part in extra):
        raise UserError(
            f"neuron_stats: examples_where {where!r} is not one boolean SQL expression, e.g. \"language = 'de'\""
        )
    rendered = session.con.execute("SELECT json_deserialize_sql($t)", {"t": json.dumps(tree)}).fetchall()[0][0]
    checked = f"({rendered.split(' WHERE ', 1)[1]})"  # after "SELECT 1 FROM examples"
    try:  # bound once here, so an unknown column names the argument to fix
        session.sql(f"SELECT 1 FROM examples WHERE {checked} LIMIT 0")
    except UserError as error:
        raise UserError(f"neuron_stats: examples_where {where!r} does not work on the examples: {error}") from None
    return checked


def _example_groups(session, run: str, columns: list[str], where: str) -> _Groups:
    """The chosen examples and their group: one per distinct ``columns`` value, NULL included (as GROUP BY)."""
    if not columns:
        table = session.sql(f"SELECT example_id FROM examples WHERE run = $run AND {where}", {"run": run})
        return _Groups(table["example_id"], np.zeros(table.num_rows, np.int64), pa.table({"_": [0]}).drop(["_"]))
    selected = ", ".join(f'"{c}"' for c in columns)
    order = ", ".join(f'"{c}" ASC NULLS LAST' for c in columns)  # NULLs are peers: one group, as in GROUP BY
    table = session.sql(
        f"SELECT example_id, {selected}, dense_rank() OVER (ORDER BY {order}) - 1 AS _g FROM examples "
        f"WHERE run = $run AND {where}",
        {"run": run},
    )
    group = table["_g"].to_numpy().astype(np.int64)  # [examples]
    _, first = np.unique(group, return_index=True)  # [groups] a row of each group, in group order
    return _Groups(table["example_id"], group, table.select(columns).take(pa.array(first)))


def _batches(session, run: str, hook: str, width: int, *, decode: bool = True):
    """The hook's rows as ``(example_id, [rows, width] float32)`` batches from the session's snapshot.

    ``decode=False``: only the example ids (``None`` for the matrix), to count rows without decoding. A vector
    of another length than ``width`` is a UserError (reshaped, a 15 and a 17 would pass as two of 16).
    """
    import pyarrow.compute as pc  # 40 ms to import: only for neuron_stats, not every session
    from hookpoints.store import vectors

    dataset = session.dataset("activations")
    names = set(dataset.schema.names)
    columns = vectors.present(names) if decode else []
    scan = dataset.to_batches(
        columns=["example_id", *columns],
        filter=(pc.field("run") == run) & (pc.field("hook") == hook),
        batch_size=_BATCH_ROWS,
        **READAHEAD,
    )
    for batch in scan:
        if getattr(session, "_timed_out", False):  # the session's deadline passed (QuerySession.deadline)
            raise UserError(
                "the query ran past its timeout and was stopped in neuron_stats: narrow it (one hook, run := ...) "
                "or give a longer --timeout"
            )
        if batch.num_rows == 0:
            continue
        if not decode:
            yield batch.column("example_id"), None
            continue
        try:
            x = vectors.matrix(batch, width, run=run, hook=hook)  # [rows, width]
        except UserError as error:
            raise UserError(f"neuron_stats: {error}") from None
        yield batch.column("example_id"), x.astype(np.float32, copy=False)


def _hook_stats(session, run, hook, width, groups: _Groups, spec: StatSpec, memory_bytes: int) -> dict:
    n_groups = len(groups.labels)
    count = np.zeros(n_groups, np.int64)
    shift = np.full((n_groups, width), np.nan)  # per group: its first rows' mean (numerically stable sums)
    s1 = np.zeros((n_groups, width))  # [groups, width] sum of (x - shift)
    s2 = np.zeros((n_groups, width))  # [groups, width] sum of (x - shift)^2
    low = np.full((n_groups, width), np.inf, np.float32)
    high = np.full((n_groups, width), -np.inf, np.float32)
    for ids, x in _batches(session, run, hook, width, decode=bool(spec.moments)):
        if x is None:  # percentiles only: count the rows, the slices read the vectors
            group = _row_groups(ids, groups)
            count += np.bincount(group[group >= 0], minlength=n_groups)
            continue
        group = _row_groups(ids, groups)
        for g in np.unique(group[group >= 0]):
            xs = x[group == g]  # [rows of g, width]
            d = xs.astype(np.float64)
            if count[g] == 0:  # a finite shift: an inf in the first batch must give inf (as numpy), not inf - inf
                first = d.mean(axis=0)
                shift[g] = np.where(np.isfinite(first), first, 0.0)
            d -= shift[g]
            s1[g] += d.sum(axis=0)
            s2[g] += np.einsum("ij,ij->j", d, d)
            np.minimum(low[g], xs.min(axis=0), out=low[g])
            np.maximum(high[g], xs.max(axis=0), out=high[g])
            count[g] += xs.shape[0]
    kept = count > 0
    out = {"run": run, "hook": hook, "width": width, "groups": np.flatnonzero(kept), "labels": groups.labels}
    out["single"] = count[kept] < 2  # [groups kept] sample variance and stddev NULL there, as DuckDB's
    n = count[kept, None].astype(np.float64)
    mean_shifted = s1[kept] / n
    variance = (s2[kept] - s1[kept] * mean_shifted) / np.maximum(n - 1, 1)
    variance = np.where(n > 1, np.maximum(variance, 0), np.nan)
    values = {
        "count": np.broadcast_to(count[kept, None], (int(kept.sum()), width)),
        "sum": s1[kept] + shift[kept] * n,
        "avg": mean_shifted + shift[kept],
        "variance": variance,
        "stddev": np.sqrt(variance),
        "min": low[kept].astype(np.float64),
        "max": high[kept].astype(np.float64),
    }
    out["values"] = {name: values[name] for name in spec.moments}
    if spec.percentiles:
        out["values"].update(_percentiles(session, run, hook, width, groups, spec, count, kept, memory_bytes))
    return out


def _row_groups(ids: pa.Array, groups: _Groups) -> np.ndarray:
    """``[rows]`` group of each row's example, -1 for examples not chosen."""
    import pyarrow.compute as pc

    index = pc.index_in(ids, value_set=groups.ids).to_numpy(zero_copy_only=False)  # float with NaN for nulls
    found = ~np.isnan(index)
    group = np.full(len(ids), -1, np.int64)
    group[found] = groups.group[index[found].astype(np.int64)]
    return group


def _percentiles(session, run, hook, width, groups: _Groups, spec, count, kept, memory_bytes) -> dict:
    """Percentiles per group and neuron, over neuron slices whose block fits ``memory_bytes``."""
    rows = int(count.sum())
    step = max(1, min(width, memory_bytes // (12 * max(rows, 1))))  # float32 block + a group's float64 copy
    slices = [(j0, min(width, j0 + step)) for j0 in range(0, width, step)]
    qs = np.array([q for _, q in spec.percentiles])
    result = np.empty((len(qs), int(kept.sum()), width))  # [percentiles, groups kept, width]
    with tempfile.TemporaryDirectory(prefix="hookpoints-neuron-stats-") as folder:
        blocks = _slice_blocks(session, run, hook, groups, slices, rows, Path(folder))
        for (j0, j1), (block, group) in zip(slices, blocks, strict=True):
            for k, g in enumerate(np.flatnonzero(kept)):
                result[:, k, j0:j1] = np.quantile(block[group == g].astype(np.float64), qs, axis=0)
    return {name: result[i] for i, (name, _) in enumerate(spec.percentiles)}


def _slice_blocks(session, run, hook, groups: _Groups, slices, rows: int, folder: Path):
    """Each slice's ``([rows, neurons] float32, [rows] group)``, the hook decoded once.

    One slice: filled in memory. Several: each batch's slices are appended to one file per slice in the
    temporary ``folder`` (the hook's float32 values once, e.g. 1.3 GB for 8,192 x 40,000), read back one at
    a time: one decode instead of one per slice.
    """
    spill = len(slices) > 1
    files = [open(folder / f"{k}.f32", "wb") for k in range(len(slices))] if spill else []  # noqa: SIM115
    block = None if spill else np.empty((rows, slices[0][1] - slices[0][0]), np.float32)  # [rows, neurons]
    group_of_row = np.empty(rows, np.int64)
    filled = 0
    try:
        for ids, x in _batches(session, run, hook, slices[-1][1]):
            group = _row_groups(ids, groups)
            keep = group >= 0
            n = int(keep.sum())
            if filled + n > rows:
                raise UserError(f"neuron_stats: hook {hook} of run {run!r} changed while read; run the query again")
            group_of_row[filled : filled + n] = group[keep]
            chosen = x if n == len(x) else x[keep]  # [kept rows, width]
            if spill:
                for file, (j0, j1) in zip(files, slices, strict=True):
                    file.write(np.ascontiguousarray(chosen[:, j0:j1]).tobytes())
            else:
                block[filled : filled + n] = chosen[:, slices[0][0] : slices[0][1]]
            filled += n
    finally:
        for file in files:
            file.close()
    if filled != rows:
        raise UserError(f"neuron_stats: hook {hook} of run {run!r} changed while read; run the query again")
    if not spill:
        yield block, group_of_row
        return
    for k, (j0, j1) in enumerate(slices):
        yield np.fromfile(folder / f"{k}.f32", np.float32).reshape(rows, j1 - j0), group_of_row
        (folder / f"{k}.f32").unlink()


def _assemble(parts: list[dict], columns: list[str], spec: StatSpec) -> pa.Table:
    """One row per (run, hook, group, neuron): run, hook, the group_by columns, neuron, the statistics."""
    names = [*spec.moments, *(name for name, _ in spec.percentiles)]
    chunks = []
    for part in parts:
        groups, width = part["groups"], part["width"]
        rows = len(groups) * width
        data = {
            "run": pa.array([part["run"]] * rows, pa.string()),
            "hook": pa.array([part["hook"]] * rows, pa.string()),
            **{c: part["labels"][c].take(pa.array(np.repeat(groups, width))) for c in columns},
            "neuron": pa.array(np.tile(np.arange(width, dtype=np.int32), len(groups))),
        }
        for name in names:
            values = np.ascontiguousarray(part["values"][name]).ravel()
            null = np.repeat(part["single"], width) if name in ("variance", "stddev") else None
            data[name] = pa.array(values.astype(np.int64) if name == "count" else values, mask=null)
        chunks.append(pa.table(data))
    return pa.concat_tables(chunks)
