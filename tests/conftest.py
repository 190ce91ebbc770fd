"""Shared fixtures: tiny seeded models saved to disk and loaded back by path, stores, manifests, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Tests never reach a model hub: everything is built locally and loaded by path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hookpoints.store.catalog import Store  # noqa: E402

from hookpoints.tiny import build_tiny  # noqa: E402

# Tests run tiny models: intra-op threads only add overhead, and on a busy machine their spinning costs several
# times the work.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family, seed=0)``: the folder of a tiny seeded model (built once per session)."""
    built: dict[tuple[str, int], Path] = {}

    def build(family: str, seed: int = 0) -> Path:
        if (family, seed) not in built:
            built[family, seed] = build_tiny(family, tmp_path_factory.mktemp(f"{family}-{seed}"), seed=seed)
        return built[family, seed]

    return build


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The bundled corpus' first meaning in its 6 languages: text and espeak-ng speech manifests (made once)."""
    from hookpoints.corpus import corpus_manifests

    return corpus_manifests(tmp_path_factory.mktemp("corpus"), limit=1)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.open(tmp_path / "store", create=True)


@pytest.fixture
def write_manifest(tmp_path):
    """``write_manifest(rows, name="manifest.jsonl")``: a JSONL manifest file of ``rows``."""

    def write(rows: list[dict], name: str = "manifest.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*args)`` -> (exit code, stdout, stderr), through the same entry point as the console script."""
    from hookpoints.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def gpt2_dir(tiny_model_dir) -> Path:
    """A tiny seeded GPT-2 (2 layers, d=64): the model the store tests record."""
    return tiny_model_dir("gpt2")


@pytest.fixture
def texts_manifest(write_manifest):
    """``texts_manifest(n)``: a manifest of ``n`` short texts of varied length, with a label column."""

    def make(n: int, name: str = "texts.jsonl") -> Path:
        words = "the quick brown fox jumps over a lazy dog while seven birds sing".split()
        texts = [" ".join(words[j % len(words)] for j in range(i, i + 3 + i % 7)) for i in range(n)]
        rows = [{"id": f"ex{i:04d}", "text": text, "group": i % 3} for i, text in enumerate(texts)]
        return write_manifest(rows, name)

    return make


@pytest.fixture
def cli_process():
    """``cli_process(*args, env=None)``: the hookpoints CLI as a real OS process (Popen, output piped)."""
    import subprocess
    import sys

    started = []

    def start(*args: str, env: dict | None = None) -> subprocess.Popen:
        environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            cwd=REPO,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    """The tiny GPT-2 loaded with ``prepend_bos`` and TransformerLens' copy of it (one per test module)."""
    from tests.test_transformerlens_names import gpt2_with_bos

    model, peer = gpt2_with_bos(tiny_model_dir, tmp_path_factory.mktemp("tl"))
    yield model, peer
    model.reset_hooks()
