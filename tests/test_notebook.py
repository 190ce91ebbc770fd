"""``examples/quickstart.ipynb`` runs top to bottom in a Jupyter kernel (nbclient), so it cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernel spec that runs this interpreter (this venv), found through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "hookpoints-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "hookpoints", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return "hookpoints-test"


def _text(cell) -> str:
    parts = []
    for output in cell.outputs:
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
            parts.append(output["data"].get("text/html", ""))
    return "".join(parts)


def test_quickstart_notebook_runs(kernel_name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}
    NotebookClient(notebook, kernel_name=kernel_name, timeout=300, resources=resources).execute()
    cells = {cell.metadata.get("tags", [None])[0]: cell for cell in notebook.cells if cell.cell_type == "code"}
    assert not [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert "hook points, e.g." in _text(cells["hooks"]) and "shape (4, 16)" in _text(cells["hooks"])
    text_cache = _text(cells["text-cache"])
    assert "blocks.0.attn.hook_q (2, " in text_cache and ", 4, 16)" in text_cache
    assert "pooled (2, 64)" in text_cache
    assert "speech_encoder.layers.1.hook_resid_post (2, " in _text(cells["audio-cache"])
    assert "recorded 30 examples at 2 hook points" in _text(cells["record"])
    assert "complete" in _text(cells["runs"])
    assert "de" in _text(cells["sql"]) and "ja" in _text(cells["sql"])
    assert "top_rank" in _text(cells["rank"])
    figure = cells["figure"]
    assert any("image/png" in o.get("data", {}) for o in figure.outputs), "the figure cell shows a figure"
    assert "Gini of the top-10 over layers:" in _text(figure)
    intervene = _text(cells["intervene"])
    assert "edits == hooks: True" in intervene
    change = float(intervene.split("largest logit change:")[1].split()[0])
    assert change > 0


def test_python_api_snippets_are_valid_python_and_use_public_names():
    """The snippets of docs/python-api.md and the README parse, and every ``hp.NAME`` they use is exported."""
    import ast
    import re

    import hookpoints

    root = NOTEBOOK.parents[1]
    used = set()
    for page in (root / "docs" / "python-api.md", root / "README.md"):
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
        assert blocks, page
        for block in blocks:
            ast.parse(block)
            used |= set(re.findall(r"\bhp\.([A-Za-z_]\w*)", block))
    assert used and not used - set(hookpoints.__all__), sorted(used - set(hookpoints.__all__))
