"""The examples an analysis compares: those of one or more runs, in one fixed order, and their label masks.

Runs are analysed together when they hold the same kind of vectors (the same pooling): e.g. a speech-to-text
run and a text-to-text run of SeamlessM4T share the text decoder's hook points, and a ranking over both
compares speech-conditioned with text-conditioned decoding. Row i of every matrix an analysis reads is
example i of the :class:`ExampleSet`: sorted by run, then example_id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hookpoints.analyses.arguments import name_list
from hookpoints.analyses.labels import LabelSet, check_predicate, quote_name
from hookpoints.analyses.subsets import examples_source
from hookpoints.store.names import RUN_KEY_SEPARATOR
from hookpoints.store.query import QuerySession
from hookpoints.store.run_marks import RunMarks

from hookpoints.errors import UserError
from hookpoints.settings import Pooling, RunSettings


@dataclass(frozen=True)
class RunGroup:
    """Runs analysed together: all give one vector per example with the same pooling.

    A per-step run (pooling ``mean+steps``) joins runs of its pooling (``mean``): its decoder hooks are pooled
    over the steps when read (:class:`hookpoints.analyses.hook_matrix.HookMatrixReader`), which gives what the
    recorder stores without ``--per-step``.
    """

    runs: tuple[str, ...]  # sorted
    settings: dict[str, RunSettings]  # run -> what it was recorded with
    marks: RunMarks | None = None  # the runs' events when read: results are written only if none changed

    @property
    def pooling(self) -> Pooling:
        return self.settings[self.runs[0]].pooling

    @property
    def dtypes(self) -> dict[str, str]:
        """run -> float32 | float16 (how its vectors are stored)."""
        return {run: s.dtype.value for run, s in self.settings.items()}

    @property
    def key(self) -> str:
        """The runs as one name (``s2tt+t2tt``): the ``run`` column of the tables analyses write."""
        return run_key(self.runs)


def run_key(runs: list[str] | tuple[str, ...]) -> str:
    """The name of a group of runs in the tables analyses write: sorted, joined by ``+``."""
    return RUN_KEY_SEPARATOR.join(sorted(set(runs)))


def run_settings(session: QuerySession, runs: list[str] | tuple[str, ...]) -> dict[str, RunSettings]:
    """What each run was recorded with, parsed from the ``runs`` table (one place: RunSettings.from_row)."""
    names = sorted(set(name_list(runs, "runs")))
    rows = {
        row["run"]: row
        for row in session.sql(
            "SELECT run, model, task, pooling, dtype, config, status, shards, shards_complete, message FROM runs "
            "WHERE list_contains($runs, run)",
            {"runs": names},
        ).to_pylist()
    }
    missing = [run for run in names if run not in rows]
    if missing:
        known = session.sql("SELECT run FROM runs ORDER BY run")["run"].to_pylist()
        listed = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "") if known else "none"
        raise UserError(f"there is no run {missing[0]!r} in this store (runs: {listed})")
    for run in names:  # a run still recording, killed or failed holds only part of its examples
        row = rows[run]
        if row["status"] != "complete":
            shards = f", {row['shards_complete']} of {row['shards']} shards complete" if row["shards"] > 1 else ""
            said = f": {row['message'][:200]}" if row["status"] == "failed" and row["message"] else ""
            raise UserError(
                f"run {run!r} is not complete (status {row['status']}{shards}{said}), so an analysis would see only "
                "part of it: finish it with `hookpoints record ... --resume` (or wait for its recording to end)"
            )
    return {run: RunSettings.from_row(rows[run]) for run in names}


def record_again(dtypes) -> str:
    """The advice for a hook holding NaN or inf: a float16 run stored values beyond +-65,504 as inf, and recording
    it again in float16 gives the same inf."""
    if "float16" in set(dtypes):
        return "record the run again with --dtype float32 (float16 storage turns values beyond ±65,504 into inf)"
    return "record the run again"


def recorded_modalities(session: QuerySession, runs: list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """run -> the input modality it was recorded with (speech / text, from its config; None if not said)."""
    rows = session.sql(
        "SELECT run, json_extract_string(config, '$.modality') AS m FROM runs WHERE list_contains($runs, run) "
        "ORDER BY run",
        {"runs": sorted(set(runs))},
    ).to_pylist()
    return {row["run"]: row["m"] for row in rows}


def open_runs(session: QuerySession, runs: list[str] | tuple[str, ...]) -> RunGroup:
    """Check that ``runs`` exist and can be analysed together (same pooling, one vector per example).

    >>> with store.query() as session:
    ...     examples = select_examples(session, open_runs(session, ["r1"]))
    """
    if not runs:
        raise UserError("give at least one --run")
    runs = name_list(runs, "runs")
    settings = run_settings(session, runs)
    names = sorted(settings)
    poolings = {s.pooling for s in settings.values()}
    if len(poolings) > 1:
        detail = ", ".join(f"{run}: {settings[run].stored_pooling()}" for run in names)
        raise UserError(f"runs analysed together must share their pooling ({detail}): pass runs recorded alike")
    if poolings.pop() is Pooling.NONE:
        raise UserError(
            f"run {names[0]!r} keeps every position (pooling none), but this analysis compares one vector per "
            "example: record with --pooling mean (the paper's choice)"
        )
    return RunGroup(tuple(names), settings, RunMarks.read(session, names))


@dataclass(frozen=True)
class ExampleSet:
    """The examples of a :class:`RunGroup` matching ``where``, sorted by (run, example_id)."""

    group: RunGroup
    where: str | None
    table: pa.Table  # run, example_id; row i is example i of every matrix
    offsets: dict[str, tuple[int, int]]  # run -> its rows [start, stop)
    source: str = "examples"  # the examples as predicates read them: NaN as NULL (subsets.examples_source)

    def __len__(self) -> int:
        return self.table.num_rows

    def ids(self, run: str) -> pa.Array:
        start, stop = self.offsets[run]
        return self.table["example_id"].slice(start, stop - start).combine_chunks()

    def base_sql(self, columns: str) -> str:
        """SELECT ``columns`` over these examples (parameter ``$runs``), in the set's order."""
        where = "" if self.where is None else f" WHERE {self.where}"
        runs = self.runs_sql()  # a predicate sees these runs only
        return f"SELECT {columns} FROM {runs}{where} ORDER BY run, example_id"

    def runs_sql(self) -> str:
        """The examples of the group's runs (parameter ``$runs``), NaN read as NULL: what predicates see."""
        return f"(SELECT * FROM {self.source} WHERE list_contains($runs, run))"

    def columns(self, session: QuerySession) -> list[str]:
        return session.sql("SELECT * FROM examples LIMIT 0").column_names

    def values(self, session: QuerySession, column: str) -> list | None:
        """Distinct non-null values of an examples column among these examples (None: no such column)."""
        if column not in self.columns(session):
            return None
        where = "" if self.where is None else f" AND ({self.where})"
        rows = session.sql(
            f"SELECT DISTINCT {quote_name(column)} AS v FROM {self.runs_sql()} "
            f"WHERE {quote_name(column)} IS NOT NULL{where} ORDER BY v",
            {"runs": list(self.group.runs)},
        )
        return rows["v"].to_pylist()

    def pairs(self, session: QuerySession, first: str, second: str) -> set[tuple]:
        """The distinct (first, second) value pairs among these examples, both non-null."""
        a, b = quote_name(first), quote_name(second)
        where = "" if self.where is None else f" AND ({self.where})"
        rows = session.sql(
            f"SELECT DISTINCT {a} AS a, {b} AS b FROM {self.runs_sql()} "
            f"WHERE {a} IS NOT NULL AND {b} IS NOT NULL{where}",
            {"runs": list(self.group.runs)},
        ).to_pylist()
        return {(row["a"], row["b"]) for row in rows}

    def mask(self, session: QuerySession, predicate: str, option: str) -> tuple[np.ndarray, np.ndarray]:
        """``[examples]`` bool twice: where the predicate is true, and where it is NULL (a NULL or NaN label)."""
        try:
            result = session.sql(self.base_sql(f"({predicate}) AS v"), {"runs": list(self.group.runs)})
        except UserError as error:
            columns = ", ".join(c for c in self.columns(session) if c not in ("example_id",))
            raise UserError(f"{option} {predicate!r} does not work on the examples ({columns}): {error}") from None
        column = result["v"]
        if not (pa.types.is_boolean(column.type) or pa.types.is_null(column.type)):
            raise UserError(
                f"{option} {predicate!r} gives {column.type} values, not true/false: write a condition, "
                "e.g. \"language = 'de'\""
            )
        if len(column) != len(self):
            raise UserError(f"{option} {predicate!r} changed the examples it was evaluated over: simplify it")
        if not len(column):
            return np.zeros(0, bool), np.zeros(0, bool)
        unknown = column.is_null().to_numpy(zero_copy_only=False).astype(bool)
        return pc.fill_null(column, False).to_numpy(zero_copy_only=False).astype(bool), unknown


