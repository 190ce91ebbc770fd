"""An analysis whose runs change while it reads them writes nothing (a store shared by a team): a teammate's
overwrite, delete or resume between the analysis' reading and its writing is refused in one line, where the
results would have been stored under the run's name but computed from rows that are gone."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
from clusters_helpers import clustered, write_run
from hookpoints.analyses.clusters import ClusterSettings, cluster_layers, write_clusters
from hookpoints.analyses.labels import custom_label_set
from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
from hookpoints.store.run_marks import RunMarks

from hookpoints.errors import UserError


def _rows(store, table: str, run: str) -> int:
    if table not in store.table_names():
        return 0
    return store.dataset(table).count_rows(filter=pc.field("run") == run)


def _change(store, how: str, examples, vectors) -> None:
    if how == "delete":
        store.delete_run("syn")
    else:  # an overwrite: recorded aside, swapped in (the old run deleted, the new one complete)
        write_run(store, "syn", examples, {h: v[::-1].copy() for h, v in vectors.items()}, if_exists="overwrite")


def _ranking(store):
    label_set = custom_label_set("language = 'l0'", name="l0")
    return rank(store, plan_ranking(store, ["syn"], custom=[label_set], hooks=["blocks.*"], ks=(1,)))


@pytest.fixture
def synthetic(store):
    examples, vectors = clustered()
    write_run(store, "syn", examples, vectors, pooling="mean")
    write_run(store, "other", examples, vectors, pooling="mean")
    return store, examples, vectors


@pytest.mark.parametrize("how", ["overwrite", "delete"])
def test_a_ranking_of_a_run_that_changed_meanwhile_writes_no_scores(synthetic, how):
    store, examples, vectors = synthetic
    ranking = _ranking(store)
    _change(store, how, examples, vectors)
    with pytest.raises(UserError, match=r"^run 'syn' changed while the ranking read it .*nothing of the ranking"):
        write_scores(store, ranking)
    assert _rows(store, "scores", "syn") == 0


def test_a_ranking_of_unchanged_runs_is_written_though_another_run_changed(synthetic):
    store, examples, vectors = synthetic
    ranking = _ranking(store)
    write_run(store, "third", examples, vectors, pooling="mean")  # a teammate's new run: not ours
    store.delete_run("other")
    write_scores(store, ranking)
    assert _rows(store, "scores", "syn") == ranking.ap.size


@pytest.mark.parametrize("how", ["overwrite", "delete"])
def test_a_clustering_of_a_run_that_changed_meanwhile_writes_nothing(synthetic, how):
    store, examples, vectors = synthetic
    result = cluster_layers(store, "syn", ClusterSettings(labels=("language",), perplexity=5))
    _change(store, how, examples, vectors)
    with pytest.raises(UserError, match=r"^run 'syn' changed while the clustering read it"):
        write_clusters(store, result)
    for table in ("clusters", "cluster_maps", "cluster_linkages"):
        assert _rows(store, table, "syn") == 0


def test_marks_count_each_runs_events_in_the_snapshot_read(synthetic):
    store, examples, vectors = synthetic
    with store.query() as session:
        marks = RunMarks.read(session, ["syn", "other", "nope"])
    raw = store.dataset("run_events").to_table(columns=["run"])["run"].to_pylist()
    assert marks.events == {"syn": raw.count("syn"), "other": raw.count("other"), "nope": 0}
    assert marks.changed(store) is None
    store.delete_run("other")
    assert marks.changed(store) == "other"
