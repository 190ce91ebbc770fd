"""Device, dtype and device-map placement (hookpoints.placement), on a machine without a GPU.

The split model: accelerate on the CPU alone can place a module on "cpu" or offload it to "disk" (its weights
sit on the meta device and are read back from the offload folder by accelerate's hooks when the module
runs); that is the same machinery a model split over GPUs goes through (per-module hooks that move weights
and activations), so a map with some layers on "cpu" and others on "disk" is the CPU stand-in for two devices.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hookpoints import placement
from hookpoints.editing import NeuronEdit, apply_edit, placed
from hookpoints.errors import UserError
from hookpoints.host_copy import HostCopy, one_behind
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.placement import Placement, check_device_map, parse_device_map, resolve_device
from hookpoints.pooling import masked_sum, pool_positions
from hookpoints.recorder import record

TEXTS = [
    "Hello there.",
    "Das Wetter ist heute wirklich sehr schön, finde ich.",
    "Hoy hace buen tiempo.",
    "Il fait très beau aujourd'hui, n'est-ce pas ?",
]
SPLIT = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "disk",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


@pytest.fixture
def manifest(write_manifest):
    return read_manifest(write_manifest([{"id": f"e{i}", "text": text} for i, text in enumerate(TEXTS)]))


def recorded(model, manifest, store, run: str) -> dict[tuple[str, str], np.ndarray]:
    """(hook, example) -> the stored vector of a run recorded at every listed hook point, batches of 2."""
    record(model, manifest, store, run, batch_size=2)
    with store.query() as session:
        rows = session.sql(f"SELECT hook, example_id, activation FROM activations WHERE run = '{run}'").to_pylist()
    return {(row["hook"], row["example_id"]): np.array(row["activation"], dtype=np.float32) for row in rows}


def test_auto_is_cpu_and_float32_without_cuda(monkeypatch):
    monkeypatch.setattr(placement, "cuda_available", lambda: False)
    chosen = Placement()
    assert chosen.torch_device() == torch.device("cpu")
    assert chosen.torch_dtype() == torch.float32
    assert chosen.from_pretrained_kwargs() == {"dtype": torch.float32}


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_a_gpu_picks_bf16_where_supported_else_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(placement, "cuda_available", lambda: True)
    monkeypatch.setattr(placement, "bf16_supported", lambda: bf16)
    assert Placement().torch_device() == torch.device("cuda")
    assert Placement().torch_dtype() == expected
    assert Placement(device="cpu").torch_dtype() == torch.float32  # the CPU stays float32 beside a GPU
    assert Placement(dtype="float32").torch_dtype() == torch.float32  # an explicit dtype wins


def test_the_real_check_agrees_with_torch():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Placement().torch_device().type == expected


def test_auto_loads_on_the_cpu_in_float32(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(placement, "cuda_available", lambda: False)
    model = load(tiny_model_dir("llama"))
    assert {p.device.type for p in model.model.parameters()} == {"cpu"}
    assert model.model.dtype == torch.float32


def test_a_model_split_by_a_device_map_records_the_same_values(tiny_model_dir, manifest, store, tmp_path):
    whole = load(tiny_model_dir("llama"), device="cpu")
    split = load(tiny_model_dir("llama"), device="cpu", device_map=SPLIT, offload_folder=tmp_path / "offload")
    places = {name: p.device.type for name, p in split.model.named_parameters()}
    assert places["model.layers.0.mlp.up_proj.weight"] == "cpu"
    assert places["model.layers.1.mlp.up_proj.weight"] == "meta"  # really offloaded: read from disk when run
    assert split.device == torch.device("cpu")
    # The probe measured the same hook points with the same layouts with half the weights on meta.
    assert [(p.name, p.width, p.time_axis, p.unavailable) for p in split.hook_points] == [
        (p.name, p.width, p.time_axis, p.unavailable) for p in whole.hook_points
    ]
    expected = recorded(whole, manifest, store, "whole")
    got = recorded(split, manifest, store, "split")
    assert got.keys() == expected.keys()
    assert any(hook.startswith("blocks.1.") for hook, _ in got)  # the offloaded layer's hooks are in it
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-6, err_msg=str(key))


def test_bfloat16_on_the_cpu_records_within_bf16_tolerance(tiny_model_dir, manifest, store):
    exact = recorded(load(tiny_model_dir("llama"), device="cpu", dtype="float32"), manifest, store, "f32")
    half_model = load(tiny_model_dir("llama"), device="cpu", dtype="bfloat16")
    assert half_model.model.dtype == torch.bfloat16
    half = recorded(half_model, manifest, store, "bf16")
    assert half.keys() == exact.keys()
    worst = 0.0
    for key, value in exact.items():
        error = np.linalg.norm(half[key] - value) / max(np.linalg.norm(value), 1e-6)
        worst = max(worst, error)
        assert error < 0.05, f"{key}: relative error {error:.3g} above bf16 tolerance"
    assert worst > 0  # the model really ran in bf16 (float32 would give the same values exactly)


def test_gpu_mean_path_sums_half_precision_in_float32():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=generator).to(torch.bfloat16)
    valid = torch.rand(3, 7, generator=generator) > 0.3
    valid[:, 0] = True
    got = masked_sum(x, valid)
    assert got.dtype == torch.float32
    expected = (x.double() * valid[..., None]).sum(1)  # exact sums of the bf16 values
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    means = pool_positions(x, valid, "mean")  # the CPU path (matmul), float32 too
    torch.testing.assert_close(means, got / valid.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)
    for method in ("max", "last", "none"):
        assert pool_positions(x, valid, method).dtype == torch.float32


def test_host_copy_casts_to_the_storage_dtype_as_numpy_does():
    """A float16 run's rows are cast before the copy (on the GPU there): the same bits as the writer's numpy cast,
    overflow to inf, NaN kept, subnormals and ties rounded to even."""
    values = torch.tensor([[1.0, 65504.0, 65520.0, 1e5], [-1e5, float("nan"), 1e-7, 2049.0 + 0.5]])  # [2, 4]
    rows = HostCopy({"h": values}, dtype=torch.float16).wait()
    assert rows["h"].dtype == np.float16
    with np.errstate(over="ignore"):
        expected = values.numpy().astype(np.float16)
    np.testing.assert_array_equal(rows["h"].view(np.int16), expected.view(np.int16))


def test_host_copy_and_one_behind_order():
    rows = HostCopy({"h": torch.arange(6.0).reshape(2, 3)}).wait()
    np.testing.assert_array_equal(rows["h"], np.arange(6.0).reshape(2, 3))
    events = []

    def started():
        for k in range(3):
            events.append(f"start {k}")
            yield k

    for k in one_behind(started(), lambda k: events.append(f"finish {k}") or k):
        events.append(f"write {k}")
    assert events == [
        "start 0", "start 1", "finish 0", "write 0", "start 2", "finish 1", "write 1", "finish 2", "write 2",
    ]  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bench/gpu.py runs this check too)")
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_side_stream_copy_waits_for_the_rows_and_keeps_their_memory(dtype):
    """The copy on a side stream must start after the rows are computed (a long kernel queued before them) and
    the rows' memory must not be reused by the compute stream's next work before the copy has read it."""
    device = torch.device("cuda")
    copies, expected = [], []
    for k in range(8):
        slow = torch.randn(4096, 4096, device=device)
        for _ in range(20):
            slow = slow @ slow * 1e-3  # queued work the rows come after: a copy that does not wait reads stale
        rows = (torch.full((64, 1024), float(k), device=device) + slow[:64, :1].abs() * 0).contiguous()
        copies.append(HostCopy({"h": rows}, dtype=dtype, side_stream=True))
        expected.append(np.full((64, 1024), float(k), dtype=np.float16 if dtype else np.float32))
        del rows
        torch.empty(64 * 1024 * 4, dtype=torch.uint8, device=device).fill_(255)  # would take the rows' block
    for copy_, want in zip(copies, expected, strict=True):
        np.testing.assert_array_equal(copy_.wait()["h"], want)


def test_edit_values_are_placed_once_per_device_and_dtype(tiny_model_dir):
    model = load(tiny_model_dir("llama"), device="cpu")
    point = model.hook_points.get("blocks.0.mlp.hook_post")
    edit = NeuronEdit(point, torch.tensor([1, 4]), torch.tensor([0.5, -2.0]))
    block = torch.Size([1, point.width])  # [pos, width] with positions 1: broadcast over batch and positions
    first = placed(edit, block, torch.device("cpu"), torch.bfloat16)
    assert placed(edit, block, torch.device("cpu"), torch.bfloat16) is first  # cached, not recopied
    assert first.values.dtype == torch.bfloat16 and first.mask.shape == block
    tensor = torch.zeros(2, 3, point.width, dtype=torch.bfloat16)
    apply_edit(tensor, edit)
    assert len(edit._placed) == 1  # apply_edit reused the cached placement
    assert torch.equal(tensor[..., [1, 4]], torch.tensor([0.5, -2.0], dtype=torch.bfloat16).expand(2, 3, 2))


@pytest.mark.parametrize(
    ("device_map", "folder", "message"),
    [
        ("everywhere", None, "device map must be one of"),
        ({"model.layers.0": "gpu7"}, None, "use cpu, disk, a GPU index or cuda:N"),
        ({"model.layers.0": "disk"}, None, "give an offload folder"),
        ({}, None, "at least one module"),
    ],
)
def test_bad_device_maps_are_one_line_errors(device_map, folder, message):
    with pytest.raises(UserError, match=message):
        check_device_map(device_map, folder)


def test_a_device_map_naming_a_missing_gpu_by_index_is_one_line(tiny_model_dir, tmp_path):
    """python-api/gpu.md's device map names GPUs 0 and 1 by index; where there are fewer (or none), "cuda:1" was
    refused in one line but the index 1 reached transformers: "RuntimeError: Cannot access accelerator device"."""
    missing = torch.cuda.device_count()  # the first index this machine does not have
    for place in (missing, f"cuda:{missing}", -1):
        with pytest.raises(UserError, match=rf"device map: module model.layers.1 goes to {place!r}: "):
            check_device_map({"model.layers.0": "cpu", "model.layers.1": place}, None)
    split = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": missing, "model.norm": "cpu",
             "lm_head": "disk"}  # fmt: skip
    with pytest.raises(UserError, match=f"module model.layers.1 goes to {missing}: "):
        load(tiny_model_dir("llama"), device_map=split, offload_folder=tmp_path)


def test_bad_device_and_dtype(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(placement, "cuda_available", lambda: False)
    with pytest.raises(UserError, match="torch sees no CUDA GPU"):
        resolve_device("cuda:0")
    with pytest.raises(UserError, match="device must be auto, cpu"):
        resolve_device("quantum")
    with pytest.raises(UserError, match="device map offloads modules to disk"):
        load(tiny_model_dir("llama"), device_map={"model": "disk"})
    with pytest.raises(UserError, match="'nothing.here', which is no module"):  # transformers ignores it
        load(tiny_model_dir("llama"), device="cpu", device_map={"": "cpu", "nothing.here": "cpu"})
    with pytest.raises(UserError, match="does not give any device"):  # accelerate's own check, one line
        load(tiny_model_dir("llama"), device_map={"lm_head": "disk"}, offload_folder=tmp_path)


def test_device_map_option_parsing(tmp_path):
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model.layers.0": 0}') == {"model.layers.0": 0}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(SPLIT))
    assert parse_device_map(str(path)) == SPLIT
    with pytest.raises(UserError, match="not valid JSON"):
        parse_device_map("{model: cpu")
    with pytest.raises(UserError, match="give auto, balanced"):
        parse_device_map(str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="must be an object"):
        parse_device_map(str(tmp_path / "list.json") if (tmp_path / "list.json").write_text("[1]") else "")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--device-map", "{model: cpu"], "--device-map is not valid JSON"),
        (["--device-map", '{"model.layers.1": "disk"}'], "give an offload folder"),
        (["--device", "tpu:9"], "device must be auto, cpu"),
    ],
)
def test_cli_placement_options_refuse_bad_input(tiny_model_dir, write_manifest, tmp_path, run_cli, extra, expected):
    from tests.test_cli import one_line_error

    manifest = write_manifest([{"id": "a", "text": "Hello there."}])
    args = ["record", "--model", str(tiny_model_dir("llama")), "--data", str(manifest), "--store", str(tmp_path / "s")]
    code, _, err = run_cli(*args, "--run", "r", *extra)
    one_line_error(code, err, expected)
    assert not (tmp_path / "s").exists()


def test_cli_records_a_split_model(tiny_model_dir, write_manifest, tmp_path, run_cli):
    manifest = write_manifest([{"id": "a", "text": "Hello there."}, {"id": "b", "text": "Hoy hace sol."}])
    split = json.dumps(SPLIT)
    base = ["record", "--model", str(tiny_model_dir("llama")), "--data", str(manifest), "--hooks", "blocks.1.*"]
    code, out, err = run_cli(*base, "--store", str(tmp_path / "s"), "--run", "split", "--device", "cpu",
                             "--device-map", split, "--offload-folder", str(tmp_path / "off"))  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(*base, "--store", str(tmp_path / "s"), "--run", "whole", "--model-dtype", "float32")
    assert code == 0, err
    from hookpoints.store.catalog import Store

    with Store.open(tmp_path / "s").query() as session:
        rows = session.sql(
            "SELECT s.activation AS s, w.activation AS w FROM activations s JOIN activations w "
            "ON s.hook = w.hook AND s.example_id = w.example_id AND w.run = 'whole' WHERE s.run = 'split'"
        ).to_pylist()
    assert len(rows) > 2
    for row in rows:
        np.testing.assert_allclose(row["s"], row["w"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["mean", "max", "last", "none"])
def test_unpadded_pooling_equals_the_masked_one(method):
    from hookpoints.pooling import pool_all, pool_prepared, prepare_masks

    x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    full = torch.ones(3, 6, dtype=torch.bool)
    padded = full.clone()
    padded[0, 4:] = False
    spaces = prepare_masks({"input": full, "decoder": padded})
    assert spaces["input"].full and not spaces["decoder"].full  # checked once per batch, per space
    got = pool_all(x, method)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, pool_positions(x, full, method), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pool_prepared(x, spaces["input"], method), got, rtol=1e-6, atol=1e-6)


def test_one_behind_still_writes_the_batch_before_a_failing_one():
    def started():
        yield 0
        raise OSError("file lost")

    written = []
    with pytest.raises(OSError, match="file lost"):
        for k in one_behind(started(), lambda k: k):
            written.append(k)
    assert written == [0]


def test_intervene_refuses_a_bad_device_map_before_anything(tmp_path, run_cli):
    from tests.test_cli import one_line_error

    args = ["intervene", "--store", str(tmp_path / "nostore"), "--run", "r", "--task", "asr"]
    code, _, err = run_cli(*args, "--device-map", "[1, 2]")
    one_line_error(code, err, "give auto, balanced, balanced_low_0, sequential, a JSON object or a JSON file")
