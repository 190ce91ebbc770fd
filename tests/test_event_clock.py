"""A machine whose clock is behind cannot reorder a run's history: each event is stamped after the run's
latest (store.runs.next_event_at), so a resumed shard's ``complete`` follows its ``failed`` and a run recorded
again after ``store delete`` is live, whatever the clocks say."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from clusters_helpers import clustered, write_run
from hookpoints.store import catalog, overwrite
from hookpoints.store.writer import HookRows, open_run


@pytest.fixture
def clock(monkeypatch):
    """``clock(hours)``: from now on this machine's clock reads ``hours`` off the true time."""

    def set_offset(hours: float) -> None:
        def skewed() -> datetime:
            return datetime.now(UTC) + timedelta(hours=hours)

        monkeypatch.setattr(catalog, "_now", skewed)
        monkeypatch.setattr(overwrite, "_now", skewed)

    return set_offset


def _events(store, run: str) -> list[tuple[str, datetime]]:
    table = store.dataset("run_events").to_table(columns=["run", "status", "event_at"])
    return [(r["status"], r["event_at"]) for r in table.to_pylist() if r["run"] == run]


def test_a_resume_on_a_machine_an_hour_behind_completes_the_run(store, clock):
    examples, vectors = clustered()
    hooks = [{"hook": h, "width": v.shape[1]} for h, v in vectors.items()]
    table = pa.Table.from_pylist(examples)
    settings = {"model": "m", "task": "forward", "pooling": "mean", "dtype": "float32"}

    def writer(if_exists: str):
        return open_run(store, "r", settings=settings, config={}, hooks=hooks, examples_schema=table.schema,
                        if_exists=if_exists)  # fmt: skip

    first = writer("error")
    first.finish("failed", "the machine went down")
    assert store.run_info("r").status == "failed"
    clock(-1)  # another machine, its clock an hour behind
    second = writer("resume")
    ids = table["example_id"].to_pylist()
    second.add(table, {h: HookRows(ids, v.astype(np.float32)) for h, v in vectors.items()})
    second.finish("complete")
    assert store.run_info("r").status == "complete"
    at = dict(_events(store, "r"))  # status -> its time stamp (one event each)
    assert at["recording"] < at["failed"] < at["resumed"] < at["complete"]  # in the order logged


def test_a_run_recorded_again_after_a_delete_by_a_machine_behind_is_live(store, clock):
    examples, vectors = clustered()
    write_run(store, "r", examples, vectors, pooling="mean")
    store.delete_run("r")
    assert store.run_info("r") is None
    clock(-2)
    write_run(store, "r", examples, vectors, pooling="mean")
    assert store.run_info("r").status == "complete"
    with store.query() as session:
        assert session.sql("SELECT count(*) AS n FROM examples WHERE run = 'r'")["n"].to_pylist() == [len(examples)]


def test_an_overwrite_swapped_in_by_a_machine_behind_is_the_run(store, clock):
    examples, vectors = clustered()
    write_run(store, "r", examples, vectors, pooling="mean")
    clock(-3)
    write_run(store, "r", examples[:5], {h: v[:5] for h, v in vectors.items()}, pooling="mean", if_exists="overwrite")
    info = store.run_info("r")
    assert info is not None and info.status == "complete"
    with store.query() as session:
        assert session.sql("SELECT count(*) AS n FROM examples WHERE run = 'r'")["n"].to_pylist() == [5]


def test_events_keep_the_machine_time_when_it_is_later(store, clock):
    examples, vectors = clustered()
    before = datetime.now(UTC)
    write_run(store, "r", examples, vectors, pooling="mean")
    stamps = [at for _, at in _events(store, "r")]
    assert all(before <= at <= datetime.now(UTC) for at in stamps)  # no skew: the clock's own time
