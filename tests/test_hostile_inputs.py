"""Hostile inputs to recording and analysis: each gets a one-line error naming the fix (exit 2), and no store
is changed (md5 of every file before and after)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from hookpoints.errors import UserError
from tests.hostile_helpers import checksums, fill


@pytest.fixture
def filled(store):
    fill(store, "r1")
    return store, Path(store.location.uri), checksums(Path(store.location.uri))


def record_args(model, data, store_path, *extra):
    return ["record", "--model", str(model), "--data", str(data), "--store", str(store_path), "--run", "r2", *extra]


def assert_refused(run_cli, args, message, root: Path, before: dict) -> str:
    code, _, err = run_cli(*args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert checksums(root) == before
    return err


def test_a_manifest_that_is_not_utf8_names_its_file_and_line(filled, run_cli, gpt2_dir, tmp_path):
    _, root, before = filled
    for suffix, good, bad in [
        ("jsonl", '{"id": "a", "text": "ok"}\n', b'{"id": "b", "text": "caf\xe9"}\n'),
        ("csv", "id,text\na,ok\n", b"b,caf\xe9\n"),  # line 3: after the header
    ]:
        path = tmp_path / f"bad.{suffix}"
        path.write_bytes(good.encode() + bad)
        line = 2 if suffix == "jsonl" else 3
        assert_refused(run_cli, record_args(gpt2_dir, path, root), f"{path}, line {line}: not UTF-8", root, before)


def test_json_nested_too_deeply_is_refused(filled, run_cli, gpt2_dir, tmp_path):
    _, root, before = filled
    path = tmp_path / "deep.jsonl"
    path.write_text('{"id": "a", "text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert_refused(run_cli, record_args(gpt2_dir, path, root), "line 1: JSON nested too deeply", root, before)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_buffer_mb_must_be_a_finite_number(filled, run_cli, gpt2_dir, texts_manifest, value):
    _, root, before = filled
    args = record_args(gpt2_dir, texts_manifest(2), root, "--buffer-mb", value)
    code, _, err = run_cli(*args)
    assert code == 2 and "--buffer-mb" in err and "Traceback" not in err
    assert checksums(root) == before


def test_threads_below_one_are_refused(filled, run_cli):
    _, root, before = filled
    code, _, err = run_cli("ap", "--store", str(root), "--run", "r1", "--preset", "unimodal", "--threads", "-1")
    assert code == 2 and "--threads" in err and checksums(root) == before


def test_a_device_that_does_not_exist_lists_those_that_do(filled, run_cli, gpt2_dir, texts_manifest):
    _, root, before = filled
    err = assert_refused(
        run_cli, record_args(gpt2_dir, texts_manifest(2), root, "--device", "cuda:9"), "no such device", root, before
    )
    assert "devices: cpu" in err


def test_a_local_path_that_does_not_exist_is_refused_at_once(filled, run_cli, texts_manifest, monkeypatch):
    _, root, before = filled
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    for model, message in [
        ("models/nope", "check the path"),
        ("nope-model", "check the path"),
        ("./nope", "does not exist"),
    ]:
        assert_refused(run_cli, record_args(model, texts_manifest(2), root), message, root, before)
    assert time.perf_counter() - started < 10


def test_a_truncated_weights_file_is_named(gpt2_dir, tmp_path):
    from hookpoints.loading import load

    broken = tmp_path / "broken"
    shutil.copytree(gpt2_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="damaged or truncated"):
        load(broken)


def test_a_config_that_does_not_match_its_weights_is_named(gpt2_dir, tmp_path):
    from hookpoints.loading import load

    broken = tmp_path / "broken"
    shutil.copytree(gpt2_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["n_embd"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="do not match its config.json"):
        load(broken)


@pytest.mark.parametrize("family", ["t5", "vit"])
def test_an_unsupported_architecture_lists_the_supported_ones(tmp_path, family):
    from transformers import T5Config, ViTConfig

    from hookpoints.loading import load

    config = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8) if family == "t5" else ViTConfig()
    config.save_pretrained(tmp_path / family)
    with pytest.raises(UserError, match=f"is a {family} model, which hookpoints does not support.*gpt2.*whisper"):
        load(tmp_path / family)


def test_a_backwards_neuron_range_is_refused():
    from hookpoints.analyses.interventions import explicit_selection

    hooks = {"blocks.0.mlp.fc1": ("mlp", 8)}
    with pytest.raises(UserError, match="runs backwards; write it 2-5"):
        explicit_selection(["blocks.0.mlp.fc1:5-2"], hooks)
    assert explicit_selection(["blocks.0.mlp.fc1:2-5"], hooks).neurons.num_rows == 4


def test_a_misspelt_neurons_hook_gets_the_closest_names():
    from hookpoints.analyses.interventions import explicit_selection

    hooks = {"blocks.0.mlp.hook_post": ("lm", 8), "blocks.1.mlp.hook_post": ("lm", 8)}
    with pytest.raises(UserError, match="no hook point 'blocks.0.mlp.hook_pst' here; e.g. blocks.0.mlp.hook_post"):
        explicit_selection(["blocks.0.mlp.hook_pst:1"], hooks)


def test_a_truncated_audio_file_is_refused(tmp_path):
    from hookpoints.audio import load_audio

    path = tmp_path / "speech.wav"
    soundfile.write(path, np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    assert load_audio(path, "a").shape == (16000,)
    path.write_bytes(path.read_bytes()[:20000])
    with pytest.raises(UserError, match="is truncated .* export it again"):
        load_audio(path, "a")


def test_record_overwrite_with_a_clashing_manifest_keeps_the_old_run(tmp_path, run_cli, gpt2_dir, write_manifest):
    """The issue's data-loss case end to end: `--overwrite` with a manifest column `Language` where the store
    has `language` (Delta refused it at commit, after the old run was deleted)."""
    store_path = tmp_path / "store"
    good = write_manifest([{"id": f"x{i}", "text": f"hi {i}", "language": "en"} for i in range(3)], "good.jsonl")
    code, _, err = run_cli(*record_args(gpt2_dir, good, store_path, "--hooks", "blocks.0.*"))
    assert code == 0, err
    before = checksums(store_path)
    clash = write_manifest([{"id": "x0", "text": "hi", "Language": "de"}], "clash.jsonl")
    assert_refused(
        run_cli,
        record_args(gpt2_dir, clash, store_path, "--hooks", "blocks.0.*", "--overwrite"),
        "case",
        store_path,
        before,
    )
    code, out, _ = run_cli("sql", "--store", str(store_path), "--format", "csv", "SELECT status FROM runs")
    assert out.splitlines() == ["status", "complete"]
