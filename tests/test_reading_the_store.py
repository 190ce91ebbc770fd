"""docs/reading-the-store.md: every ```python block of the page runs, in order, in one namespace (the blocks
assert what the text claims: row counts, decoded float16 values equal to the recorded ones, 576 globbed rows
for 288 until vacuum, typed exports)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "reading-the-store.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_every_recipe_of_the_page_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = blocks()
    assert len(found) >= 8
    namespace: dict = {"__name__": "reading_the_store"}
    for number, code in enumerate(found, 1):
        try:
            exec(compile(code, f"{DOC.name} block {number}", "exec"), namespace)  # noqa: S102 - our own doc
        except Exception as error:
            raise AssertionError(f"block {number} of {DOC.name} fails: {error!r}\n{code}") from error
    assert (tmp_path / "r16.parquet").is_file()


def test_the_page_imports_no_hookpoints_after_the_set_up_block():
    later = "".join(blocks()[1:])
    assert "from hookpoints" not in later and "import hookpoints" not in later
