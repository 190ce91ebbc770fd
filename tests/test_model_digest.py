"""A run knows its model by weights, not by path (hookpoints.model_digest): a resume or another shard from a copy
of the checkpoint elsewhere is the same model; the same folder holding another checkpoint, or the weights in
another dtype, is refused; an intervention sweep refuses a model that is not its stats run's."""

from __future__ import annotations

import json
import shutil
import zlib

import numpy as np
import pytest
import torch
from hookpoints.analyses.intervention_sweep import SweepSpec, plan_sweep
from hookpoints.analyses.ranking import plan_ranking, rank, write_scores
from hookpoints.store.catalog import RunInfo, Store
from hookpoints.store.run_checks import check_resumable, config_differences
from transformers import AutoConfig

from hookpoints.adapters import adapter_for
from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.model_digest import SAMPLES, _positions, check_weights, model_config, model_digests, weights_dtype
from hookpoints.recorder import record
from tests.test_placement import SPLIT

HOOKS = ["blocks.*.hook_resid_post"]
TEXTS = ["the cat sat", "a dog ran far away", "one more line of words", "birds sing", "it rains today", "hello"]


@pytest.fixture
def manifests(write_manifest):
    """``manifests(n)``: the first ``n`` texts (all of them by default), half English, half German."""

    def make(n: int = len(TEXTS)):
        rows = [{"id": f"t{i}", "text": t, "language": "en de".split()[i % 2]} for i, t in enumerate(TEXTS[:n])]
        return read_manifest(write_manifest(rows, f"texts{n}.jsonl"), required=("text",))

    return make


def _copy(folder, to):
    shutil.copytree(folder, to, dirs_exist_ok=True)
    return to


def _values(store: Store, run: str) -> dict:
    with store.query() as session:
        rows = session.sql(f"SELECT example_id, hook, activation FROM activations WHERE run = '{run}'").to_pylist()
    return {(r["example_id"], r["hook"]): np.asarray(r["activation"]) for r in rows}


@pytest.mark.parametrize("family", ["llama", "seamless_m4t_v2", "whisper"])
def test_the_digest_is_the_checkpoint_not_its_path_placement_or_load_dtype(tiny_model_dir, tmp_path, family):
    folder = tiny_model_dir(family)
    whole = model_digests(load(folder, device="cpu").model)
    assert set(whole) == {"float32", "bfloat16", "float16"}
    assert model_digests(load(_copy(folder, tmp_path / "copy"), device="cpu").model) == whole
    for dtype in ("bfloat16", "float16"):  # loaded cast down: its own digest is the float32 load's cast one
        half = load(folder, device="cpu", dtype=dtype).model
        assert weights_dtype(half) == dtype
        assert model_digests(half) == {dtype: whole[dtype]}
    assert len(set(whole.values())) == 3


def test_offloaded_weights_are_read_from_the_device_map(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    split = load(folder, device="cpu", device_map=SPLIT, offload_folder=tmp_path / "offload").model
    assert dict(split.named_parameters())["model.layers.1.mlp.up_proj.weight"].device.type == "meta"
    assert model_digests(split) == model_digests(load(folder, device="cpu").model)


def test_other_weights_change_the_digest_and_config_values_are_compared_by_key(tiny_model_dir):
    model = load(tiny_model_dir("llama"), device="cpu").model
    digest, config = model_digests(model)["float32"], model_config(model)
    assert model_digests(load(tiny_model_dir("llama", seed=1), device="cpu").model)["float32"] != digest
    weight = model.model.layers[1].mlp.down_proj.weight  # one matrix, every value moved by a fine-tune's step
    assert weight.numel() > SAMPLES  # sampled, not read whole
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-6)
        assert model_digests(model)["float32"] != digest
        weight.copy_(saved)
    assert model_digests(model)["float32"] == digest
    assert "name_or_path" not in json.dumps(config) and "transformers_version" not in config
    model.config.use_cache = not model.config.use_cache  # how it is run, not what it computes
    model.config.output_hidden_states = True
    assert config_differences(config, model_config(model)) == []
    model.config.rms_norm_eps *= 2  # what it computes: named, and not in the digest
    assert config_differences(config, model_config(model)) == [
        f"rms_norm_eps: {model.config.rms_norm_eps!r} here != {config['rms_norm_eps']!r} recorded"
    ]
    assert model_digests(model)["float32"] == digest
    newer = {**model_config(model), "a_key_a_newer_transformers_writes": 1}
    assert config_differences(model_config(model), newer) == []  # only the keys both hold are compared


