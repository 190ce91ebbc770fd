"""AP neuron ranking over the store (Experiment 1 of seeds/seamless-m4t-v2-neurons.txt, sections 3.2 and 4.2).

Every neuron (one hidden dimension of a hook point's pooled activation) is scored by its average precision
(analyses.ap) against each label set, then ranked within its module group (the hooks table's ``component``:
speech_encoder, text_encoder, text_decoder, ...) across all layers and submodules: top-k are the k highest
APs of the group (excitatory), bottom-k the k lowest (inhibitory), k from a list (the paper: 500, 1000, 2500,
5000).

The activations stream from the store one hook at a time (a hook wider than the memory budget is read in
neuron slices); each slice is sorted once per neuron for all label sets (``LabelSetPlan``). Memory: one
slice, the kernel's scratch, and the ``[label sets, neurons]`` APs; it does not grow with the store.

Results go to the ``scores`` table (docs/selectivity.md): one row per (run key, label set, neuron), replaced
atomically when a label set is ranked again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
from hookpoints.analyses.ap import LabelSetPlan
from hookpoints.analyses.arguments import as_store, name_list
from hookpoints.analyses.examples import (
    ExampleSet,
    LabelMasks,
    RunGroup,
    label_masks,
    open_runs,
    record_again,
    recorded_modalities,
    select_examples,
)
from hookpoints.analyses.hook_matrix import HookMatrixReader, neuron_slices, shared_hooks
from hookpoints.analyses.hooks import StoredHook
from hookpoints.analyses.labels import MODALITY_PRESETS, PRESETS, LabelSet, preset_label_sets
from hookpoints.analyses.selection import PAPER_KS, check_ks
from hookpoints.store.catalog import Store
from hookpoints.store.schema import TableSpec
from hookpoints.store.tables import sql_string

from hookpoints.errors import UserError, check_count

WRITE_BATCH_ROWS = 8192
DEFAULT_MEMORY_BYTES = 2 * 2**30  # for the two hook matrices (or neuron slices) in memory at a time

SCORES_SCHEMA = pa.schema(
    [
        ("run", pa.string()),  # the run, or the runs ranked together joined by '+' (sorted): the ranking's key
        ("runs", pa.list_(pa.string())),  # the runs whose examples were compared
        ("label_set", pa.string()),  # e.g. unimodal/speech/de, modality/text, or a --name
        ("preset", pa.string()),  # unimodal | multimodal | modality | language-modality; null for --positive
        ("positive", pa.string()),  # SQL predicate over examples
        ("among", pa.string()),  # SQL predicate; null: all examples
        ("subset", pa.string()),  # --where over all label sets; null: every example of the runs
        ("n_positive", pa.int32()),
        ("n_among", pa.int32()),  # examples the AP was computed over
        ("component", pa.string()),  # module group the neuron is ranked in
        ("layer", pa.int32()),
        ("submodule", pa.string()),
        ("hook", pa.string()),
        ("neuron", pa.int32()),  # 0-based index in the hook's vector
        ("ap", pa.float64()),
        ("top_rank", pa.int32()),  # 1 = highest AP of its (run, label_set, component)
        ("bottom_rank", pa.int32()),  # 1 = lowest AP
        ("top_k", pa.int32()),  # smallest k of `ks` with top_rank <= k (null: in no top-k)
        ("bottom_k", pa.int32()),
        ("ks", pa.list_(pa.int32())),
        ("group_size", pa.int32()),  # neurons ranked in the component
        ("computed_at", pa.timestamp("us", tz="UTC")),
    ]
)
#: Large row groups: queries read whole label sets (4-5x faster to scan than the store's 1,024-row default).
SCORES_TABLE = TableSpec("scores", SCORES_SCHEMA, ("run", "label_set"), row_group_rows=65536)


@dataclass(frozen=True)
class RankingJob:
    """Everything a ranking needs, checked before any activation is read (see :func:`plan_ranking`)."""

    group: RunGroup
    examples: ExampleSet
    masks: LabelMasks
    hooks: list[StoredHook]
    ks: tuple[int, ...]

    @property
    def n_neurons(self) -> int:
        return sum(h.width for h in self.hooks)

    @property
    def components(self) -> list[str]:
        return list(dict.fromkeys(h.component for h in self.hooks))


@dataclass
class Ranking:
    """APs of every neuron of the job's hooks for every label set, and their ranks within components."""

    job: RankingJob
    ap: np.ndarray  # [sets, neurons] float64
    top_rank: np.ndarray  # [sets, neurons] int32, 1 = highest AP in the neuron's component
    bottom_rank: np.ndarray  # [sets, neurons] int32, 1 = lowest AP
    neuron_hook: np.ndarray  # [neurons] int32: index into job.hooks
    neuron_index: np.ndarray  # [neurons] int32: neuron within its hook
    timings: dict = field(default_factory=dict)

    def component_mask(self, component: str) -> np.ndarray:
        hook_component = np.array([h.component for h in self.job.hooks])
        return hook_component[self.neuron_hook] == component

    def selected(self, s: int, component: str, k: int, side: str) -> np.ndarray:
        """Neuron indices (into the ranking's neurons) of label set ``s``'s top or bottom ``k`` in ``component``."""
        rank = self.top_rank[s] if side == "top" else self.bottom_rank[s]
        return np.flatnonzero((rank <= k) & self.component_mask(component))


