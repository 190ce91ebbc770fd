"""Exact, fast average precision (AP) for ranking neurons against label sets.

AP of neuron j against binary labels y is ``sklearn.metrics.average_precision_score(y, s_j)``
(tied scores form one threshold). Written per positive example i::

    AP = (1/P) * sum_{i positive} TP(>= s_i) / N(>= s_i)

where TP(>= t) / N(>= t) count positives / all examples scoring at least t. Both counts are
"max ranks": the position of the last example tied with i in descending order, counted over
the positives (TP) or over every example (N).

How the kernel gets every label set from one sort per neuron:

* Each neuron's scores are sorted once, as packed int64 keys ``(order-preserving score bits
  << b) | example`` (numpy's SIMD sort; 2-3x faster than ``argsort``).
* Label sets are grouped into *families* of pairwise disjoint example sets (a partition such
  as the languages, the modalities or the language x modality cells, each a class). A stable
  radix argsort of the small-int class ids, taken in score order, lays every class out as a
  contiguous segment in descending score order. In that frame the k-th member of class c has
  TP = k (its within-class rank) and N = 1 + its position in the global order, which the
  argsort returns. So every class of a family gets its AP in O(examples) per neuron, however
  many classes there are.
* "among" subsets (AP over a subset of the examples, e.g. German vs other languages among
  speech only) are a second family: the denominator N becomes the rank within the subset,
  scattered back from that family's frame. Examples outside the subset just drop out.
* Ties: on rows that have any, ranks are replaced by max ranks (end of the tie run) with one
  reverse ``minimum.accumulate``; untied rows skip that work.

Neurons are processed in blocks of rows (``block`` neurons x examples), two threads by default;
numpy releases the GIL in the sort, the gathers and the ufuncs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LabelSetPlan",
    "average_precision",
    "average_precision_many",
    "neuron_chunk_size",
]

DEFAULT_BLOCK = 32  # neurons per work unit; ~10-15 MB of int64 scratch per thread at 12k examples
_WORK_BYTES_PER_CELL = 112  # measured peak scratch per (neuron, example) of one block, 4 families


class _NonFinite(Exception):
    """Raised inside a worker; the caller turns it into a ValueError with a full report."""


@dataclass(frozen=True)
class _Family:
    """Disjoint example sets laid out as classes; class ``n_classes`` is 'in none of them'."""

    labels: np.ndarray  # [examples] small int class id
    n_classes: int
    seg_start: np.ndarray  # [examples] int64, start of the segment each grouped position is in
    ordinal: np.ndarray  # [examples] float64, 1-based rank within its class at each grouped position
    seg_break: np.ndarray  # [examples - 1] bool, grouped position k + 1 starts a new segment
    reduce_idx: np.ndarray  # [n_classes or n_classes + 1] segment starts for np.add.reduceat


def _make_family(sets: list[np.ndarray], n: int) -> _Family:
    k = len(sets)
    dtype = np.int8 if k < 127 else np.int16 if k < 32767 else np.int32
    labels = np.full(n, k, dtype=dtype)
    for c, s in enumerate(sets):
        labels[s] = c
    counts = np.bincount(labels, minlength=k + 1)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [k + 2]
    seg_start = np.repeat(starts[:-1], counts)
    ordinal = (np.arange(n) - seg_start + 1).astype(np.float64)
    seg_break = np.zeros(max(n - 1, 0), dtype=bool)
    inner = starts[1 : k + 1]
    seg_break[inner[inner < n] - 1] = True
    reduce_idx = starts[: k + 1] if counts[k] else starts[:k]
    return _Family(labels, k, seg_start, ordinal, seg_break, reduce_idx)


def _as_bool_matrix(a, name: str, n: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [sets, examples]; got an array of shape {a.shape}")
    if a.shape[1] != n:
        raise ValueError(
            f"{name} has {a.shape[1]} examples per set but scores have {n} examples (rows); "
            "pass one entry per example"
        )
    if a.dtype != bool:
        if not (np.issubdtype(a.dtype, np.integer) and np.isin(a, (0, 1)).all()):
            raise ValueError(f"{name} must be bool (or 0/1 integers); got dtype {a.dtype}")
        a = a.astype(bool)
    return a


class LabelSetPlan:
    """Label sets (optionally each restricted to an "among" subset) prepared for fast AP.

    Build once, then call :meth:`score` on each neuron chunk: the structure (families of
    disjoint sets, segment layouts) is worked out here, not per chunk.

    label_sets: ``[sets, examples]`` bool, True = positive.
    among: ``[sets, examples]`` bool or None; AP of set s is computed over the examples with
        ``among[s]`` True only (positives outside it are ignored). None = all examples.
    """

    def __init__(self, label_sets, among=None, *, n_examples: int | None = None):
        ls = np.asarray(label_sets)
        n = ls.shape[-1] if n_examples is None else n_examples
        ls = _as_bool_matrix(ls, "label_sets", n)
        n_sets = ls.shape[0]
        if among is None:
            am = None
        else:
            am = _as_bool_matrix(among, "among", n)
            if am.shape[0] == 1 and n_sets > 1:
                am = np.broadcast_to(am, ls.shape)
            if am.shape[0] != n_sets:
                raise ValueError(
                    f"among has {am.shape[0]} sets but label_sets has {n_sets}; pass one mask per set"
                )
        self.n_examples = n
        self.n_sets = n_sets

        pos = ls if am is None else ls & am  # [sets, examples]
        for s in range(n_sets):
            n_pos = int(pos[s].sum())
            n_in = n if am is None else int(am[s].sum())
            where = f"label set {s}" if n_sets > 1 else "labels"
            scope = "" if am is None else f" among the {n_in} examples of its 'among' mask"
            if n_pos == 0:
                raise ValueError(
                    f"{where} has no positive examples{scope}; AP is undefined - give it >= 1 True"
                )
            if n_pos == n_in:
                raise ValueError(
                    f"{where} has no negative examples{scope} (all {n_in} positive); "
                    "AP is undefined - give it >= 1 False"
                )

        # Distinct example sets (positives, then non-trivial among masks), greedily packed
        # into families of pairwise disjoint sets.
        fam_sets: list[list[np.ndarray]] = []
        fam_union: list[np.ndarray] = []
        where_is: dict[bytes, tuple[int, int]] = {}

        def place(s: np.ndarray) -> tuple[int, int]:
            key = np.packbits(s).tobytes()
            if key not in where_is:
                for f, u in enumerate(fam_union):
                    if not (u & s).any():
                        fam_sets[f].append(s)
                        u |= s
                        where_is[key] = (f, len(fam_sets[f]) - 1)
                        break
                else:
                    fam_sets.append([s])
                    fam_union.append(s.copy())
                    where_is[key] = (len(fam_sets) - 1, 0)
            return where_is[key]

        p_of = [place(pos[s]) for s in range(n_sets)]
        q_of = [-1 if am is None or am[s].all() else place(am[s])[0] for s in range(n_sets)]

        self._families = [_make_family(sets, n) for sets in fam_sets]
        pairs: dict[tuple[int, int], int] = {}
        set_pair = np.empty(n_sets, dtype=np.int64)
        for s in range(n_sets):
            set_pair[s] = pairs.setdefault((p_of[s][0], q_of[s]), len(pairs))
        self._pairs = list(pairs)  # [(P family, Q family or -1 for all examples)]
        self._set_pair = set_pair
        self._set_class = np.array([c for _, c in p_of], dtype=np.int64)
        self._inv_npos = 1.0 / pos.sum(axis=1).astype(np.float64)  # [sets]
        self._q_fams = sorted({q for _, q in self._pairs if q >= 0})
        self._p_fams = sorted({p for p, _ in self._pairs})
        self._bits = max(1, (n - 1).bit_length())

    @property
    def n_families(self) -> int:
        """Number of families of disjoint sets (one radix argsort each per neuron)."""
        return len(self._families)

    @property
    def n_pairs(self) -> int:
        """Number of (positive family, among family) pairs (one reduction each per neuron)."""
        return len(self._pairs)

    def score(self, scores, *, threads: int | None = None, block: int = DEFAULT_BLOCK) -> np.ndarray:
        """AP of every neuron column of ``scores`` ``[examples, neurons]`` for every label set.

        Returns float64 ``[sets, neurons]``. Fastest when the neuron columns are contiguous
        (``scores`` Fortran-ordered, i.e. ``neuron_major.T``); any layout works.
        """
        x = np.asarray(scores)
        if x.ndim != 2:
            raise ValueError(f"scores must be 2-D [examples, neurons]; got shape {x.shape}")
        if x.shape[0] != self.n_examples:
            raise ValueError(
                f"scores have {x.shape[0]} examples (rows) but the labels have {self.n_examples}; "
                "pass scores as [examples, neurons]"
            )
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
            raise ValueError(f"scores must be a real numeric array; got dtype {x.dtype}")
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32 if x.dtype.itemsize <= 2 else np.float64)
        n_neurons = x.shape[1]
        out = np.empty((self.n_sets, n_neurons), dtype=np.float64)  # [sets, neurons]
        if n_neurons == 0:
            return out
        xt = x.T  # [neurons, examples] view
        starts = range(0, n_neurons, block)
        threads = _default_threads() if threads is None else max(1, int(threads))

        def work(j0: int) -> None:
            j1 = min(j0 + block, n_neurons)
            out[:, j0:j1] = self._score_block(xt[j0:j1])

        try:
            if threads == 1 or len(starts) == 1:
                for j0 in starts:
                    work(j0)
            else:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    for f in [pool.submit(work, j0) for j0 in starts]:
                        f.result()
        except _NonFinite:
            bad = ~np.isfinite(x)
            cols = np.flatnonzero(bad.any(axis=0))
            shown = ", ".join(map(str, cols[:10])) + (", ..." if len(cols) > 10 else "")
            raise ValueError(
                f"scores contain {int(bad.sum())} NaN/inf values in {len(cols)} neuron columns "
                f"[{shown}]; drop or impute those neurons first"
            ) from None
        return out

    # -- kernel -------------------------------------------------------------------------------

    def _sort_rows(self, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sort each row of ``xb`` ``[m, examples]`` descending.

        Returns (idx, same): idx ``[m, examples]`` int64 example index at each sorted position,
        same ``[m, examples - 1]`` bool, position p ties with p + 1.
        """
        m, n = xb.shape
        f32 = np.empty((m, n), dtype=np.float32)
        if xb.dtype == np.float32:
            np.add(xb, np.float32(0.0), out=f32)  # -0.0 -> +0.0 (they tie); contiguous copy
            exact = True
        else:
            np.add(xb, 0.0, out=f32, casting="same_kind")
            exact = bool(np.equal(f32, xb).all())  # float64 that is exactly float32 takes the fast path
        if not np.isfinite(f32).all() or (not exact and not np.isfinite(xb).all()):
            raise _NonFinite
        if exact:
            bits = self._bits
            i = f32.view(np.int32)
            o = np.right_shift(i, 31)
            o &= np.int32(0x7FFFFFFF)
            o ^= i  # int32 with the same order as the floats
            np.invert(o, out=o)  # descending
            keys = o.astype(np.int64)
            keys <<= bits
            keys |= np.arange(n, dtype=np.int64)
            keys.sort(axis=1)
            idx = keys & ((1 << bits) - 1)
            keys >>= bits
            same = keys[:, 1:] == keys[:, :-1]
            return idx, same
        # float64 values that float32 would round: argsort the order-preserving int64 bits.
        x64 = np.add(xb, 0.0)
        i = x64.view(np.int64)
        o = np.right_shift(i, 63)
        o &= np.int64(0x7FFFFFFFFFFFFFFF)
        o ^= i
        np.invert(o, out=o)
        idx = np.argsort(o, axis=1)
        o = np.take_along_axis(o, idx, axis=1)
        return idx, o[:, 1:] == o[:, :-1]

    def _score_block(self, xb: np.ndarray) -> np.ndarray:
        """AP ``[sets, m]`` for a block of neuron rows ``xb`` ``[m, examples]``."""
        idx, same = self._sort_rows(xb)
        tied = same.any(axis=1)  # [m]
        if not tied.any():
            sums = self._pair_sums(idx, None)
        else:
            gpos = _run_ends(~same)  # [m, examples] sorted position ending each tie run
            if tied.all():
                sums = self._pair_sums(idx, gpos)
            else:
                t_rows, u_rows = np.flatnonzero(tied), np.flatnonzero(~tied)
                st = self._pair_sums(idx[t_rows], np.ascontiguousarray(gpos[t_rows]))
                su = self._pair_sums(idx[u_rows], None)
                sums = []
                for a, b in zip(st, su, strict=True):
                    full = np.empty((idx.shape[0], a.shape[1]))
                    full[t_rows], full[u_rows] = a, b
                    sums.append(full)
        res = np.empty((self.n_sets, idx.shape[0]))
        for s in range(self.n_sets):
            res[s] = sums[self._set_pair[s]][:, self._set_class[s]] * self._inv_npos[s]
        return res

    def _frame(self, fam: _Family, idx: np.ndarray, gpos: np.ndarray | None):
        """Class-grouped frame of a family for rows of sorted example indices ``idx``.

        Returns (g, num, den_all): g ``[m, examples]`` sorted position of each grouped slot;
        num within-class max rank there (float64, a broadcast ``[examples]`` row when untied);
        den_all rank among all examples there (float64).
        """
        labs = np.take(fam.labels, idx)  # [m, examples] class of each sorted position
        g = np.argsort(labs, axis=1, kind="stable")  # radix sort: classes in score order
        den_all = np.empty(g.shape)
        if gpos is None:
            np.add(g, 1.0, out=den_all)
            return g, fam.ordinal, den_all
        m, n = g.shape
        key = np.empty_like(g)  # global tie-run end of each grouped slot
        for j in range(m):
            np.take(gpos[j], g[j], out=key[j])
        np.add(key, 1.0, out=den_all)
        brk = key[:, 1:] != key[:, :-1]
        brk |= fam.seg_break  # [m, examples - 1] slot k ends a run (value or class changes)
        end = _run_ends(brk)  # last slot of each run
        end -= fam.seg_start
        return g, np.add(end, 1.0), den_all

    def _pair_sums(self, idx: np.ndarray, gpos: np.ndarray | None) -> list[np.ndarray]:
        """For each (P, Q) pair: ``[m, classes of P]`` sums of TP/N over each class's members."""
        m, n = idx.shape
        p_fams = set(self._p_fams)
        frames = {}
        rank_q = {}
        for f in self._q_fams:  # rank within each among-class, at each sorted position
            fr = self._frame(self._families[f], idx, gpos)
            if f in p_fams:
                frames[f] = fr
            g, num = fr[0], np.broadcast_to(fr[1], (m, n))
            r = np.empty((m, n))
            for j in range(m):
                r[j, g[j]] = num[j]
            rank_q[f] = r
        sums: list[np.ndarray] = [np.empty(0)] * len(self._pairs)
        for p in self._p_fams:
            fam = self._families[p]
            g, num, den_all = frames.pop(p) if p in frames else self._frame(fam, idx, gpos)
            for k, (pp, q) in enumerate(self._pairs):
                if pp != p:
                    continue
                if q < 0:  # among all examples; pairs are unique, so den_all is free to overwrite
                    ratio = np.divide(num, den_all, out=den_all)
                else:
                    ratio = np.empty((m, n))
                    rq = rank_q[q]
                    for j in range(m):
                        np.take(rq[j], g[j], out=ratio[j])
                    np.divide(num, ratio, out=ratio)
                sums[k] = np.add.reduceat(ratio, fam.reduce_idx, axis=1)[:, : fam.n_classes]
        return sums