def test_sample_positions_are_splitmix64_written_out():
    """The positions are the same with any torch or numpy: splitmix64 (Steele, Lea, Flood 2014) step by step in
    Python integers against the vectorised version."""
    mask = 2**64 - 1

    def splitmix(seed: int, i: int) -> int:
        z = (seed + i * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    seed = zlib.crc32(b"model.layers.0.mlp.up_proj.weight")
    expected = [splitmix(seed, i) % 12_345 for i in range(1, SAMPLES + 1)]
    assert _positions("model.layers.0.mlp.up_proj.weight", 12_345).tolist() == expected
    assert len(set(expected)) > 3_000  # spread, not a stride


def test_a_resume_and_a_shard_from_a_copy_of_the_checkpoint_are_the_same_model(
    tiny_model_dir, tmp_path, manifests, store
):
    folder = tiny_model_dir("gpt2")
    copy = _copy(folder, tmp_path / "elsewhere" / "gpt2")
    record(load(folder), manifests(), store, "whole", hooks=HOOKS)
    first = manifests(2)
    record(load(folder), first, store, "r", hooks=HOOKS)
    summary = record(load(copy), manifests(), store, "r", hooks=HOOKS, if_exists="resume")  # was refused by name
    assert (summary.recorded, summary.skipped) == (4, 2)
    record(load(folder), manifests(), store, "s", hooks=HOOKS, shard=(0, 2))
    record(load(copy), manifests(), store, "s", hooks=HOOKS, shard=(1, 2))
    expected = _values(store, "whole")
    for run in ("r", "s"):
        got = _values(store, run)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-6)


def test_the_same_folder_holding_another_checkpoint_or_dtype_is_refused(tiny_model_dir, tmp_path, manifests, store):
    folder = _copy(tiny_model_dir("gpt2"), tmp_path / "ckpt")
    first = manifests(2)
    record(load(folder), first, store, "r", hooks=HOOKS)
    record(load(folder), first, store, "s", hooks=HOOKS, shard=(0, 2))
    with pytest.raises(UserError, match=r"^cannot resume run 'r' with the model's weights in bfloat16: .*float32"):
        record(load(folder, dtype="bfloat16"), manifests(), store, "r", hooks=HOOKS, if_exists="resume")
    _copy(tiny_model_dir("gpt2", seed=1), folder)  # the next fine-tuning step saved over it
    with pytest.raises(UserError, match=r"^cannot resume run 'r' with model .*ckpt: its weights are not those"):
        record(load(folder), manifests(), store, "r", hooks=HOOKS, if_exists="resume")
    with pytest.raises(UserError, match=r"^cannot resume run 's' with model .*ckpt: its weights are not those"):
        record(load(folder), manifests(), store, "s", hooks=HOOKS, shard=(1, 2))
    assert len(_values(store, "r")) == 2 * 2  # nothing was added


def test_a_run_recorded_before_digests_is_still_compared_by_name(
    tiny_model_dir, tmp_path, manifests, store, monkeypatch
):
    import hookpoints.recorder as recorder

    monkeypatch.setattr(recorder, "model_digests", lambda model: {})
    monkeypatch.setattr(recorder, "weights_dtype", lambda model: None)
    first = manifests(2)
    record(load(tiny_model_dir("gpt2")), first, store, "r", hooks=HOOKS)
    monkeypatch.undo()
    copy = _copy(tiny_model_dir("gpt2"), tmp_path / "copy")
    with pytest.raises(UserError, match="^cannot resume run 'r' with model=.*copy: it was recorded with model="):
        record(load(copy), manifests(), store, "r", hooks=HOOKS, if_exists="resume")


