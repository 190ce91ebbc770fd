"""Exact, fast average precision (AP) for ranking neurons against label sets.

AP of neuron j against binary labels y is ``sklearn.metrics.average_precision_score(y, s_j)``
(tied scores form one threshold). Written per positive example i::

    AP = (1/P) * sum_{i positive} TP(>= s_i) / N(>= s_i)

where TP(>= t) and N(>= t) count the positives and all examples scoring at least t. With an
"among" mask (AP over a subset of the examples, e.g. German vs the other languages among
speech examples only) N counts the subset only; examples outside it drop out.

Every label set is scored from one sort per neuron:

* Label sets are packed into *families* of pairwise disjoint example sets (a partition such as
  the languages, the modalities or the language x modality cells; each set is a class). A
  label set is a (positive class of family P, among class of family Q or "all") pair.
* numba backend (default when numba is importable): each neuron's scores become int64 keys
  ``(order-preserving score bits << b) | atom``, where the atom says which class of every family
  the example is in; numpy's SIMD sort orders them; one pass over the sorted keys keeps a
  counter per class (TP and N are counters) and adds TP/N into one accumulator per
  (pair, class). A tie run is counted first and scored after, which gives sklearn's ties;
  its examples are scored once per atom, times their number (as sklearn does per threshold).
  Cost per (neuron, example) on one Zen 3 core: ~10 ns sort + ~12 ns counter pass for the
  paper's 32 label sets (3 families, 4 pairs), independent of how many classes a family has.
* numpy backend (fallback): the same sort, then per family a stable radix argsort of the class
  ids in score order lays each class out as a segment in descending order, where the k-th
  member has TP = k and N = 1 + its sorted position; ~3x slower than numba.

Neurons are processed in blocks of rows by worker threads (numpy's sort and the numba kernels
release the GIL).
"""

from __future__ import annotations

import functools
import itertools
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

DEFAULT_BLOCK = 16  # neurons per work unit
# Peak scratch per (neuron of a block, example), measured with tracemalloc at 12k examples and
# the 32-set benchmark plan: numba = int64 keys + float32 copy; numpy = about a dozen
# [block, examples] temporaries.
_SCRATCH_BYTES = {"numba": 12, "numpy": 120}


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
            f"{name} has {a.shape[1]} examples per set but scores have {n} examples (rows); pass one entry per example"
        )
    if a.dtype != bool:
        if not (np.issubdtype(a.dtype, np.integer) and np.isin(a, (0, 1)).all()):
            raise ValueError(f"{name} must be bool (or 0/1 integers); got dtype {a.dtype}")
        a = a.astype(bool)
    return a