def _run_ends(brk: np.ndarray) -> np.ndarray:
    """Last position of the run each position is in, ``[m, n]`` int64.

    brk: ``[m, n - 1]`` bool, True where position p ends a run (p + 1 starts a new one).
    """
    m, n1 = brk.shape
    end = np.empty((m, n1 + 1), dtype=np.int64)
    end[:, ::-1] = np.arange(n1 + 1)  # reversed, so the accumulate below reads forward
    np.copyto(end[:, 1:], n1, where=~brk[:, ::-1])
    np.minimum.accumulate(end, axis=1, out=end)
    return end[:, ::-1]


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def average_precision_many(
    scores, label_sets, among=None, *, threads: int | None = None, block: int = DEFAULT_BLOCK
) -> np.ndarray:
    """AP of every neuron for every label set, sorting each neuron once.

    scores: ``[examples, neurons]`` float32/float64 (a chunk of neurons is fine).
    label_sets: ``[sets, examples]`` bool. among: ``[sets, examples]`` bool or None, the
    examples each set's AP is computed over. Returns float64 ``[sets, neurons]``, equal to
    ``sklearn.metrics.average_precision_score(label_sets[s][among[s]], scores[among[s], j])``.
    For many chunks, build a :class:`LabelSetPlan` once and call its ``score``.
    """
    x = np.asarray(scores)
    n = x.shape[0] if x.ndim == 2 else None
    return LabelSetPlan(label_sets, among, n_examples=n).score(x, threads=threads, block=block)