def test_a_sweep_refuses_a_model_that_is_not_its_stats_runs(tiny_model_dir, tmp_path, manifests, store):
    folder = tiny_model_dir("gpt2")
    record(load(folder), manifests(), store, "lm", hooks=["blocks.*.mlp.hook_post"])
    write_scores(store, rank(store, plan_ranking(store, ["lm"], presets=["unimodal"], ks=(4,))))
    assert store.run_info("lm").config["model_dtype"] == "float32"

    def plan(model, dtype="float32", stats_run="lm") -> list:
        spec = SweepSpec("s", runs=("lm",), tasks=("continue",), ks=(4,), languages=("en", "de"), limit=2,
                         max_new_tokens=3, model=str(model), kind="constant", value=8.0,
                         stats_runs=(stats_run,))  # fmt: skip
        return plan_sweep(store, spec, lambda source, modality: load(source, modality=modality, dtype=dtype))

    assert len(plan(_copy(folder, tmp_path / "moved"))) == 2  # the checkpoint moved: the same weights
    assert len(plan(folder, dtype="bfloat16")) == 2  # recorded in float32, checked in bfloat16
    with pytest.raises(UserError, match=r"^model .*gpt2-1.* does not have the weights run 'lm' was recorded with"):
        plan(tiny_model_dir("gpt2", seed=1))
    with pytest.raises(UserError, match="does not have the weights run 'lm' was recorded with .* in bfloat16"):
        plan(tiny_model_dir("gpt2", seed=1), dtype="bfloat16")
    record(load(folder, dtype="bfloat16"), manifests(), store, "lm16", hooks=["blocks.*.mlp.hook_post"])
    assert len(plan(folder, stats_run="lm16")) == 2  # recorded in bfloat16, checked as float32 cast down
    with pytest.raises(UserError, match=r"^cannot check that model .* \(float16 here\) .* --model-dtype bfloat16"):
        plan(folder, dtype="float16", stats_run="lm16")


def test_a_model_whose_weights_are_not_here_has_no_digest_and_is_compared_by_name(tiny_model_dir, store):
    """A remote model's meta-device stand-in: a digest of its config and shapes alone was the same for two
    checkpoints of one architecture, and a resume from the other one skipped the comparison by name."""

    def stand_in(folder):
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return adapter_for(config.model_type).model_class(config, "text").from_config(config)

    first, second = stand_in(tiny_model_dir("llama")), stand_in(tiny_model_dir("llama", seed=1))
    assert model_digests(first) == model_digests(second) == {}
    config = {"model_digest": model_digests(first), "model_dtype": weights_dtype(first)}
    info = RunInfo("r", "complete", "org/base", "forward", "mean", "float32", config)
    settings = {"model": "org/fine-tune", "task": "forward", "pooling": "mean", "dtype": "float32"}
    with pytest.raises(UserError, match="^cannot resume run 'r' with model=org/fine-tune: it was recorded with"):
        check_resumable(store, "r", info, settings, [], {**config, "model_digest": model_digests(second)})
    check_weights(load(tiny_model_dir("llama"), device="cpu").model, config, "r", "x")  # nothing to compare


def test_a_checkpoint_whose_config_was_edited_is_refused_naming_the_key(tiny_model_dir, tmp_path, manifests, store):
    folder = _copy(tiny_model_dir("gpt2"), tmp_path / "ckpt")
    record(load(folder), manifests(2), store, "r", hooks=HOOKS)
    config = json.loads((folder / "config.json").read_text())
    epsilon = config["layer_norm_epsilon"]
    config["layer_norm_epsilon"] = epsilon * 10  # the same weights, another computation
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UserError, match=r"^cannot resume run 'r' with model .*: it is not configured as .*layer_norm_eps"
    ):
        record(load(folder), manifests(), store, "r", hooks=HOOKS, if_exists="resume")
    recorded = store.run_info("r").config
    with pytest.raises(UserError, match=r"^model .* is not configured as the model run 'r' .*layer_norm_epsilon"):
        check_weights(load(folder).model, recorded, "r", str(folder))
    config["transformers_version"] = "9.99"  # written by another version: not a computation
    config["layer_norm_epsilon"] = epsilon
    (folder / "config.json").write_text(json.dumps(config))
    assert record(load(folder), manifests(), store, "r", hooks=HOOKS, if_exists="resume").recorded == 4
