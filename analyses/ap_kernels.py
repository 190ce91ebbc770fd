"""The numba kernels of the AP ranking (:mod:`hookpoints.analyses.ap`): packing each neuron's scores into sort
keys, and one counting pass over the sorted keys (the algorithm is described there)."""

from __future__ import annotations

import functools

import numpy as np

from hookpoints.errors import UserError


def pack_keys(src, atom, abits, f32, keys):  # pragma: no cover - compiled by numba
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


def scan_keys(keys, abits, tab, n_fam, n_pairs, n_cnt, out):  # pragma: no cover - compiled by numba
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
def numba_kernels():
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
    )(pack_keys)
    scan_sig = types.none(int64[:, ::1], int64, uint32[:, ::1], int64, int64, int64, float64[:, ::1])
    scan = jit([scan_sig])(scan_keys)
    return pack, scan


def resolve_backend(backend: str):
    if backend not in ("auto", "numba", "numpy"):
        raise UserError(f"backend must be 'auto', 'numba' or 'numpy'; got {backend!r}")
    if backend == "numpy":
        return None
    kernels = numba_kernels()
    if kernels is None and backend == "numba":
        raise UserError("backend='numba' needs numba installed (pip install numba); or use backend='numpy'")
    return kernels