def average_precision(scores, labels, *, threads: int | None = None) -> np.ndarray:
    """AP of each neuron column of ``scores`` ``[examples, neurons]`` against ``labels`` ``[examples]``.

    Returns float64 ``[neurons]`` equal to sklearn's ``average_precision_score`` per column.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [examples]; got shape {labels.shape}")
    return average_precision_many(scores, labels[None, :], threads=threads)[0]


def neuron_chunk_size(
    n_examples: int,
    memory_bytes: int,
    *,
    n_sets: int = 32,
    itemsize: int = 4,
    threads: int | None = None,
    block: int = DEFAULT_BLOCK,
    copies: int = 2,
) -> int:
    """Neuron columns per chunk so one chunk's working set fits in ``memory_bytes``.

    Counts ``copies`` copies of the input chunk (e.g. the Arrow buffer and the numpy array),
    the float64 ``[sets, chunk]`` result and the kernel's per-thread scratch. Returns a
    multiple of ``block`` (at least ``block``).
    """
    threads = _default_threads() if threads is None else threads
    scratch = threads * block * n_examples * _WORK_BYTES_PER_CELL
    per_neuron = copies * n_examples * itemsize + 8 * n_sets
    cols = (memory_bytes - scratch) // per_neuron
    return int(max(block, cols // block * block))
