"""Shared pieces of the hostile-input tests: a small store filled through the writer, and checksums."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run

SETTINGS = {"model": "m", "task": "forward", "pooling": "mean", "dtype": "float32"}


def hooks(names=("h0", "h1"), width: int = 4) -> list[dict]:
    return [
        {
            "hook": name,
            "module": name.split(":")[0],
            "io": "output",
            "component": "lm",
            "layer": i,
            "submodule": "mlp",
            "width": width,
            "shape": [width],
            "neuron_axis": 2,
            "space": "input",
            "layer_output": False,
        }
        for i, name in enumerate(names)
    ]


def fill(store: Store, run: str, seed: int = 0, *, hook_names=("h0", "h1"), if_exists="error", columns=None):
    """Record 3 examples of random vectors (seeded) at ``hook_names``; returns the vectors per hook."""
    rng = np.random.default_rng(seed)
    examples = pa.table(columns or {"example_id": ["a", "b", "c"], "text": ["x", "y", "z"]})
    points = hooks(hook_names)
    writer = open_run(
        store, run, settings=SETTINGS, config={}, hooks=points, examples_schema=examples.schema, if_exists=if_exists
    )
    ids = examples["example_id"].to_pylist()
    values = {p["hook"]: rng.normal(size=(len(ids), 4)).astype(np.float32) for p in points}
    writer.add(examples, {hook: HookRows(ids, v) for hook, v in values.items()})
    writer.finish()
    return values


def checksums(root: Path) -> dict[str, str]:
    """md5 of every file under ``root`` (relative path -> digest)."""
    return {
        str(path.relative_to(root)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def vectors(store: Store, run: str) -> dict:
    """(hook, example_id) -> vector, read through the SQL views."""
    with store.query() as session:
        rows = session.sql("SELECT hook, example_id, activation FROM activations WHERE run = $r", {"r": run})
    return {(r["hook"], r["example_id"]): r["activation"] for r in rows.to_pylist()}


#: Four labelled texts: the run the entry-point matrix (tests/test_hostile_entry_points.py) records first.
ROWS = [{"id": f"e{i}", "text": text, "language": lang} for i, (text, lang) in enumerate(
    [("hello world", "en"), ("hallo welt", "de"), ("good day", "en"), ("guten tag", "de")])]  # fmt: skip


def recorded_store(model, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A store holding run r1 of ``ROWS`` (two hooks), and the md5 of its files."""
    import hookpoints as hp

    root = tmp_path / "store"
    hp.record(model, ROWS, str(root), run="r1", hooks="blocks.*.mlp.hook_post", progress=False)
    return root, checksums(root)


def copied_store(recorded: tuple[Path, dict[str, str]], tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Each test's own copy of a store :func:`recorded_store` made once per module (in ``tmp_path / "store"``,
    byte for byte its files), and the md5 of its files: a test that changes its store changes only its copy."""
    root = tmp_path / "store"
    shutil.copytree(recorded[0], root)
    before = checksums(root)
    assert before == recorded[1]
    return root, before


def one_line_error(call) -> str:
    """The message of the UserError ``call()`` raises, checked to be one line."""
    import pytest

    from hookpoints.errors import UserError

    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message
