"""The numpy backend of the AP ranking (:mod:`hookpoints.analyses.ap`; used when numba is missing): the same
sort per neuron, then per family of disjoint label sets a stable radix argsort of the class ids in score order,
which lays each class out as a segment in descending order where the k-th member has TP = k."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class NonFinite(Exception):
    """Raised inside a worker; the caller turns it into a UserError with a full report."""


@dataclass(frozen=True)
class Family:
    """Disjoint example sets laid out as classes; class ``n_classes`` is 'in none of them'."""

    labels: np.ndarray  # [examples] small int class id
    n_classes: int
    seg_start: np.ndarray  # [examples] int64, start of the segment each grouped position is in
    ordinal: np.ndarray  # [examples] float64, 1-based rank within its class at each grouped position
    seg_break: np.ndarray  # [examples - 1] bool, grouped position k + 1 starts a new segment
    reduce_idx: np.ndarray  # [n_classes or n_classes + 1] segment starts for np.add.reduceat


def make_family(sets: list[np.ndarray], n: int) -> Family:
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
    return Family(labels, k, seg_start, ordinal, seg_break, reduce_idx)


def run_ends(brk: np.ndarray) -> np.ndarray:
    """Last position of the run each position is in, ``[m, n]`` int64.

    brk: ``[m, n - 1]`` bool, True where position p ends a run (p + 1 starts a new one).
    """
    m, n1 = brk.shape
    end = np.empty((m, n1 + 1), dtype=np.int64)
    end[:, ::-1] = np.arange(n1 + 1)  # reversed, so the accumulate below reads forward
    np.copyto(end[:, 1:], n1, where=~brk[:, ::-1])
    np.minimum.accumulate(end, axis=1, out=end)
    return end[:, ::-1]


class NumpyBackend:
    """The numpy scoring of :class:`hookpoints.analyses.ap.LabelSetPlan` (a mixin: it reads the plan's tables)."""

    def _sort_rows(self, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sort each row of ``xb`` ``[m, examples]`` descending.

        Returns (idx, same): idx ``[m, examples]`` int64 example index at each sorted position,
        same ``[m, examples - 1]`` bool, position p ties with p + 1.
        """
        m, n = xb.shape
        if not np.isfinite(xb).all():
            raise NonFinite
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
            gpos = run_ends(~same)  # [m, examples] sorted position ending each tie run
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

    def _frame(self, fam: Family, idx: np.ndarray, gpos: np.ndarray | None):
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
        end = run_ends(brk)  # last slot of each run
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