def plan_ranking(
    store: Store,
    runs: list[str],
    *,
    presets: list[str] = (),
    custom: list[LabelSet] = (),
    where: str | None = None,
    hooks: list[str] | None = None,
    components: list[str] | None = None,
    ks: tuple[int, ...] = PAPER_KS,
    language_column: str = "language",
    modality_column: str = "modality",
) -> RankingJob:
    """Check runs, examples, label sets, hooks and k before reading any activation; clear errors otherwise.

    >>> job = plan_ranking(store, ["s2tt", "t2tt"], presets=["unimodal"], ks=(500, 1000))
    """
    ks = check_ks(ks)
    store = as_store(store)
    for option, column in (("language_column", language_column), ("modality_column", modality_column)):
        if not isinstance(column, str) or not column:
            raise UserError(f"{option} must be the name of an examples column, not {column!r:.80}")
    presets = name_list(presets or (), "presets")
    custom = [custom] if isinstance(custom, LabelSet) else custom or ()
    if not isinstance(custom, list | tuple) or not all(isinstance(label_set, LabelSet) for label_set in custom):
        raise UserError(f"custom takes label sets made by custom_label_set(...), not {custom!r:.80}")
    with store.query() as session:
        group = open_runs(session, runs)
        examples = select_examples(session, group, where)
        label_sets = list(custom)
        if "all" in presets:
            presets = [p for p in PRESETS]
        for preset in dict.fromkeys(presets):
            label_sets += preset_sets(session, examples, preset, language_column, modality_column)
        masks = label_masks(session, examples, label_sets)
        chosen = shared_hooks(session, group.runs, patterns=hooks, components=components)
    sizes: dict[str, int] = {}
    for h in chosen:
        sizes[h.component] = sizes.get(h.component, 0) + h.width
    for component, size in sizes.items():
        if max(ks) > size:
            raise UserError(
                f"k={max(ks)} is larger than module group {component} ({size:,} neurons in the chosen hook "
                f"points): pass --k values up to {size:,}"
            )
    return RankingJob(group, examples, masks, chosen, ks)


