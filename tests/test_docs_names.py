"""Every dotted name of our code in the README and docs/ (``hookpoints.settings.RunSettings``,
``analyses.selection.selection_gini``, ``store.tables.sql_string``) imports and has that attribute, and every
source path they cite (``store/neuron_sql.py``, ``tests/test_placement.py``) exists: a moved function or file
cannot leave the docs pointing at nothing."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOTTED = re.compile(r"(?<![\w/.$])((?:hookpoints|analyses|store|cli)(?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(
    r"(?<![\w/.-])((?:hookpoints|analyses|store|cli|tests|bench|examples)/[\w./-]+\.(?:py|ipynb|sh|jsonl))"
)
#: A Store called ``store`` in the docs' examples, not the package.
VARIABLES = {"store.sql", "store.info", "store.query", "store.runs"}


def resolves(name: str) -> bool:
    parts = name.split(".")
    if parts[0] != "hookpoints":
        parts = ["hookpoints", *parts]
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                found = getattr(found, attribute)
        except AttributeError:
            return False
        return True
    return False


def dead(page: Path) -> list[str]:
    text = page.read_text()
    names = {n for n in DOTTED.findall(text) if n not in VARIABLES and not n.endswith((".py", ".md", ".html"))}
    wrong = [name for name in sorted(names) if not resolves(name)]
    return wrong + [path for path in sorted(set(PATH.findall(text))) if not (ROOT / path).exists()]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_code_names_and_paths_in_the_docs_exist(page):
    assert not dead(page), f"{page.relative_to(ROOT)} names what does not exist: {dead(page)}"


def test_the_check_finds_a_missing_name_and_path(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "`hookpoints.settings.RunSettings`, `analyses.selection.no_such`, `store/gone.py`, `tests/conftest.py`"
    )
    assert dead(page) == ["analyses.selection.no_such", "store/gone.py"]
