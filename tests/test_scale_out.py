"""``hookpoints record --ray``: a local Ray instance (2 CPUs), an actor pool with one model each, same values."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from hookpoints.store.catalog import Store
from hookpoints.store.verify import verify

from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.recorder import BatchJob, record, record_batch
from hookpoints.scale_out import decode, encode
from tests.store_checks import assert_exactly_once

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
QUERY = "SELECT hook, example_id, activation FROM activations WHERE run = $run ORDER BY hook, example_id"


def test_encoding_for_ray_round_trips_every_position(gpt2_dir):
    """Rows travel between actors and driver one example per row; decoding gives back the recorder's rows."""
    model = load(gpt2_dir)
    points = model.select(HOOKS)
    examples = pa.table({"example_id": ["a", "b", "c"], "text": ["one", "two words here", "three words"]})
    rows, added = record_batch(model, examples, points, BatchJob("forward", "none"))  # every position kept
    assert added == {}
    names = [point.name for point in points]
    generated = {"generated_text": ["x", "y", "z"]}
    decoded, columns = decode(encode(["a", "b", "c"], rows, names, generated), names, [p.width for p in points])
    assert columns == generated
    for name in names:
        order = np.lexsort((rows[name].positions, [ord(e) for e in rows[name].example_ids]))
        assert decoded[name].example_ids == [rows[name].example_ids[i] for i in order]
        np.testing.assert_array_equal(decoded[name].positions, rows[name].positions[order])
        np.testing.assert_array_equal(decoded[name].values, rows[name].values[order])


def test_record_with_ray_equals_the_plain_loop(tmp_path, gpt2_dir, run_cli):
    rows = [{"id": f"ex{i}", "text": f"example sentence number {i} " * (1 + i % 3), "lang": "en"} for i in range(12)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = Store.open(tmp_path / "store", create=True)
    record(load(gpt2_dir), read_manifest(tmp_path / "m.jsonl"), store, "plain", hooks=HOOKS, batch_size=4)

    args = ["record", "--model", str(gpt2_dir), "--data", str(tmp_path / "m.jsonl"), "--store", str(tmp_path / "store")]
    args += ["--run", "ray", "--hooks", HOOKS[0], "--hooks", HOOKS[1], "--batch-size", "4"]
    code, out, err = run_cli(*args, "--ray", "--workers", "2")
    assert code == 0, err
    assert "recorded 12 examples" in out.replace("\n", " ")

    assert_exactly_once(store, "ray", [row["id"] for row in rows], len(HOOKS))
    assert store.run_info("ray").status == "complete"
    with store.query() as session:
        plain = session.sql(QUERY, {"run": "plain"}).to_pylist()
        ray = session.sql(QUERY, {"run": "ray"}).to_pylist()
    assert [(r["hook"], r["example_id"]) for r in ray] == [(r["hook"], r["example_id"]) for r in plain]
    for got, expected in zip(ray, plain, strict=True):
        np.testing.assert_allclose(got["activation"], expected["activation"], rtol=1e-5, atol=1e-6)
    assert verify(store).ok

    code, _, err = run_cli(*args, "--ray", "--workers", "0", "--resume")
    assert code == 2 and "--workers must be at least 1" in err


def test_a_ray_run_keeps_the_dtype_and_digest_of_the_weights_its_actors_run(tmp_path, gpt2_dir, run_cli, monkeypatch):
    """--ray --device cuda with --model-dtype auto: the actors load bfloat16 (a GPU that supports it); the run's
    config said float32 (the model loaded here on the CPU to list its hook points), and a resume without --ray in
    bfloat16, the weights the rows came from, was refused with advice to pass --model-dtype float32."""
    import torch

    import hookpoints.placement as placement
    import hookpoints.scale_out as scale_out

    actors = {}

    def ray_runner(source, *, load_options, workers, batch_size):
        actors.update(load_options)
        return None  # the batches run here, on the model loaded here (as an actor would, on the CPU)

    monkeypatch.setattr(placement, "resolve_device", torch.device)  # "cuda" without asking torch for one
    monkeypatch.setattr(placement, "bf16_supported", lambda: True)
    monkeypatch.setattr(scale_out, "ray_runner", ray_runner)
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps({"id": f"e{i}", "text": f"words {i}"}) + "\n" for i in range(3))
    )
    args = ["record", "--model", str(gpt2_dir), "--data", str(tmp_path / "m.jsonl"), "--store", str(tmp_path / "s")]
    code, _, err = run_cli(*args, "--run", "r", "--hooks", HOOKS[0], "--ray", "--device", "cuda")
    assert code == 0, err
    assert (actors["device"], actors["dtype"]) == ("cuda", "bfloat16")
    assert Store.open(tmp_path / "s").run_info("r").config["model_dtype"] == "bfloat16"
