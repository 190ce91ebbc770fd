"""A run's state from the append-only ``run_events`` log, and how a run is split into shards.

Each shard of a run logs its own events (recording, resumed, complete, failed); a deletion is logged for the
whole run. The state is computed, never stored, so concurrent writers never update a shared row:

- events at or before a run's latest ``deleted`` event are history and ignored;
- each shard's status is its latest event's;
- the run is ``complete`` when all its shards are, ``failed`` when one of them failed (resume it), and
  ``recording`` otherwise (a shard killed with SIGKILL stays ``recording`` until it is resumed).

Events written before schema version 2 have no shard columns: they read as shard 0 of 1.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta

from hookpoints.errors import UserError


def next_event_at(dataset, runs: list[str], now: datetime) -> datetime:
    """The time stamp of a new event of ``runs``: ``now``, or 1 us after their latest event where that is later.

    A run's state orders its events by ``event_at``, written by each machine's clock. A machine whose clock is
    behind would log a resumed shard's ``complete`` before its own ``failed``, or a run recorded again after a
    ``store delete`` before the delete (and so deleted). Stamping each event after the run's latest keeps the
    order in which they were logged. ``dataset``: the ``run_events`` table (an Arrow dataset).
    """
    import pyarrow.compute as pc

    stamps = dataset.to_table(columns=["event_at"], filter=pc.field("run").isin(runs))["event_at"]
    latest = pc.max(stamps).as_py() if len(stamps) else None
    return now if latest is None or latest < now else latest + timedelta(microseconds=1)


#: Per shard: its latest status. ``{events}`` is the name of a relation with ``run_events``' columns.
SHARD_STATES_SQL = """
    WITH events AS (
        SELECT *, coalesce(shard, 0) AS shard_index, coalesce(shards, 1) AS shard_count FROM {events}
    ),
    deleted AS (SELECT run, max(event_at) AS deleted_at FROM events WHERE status = 'deleted' GROUP BY run)
    SELECT e.* EXCLUDE (shard, shards)
    FROM events e LEFT JOIN deleted d USING (run)
    WHERE d.deleted_at IS NULL OR e.event_at > d.deleted_at
"""

#: One row per live run: settings from its latest event, status over all its shards.
RUNS_SQL = """
    WITH live AS ({live}),
    shard_latest AS (
        SELECT run, shard_index, arg_max(status, event_at) AS status FROM live GROUP BY run, shard_index
    ),
    per_run AS (
        SELECT run,
            count(*) FILTER (WHERE status = 'complete') AS shards_complete,
            count(*) FILTER (WHERE status = 'failed') AS shards_failed
        FROM shard_latest GROUP BY run
    ),
    latest AS (
        SELECT *, min(event_at) OVER (PARTITION BY run) AS created_at FROM live
        QUALIFY row_number() OVER (PARTITION BY run ORDER BY event_at DESC) = 1
    )
    SELECT l.run, l.model, l.task, l.pooling, l.dtype, l.created_at,
        CASE
            WHEN p.shards_complete = l.shard_count THEN 'complete'
            WHEN p.shards_failed > 0 THEN 'failed'
            ELSE 'recording'
        END AS status,
        l.event_at AS updated_at, l.shard_count AS shards, p.shards_complete, l.config, l.message
    FROM latest l JOIN per_run p USING (run)
"""


def runs_sql(events: str) -> str:
    """The ``runs`` query over a relation named ``events`` holding ``run_events`` rows."""
    return RUNS_SQL.format(live=SHARD_STATES_SQL.format(events=events))


def shard_states_sql(events: str) -> str:
    """``(run, shard_index, status)``: each live shard's latest status."""
    live = SHARD_STATES_SQL.format(events=events)
    return f"SELECT run, shard_index, arg_max(status, event_at) AS status FROM ({live}) GROUP BY run, shard_index"


# -- shards ------------------------------------------------------------------------------------------------

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; None -> ``(0, 1)`` (the whole run)."""
    if text is None:
        return 0, 1
    match = _SHARD.match(str(text))
    if not match:
        raise UserError(f"shard {text!r} is not of the form I/N (e.g. 0/4 for the first of four shards)")
    index, count = int(match[1]), int(match[2])
    check_shard((index, count))
    return index, count


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    whole = isinstance(shard, tuple | list) and len(shard) == 2
    if not whole or not all(hasattr(n, "__index__") and not isinstance(n, bool) for n in shard):
        # (0.5, 2) matched no example: a run of 0 examples, recorded without a word
        raise UserError(f"shard must be two whole numbers (I, N), e.g. (0, 4) for the first of four, not {shard!r}")
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UserError(f"shard {index}/{count} does not exist: give I/N with 0 <= I < N (N >= 1)")
    return shard


def in_shard(example_id: str, shard: tuple[int, int]) -> bool:
    """Whether ``example_id`` belongs to ``shard``: a stable hash of the id (same on every machine)."""
    index, count = shard
    if count == 1:
        return True
    digest = hashlib.blake2b(example_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count == index


def config_json(config: dict) -> str:
    """A run's config as ``run_events`` holds it: numpy / torch numbers as numbers (check_count takes np.int64(5):
    stored as "5", every resume or shard repeating it was refused), anything else JSON lacks as ``str``."""

    def plain(value):
        try:
            item = value.item()
        except (AttributeError, TypeError, ValueError, RuntimeError):
            return str(value)
        return item if isinstance(item, bool | int | float | str) else str(value)

    return json.dumps(config, sort_keys=True, default=plain)
