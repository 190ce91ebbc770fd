"""Recording through nnsight's remote execution (NDIF), as far as it can run offline.

The real server cannot be reached here. nnsight's local simulation of it serializes each trace exactly as it
would be sent to NDIF and runs it with this package's modules hidden (as they are on the server), so the
recorded values prove the trace needs nothing NDIF lacks. The meta-device stand-in of a remote model is
probed for its hook points like a local one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hookpoints.store.catalog import Store
from transformers import AutoConfig

from hookpoints.adapters import adapter_for
from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.model import HookedModel
from hookpoints.recorder import record
from hookpoints.remote import load_remote, simulate_remote

HOOKS = ["blocks.*.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"]
QUERY = "SELECT hook, example_id, activation FROM activations WHERE run = $run ORDER BY hook, example_id"


def test_recording_through_the_simulated_remote_server_equals_local(tmp_path, tiny_model_dir):
    rows = [{"id": f"ex{i}", "text": f"words for a remote model {i} " * (1 + i % 2)} for i in range(6)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = read_manifest(tmp_path / "m.jsonl")
    store = Store.open(tmp_path / "store", create=True)
    local = load(tiny_model_dir("llama"))
    record(local, manifest, store, "local", hooks=HOOKS, batch_size=3)
    remote = simulate_remote(local)
    assert remote.remote == "local"
    record(remote, manifest, store, "remote", hooks=HOOKS, batch_size=3)
    with store.query() as session:
        expected = session.sql(QUERY, {"run": "local"}).to_pylist()
        got = session.sql(QUERY, {"run": "remote"}).to_pylist()
    assert len(got) == len(expected) == 6 * 4
    for a, b in zip(got, expected, strict=True):
        assert (a["hook"], a["example_id"]) == (b["hook"], b["example_id"])
        np.testing.assert_allclose(a["activation"], b["activation"], rtol=1e-5, atol=1e-6)


def test_a_remote_models_stand_in_has_the_same_hook_points_without_weights(tiny_model_dir):
    source = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(source)
    adapter = adapter_for(config.model_type)
    with torch.device("meta"):
        stand_in = adapter.model_class(config, "text").from_config(config)
    remote = HookedModel(stand_in, adapter, source=str(source), remote=True)
    local = load(source)
    assert remote.device.type == "cpu"  # inputs are sent from here; the weights are on the server
    describe = [(p.name, p.width, p.time_axis, p.space) for p in remote.hook_points]
    assert describe == [(p.name, p.width, p.time_axis, p.space) for p in local.hook_points]


def test_remote_options_that_cannot_work_are_clear_errors(tiny_model_dir, monkeypatch, run_cli):
    with pytest.raises(UserError, match="serves hub models: give the hub id"):
        load_remote(str(tiny_model_dir("llama")))
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr("nnsight.CONFIG.API.APIKEY", None)
    with pytest.raises(UserError, match="needs an NDIF API key: set NDIF_API_KEY"):
        load_remote("meta-llama/Llama-3.1-8B")
    monkeypatch.setenv("NDIF_API_KEY", "not-a-real-key")
    with pytest.raises(UserError, match="cannot read the config of meta-llama/Llama-3.1-8B from the hub"):
        load_remote("meta-llama/Llama-3.1-8B")  # offline here
    code, _, err = run_cli("record", "--model", "x/y", "--data", "m.jsonl", "--store", "s", "--run", "r", "--remote",
                           "--ray")  # fmt: skip
    assert code == 2 and "give --ray or --remote, not both" in err