def preset_sets(
    session, examples: ExampleSet, preset: str, language_column: str, modality_column: str
) -> list[LabelSet]:
    """A preset's label sets over the languages and modalities present among ``examples``."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)} or all")
    columns = examples.columns(session)
    shown = ", ".join(c for c in columns if c not in ("run", "example_id"))
    if preset != "modality" and language_column not in columns:
        raise UserError(
            f"preset {preset} needs a language column, but the examples have no {language_column!r} "
            f"(they have {shown}): name it with --language-column"
        )
    if preset in MODALITY_PRESETS and modality_column not in columns:
        raise UserError(
            f"preset {preset} needs a modality column, but the examples have no {modality_column!r} "
            f"(they have {shown}): name it with --modality-column, or rank a speech run and a text run together"
        )
    languages = examples.values(session, language_column) if preset != "modality" else []
    modalities = examples.values(session, modality_column)
    if preset == "unimodal" and modalities is None:
        _refuse_mixed_inputs(session, examples.group.runs, modality_column)
    pairs = examples.pairs(session, language_column, modality_column) if languages and modalities else None
    return preset_label_sets(
        preset, languages, modalities, language_column=language_column, modality_column=modality_column, pairs=pairs
    )


def _refuse_mixed_inputs(session, runs: tuple[str, ...], modality_column: str) -> None:
    """Without a modality column, unimodal compares languages over every example: over runs that read speech
    and text (recorded in their config), that is the multimodal setting under a unimodal name."""
    read = recorded_modalities(session, runs)
    if len({m for m in read.values() if m}) > 1:
        shown = ", ".join(f"{run} ({m})" for run, m in read.items())
        raise UserError(
            f"runs {shown} read different modalities, but the examples have no {modality_column!r} column: "
            "--preset unimodal would compare languages over both at once (the multimodal setting). Rank each run "
            "on its own (one --run), or name the column that holds the modality with --modality-column"
        )


def rank(
    store: Store,
    job: RankingJob,
    *,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    threads: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Ranking:
    """Score every neuron of ``job.hooks`` against every label set, hook by hook, and rank within components.

    >>> ranking = rank(store, plan_ranking(store, ["r1"], custom=[custom_label_set("language = 'de'")], ks=(10,)))
    >>> write_scores(store, ranking)
    """
    store = as_store(store)
    if not isinstance(job, RankingJob):
        raise UserError(f"rank takes the job plan_ranking(...) returns, not {type(job).__name__}")
    check_count("memory_bytes", memory_bytes)  # None or "2G" was a TypeError after the job was read
    if threads is not None:
        check_count("threads", threads)
    masks = job.masks
    plan = LabelSetPlan(masks.positive, masks.among)
    reader = HookMatrixReader(store, job.examples)
    n_sets, n = len(masks.label_sets), len(job.examples)
    ap = np.empty((n_sets, job.n_neurons), np.float64)  # [sets, neurons]
    neuron_hook = np.repeat(np.arange(len(job.hooks), dtype=np.int32), [h.width for h in job.hooks])
    neuron_index = np.concatenate([np.arange(h.width, dtype=np.int32) for h in job.hooks])
    timings = {"read_s": 0.0, "read_wait_s": 0.0, "kernel_s": 0.0, "kernel_cpu_s": 0.0}
    if on_start:
        on_start(job.n_neurons)
    # (hook, first neuron of the hook in `ap`, neuron slice); two slices are in memory at a time
    tasks = []
    offset = 0
    for hook in job.hooks:
        tasks += [(hook, offset, part) for part in neuron_slices(hook.width, n, memory_bytes // 2)]
        offset += hook.width
    size = max(n * (part.stop - part.start) for _, _, part in tasks)
    buffers = [np.empty(size, np.float32) for _ in range(min(2, len(tasks)))]

    def load(i: int) -> np.ndarray:
        hook, _, part = tasks[i]
        t0 = time.perf_counter()
        x = reader.read(hook, part, out=buffers[i % 2])  # [examples, neurons of the slice]
        timings["read_s"] += time.perf_counter() - t0
        return x

    # the next slice is read (Arrow decodes with the GIL released) while the kernel scores this one
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        pending = prefetch.submit(load, 0)
        for i, (hook, offset, part) in enumerate(tasks):
            t0 = time.perf_counter()
            x = pending.result()
            t1, c1 = time.perf_counter(), _cpu()
            timings["read_wait_s"] += t1 - t0
            if i + 1 < len(tasks):
                pending = prefetch.submit(load, i + 1)
            try:
                ap[:, offset + part.start : offset + part.stop] = plan.score(x, threads=threads)
            except UserError as error:
                if "NaN/inf" not in str(error):
                    raise
                raise UserError(
                    f"hook {hook.hook} of run(s) {job.group.key} holds NaN or infinite activations "
                    f"({str(error).split(' values in ')[-1].split(';')[0]}, neurons counted from {part.start}): "
                    f"leave the hook out with --hooks, or {record_again(job.group.dtypes.values())}"
                ) from None
            timings["kernel_s"] += time.perf_counter() - t1
            timings["kernel_cpu_s"] += _cpu() - c1
            if on_progress:
                on_progress(part.stop - part.start)
    t0 = time.perf_counter()
    top_rank, bottom_rank = _ranks(ap, neuron_hook, [h.component for h in job.hooks])
    timings["rank_s"] = time.perf_counter() - t0
    return Ranking(job, ap, top_rank, bottom_rank, neuron_hook, neuron_index, timings)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _ranks(ap: np.ndarray, neuron_hook: np.ndarray, hook_components: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks by AP within each component (descending for top, ascending for bottom).

    Neurons are laid out in hook order then neuron index, so a stable sort breaks AP ties by that order.
    """
    top = np.empty(ap.shape, np.int32)
    bottom = np.empty(ap.shape, np.int32)
    components = np.array(hook_components)[neuron_hook]
    for component in dict.fromkeys(hook_components):
        idx = np.flatnonzero(components == component)
        ranks = np.arange(1, len(idx) + 1, dtype=np.int32)
        for s in range(ap.shape[0]):
            values = ap[s, idx]
            top[s, idx[np.argsort(-values, kind="stable")]] = ranks
            bottom[s, idx[np.argsort(values, kind="stable")]] = ranks
    return top, bottom


