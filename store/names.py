"""The store's schema version and its rule for run names: the constants a store is opened and checked with.

Kept apart from store/schema.py (the Arrow schemas, which import pyarrow) so that ``hookpoints sql`` and
``store info`` open a store without importing pyarrow; store/schema.py re-exports both. Example::

    assert RUN_NAME.match("whisper-tiny.fleurs") and SCHEMA_VERSION >= 2
"""

from __future__ import annotations

import re

#: Version 2 added ``run_events.shard/shards/writer`` and ``activations.finite``; version 3
#: ``activations.activation_f16_bytes`` (store/migrate.py upgrades older stores).
SCHEMA_VERSION = 3

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

#: Joins the runs an analysis compared together into its tables' ``run`` key (``s2tt+t2tt``): not allowed in
#: run names, so a key names its runs unambiguously.
RUN_KEY_SEPARATOR = "+"


def names_run(key: str, run: str) -> bool:
    """Whether an analysis table's ``run`` key is ``run`` or a key of runs analysed together that holds it."""
    return run in key.split(RUN_KEY_SEPARATOR)
