"""analyses.ap against sklearn.metrics.average_precision_score, ties included."""

import importlib.util

import numpy as np
import pytest
from hookpoints.analyses import average_precision
from hookpoints.analyses.ap import LabelSetPlan, average_precision_many, neuron_chunk_size
from sklearn.metrics import average_precision_score

from hookpoints.errors import UserError

BACKENDS = [
    "numpy",
    pytest.param(
        "numba",
        marks=pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed"),
    ),
]
RTOL = 1e-12


def sk_ap(labels, scores, among=None):
    """Reference: sklearn per neuron column (and per label set), over the among subset."""
    labels = np.atleast_2d(labels)
    among = np.ones_like(labels) if among is None else np.broadcast_to(among, labels.shape)
    return np.array(
        [
            [average_precision_score(y[m], scores[m, j]) for j in range(scores.shape[1])]
            for y, m in zip(labels, among, strict=True)
        ]
    )


def tie_heavy_scores(rng, n, dtype=np.float32):
    """[n, 24] columns: integer-valued, quantised, constant, +-0.0, mostly-constant, continuous."""
    cols = [
        rng.integers(0, 3, n),
        rng.integers(-5, 5, n),
        rng.integers(0, 50, n),
        np.round(rng.standard_normal(n) * 4) / 4,
        np.round(rng.standard_normal(n), 1),
        np.full(n, 0.7),
        np.where(rng.random(n) < 0.5, -0.0, 0.0),
        np.where(rng.random(n) < 0.9, 0.0, rng.random(n)),  # ReLU-like: mostly exact zeros
        np.where(rng.random(n) < 0.5, 1.0, 2.0),  # two values
    ]
    cols += [rng.standard_normal(n) for _ in range(8)]  # continuous (untied rows in the same block)
    cols += [rng.integers(0, 2, n) * rng.integers(1, 4, n) for _ in range(7)]
    return np.stack(cols, axis=1).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_single_label_set_matches_sklearn_with_ties(backend, dtype, layout):
    rng = np.random.default_rng(0)
    n = 301
    for rate in (0.02, 0.3, 0.5, 0.9):
        x = tie_heavy_scores(rng, n, dtype)
        x = np.asfortranarray(x) if layout == "F" else np.ascontiguousarray(x)
        y = rng.random(n) < rate
        y[:2] = [True, False]
        got = average_precision(x, y, backend=backend)
        assert got.dtype == np.float64 and got.shape == (x.shape[1],)
        np.testing.assert_allclose(got, sk_ap(y, x)[0], rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_positive_and_single_negative(backend):
    rng = np.random.default_rng(1)
    n = 200
    x = tie_heavy_scores(rng, n)
    for y in (np.arange(n) == 17, np.arange(n) != 17, np.arange(n) == 0, np.arange(n) != n - 1):
        got = average_precision(x, y, backend=backend)
        np.testing.assert_allclose(got, sk_ap(y, x)[0], rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_finer_than_float32_is_not_rounded(backend):
    # float32 would tie every value here; sklearn (and the kernel) must tell them apart.
    rng = np.random.default_rng(2)
    n = 150
    x = 1.0 + rng.integers(0, 40, (n, 6)) * 1e-12
    x[:, 0] = rng.standard_normal(n)  # continuous float64
    x[:, 1] = np.float32(0.5)  # a column that is exactly float32 in the same array
    x[:, 2] = rng.choice([1e300, -1e300, 3.5e38, 1e-300, -1e-300, 0.0], n)  # finite, float32 can't hold
    y = rng.random(n) < 0.4
    got = average_precision(x, y, backend=backend)
    assert np.ptp(got[3:]) > 0  # rounding to float32 would make these all equal to the positive rate
    np.testing.assert_allclose(got, sk_ap(y, x)[0], rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_tie_runs_do_not_accumulate_rounding(backend):
    # ReLU-like columns: ~10,000 exact zeros in one tie run. Adding their equal shares one by
    # one drifts by ~1e-13 relative; scoring the run once per threshold, as sklearn does, not.
    rng = np.random.default_rng(10)
    n = 20_000
    x = np.maximum(rng.standard_normal((n, 3)), 0).astype(np.float32)
    x[:, 1] = np.round(x[:, 1])
    y = rng.random(n) < 0.3
    np.testing.assert_allclose(average_precision(x, y, backend=backend), sk_ap(y, x)[0], rtol=1e-14, atol=0)


def partition_label_sets(rng, n):
    """Label sets from partitions: languages, modalities, language x modality, with among masks."""
    lang = rng.integers(0, 4, n)
    mod = rng.integers(0, 2, n)
    every = np.ones(n, dtype=bool)
    sets, among = [], []
    for lg in range(4):
        sets.append(lang == lg), among.append(every)  # language vs the rest
        for md in range(2):
            sets.append(lang == lg), among.append(mod == md)  # language among one modality
            sets.append((lang == lg) & (mod == md)), among.append(every)  # cell vs the rest
    sets.append(mod == 0), among.append(every)
    sets.append(mod == 1), among.append(every)
    return np.array(sets), np.array(among)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_partition_label_sets_with_among(backend):
    rng = np.random.default_rng(3)
    n = 400
    x = tie_heavy_scores(rng, n)
    sets, among = partition_label_sets(rng, n)
    plan = LabelSetPlan(sets, among)
    assert plan.n_families == 3  # languages, cells, modalities: one sort, three families
    got = plan.score(x, threads=2, block=5, backend=backend)
    assert got.shape == (len(sets), x.shape[1])
    np.testing.assert_allclose(got, sk_ap(sets, x, among), rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_overlapping_label_sets_and_random_among(backend):
    # No partition structure at all: every set overlaps the others, among masks are random.
    rng = np.random.default_rng(4)
    n = 250
    x = tie_heavy_scores(rng, n)
    sets = rng.random((9, n)) < rng.random((9, 1))
    among = rng.random((9, n)) < 0.7
    among[:3] = True
    sets[:, :2] = [True, False]
    among[:, :2] = True
    got = average_precision_many(x, sets, among, threads=2, block=3, backend=backend)
    np.testing.assert_allclose(got, sk_ap(sets, x, among), rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positives_outside_among_are_ignored(backend):
    rng = np.random.default_rng(5)
    n = 120
    x = tie_heavy_scores(rng, n)
    among = np.arange(n) % 3 != 0
    y = rng.random(n) < 0.5
    y[:3] = [True, True, False]
    got = average_precision_many(x, y, among[None], backend=backend)
    np.testing.assert_allclose(got, sk_ap(y, x, among), rtol=RTOL, atol=0)
    np.testing.assert_array_equal(got, average_precision_many(x, y & among, among[None], backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_and_threads_give_identical_results(backend):
    rng = np.random.default_rng(6)
    n = 300
    x = rng.standard_normal((n, 70)).astype(np.float32)
    x[:, ::7] = np.round(x[:, ::7])
    sets, among = partition_label_sets(rng, n)
    plan = LabelSetPlan(sets, among)
    whole = plan.score(x, threads=1, block=70, backend=backend)
    parts = np.concatenate(
        [plan.score(x[:, j : j + 16], threads=2, block=3, backend=backend) for j in range(0, 70, 16)], axis=1
    )
    np.testing.assert_array_equal(whole, parts)


def test_backends_agree_at_scale():
    # numba is a required dependency (pyproject.toml): a missing install must fail here, not skip
    rng = np.random.default_rng(7)
    n = 3000
    x = rng.standard_normal((n, 64)).astype(np.float32)
    x[:, :8] = np.round(x[:, :8] * 3)
    sets, among = partition_label_sets(rng, n)
    plan = LabelSetPlan(sets, among)
    a = plan.score(x, backend="numba")
    b = plan.score(x, backend="numpy")
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=0)
    np.testing.assert_allclose(a[:, :3], sk_ap(sets, x[:, :3], among), rtol=RTOL, atol=0)


def test_other_numeric_inputs_and_empty():
    rng = np.random.default_rng(8)
    x = rng.integers(0, 4, (60, 5))
    y = rng.random(60) < 0.5
    np.testing.assert_allclose(average_precision(x, y), sk_ap(y, x)[0], rtol=RTOL, atol=0)
    np.testing.assert_allclose(
        average_precision(x.astype(np.float16), y.astype(np.int8)), sk_ap(y, x)[0], rtol=RTOL, atol=0
    )
    assert average_precision(np.empty((60, 0), np.float32), y).shape == (0,)


@pytest.mark.parametrize(
    "scores, labels, among, match",
    [
        (np.zeros((5, 2)), np.zeros(5, bool), None, r"no positive examples"),
        (np.zeros((5, 2)), np.ones(5, bool), None, r"no negative examples .*all 5 positive"),
        (np.zeros((5, 2)), np.array([1, 0, 0, 0, 0], bool), np.arange(5) != 0, r"no positive .*among"),
        (np.zeros((5, 2)), np.array([1, 1, 0, 0, 0], bool), np.arange(5) < 2, r"no negative .*among"),
        (np.zeros((5, 2)), np.array([1, 0, 0, 0], bool), None, r"4 examples per set but scores have 5"),
        (np.zeros(5), np.array([1, 0, 0, 0, 0], bool), None, r"scores must be 2-D"),
        (np.zeros((5, 2)), np.array([2, 0, 0, 0, 1]), None, r"must be binary \(True/False or 0/1\), but hold 2"),
        (np.zeros((5, 2)), np.array([1, 0, 1, 0, 1], bool), np.ones((2, 5), bool), r"among has 2 sets"),
    ],
)
def test_bad_inputs_raise_clear_errors(scores, labels, among, match):
    with pytest.raises(UserError, match=match):
        average_precision_many(scores, labels, among)


def test_error_names_the_failing_label_set():
    sets = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], bool)
    with pytest.raises(UserError, match=r"^label set 1 has no positive examples"):
        average_precision_many(np.zeros((4, 3)), sets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_scores_name_count_and_columns(backend):
    x = np.random.default_rng(9).standard_normal((50, 40)).astype(np.float32)
    x[3, 7] = np.nan
    x[9, 7] = np.inf
    x[0, 33] = -np.inf
    y = np.arange(50) % 2 == 0
    msg = r"scores contain 3 NaN/inf values in 2 neuron columns \[7, 33\]; drop or impute"
    with pytest.raises(UserError, match=msg) as e:
        average_precision(x, y, backend=backend)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"1 NaN/inf values in 1 neuron columns \[1\]"):
        x64 = np.array([[0.0, 1.0], [1.0, np.nan], [2.0, 3.0]])
        average_precision(x64, [True, False, True], backend=backend)


def test_labels_must_be_one_dimensional_and_backend_known():
    with pytest.raises(UserError, match=r"labels must be 1-D"):
        average_precision(np.zeros((4, 2)), np.zeros((2, 4), bool))
    with pytest.raises(UserError, match=r"backend must be"):
        average_precision(np.zeros((4, 2)), np.array([1, 0, 1, 0], bool), backend="cuda")


def test_neuron_chunk_size_fits_the_budget():
    n, budget = 12_000, 1 << 30
    cols = neuron_chunk_size(n, budget, n_sets=32, threads=2, block=16, backend="numpy")
    assert cols % 16 == 0 and cols > 0
    scratch = 2 * 16 * n * 120
    assert scratch + cols * (2 * n * 4 + 32 * 8) <= budget
    assert scratch + (cols + 16) * (2 * n * 4 + 32 * 8) > budget  # and it is the largest such
    assert neuron_chunk_size(n, 1 << 20, block=16) == 16  # never below one block
    assert neuron_chunk_size(n, 4 << 30) > neuron_chunk_size(n, 1 << 30)


SCORES = np.array([[0.9, 0.1], [0.1, 0.5], [0.8, 0.3], [0.4, 0.4]])


@pytest.mark.parametrize(
    ("scores", "labels", "kwargs", "message"),
    [
        ("abc", [1, 0, 1, 0], {}, r"^scores must be an array of numbers, not str$"),
        (None, [1, 0, 1, 0], {}, r"^scores must be an array of numbers, not NoneType$"),
        ([[1.0, 2.0], [3.0]], [1, 0], {}, r"^scores must be an array of numbers of one shape"),
        (SCORES[:, 0], [1, 0, 1, 0], {}, r"scores must be 2-D .* for one neuron pass scores\[:, None\]"),
        (SCORES + 1j, [1, 0, 1, 0], {}, r"scores must hold real numbers .*not complex128"),
        (SCORES.astype(object), [1, 0, 1, 0], {}, r"scores must hold real numbers .*not object"),
        (np.zeros((0, 2)), [], {}, r"^labels has no positive examples"),
        (SCORES, [0, 1, 2, 0], {}, r"^labels must be binary \(True/False or 0/1\), but hold 2$"),
        (SCORES, [0, 1, np.nan, 0], {}, r"^labels must be binary .*but hold nan$"),
        (SCORES, "1010", {}, r"^labels must be an array of numbers, not str$"),
        (SCORES, ["a", "b", "a", "b"], {}, r"^labels must hold real numbers .*not <U1"),
        (SCORES, [1, 0, 1], {}, r"^labels has 3 examples per set but scores have 4"),
        (np.array([[np.nan], [1.0], [2.0], [3.0]]), [1, 0, 1, 0], {}, r"scores contain 1 NaN/inf values"),
        (SCORES, [1, 0, 1, 0], {"threads": "2"}, r"^threads must be a whole number of at least 1, not '2'$"),
        (SCORES, [1, 0, 1, 0], {"backend": None}, r"^backend must be 'auto', 'numba' or 'numpy'; got None$"),
    ],
)
def test_bad_input_to_average_precision_is_one_user_error(scores, labels, kwargs, message):
    """Each gave a ValueError / TypeError with numpy's words ("could not convert", "inhomogeneous shape", "label_sets
    must be bool ... got dtype float64" for labels [] or with a NaN), not the project's UserError."""
    with pytest.raises(UserError, match=message) as caught:
        average_precision(scores, labels, **kwargs)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("labels", [[1, 0, 1, 0], [1.0, 0.0, 1.0, 0.0], [True, False, True, False], (1, 0, 1, 0)])
def test_good_labels_of_any_binary_form_equal_sklearn(labels):
    expected = [average_precision_score(np.asarray(labels, float), SCORES[:, j]) for j in range(2)]
    np.testing.assert_allclose(average_precision(SCORES.tolist(), labels), expected, rtol=1e-12)