def score_batches(ranking: Ranking, computed_at: datetime | None = None) -> Iterator[pa.RecordBatch]:
    """The ranking as ``scores`` rows, label set by label set, in batches of ``WRITE_BATCH_ROWS``."""
    job = ranking.job
    computed_at = computed_at or datetime.now(UTC)
    n = job.n_neurons
    hooks = job.hooks
    take = pa.array(ranking.neuron_hook)
    hook_col = pa.array([h.hook for h in hooks], pa.string()).take(take)
    component_col = pa.array([h.component for h in hooks], pa.string()).take(take)
    layer_col = pa.array([h.layer for h in hooks], pa.int32()).take(take)
    submodule_col = pa.array([h.submodule for h in hooks], pa.string()).take(take)
    neuron_col = pa.array(ranking.neuron_index, pa.int32())
    sizes = {c: int(ranking.component_mask(c).sum()) for c in job.components}
    size_col = pa.array(np.array([sizes[h.component] for h in hooks], np.int32)[ranking.neuron_hook])
    ks = np.array(job.ks, np.int32)
    ks_col = pa.array([list(job.ks)], pa.list_(pa.int32())).take(pa.array(np.zeros(n, np.int32)))
    runs_col = pa.array([list(job.group.runs)], pa.list_(pa.string())).take(pa.array(np.zeros(n, np.int32)))
    where = job.examples.where
    masks = job.masks
    for s, ls in enumerate(masks.label_sets):
        columns = {
            "run": pa.repeat(job.group.key, n),
            "runs": runs_col,
            "label_set": pa.repeat(ls.name, n),
            "preset": pa.repeat(pa.scalar(ls.preset, pa.string()), n),
            "positive": pa.repeat(ls.positive, n),
            "among": pa.repeat(pa.scalar(ls.among, pa.string()), n),
            "subset": pa.repeat(pa.scalar(where, pa.string()), n),
            "n_positive": pa.repeat(pa.scalar(int(masks.n_positive[s]), pa.int32()), n),
            "n_among": pa.repeat(pa.scalar(int(masks.n_among[s]), pa.int32()), n),
            "component": component_col,
            "layer": layer_col,
            "submodule": submodule_col,
            "hook": hook_col,
            "neuron": neuron_col,
            "ap": pa.array(ranking.ap[s]),
            "top_rank": pa.array(ranking.top_rank[s]),
            "bottom_rank": pa.array(ranking.bottom_rank[s]),
            "top_k": _smallest_k(ranking.top_rank[s], ks),
            "bottom_k": _smallest_k(ranking.bottom_rank[s], ks),
            "ks": ks_col,
            "group_size": size_col,
            "computed_at": pa.repeat(pa.scalar(computed_at, pa.timestamp("us", tz="UTC")), n),
        }
        batch = pa.record_batch([columns[f.name].cast(f.type) for f in SCORES_SCHEMA], schema=SCORES_SCHEMA)
        for start in range(0, n, WRITE_BATCH_ROWS):  # Delta's writer buffers less of small batches
            yield batch.slice(start, WRITE_BATCH_ROWS)


def _smallest_k(rank: np.ndarray, ks: np.ndarray) -> pa.Array:
    i = np.searchsorted(ks, rank, side="left")  # first k >= rank
    inside = i < len(ks)
    return pa.array(ks[np.minimum(i, len(ks) - 1)], pa.int32(), mask=~inside)


def write_scores(store: Store, ranking: Ranking) -> None:
    """Replace the ranking's label sets in the ``scores`` table with its rows, in one atomic commit.

    >>> write_scores(store, rank(store, job))  # then: store.sql("SELECT * FROM scores")
    """
    store = as_store(store)
    if not isinstance(ranking, Ranking):
        raise UserError(f"write_scores takes the ranking rank(...) returns, not {type(ranking).__name__}")
    job = ranking.job
    if job.group.marks is not None:
        job.group.marks.check(store, "ranking")
    names = ", ".join(sql_string(ls.name) for ls in job.masks.label_sets)
    predicate = f"run = {sql_string(job.group.key)} AND label_set IN ({names})"
    computed_at = datetime.now(UTC)
    store.replace(
        SCORES_TABLE,
        lambda: pa.RecordBatchReader.from_batches(SCORES_SCHEMA, score_batches(ranking, computed_at)),
        predicate,
    )