def select_examples(session: QuerySession, group: RunGroup, where: str | None = None) -> ExampleSet:
    """The examples of ``group``'s runs (matching ``where``), in (run, example_id) order.

    >>> with store.query() as session:
    ...     examples = select_examples(session, open_runs(session, ["r1"]), where="language = 'de'")
    """
    where = None if where is None else check_predicate(where, "--where")
    source = examples_source(session)
    probe = ExampleSet(group, where, pa.table({"run": pa.array([], pa.string())}), {}, source)
    try:
        table = session.sql(probe.base_sql("run, example_id"), {"runs": list(group.runs)})
    except UserError as error:
        raise UserError(f"--where {where!r} does not work on the examples table: {error}") from None
    runs = table["run"].to_numpy(zero_copy_only=False)
    offsets = {}
    for run in group.runs:
        rows = np.flatnonzero(runs == run)
        if len(rows) == 0:
            scope = f" matching --where {where!r}" if where else ""
            raise UserError(f"run {run!r} has no examples{scope}: check the run name and the predicate")
        offsets[run] = (int(rows[0]), int(rows[-1]) + 1)
    ids = table["example_id"]
    if pc.count_distinct(pc.binary_join_element_wise(table["run"], ids, "\x00")).as_py() != table.num_rows:
        raise UserError(
            f"the examples table lists an example twice in run(s) {', '.join(group.runs)}: the run is damaged"
        )
    return ExampleSet(group, where, table.select(["run", "example_id"]), offsets, source)


