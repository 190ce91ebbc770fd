"""Representation spaces layer by layer: how a run's examples cluster by a label (language, meaning, modality,
speaker ...), after seeds/lalm-representation-spaces.txt, sections 3-5 (Tables 1-2, Figures 3-13).

For every layer (analyses.layers: the layer's output, pooled by last token or mean) and every label column:

- silhouette and Davies-Bouldin index in the original space and on the layer's 2-D t-SNE map (section 3.2:
  the paper measures on the t-SNE map; Figure 4 and Figure 13a-b),
- mean Euclidean distance between examples of the same class and of different classes,
- Euclidean distances between the label's class centroids, and a hierarchical clustering of the centroids
  (the dendrograms of Figure 13c),
- Euclidean distances between chosen examples (Tables 1-2).

Silhouette and t-SNE cost O(n^2) and O(n log n) per layer with large constants, so they run on one seeded
sample of the subset (the same examples at every layer); Davies-Bouldin and centroids use every example.
Every result row says how many examples it was computed over, the sample size and the seed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hookpoints.analyses.arguments import as_store, name_list
from hookpoints.analyses.cluster_measures import centroid_stats, pairwise_distances, silhouettes
from hookpoints.analyses.hooks import StoredHook
from hookpoints.analyses.layers import layer_hooks, read_layer, resolve_pooling, run_settings
from hookpoints.analyses.subsets import Subset, select_subset
from hookpoints.store.catalog import Store
from hookpoints.store.run_marks import RunMarks
from hookpoints.store.schema import TableSpec

from hookpoints.errors import UserError

#: Centroid distances and dendrograms are kept for labels with at most this many classes.
MAX_CENTROID_CLASSES = 100
LINKAGES = ("average", "complete", "single", "ward", "centroid", "median", "weighted")

CLUSTERS_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("analysis", pa.string()),  # one id per analysis call: its rows belong together
        ("component", pa.string()),
        ("layer", pa.int32()),
        ("hook", pa.string()),
        ("pooling", pa.string()),
        ("label", pa.string()),  # the examples column the classes come from (null for example distances)
        ("measure", pa.string()),  # silhouette | davies_bouldin | within_distance | between_distance | ...
        ("space", pa.string()),  # original | tsne
        ("a", pa.string()),  # centroid_distance: a class; distance: an example id
        ("b", pa.string()),
        ("value", pa.float64()),
        ("n_examples", pa.int64()),  # examples the value was computed over
        ("n_subset", pa.int64()),  # examples the subset holds (--where)
        ("sample_size", pa.int64()),  # the requested sample size for silhouette and t-SNE
        ("seed", pa.int64()),
        ("perplexity", pa.float64()),  # t-SNE rows only
        ("subset", pa.string()),  # the --where predicate ("" = every example of the run)
        ("computed_at", pa.timestamp("us", tz="UTC")),
    ]
)
CLUSTERS_TABLE = TableSpec("clusters", CLUSTERS_SCHEMA, ("run",))


@dataclass(frozen=True)
class ClusterSettings:
    """What to measure. ``labels``: examples columns; ``where``: a SQL predicate over the examples table.

    >>> result = cluster_layers(store, "r1", ClusterSettings(labels=("language",), tsne=False))
    """

    labels: tuple[str, ...]
    where: str = ""
    pooling: str | None = None  # last | mean | max; default: last, or the run's own pooling
    hooks: tuple[str, ...] = ()  # globs over the run's hook names; default: its layer outputs
    sample: int = 2000  # examples for silhouette and t-SNE (seeded); Davies-Bouldin uses them all
    seed: int = 0
    tsne: bool = True
    perplexity: float = 30.0
    tsne_threads: int | None = 1  # OpenMP threads for t-SNE (None: all cores)
    examples: tuple[str, ...] = ()  # example ids for the distance tables
    linkage: str = "average"  # scipy.cluster.hierarchy.linkage method over class centroids

    def __post_init__(self):  # a string here was read letter by letter ("a label is given twice (l, a, n, ...)")
        for name in ("labels", "hooks", "examples"):
            object.__setattr__(self, name, tuple(name_list(getattr(self, name), name)))


@dataclass(frozen=True)
class Labelling:
    """One label column over the subset: class names and a code per example (-1: no label)."""

    name: str
    classes: list[str]
    codes: np.ndarray  # [subset] int64


@dataclass
class LayerResult:
    hook: StoredHook
    tsne: np.ndarray | None = None  # [sample, 2], row i = the sample's example i
    linkages: dict[str, np.ndarray] = field(default_factory=dict)  # label -> scipy linkage of its centroids
    example_distances: np.ndarray | None = None  # [examples, examples]


@dataclass
class ClusterResult:
    run: str
    pooling: str
    settings: ClusterSettings
    subset: Subset
    labellings: list[Labelling]
    sample: np.ndarray  # [sample] rows of the subset used for silhouette and t-SNE, sorted
    example_rows: np.ndarray  # [examples] rows of the subset chosen for the distance tables
    layers: list[LayerResult] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    marks: RunMarks | None = None  # the run's events when read: written only if none changed since
    analysis: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    computed_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def sampled(self) -> bool:
        return len(self.sample) < len(self.subset)

    def table(self) -> pa.Table:
        """The result rows as the ``clusters`` table's Arrow schema."""
        common = {
            "run": self.run,
            "analysis": self.analysis,
            "pooling": self.pooling,
            "n_subset": len(self.subset),
            "sample_size": self.settings.sample,
            "seed": self.settings.seed,
            "subset": self.subset.where,
            "computed_at": self.computed_at,
        }
        return pa.Table.from_pylist([{**common, **row} for row in self.rows], schema=CLUSTERS_SCHEMA)


