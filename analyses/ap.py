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

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from hookpoints.analyses.ap_kernels import resolve_backend
from hookpoints.analyses.ap_numpy import NonFinite, NumpyBackend, make_family
from hookpoints.analyses.arguments import binary_array, number_array

from hookpoints.errors import UserError, check_count

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


def _as_bool_matrix(a, name: str, n: int) -> np.ndarray:
    a = binary_array(a, name)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise UserError(f"{name} must be [sets, examples]; got an array of shape {a.shape}")
    if a.shape[1] != n:
        raise UserError(
            f"{name} has {a.shape[1]} examples per set but scores have {n} examples (rows); pass one entry per example"
        )
    return a


class LabelSetPlan(NumpyBackend):
    """Label sets (each optionally restricted to an "among" subset) prepared for fast AP.

    Build once, then call :meth:`score` on each neuron chunk; the structure (families of
    disjoint sets, counter tables) is worked out here, not per chunk.

    label_sets: ``[sets, examples]`` bool, True = positive.
    among: ``[sets, examples]`` bool (or one ``[examples]`` mask for all sets) or None; AP of
        set s is computed over the examples with ``among[s]`` True only (positives outside
        it are ignored). None = all examples.
    """

    def __init__(self, label_sets, among=None, *, n_examples: int | None = None):
        ls = binary_array(label_sets, "label_sets")
        n = (ls.shape[-1] if ls.ndim else 0) if n_examples is None else n_examples
        ls = _as_bool_matrix(ls, "labels" if ls.ndim == 1 else "label_sets", n)
        n_sets = ls.shape[0]
        if among is None:
            am = None
        else:
            am = _as_bool_matrix(among, "among", n)
            if am.shape[0] == 1 and n_sets > 1:
                am = np.broadcast_to(am, ls.shape)
            if am.shape[0] != n_sets:
                raise UserError(f"among has {am.shape[0]} sets but label_sets has {n_sets}; pass one mask per set")
        self.n_examples = n
        self.n_sets = n_sets

        pos = ls if am is None else ls & am  # [sets, examples]
        for s in range(n_sets):
            n_pos = int(pos[s].sum())
            n_in = n if am is None else int(am[s].sum())
            where = f"label set {s}" if n_sets > 1 else "labels"
            scope = "" if am is None else f" among the {n_in} examples of its 'among' mask"
            if n_pos == 0:
                raise UserError(f"{where} has no positive examples{scope}; AP is undefined - give it >= 1 True")
            if n_pos == n_in:
                raise UserError(
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

        fams = [make_family(sets, n) for sets in fam_sets]
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
        x = number_array(scores, "scores")
        if x.ndim != 2:
            one = "; for one neuron pass scores[:, None]" if x.ndim == 1 else ""
            raise UserError(f"scores must be 2-D [examples, neurons]; got shape {x.shape}{one}")
        if x.shape[0] != self.n_examples:
            raise UserError(
                f"scores have {x.shape[0]} examples (rows) but the labels have {self.n_examples}; "
                "pass scores as [examples, neurons]"
            )
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32 if x.dtype.itemsize <= 2 else np.float64)
        kernels = resolve_backend(backend)
        n, n_neurons = x.shape
        out = np.empty((self.n_sets, n_neurons), dtype=np.float64)  # [sets, neurons]
        if n_neurons == 0:
            return out
        check_count("block", block)
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

        if threads is not None:
            check_count("threads", threads)
        threads = _default_threads() if threads is None else threads
        with ThreadPoolExecutor(max_workers=min(threads, n_blocks)) as pool:
            futures = [pool.submit(worker) for _ in range(min(threads, n_blocks))]
        if failed:
            if isinstance(failed[0], NonFinite):
                bad = ~np.isfinite(x)
                cols = np.flatnonzero(bad.any(axis=0))
                shown = ", ".join(map(str, cols[:10])) + (", ..." if len(cols) > 10 else "")
                raise UserError(
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
            raise NonFinite
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
    x = number_array(scores, "scores")
    n = x.shape[0] if x.ndim == 2 else None
    plan = LabelSetPlan(label_sets, among, n_examples=n)
    return plan.score(x, threads=threads, block=block, backend=backend)


def average_precision(scores, labels, *, threads: int | None = None, backend: str = "auto") -> np.ndarray:
    """AP of each neuron column of ``scores`` ``[examples, neurons]`` against ``labels`` ``[examples]``.

    Returns float64 ``[neurons]`` equal to sklearn's ``average_precision_score`` per column.

    >>> average_precision(np.array([[0.9], [0.1], [0.8]]), np.array([1, 0, 1]))
    array([1.])
    """
    labels = binary_array(labels, "labels")
    if labels.ndim != 1:
        raise UserError(f"labels must be 1-D [examples]; got shape {labels.shape}")
    return average_precision_many(scores, labels, threads=threads, backend=backend)[0]


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
    kind = "numpy" if resolve_backend(backend) is None else "numba"
    threads = _default_threads() if threads is None else max(1, int(threads))
    scratch = threads * block * n_examples * _SCRATCH_BYTES[kind]
    per_neuron = copies * n_examples * itemsize + 8 * n_sets
    cols = (memory_bytes - scratch) // per_neuron
    return int(max(block, cols // block * block))
