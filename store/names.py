"""The store's schema version and its rule for run names: the constants a store is opened and checked with.

Kept apart from store/schema.py (the Arrow schemas, which import pyarrow) so that ``hookpoints sql`` and
``store info`` open a store without importing pyarrow; store/schema.py re-exports both. Example::

    assert RUN_NAME.match("whisper-tiny.fleurs") and SCHEMA_VERSION >= 2
"""

from __future__ import annotations

import re

#: Version 2 added ``run_events.shard/shards/writer`` and ``activations.finite`` (store/migrate.py upgrades 1).
SCHEMA_VERSION = 2

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