def cluster_layers(
    store: Store,
    run: str,
    settings: ClusterSettings,
    *,
    on_layer: Callable[[StoredHook], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ClusterResult:
    """Measure how the run's examples cluster by each label, layer by layer (nothing is written).

    Every check on the input runs before the first layer is read. ``on_start(layers)`` and
    ``on_layer(hook)`` report progress.

    >>> result = cluster_layers(store, "r1", ClusterSettings(labels=("language",), sample=500))
    >>> measures_figure(result)
    """
    store = as_store(store)
    if not isinstance(run, str):
        raise UserError(f"cluster_layers analyses one run: give its name, not {run!r:.60}")
    if not settings.labels:
        raise UserError("give at least one label column to cluster by (--label language)")
    if len(set(settings.labels)) != len(settings.labels):
        raise UserError(f"a label is given twice ({', '.join(settings.labels)}): give each once")
    _check_numbers(settings)
    with store.query() as session:
        recorded = run_settings(session, run)
        marks = RunMarks.read(session, [run])
        pooling = resolve_pooling(recorded, settings.pooling, run)
        hooks = layer_hooks(session, run, list(settings.hooks))
        subset = select_subset(session, run, settings.where, list(settings.labels))
        labellings = [_labelling(subset, name) for name in settings.labels]
        sample = sample_rows(len(subset), settings.sample, settings.seed)
        for labelling in labellings:
            _check_sample(labelling, sample, settings)
        if settings.tsne:
            _check_perplexity(len(sample), settings.perplexity)
        result = ClusterResult(run, pooling, settings, subset, labellings, sample, _example_rows(subset, settings))
        result.marks = marks
        if on_start:
            on_start(len(hooks))
        for hook in hooks:
            x = read_layer(session, subset, hook, recorded, pooling)  # [subset, width]
            result.layers.append(_measure_layer(result, hook, x))
            del x
            if on_layer:
                on_layer(hook)
    return result


def write_clusters(store: Store, result: ClusterResult) -> None:
    """Append the result's t-SNE maps and linkages (analyses.cluster_tables), then its rows to the store's
    ``clusters`` table (one atomic commit each)."""
    from hookpoints.analyses.cluster_tables import write_maps

    if result.marks is not None:
        result.marks.check(store, "clustering")
    write_maps(store, result)
    store.append(CLUSTERS_TABLE, result.table())


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` of the rows ``0..n-1`` drawn without replacement with ``seed`` (all of them if n <= size), sorted."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def tsne_map(x: np.ndarray, perplexity: float, seed: int, threads: int | None = 1) -> np.ndarray:
    """The 2-D t-SNE embedding of ``x`` ``[n, d]`` (scikit-learn, Barnes-Hut, PCA initialisation): ``[n, 2]``.

    ``threads`` caps the OpenMP threads of the Barnes-Hut gradient (None: all cores). One thread is the
    default: on a busy machine OpenMP's waiting threads made t-SNE up to 6x slower (docs/gotchas.md).
    Points whose first principal component has no spread in float32 (all one vector, or differences of 1e-30)
    map to the origin: scikit-learn's PCA start divides by that spread and its Barnes-Hut gradient then crashes
    the process. One-dimensional points get a zero second column.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE  # loads the OpenMP runtime, so the limit below reaches it
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, np.float32)
    if x.shape[1] < 2:  # a width-1 hook (a norm's scale): a zero column keeps every distance, and lets PCA start
        x = np.pad(x, ((0, 0), (0, 2 - x.shape[1])))
    with np.errstate(invalid="ignore", divide="ignore"):  # PCA's explained variance ratio of no variance
        start = PCA(n_components=2, random_state=seed).fit_transform(x).astype(np.float32)[:, 0]  # TSNE's start
        spread = float(np.std(start))
    if not (np.isfinite(spread) and spread > 0):  # TSNE divides by it: NaN, then a crash
        return np.zeros((len(x), 2))

    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    with threadpool_limits(threads, user_api="openmp"):
        return tsne.fit_transform(x).astype(np.float64)


# -- one layer ---------------------------------------------------------------------------------------------


def _measure_layer(result: ClusterResult, hook: StoredHook, x: np.ndarray) -> LayerResult:
    from scipy.cluster.hierarchy import linkage

    settings, layer = result.settings, LayerResult(hook)
    where = {"component": hook.component, "layer": hook.layer, "hook": hook.hook}

    def add(label, measure, space, value, n, a=None, b=None, perplexity=None):
        row = {"label": label, "measure": measure, "space": space, "a": a, "b": b, "value": float(value)}
        result.rows.append({**where, **row, "n_examples": int(n), "perplexity": perplexity})

    for labelling in result.labellings:  # every example: Davies-Bouldin, centroids
        stats = centroid_stats(x, labelling.codes)
        labelled = int(stats.sizes.sum())
        add(labelling.name, "davies_bouldin", "original", stats.davies_bouldin, labelled)
        if len(labelling.classes) <= MAX_CENTROID_CLASSES:
            upper = np.triu_indices(len(labelling.classes), 1)
            for i, j in zip(*upper, strict=True):
                pair = (labelling.classes[i], labelling.classes[j])
                add(labelling.name, "centroid_distance", "original", stats.distances[i, j], labelled, *pair)
            layer.linkages[labelling.name] = linkage(stats.centroids, method=settings.linkage)

    xs = x[result.sample]  # [sample, width]
    codes = [labelling.codes[result.sample] for labelling in result.labellings]
    for labelling, stats in zip(result.labellings, silhouettes(xs, codes), strict=True):
        add(labelling.name, "silhouette", "original", stats.silhouette, stats.points)
        add(labelling.name, "within_distance", "original", stats.within, stats.points)
        add(labelling.name, "between_distance", "original", stats.between, stats.points)

    if settings.tsne:
        layer.tsne = tsne_map(xs, settings.perplexity, settings.seed, settings.tsne_threads)
        for labelling, label_codes, stats in zip(result.labellings, codes, silhouettes(layer.tsne, codes), strict=True):
            add(labelling.name, "silhouette", "tsne", stats.silhouette, stats.points, perplexity=settings.perplexity)
            db = centroid_stats(layer.tsne, label_codes).davies_bouldin
            add(labelling.name, "davies_bouldin", "tsne", db, stats.points, perplexity=settings.perplexity)

    if len(result.example_rows):
        ids = [result.subset.example_ids[row] for row in result.example_rows]
        layer.example_distances = pairwise_distances(x[result.example_rows], x[result.example_rows])
        np.fill_diagonal(layer.example_distances, 0.0)
        for i, j in zip(*np.triu_indices(len(ids), 1), strict=True):
            add(None, "distance", "original", layer.example_distances[i, j], 2, ids[i], ids[j])
    return layer


# -- checks on the input -------------------------------------------------------------------------------


def _check_numbers(settings: ClusterSettings) -> None:
    # None or "5" was a TypeError on the comparison; sample=2.5 drew 2.5 rows (numpy's "negative dimensions" for nan)
    if not _whole(settings.sample) or settings.sample < 3:
        raise UserError(f"--sample must be a whole number of at least 3 examples, not {settings.sample!r}")
    if not _whole(settings.seed) or settings.seed < 0:
        raise UserError(f"--seed must be a non-negative integer, not {settings.seed!r}")
    if isinstance(settings.perplexity, bool) or not isinstance(settings.perplexity, int | float | np.number):
        raise UserError(f"--perplexity must be a positive number, not {settings.perplexity!r}")
    if not settings.perplexity > 0:
        raise UserError(f"--perplexity must be positive, not {settings.perplexity}")
    if settings.linkage not in LINKAGES:
        raise UserError(f"--linkage must be one of {', '.join(LINKAGES)}, not {settings.linkage!r}")


def _whole(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _labelling(subset: Subset, name: str) -> Labelling:
    """Codes for one label column; a label that cannot form clusters is a clear error."""
    column = subset.table[name]
    kind = column.type
    if not (
        pa.types.is_string(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind)
    ):
        raise UserError(
            f"label {name!r} holds {kind} values: cluster by a column of text, integers or booleans "
            "(or derive one in the manifest)"
        )
    values = pc.cast(column, pa.string())
    encoded = pc.dictionary_encode(values).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    codes = np.where(encoded.indices.is_null().to_numpy(zero_copy_only=False), -1, codes).astype(np.int64)
    classes = encoded.dictionary.to_pylist()
    scope = f"run {subset.run!r}" + (f" with --where {subset.where!r}" if subset.where else "")
    if not classes:
        raise UserError(f"label {name!r} is empty (null) for every example of {scope}: pick another label")
    if len(classes) == 1:
        raise UserError(
            f"label {name!r} has one class only ({classes[0]!r}) among the examples of {scope}: clustering needs "
            "at least 2 classes; widen --where or pick another label"
        )
    sizes = np.bincount(codes[codes >= 0], minlength=len(classes))
    single = [classes[i] for i in np.flatnonzero(sizes == 1)]
    if single:
        shown = ", ".join(repr(c) for c in single[:3]) + (" ..." if len(single) > 3 else "")
        raise UserError(
            f"label {name!r} has {len(single)} class(es) with a single example ({shown}) in {scope}: every class "
            "needs at least 2 examples; leave them out with --where or add examples"
        )
    return Labelling(name, classes, codes)


def _check_sample(labelling: Labelling, sample: np.ndarray, settings: ClusterSettings) -> None:
    codes = labelling.codes[sample]
    codes = codes[codes >= 0]
    present = len(np.unique(codes))
    if present < 2 or present >= len(codes):
        raise UserError(
            f"the seeded sample of {len(sample)} examples (--sample {settings.sample}, --seed {settings.seed}) holds "
            f"{present} class(es) of label {labelling.name!r} over {len(codes)} labelled examples; silhouette needs "
            "2 or more classes and fewer classes than examples: raise --sample"
        )


def _check_perplexity(examples: int, perplexity: float) -> None:
    if examples <= perplexity:
        raise UserError(
            f"t-SNE with perplexity {perplexity:g} needs more than {perplexity:g} examples and gets {examples}: "
            f"lower --perplexity (below {examples}, e.g. {max(1, examples // 4)}), give more examples, "
            "or pass --no-tsne"
        )


def _example_rows(subset: Subset, settings: ClusterSettings) -> np.ndarray:
    if not settings.examples:
        return np.arange(0)
    if len(settings.examples) < 2:
        raise UserError("--examples needs at least 2 example ids to measure distances between")
    if len(set(settings.examples)) != len(settings.examples):
        raise UserError(f"--examples names an example twice ({', '.join(settings.examples)}): give each once")
    position = {example: row for row, example in enumerate(subset.example_ids)}
    missing = [example for example in settings.examples if example not in position]
    if missing:
        scope = " matching --where" if subset.where else ""
        raise UserError(f"example {missing[0]!r} is not among the examples of run {subset.run!r}{scope}: check the id")
    return np.array([position[example] for example in settings.examples])