class LabelSetPlan:
    """Label sets (each optionally restricted to an "among" subset) prepared for fast AP.

    Build once, then call :meth:`score` on each neuron chunk; the structure (families of
    disjoint sets, counter tables) is worked out here, not per chunk.

    label_sets: ``[sets, examples]`` bool, True = positive.
    among: ``[sets, examples]`` bool (or one ``[examples]`` mask for all sets) or None; AP of
        set s is computed over the examples with ``among[s]`` True only (positives outside
        it are ignored). None = all examples.
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
                raise ValueError(f"among has {am.shape[0]} sets but label_sets has {n_sets}; pass one mask per set")
        self.n_examples = n
        self.n_sets = n_sets

        pos = ls if am is None else ls & am  # [sets, examples]
        for s in range(n_sets):
            n_pos = int(pos[s].sum())
            n_in = n if am is None else int(am[s].sum())
            where = f"label set {s}" if n_sets > 1 else "labels"
            scope = "" if am is None else f" among the {n_in} examples of its 'among' mask"
            if n_pos == 0:
                raise ValueError(f"{where} has no positive examples{scope}; AP is undefined - give it >= 1 True")
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

        fams = [_make_family(sets, n) for sets in fam_sets]
        self._families = fams
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

        # Counter tables for the numba backend. An atom is a set of examples in the same class
        # of every family; the sort key carries the atom, the tables map it to counter slots.
        labs = np.stack([f.labels.astype(np.int64) for f in fams], axis=1)  # [examples, families]
        sig, atom = np.unique(labs, axis=0, return_inverse=True)  # sig [atoms, families]
        self._atom = atom.reshape(-1).astype(np.int64)  # [examples]
        self._abits = max(1, (len(sig) - 1).bit_length())
        cnt_off = np.concatenate([[0], np.cumsum([f.n_classes + 1 for f in fams])])
        self._n_cnt = int(cnt_off[-1])  # N counter slot n_cnt means "all examples"
        acc_off = np.concatenate([[0], np.cumsum([fams[p].n_classes + 1 for p, _ in self._pairs])])
        cols = [sig[:, f] + cnt_off[f] for f in range(len(fams))]
        for k, (p, q) in enumerate(self._pairs):
            cols.append(sig[:, p] + acc_off[k])  # accumulator of the atom's P class
            cols.append(sig[:, p] + cnt_off[p])  # TP counter
            cols.append(sig[:, q] + cnt_off[q] if q >= 0 else np.full(len(sig), self._n_cnt))  # N counter
        self._tab = np.ascontiguousarray(np.stack(cols, axis=1), dtype=np.uint32)  # [atoms, F + 3 pairs]
        self._n_acc = int(acc_off[-1])
        self._set_col = acc_off[set_pair] + self._set_class  # [sets] accumulator of each label set

    @property
    def n_families(self) -> int:
        """Families of disjoint sets (one counter set, or one radix argsort, per neuron each)."""
        return len(self._families)

    @property
    def n_pairs(self) -> int:
        """(positive family, among family) pairs (one TP/N accumulation per neuron each)."""
        return len(self._pairs)

    @property
    def n_atoms(self) -> int:
        """Groups of examples that no label set or among mask tells apart."""
        return int(self._tab.shape[0])

    def score(
        self,
        scores,
        *,
        threads: int | None = None,
        block: int = DEFAULT_BLOCK,
        backend: str = "auto",
    ) -> np.ndarray:
        """AP of every neuron column of ``scores`` ``[examples, neurons]`` for every label set.

        Returns float64 ``[sets, neurons]``. Any memory layout works; neuron-contiguous
        (Fortran-ordered, i.e. ``neuron_major.T``) reads fastest. ``backend`` is "numba",
        "numpy" or "auto" (numba when importable).
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
        kernels = _resolve_backend(backend)
        n, n_neurons = x.shape
        out = np.empty((self.n_sets, n_neurons), dtype=np.float64)  # [sets, neurons]
        if n_neurons == 0:
            return out
        block = max(1, int(block))
        xt = x.T  # [neurons, examples] view
        n_blocks = -(-n_neurons // block)
        next_block = itertools.count().__next__  # atomic under the GIL
        failed: list[BaseException] = []

        def worker() -> None:
            if kernels is not None:
                ws = (
                    np.empty((block, n), dtype=np.float32),
                    np.empty((block, n), dtype=np.int64),
                    np.empty((block, self._n_acc), dtype=np.float64),
                )
            while not failed and (b := next_block()) < n_blocks:
                j0, j1 = b * block, min(n_neurons, (b + 1) * block)
                try:
                    if kernels is not None:
                        out[:, j0:j1] = self._block_numba(xt[j0:j1], ws, kernels)
                    else:
                        out[:, j0:j1] = self._block_numpy(xt[j0:j1])
                except BaseException as e:
                    failed.append(e)
                    raise

        threads = _default_threads() if threads is None else max(1, int(threads))
        with ThreadPoolExecutor(max_workers=min(threads, n_blocks)) as pool:
            futures = [pool.submit(worker) for _ in range(min(threads, n_blocks))]
        if failed:
            if isinstance(failed[0], _NonFinite):
                bad = ~np.isfinite(x)
                cols = np.flatnonzero(bad.any(axis=0))
                shown = ", ".join(map(str, cols[:10])) + (", ..." if len(cols) > 10 else "")
                raise ValueError(
                    f"scores contain {int(bad.sum())} NaN/inf values in {len(cols)} neuron columns "
                    f"[{shown}]; drop or impute those neurons first"
                ) from None
            for f in futures:
                f.result()
        return out

    # -- numba backend --------------------------------------------------------------------------

    def _block_numba(self, src: np.ndarray, ws, kernels) -> np.ndarray:
        """AP ``[sets, m]`` for neuron rows ``src`` ``[m, examples]`` (any strides)."""
        pack, scan = kernels
        m = src.shape[0]
        f32, keys, sums = ws[0][:m], ws[1][:m], ws[2][:m]
        bad, inexact = pack(src, self._atom, self._abits, f32, keys)
        if bad:
            raise _NonFinite
        if inexact:  # float64 values that float32 would round: rank them with a float64 argsort
            i = np.add(src, 0.0).view(np.int64)
            o = np.right_shift(i, 63)
            o &= np.int64(0x7FFFFFFFFFFFFFFF)
            o ^= i
            np.invert(o, out=o)  # descending
            idx = np.argsort(o, axis=1)
            o = np.take_along_axis(o, idx, axis=1)
            keys[:, 0] = 0
            np.cumsum(o[:, 1:] != o[:, :-1], axis=1, out=keys[:, 1:])  # tie-run id, ascending
            keys <<= self._abits
            keys |= self._atom[idx]
        else:
            keys.sort(axis=1)
        scan(keys, self._abits, self._tab, len(self._families), len(self._pairs), self._n_cnt, sums)
        return (sums[:, self._set_col] * self._inv_npos).T

    # -- numpy backend --------------------------------------------------------------------------

    def _sort_rows(self, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sort each row of ``xb`` ``[m, examples]`` descending.

        Returns (idx, same): idx ``[m, examples]`` int64 example index at each sorted position,
        same ``[m, examples - 1]`` bool, position p ties with p + 1.
        """
        m, n = xb.shape
        if not np.isfinite(xb).all():
            raise _NonFinite
        f32 = np.empty((m, n), dtype=np.float32)
        if xb.dtype == np.float32:
            np.add(xb, np.float32(0.0), out=f32)  # -0.0 -> +0.0 (they tie); contiguous copy
            exact = True
        else:
            with np.errstate(over="ignore"):
                np.add(xb, 0.0, out=f32, casting="same_kind")
            exact = bool(np.equal(f32, xb).all())  # float64 that is exactly float32 takes the fast path
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

    def _block_numpy(self, xb: np.ndarray) -> np.ndarray:
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


def _pack_py(src, atom, abits, f32, keys):  # pragma: no cover - compiled by numba
    """Sort keys for rows ``src`` ``[m, examples]``: ``(descending score bits << abits) | atom``.

    Copies ``src`` into the float32 scratch ``f32`` on the way. Returns (non-finite count,
    count of float64 values float32 would round); the keys are only written when both are 0.
    """
    m, n = src.shape
    bad = 0
    inexact = 0
    if src.strides[0] < src.strides[1]:  # neuron axis contiguous: walk examples in the outer loop
        for i in range(n):
            for j in range(m):
                v = src[j, i]
                w = np.float32(v)
                if not np.isfinite(v):
                    bad += 1
                elif w != v:
                    inexact += 1
                f32[j, i] = w
    else:
        for j in range(m):
            for i in range(n):
                v = src[j, i]
                w = np.float32(v)
                if not np.isfinite(v):
                    bad += 1
                elif w != v:
                    inexact += 1
                f32[j, i] = w
    if bad or inexact:
        return bad, inexact
    bits = f32.view(np.int32)
    for j in range(m):
        for i in range(n):
            b = bits[j, i]
            if b == -2147483648:  # -0.0 ties with +0.0
                b = 0
            o = b ^ ((b >> 31) & 0x7FFFFFFF)  # int32 in the order of the floats
            keys[j, i] = (np.int64(~o) << abits) | atom[i]  # ~o: descending
    return bad, inexact


def _scan_py(keys, abits, tab, n_fam, n_pairs, n_cnt, out):  # pragma: no cover - compiled by numba
    """One pass over each row of sorted keys ``[m, examples]``; ``out`` ``[m, acc slots]`` sums of TP/N.

    tab ``[atoms, n_fam + 3 n_pairs]``: the atom's counter slot in each family, then per pair
    its accumulator, TP counter and N counter slots (``n_cnt`` = all examples: no counter).
    """
    m, n = keys.shape
    amask = (np.int64(1) << abits) - 1
    cnt = np.zeros(n_cnt, np.float64)
    acc = np.zeros(out.shape[1], np.float64)
    run_cnt = np.zeros(tab.shape[0], np.float64)  # members of each atom in the current tie run
    run_atoms = np.empty(min(n, tab.shape[0]), np.int64)  # the atoms seen in it
    for j in range(m):
        row = keys[j]
        cnt[:] = 0.0
        acc[:] = 0.0
        p = 0
        while p < n:
            hi = row[p] >> abits
            q = p + 1
            while q < n and (row[q] >> abits) == hi:
                q += 1
            inv_all = 1.0 / q  # N over all examples is the sorted position
            if q == p + 1:  # no tie: count the example, then add its TP(>= s) / N(>= s)
                tr = tab[row[p] & amask]
                for f in range(n_fam):
                    cnt[tr[f]] += 1.0
                for k in range(n_pairs):
                    c = n_fam + 3 * k
                    d = tr[c + 2]
                    if d == n_cnt:
                        acc[tr[c]] += cnt[tr[c + 1]] * inv_all
                    else:
                        acc[tr[c]] += cnt[tr[c + 1]] / cnt[d]
            else:  # tie run: count all of it first, then score each atom once, times its members
                n_run = 0
                for t in range(p, q):
                    a = row[t] & amask
                    tr = tab[a]
                    for f in range(n_fam):
                        cnt[tr[f]] += 1.0
                    if run_cnt[a] == 0.0:
                        run_atoms[n_run] = a
                        n_run += 1
                    run_cnt[a] += 1.0
                for r in range(n_run):
                    a = run_atoms[r]
                    w = run_cnt[a]
                    run_cnt[a] = 0.0
                    tr = tab[a]
                    for k in range(n_pairs):
                        c = n_fam + 3 * k
                        d = tr[c + 2]
                        if d == n_cnt:
                            acc[tr[c]] += w * (cnt[tr[c + 1]] * inv_all)
                        else:
                            acc[tr[c]] += w * (cnt[tr[c + 1]] / cnt[d])
            p = q
        out[j, :] = acc


@functools.cache
def _numba_kernels():
    """The compiled (pack, scan) kernels, or None when numba is not installed."""
    try:
        import numba
    except ImportError:
        return None
    from numba import float32, float64, int64, types, uint32

    jit = functools.partial(numba.njit, nogil=True, cache=True, boundscheck=False)
    # Explicit signatures, compiled once: contiguous float32 rows (the fast path), then
    # any-layout ("A") float32 / float64 so that every other layout needs no further compile.
    counts = types.UniTuple(int64, 2)
    pack = jit(
        [
            counts(float32[:, ::1], int64[::1], int64, float32[:, ::1], int64[:, ::1]),
            counts(float32[:, :], int64[::1], int64, float32[:, ::1], int64[:, ::1]),
            counts(float64[:, :], int64[::1], int64, float32[:, ::1], int64[:, ::1]),
        ]
    )(_pack_py)
    scan_sig = types.none(int64[:, ::1], int64, uint32[:, ::1], int64, int64, int64, float64[:, ::1])
    scan = jit([scan_sig])(_scan_py)
    return pack, scan


def _resolve_backend(backend: str):
    if backend not in ("auto", "numba", "numpy"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy'; got {backend!r}")
    if backend == "numpy":
        return None
    kernels = _numba_kernels()
    if kernels is None and backend == "numba":
        raise ValueError("backend='numba' needs numba installed (pip install numba); or use backend='numpy'")
    return kernels


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
    scores,
    label_sets,
    among=None,
    *,
    threads: int | None = None,
    block: int = DEFAULT_BLOCK,
    backend: str = "auto",
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
    plan = LabelSetPlan(label_sets, among, n_examples=n)
    return plan.score(x, threads=threads, block=block, backend=backend)


def average_precision(scores, labels, *, threads: int | None = None, backend: str = "auto") -> np.ndarray:
    """AP of each neuron column of ``scores`` ``[examples, neurons]`` against ``labels`` ``[examples]``.

    Returns float64 ``[neurons]`` equal to sklearn's ``average_precision_score`` per column.

    >>> average_precision(np.array([[0.9], [0.1], [0.8]]), np.array([1, 0, 1]))
    array([1.])
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [examples]; got shape {labels.shape}")
    return average_precision_many(scores, labels[None, :], threads=threads, backend=backend)[0]


def neuron_chunk_size(
    n_examples: int,
    memory_bytes: int,
    *,
    n_sets: int = 32,
    itemsize: int = 4,
    copies: int = 2,
    threads: int | None = None,
    block: int = DEFAULT_BLOCK,
    backend: str = "auto",
) -> int:
    """Neuron columns per chunk so that one chunk's working set fits in ``memory_bytes``.

    Counts ``copies`` copies of the ``[examples, chunk]`` input (e.g. the Arrow buffer and the
    numpy array), the float64 ``[sets, chunk]`` result and the kernel's per-thread scratch.
    Returns a multiple of ``block`` (at least ``block``).
    """
    kind = "numpy" if _resolve_backend(backend) is None else "numba"
    threads = _default_threads() if threads is None else max(1, int(threads))
    scratch = threads * block * n_examples * _SCRATCH_BYTES[kind]
    per_neuron = copies * n_examples * itemsize + 8 * n_sets
    cols = (memory_bytes - scratch) // per_neuron
    return int(max(block, cols // block * block))