@dataclass(frozen=True)
class LabelMasks:
    """Positives and "among" masks of label sets over an :class:`ExampleSet`."""

    label_sets: list[LabelSet]
    positive: np.ndarray  # [sets, examples] bool (already restricted to among)
    among: np.ndarray  # [sets, examples] bool
    left_out: np.ndarray  # [sets] int: examples of among whose --positive is NULL (a NULL or NaN label)

    @property
    def n_positive(self) -> np.ndarray:
        return self.positive.sum(axis=1)

    @property
    def n_among(self) -> np.ndarray:
        return self.among.sum(axis=1)


def label_masks(session: QuerySession, examples: ExampleSet, label_sets: list[LabelSet]) -> LabelMasks:
    """Evaluate each label set's predicates; refuse sets with no positive or no negative example."""
    if not label_sets:
        raise UserError("no label sets to rank: give --preset or --positive")
    names = [ls.name for ls in label_sets]
    dup = next((name for name in names if names.count(name) > 1), None)
    if dup:
        raise UserError(f"label set {dup!r} is given twice: give each label set its own --name")
    cache: dict[str, np.ndarray] = {}

    def mask(predicate: str | None, option: str) -> tuple[np.ndarray, np.ndarray]:
        if predicate is None:
            return np.ones(len(examples), bool), np.zeros(len(examples), bool)
        if predicate not in cache:
            cache[predicate] = examples.mask(session, predicate, option)
        return cache[predicate]

    n = len(examples)
    positive = np.zeros((len(label_sets), n), bool)
    among = np.zeros((len(label_sets), n), bool)
    left_out = np.zeros(len(label_sets), np.int64)
    for s, ls in enumerate(label_sets):
        among[s] = mask(ls.among, "--among")[0]  # NULL: not among
        is_positive, unknown = mask(ls.positive, "--positive")
        left_out[s] = int((among[s] & unknown).sum())  # neither positive nor negative: left out
        among[s] &= ~unknown
        positive[s] = is_positive & among[s]
        n_in, n_pos = int(among[s].sum()), int(positive[s].sum())
        scope = f"among the {n_in} examples of --among {ls.among!r}" if ls.among else f"among the {n_in} examples"
        if n_in == 0 and left_out[s]:
            raise UserError(
                f"label set {ls.name}: --positive {ls.positive!r} is NULL for every example (a NULL or NaN label), "
                "so none is positive or negative; check the column's values"
            )
        if n_in == 0:
            raise UserError(f"label set {ls.name}: --among {ls.among!r} matches no example; check its values")
        if n_pos == 0:
            raise UserError(
                f"label set {ls.name} has no positive examples ({ls.positive!r}) {scope}: AP is undefined; "
                'check the predicate\'s values (hookpoints sql ... "SELECT DISTINCT language FROM examples")'
            )
        if n_pos == n_in:
            raise UserError(
                f"label set {ls.name} has no negative examples: all {n_in} examples match {ls.positive!r}; "
                "AP is undefined - widen --among or narrow --positive"
            )
    return LabelMasks(list(label_sets), positive, among, left_out)
