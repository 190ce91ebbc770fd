"""Loading checkpoints by path (as a user would a hub id), and the errors for what cannot be loaded."""

from __future__ import annotations

import json

import pytest

from hookpoints.errors import UserError
from hookpoints.loading import load


def test_bad_model_sources(tmp_path):
    with pytest.raises(UserError, match="model path .*/nowhere does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(UserError, match="unknown architecture"):
        load(tmp_path / "odd")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="broken"):
        load(tmp_path / "broken")


def test_hub_id_without_a_reachable_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="model someone/not-cached-model: .* the hub is not reachable .*check the path"):
        load("someone/not-cached-model")


def test_modality_the_model_cannot_take(tiny_model_dir):
    with pytest.raises(UserError, match="takes text input, not speech"):
        load(tiny_model_dir("gpt2"), modality="speech")
    with pytest.raises(UserError, match="dtype must be one of"):
        load(tiny_model_dir("gpt2"), dtype="int4")


def test_missing_weights(tiny_model_dir, tmp_path):
    source = tiny_model_dir("gpt2")
    target = tmp_path / "config-only"
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(UserError, match="cannot load model weights"):
        load(target)


def test_model_without_tokenizer(tiny_model_dir, tmp_path):
    source = tiny_model_dir("gpt2")
    target = tmp_path / "no-tokenizer"
    target.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (source / name).exists():
            (target / name).write_bytes((source / name).read_bytes())
    model = load(target)
    with pytest.raises(UserError, match="has no tokenizer"):
        model.text_inputs(["hello"])
