"""RunWriter.stats and RecordSummary.store: what the store wrote and how long the producer waited for it
(issue 16: on a GPU the store, not the model, can set the pace, and a researcher should see that)."""

from __future__ import annotations

import time

import pytest
from hookpoints.store import commits

from tests.test_store_writer import BATCH_BYTES, _batches, _open


@pytest.mark.parametrize("background", [True, False])
def test_stats_count_every_flush_its_bytes_and_the_waits(store, monkeypatch, background):
    pause = 0.3
    original = commits.FencedAppender.append

    def slow(self, data, **kwargs):
        if self.spec.name == "activations":
            time.sleep(pause)  # a slow store: every activations commit takes at least this long
        return original(self, data, **kwargs)

    monkeypatch.setattr(commits.FencedAppender, "append", slow)
    writer = _open(store, buffer_examples=3, background=background)
    batches = list(_batches(4, 3))  # 4 batches of 3 examples, a buffer of 3: a flush per batch
    for examples, rows in batches:
        writer.add(examples, rows)
    writer.finish()
    stats = writer.stats
    assert stats.flushes == 4
    assert stats.bytes == sum(r.values.nbytes for _, rows in batches for r in rows.values()) == 12 * BATCH_BYTES
    assert stats.flush_seconds >= 4 * pause
    assert stats.mb_per_second == pytest.approx(stats.bytes / stats.flush_seconds / 1e6)
    # background: each add after the first waits for the flush before it, finish for the last; serial: the
    # producer runs every flush itself
    assert stats.waited_seconds >= (4 * pause if not background else 3 * pause)
    assert stats.waited_seconds <= stats.flush_seconds + 5  # it cannot wait much longer than the store works


def test_build_seconds_count_the_table_building_alone(store, monkeypatch):
    """``build_seconds``: building each flush's Arrow table (the part of a flush on one core), inside
    ``flush_seconds``; a slow build shows there, a slow commit does not."""
    from hookpoints.store.buffer import Buffer

    pause = 0.25
    build, append = Buffer.table, commits.FencedAppender.append
    monkeypatch.setattr(Buffer, "table", lambda self, *a, **k: time.sleep(pause) or build(self, *a, **k))

    def slow_append(self, data, **kwargs):
        if self.spec.name == "activations":
            time.sleep(2 * pause)
        return append(self, data, **kwargs)

    monkeypatch.setattr(commits.FencedAppender, "append", slow_append)
    writer = _open(store, buffer_examples=3)
    for examples, rows in _batches(2, 3):
        writer.add(examples, rows)
    writer.finish()
    stats = writer.stats
    assert stats.flushes == 2
    assert 2 * pause <= stats.build_seconds < 2 * pause + 1.0  # the builds, not the commits' 2 x 0.5 s
    assert stats.flush_seconds >= stats.build_seconds + 4 * pause


def test_build_seconds_of_a_flush_that_failed_are_not_counted(store, monkeypatch):
    """A flush whose commit fails is not in ``flush_seconds`` (its rows are retried by the next one), so the time
    it spent building its table is not in ``build_seconds`` either: before, it was, and ``build_seconds``, "the part
    of flush_seconds spent building", came out larger than ``flush_seconds``."""
    from hookpoints.store.buffer import Buffer

    pause = 0.25
    build, append = Buffer.table, commits.FencedAppender.append
    monkeypatch.setattr(Buffer, "table", lambda self, *a, **k: time.sleep(pause) or build(self, *a, **k))
    failures = [OSError("disk full")]

    def failing_once(self, data, **kwargs):
        if self.spec.name == "activations" and failures:
            raise failures.pop()
        return append(self, data, **kwargs)

    monkeypatch.setattr(commits.FencedAppender, "append", failing_once)
    writer = _open(store, buffer_examples=3, background=False)
    ((examples, rows),) = _batches(1, 3)
    with pytest.raises(OSError, match="disk full"):
        writer.add(examples, rows)  # full: flushed at once, and that flush fails
    writer.finish()  # the same rows, committed
    stats = writer.stats
    assert stats.flushes == 1
    assert pause <= stats.build_seconds < 2 * pause  # the build of the flush that committed, not both
    assert stats.build_seconds <= stats.flush_seconds


def test_a_writer_that_flushed_nothing_says_zero(store):
    writer = _open(store)
    writer.finish()
    assert (writer.stats.flushes, writer.stats.bytes, writer.stats.mb_per_second) == (0, 0, 0.0)


def test_record_returns_the_store_stats_and_the_cli_prints_them(gpt2_dir, write_manifest, tmp_path, run_cli):
    import hookpoints as hp

    manifest = write_manifest([{"id": f"e{i}", "text": f"text number {i}"} for i in range(5)])
    model = hp.load(gpt2_dir)
    summary = hp.record(model, manifest, tmp_path / "s1", run="r1", hooks=["blocks.0.hook_resid_post"])
    width = model.model.config.n_embd
    assert summary.store.flushes >= 1
    assert summary.store.bytes == 5 * width * 4  # float32, one pooled vector per example
    assert 0 <= summary.store.waited_seconds <= summary.seconds
    code, out, err = run_cli("record", "--model", str(gpt2_dir), "--data", str(manifest), "--store",
                             str(tmp_path / "s2"), "--run", "r1", "--hooks", "blocks.0.hook_resid_post")  # fmt: skip
    assert code == 0, err
    said = " ".join(out.split())
    assert f"the store wrote {5 * width * 4 / 1e6:,.1f} MB of vectors in 1 flush(es)" in said
    assert "recording waited" in said
