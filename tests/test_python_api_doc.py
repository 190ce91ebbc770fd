"""docs/python-api.md and the README's Python block run as written, in order, in one namespace: hub ids and paths
become tiny local models (the SeamlessM4T v2 id a seeded tiny one, on the CPU), a FLEURS folder the test's own,
layer 3 layer 1 (the tiny models have two); the names the page leaves to the reader (``texts``,
``other_texts``, ``corrupt``, ``clean_cache``, ``direction``, ``scores``, ``labels``, ``values``) are defined
first. Then what the page's comments claim of the values is checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fleurs import fleurs  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]
PRELUDE = """
import torch
texts = ["The weather is nice.", "Hi"]
other_texts = ["Das Wetter", "Hallo Welt, wie geht es?"]
corrupt = ["The weather is bad.", "Ho"]
direction = torch.randn(64)
scores, labels, values = np.random.default_rng(0).normal(size=(6, 4)), np.array([1, 0, 1, 0, 0, 1]), [1.0, 2.0, 5.0]
"""


def blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def run_page(page: Path, namespace: dict, local: dict[str, str], before: dict[int, str]) -> None:
    for number, code in enumerate(blocks(page), 1):
        for placeholder, path in local.items():
            code = code.replace(placeholder, path)
        code = before.get(number, "") + code
        try:
            exec(compile(code, f"{page.name} block {number}", "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as error:
            raise AssertionError(f"block {number} of {page.name} fails: {error!r}\n{code}") from error


@pytest.fixture
def local(tiny_model_dir, fleurs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    rows = [
        {"id": f"e{i}", "text": text, "language": language, "modality": modality}
        for i, (text, language, modality) in enumerate(
            [("Das Wetter ist schön.", "de", "speech"), ("The weather is nice.", "en", "speech"),
             ("Hallo Welt", "de", "text"), ("Il fait beau.", "fr", "speech"), ("Guten Morgen", "de", "speech")]
        )
    ]  # fmt: skip
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    seamless = str(tiny_model_dir("seamless_m4t_v2"))
    return {
        '"path/to/model"': repr(str(tiny_model_dir("gpt2"))),
        '"facebook/seamless-m4t-v2-large"': repr(seamless),
        'dtype="float16", device="cuda"': 'dtype="float32", device="cpu"',
        '"path/to/fleurs"': repr(str(fleurs)),
        "layers.3.": "layers.1.",
        'hp.load("gpt2")': f"hp.load({str(tiny_model_dir('gpt2'))!r})",
        "blocks.5.": "blocks.1.",
    }


def test_the_python_api_page_runs_as_written(local):
    namespace: dict = {"__name__": "python_api_doc", "np": np}
    exec(PRELUDE, namespace)  # noqa: S102
    # block 3 patches a clean run into a corrupt one of the same shapes: the page's "clean_cache"
    before = {3: "_, clean_cache = model.run_with_cache(corrupt)\n"}
    run_page(ROOT / "docs" / "python-api.md", namespace, local, before)
    assert (namespace["point"].width, namespace["point"].shape, namespace["point"].module) == (
        64, (4, 16), "transformer.h.0.attn.c_attn",
    )  # fmt: skip
    cache, pooled = namespace["cache"], namespace["pooled"]
    assert cache["blocks.0.attn.hook_q"].shape[2:] == (4, 16) and cache.mask.dtype == torch.bool
    assert cache.mean("blocks.0.hook_resid_post").shape == (64,) and pooled["blocks.0.hook_resid_post"].shape == (2, 64)
    assert namespace["np"].stack(namespace["one"]["activation"].to_pylist()).shape == (5, 256)
    assert isinstance(namespace["seamless"].decode(namespace["generation"])[0], str)
    continuation = namespace["continuation"]  # GPT-2 continues its two texts: each as it would alone
    alone = namespace["gpt2"].generate(["Hello"], max_new_tokens=20)
    assert continuation.generated(1) == alone.generated(0) and continuation.space == "input"
    assert {r["run"] for r in namespace["store"].runs().to_pylist()} == {"r1", "r2", "r3", "fleurs"}
    model = namespace["model"]  # the TransformerLens habits: hooks gone after reset_hooks and the hooks() block
    assert not namespace["ablated_cache"]["blocks.0.mlp.hook_post"][..., [3, 7]].any() and not model._hook_entries
    assert namespace["per_token"].shape == (2, namespace["logits"].shape[1] - 1) and namespace["loss"].dim() == 0
    assert not torch.isclose(namespace["ablated_loss"], namespace["loss"])
    real = namespace["cache"].mask  # direct logit attribution: a value at every real position, NaN at padding
    assert namespace["diff"][:, real].isfinite().all() and namespace["diff"][:, ~real].isnan().all()
    grads = namespace["grads"]  # gradients at every cached point, in its layout; no weight's .grad left
    assert grads["blocks.0.hook_resid_post_grad"].shape == grads["blocks.0.hook_resid_post"].shape
    assert grads["blocks.0.hook_resid_post_grad"].abs().sum() > 0 and namespace["train_loss"].dim() == 0
    assert torch.equal(namespace["logits"], model(namespace["texts"]))
    assert all(p.grad is None for p in model.model.parameters()) and namespace["hooked_loss"].requires_grad


def test_the_readme_python_block_runs_as_written(local):
    namespace: dict = {"__name__": "readme"}
    (readme,) = blocks(ROOT / "README.md")
    run_page(ROOT / "README.md", namespace, local, {})
    assert "blocks.0.hook_resid_post" in readme
    shapes = (namespace["cache"]["blocks.0.hook_resid_post"].shape, namespace["cache"].mask.shape)
    assert shapes[0][:2] == shapes[1] and shapes[0][2] == 64
