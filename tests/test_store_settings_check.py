"""The settings a resumed run or another shard must repeat (store/run_checks.py `check_resumable`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hookpoints.store.writer import open_run

from hookpoints.errors import UserError
from tests.hostile_helpers import SETTINGS, hooks

SCHEMA = pa.table({"example_id": ["a"], "text": ["x"]}).schema


def start(store, config: dict, shard=(0, 1), if_exists="error"):
    writer = open_run(
        store,
        "r",
        settings=SETTINGS,
        config=config,
        hooks=hooks(),
        examples_schema=SCHEMA,
        shard=shard,
        if_exists=if_exists,
    )
    return writer


def test_a_shard_given_the_same_numpy_count_as_the_first_is_not_refused(store):
    """check_count takes numpy integers, and the run's config was written with json's default=str: a run started
    with max_new_tokens=np.int64(5) held "5", and every later shard or resume (5, or np.int64(5)) was refused
    with 'cannot resume run with max_new_tokens=5: it was recorded with max_new_tokens=5'."""
    first = start(store, {"max_new_tokens": np.int64(5), "frames": np.int32(300)}, shard=(0, 2))
    first.finish()
    assert store.run_info("r").config["max_new_tokens"] == 5  # a number, as json writes a Python int
    start(store, {"max_new_tokens": 5, "frames": 300}, shard=(1, 2)).finish()
    with pytest.raises(UserError, match="with max_new_tokens=6: it was recorded with max_new_tokens=5"):
        start(store, {"max_new_tokens": np.int64(6), "frames": 300}, shard=(1, 2), if_exists="resume")


def test_a_resume_of_a_run_recorded_before_template_existed(store):
    """A config without "template" (older hookpoints) is a run without one: resumed without one, not refused;
    with one, refused in one line."""
    start(store, {"max_new_tokens": None}).finish()
    start(store, {"max_new_tokens": None}, if_exists="resume").finish()
    with pytest.raises(UserError, match=r"with template=<\|audio\|> \{audio\}: it was recorded with template=None"):
        start(store, {"max_new_tokens": None, "template": "<|audio|> {audio}"}, if_exists="resume")


def test_a_shard_of_a_run_whose_config_an_older_hookpoints_wrote_without_the_keys(store):
    """A run started by an older hookpoints (no prepend_bos, modality or frames in its config): a new shard that
    gives them is not refused for the keys the run does not say; one it does say is still compared."""
    start(store, {"max_new_tokens": 5}, shard=(0, 3)).finish()
    start(store, {"max_new_tokens": 5, "prepend_bos": True, "modality": "text", "frames": None}, shard=(1, 3))
    with pytest.raises(UserError, match="^cannot resume run 'r' with max_new_tokens=7: it was recorded with"):
        start(store, {"max_new_tokens": 7, "prepend_bos": True}, shard=(2, 3))
