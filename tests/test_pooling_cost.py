"""The per-hook pooling path (masks prepared once per batch, one copy to the host per batch): the same values as
an independent pooling of the raw activations, and a bounded number of operations per hook point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hookpoints.generation import Generation
from hookpoints.host_copy import HostCopy, pack, unpack
from hookpoints.loading import load
from hookpoints.op_count import OpCount
from hookpoints.points import HookPoint
from hookpoints.pooling import SpaceMask, pool, prepare_masks
from hookpoints.probe import first_tensor

PADDED = ["Hello there.", "Das Wetter ist heute wirklich sehr schön, finde ich.", "Hoy hace sol."]
UNPADDED = ["Das Wetter ist heute schön."] * 3
METHODS = ("mean", "max", "last", "none")


def raw_activations(model, inputs, points: list[HookPoint]) -> dict[str, torch.Tensor]:
    """Each plain hook point's tensor as ``[batch, pos, width]`` float64, through plain torch hooks."""
    seen, handles = {}, []
    for point in points:
        module = model.model.get_submodule(point.module)

        def keep(tensor, point=point):
            x = tensor.movedim(point.time_axis, 1)
            x = x.reshape(x.shape[0], x.shape[1], -1).double()
            if point.part:
                index, count = point.part
                width = x.shape[-1] // count
                x = x[..., index * width : (index + 1) * width]
            seen[point.name] = x.clone()

        if point.io == "input":
            handles.append(module.register_forward_pre_hook(lambda m, args, keep=keep: keep(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, keep=keep: keep(first_tensor(out))))
    try:
        with torch.inference_mode():
            model.model(**inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def by_hand(x: torch.Tensor, mask: torch.Tensor, method: str) -> np.ndarray:
    """Pooling by its definition, example by example, in float64 (numpy)."""
    rows = []
    x = x.expand(mask.shape[0], -1, -1)  # a tensor shared by the batch (position embeddings): each example's
    for example, valid in zip(x.numpy(), mask.numpy(), strict=True):
        kept = example[valid]  # [valid positions, width]
        rows.append({"mean": kept.mean(0), "max": kept.max(0), "last": kept[-1], "none": kept}[method])
    return np.concatenate(rows) if method == "none" else np.stack(rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("texts", [PADDED, UNPADDED], ids=["padded", "unpadded"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "seamless_m4t_v2"])
def test_recorded_pooling_equals_pooling_by_hand(tiny_model_dir, family, texts, dtype):
    model = load(tiny_model_dir(family), device="cpu", dtype=dtype)
    inputs = model.text_inputs(texts)
    assert bool(inputs.masks["input"].all()) == (texts is UNPADDED)
    points = [p for p in model.select(None) if p.time_axis is not None and not p.derived and p.keys is None]
    assert len(points) > 10
    raw = raw_activations(model, inputs, points)
    for method in METHODS:
        pooled = model.pooled(inputs, points, method)
        for point in points:
            got = pooled[point.name]
            assert got.dtype == torch.float32, point.name
            want = by_hand(raw[point.name], inputs.masks[point.space], method)
            np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-5, err_msg=f"{point.name} {method}")


PADDINGS = ("none", "ragged", "same")  # no padding; holes anywhere; every example the same 6 of 9 positions


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_speech_with_the_same_padding_in_every_example_equals_pooling_by_hand(tiny_model_dir, dtype):
    """Equal-length speech fixed to 300 frames: 299 valid in every example, pooled as the slice (no mask)."""
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="speech", device="cpu", dtype=dtype)
    generator = np.random.default_rng(5)
    waves = [(0.1 * generator.standard_normal(6 * 16000)).astype(np.float32) for _ in range(3)]
    inputs = model.speech_inputs(waves, frames=300)
    assert prepare_masks(inputs.masks)["input"].prefix == 299
    points = [p for p in model.select(["speech_encoder.*"]) if p.time_axis is not None and p.space == "input"]
    assert len(points) > 10 and any(p.time_axis == 2 for p in points)  # the convolution's [batch, channels, time]
    raw = raw_activations(model, inputs, points)
    for method in METHODS:
        pooled = model.pooled(inputs, points, method)
        for point in points:
            want = by_hand(raw[point.name], inputs.masks["input"], method)
            np.testing.assert_allclose(pooled[point.name].numpy(), want, rtol=2e-5, atol=1e-5, err_msg=point.name)


def junk_batch(junk: float, dtype: torch.dtype, padding: str = "ragged"):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 5, generator=generator).to(dtype)  # [batch, pos, width]
    mask = torch.rand(4, 9, generator=generator) > 0.4
    mask[:, 0] = True
    mask[2] = True  # one example without padding
    if padding != "ragged":
        mask[:] = True
        mask[:, 6 if padding == "same" else 9 :] = False
    x[~mask] = junk
    return x, mask


@pytest.mark.parametrize("padding", ["ragged", "same"])
@pytest.mark.parametrize("matmul", [True, False], ids=["cpu-path", "gpu-path"])
@pytest.mark.parametrize("junk", [0.0, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_paths_ignore_padding_whatever_it_holds(padding, matmul, junk, dtype):
    x, mask = junk_batch(junk, dtype, padding)
    space = SpaceMask(mask)
    assert space.prefix == (6 if padding == "same" else None)  # the same padding everywhere: pooled as a slice
    if not matmul:
        space.weights = None  # what a GPU's mask has: the where-and-sum path
    point = HookPoint("h", "m", time_axis=1, neuron_axis=2, width=5)
    for method in METHODS:
        got = pool(x, point, space, method)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), by_hand(x.double(), mask, method), rtol=1e-6, atol=1e-6)


def test_an_unknown_pooling_is_refused_on_every_path():
    x, mask = junk_batch(0.0, torch.float32)
    point = HookPoint("h", "m", time_axis=1, neuron_axis=2, width=5)
    for space in (SpaceMask(mask), SpaceMask(torch.ones_like(mask)), None):
        with pytest.raises(ValueError, match="pooling must be one of"):
            pool(x, point, space, "median")


# Operations per hook point, counted (not timed): on a GPU each kernel is a launch. Bounds measured 2026-11-27
# (docs/benchmarks.md, "Per-hook cost of recording"); before the change a mean took 17 operations, 8 kernels.
# (method, padding, path) -> (operations, kernels, host syncs) for float32 and for bfloat16 [batch, pos, width]
# activations; "gpu" is the path a mask on a GPU takes (no matmul weights, nothing waits for the device).
BOUNDS = {
    ("mean", "none", "gpu"): ((1, 1, 0), (1, 1, 0)),  # mean(dtype=float32): one kernel, no cast
    ("mean", "same", "gpu"): ((2, 1, 0), (2, 1, 0)),  # the same on a slice (a view)
    ("mean", "ragged", "gpu"): ((3, 3, 0), (3, 3, 0)),  # masked_fill, sum in float32, divide
    ("mean", "none", "cpu"): ((2, 1, 0), (3, 2, 0)),  # a matmul with the weights (bf16: cast first)
    ("mean", "same", "cpu"): ((3, 1, 0), (4, 2, 0)),
    ("mean", "ragged", "cpu"): ((4, 2, 1), (5, 3, 1)),  # the matmul, its finiteness checked on the host
    ("max", "none", "gpu"): ((1, 1, 0), (2, 2, 0)),
    ("max", "ragged", "gpu"): ((2, 2, 0), (3, 3, 0)),
    ("last", "none", "gpu"): ((2, 1, 0), (2, 1, 0)),  # a view and one copy (that casts)
    ("last", "ragged", "gpu"): ((1, 1, 0), (2, 2, 0)),
    ("none", "none", "gpu"): ((1, 0, 0), (2, 1, 0)),
    ("none", "ragged", "gpu"): ((1, 1, 0), (2, 2, 0)),
}


@pytest.mark.parametrize(("method", "padding", "path"), list(BOUNDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operations_per_hook_stay_bounded(method, padding, path, dtype):
    x, mask = junk_batch(0.0, dtype, padding)
    space = SpaceMask(mask)
    if path == "gpu":
        space.weights = None
    point = HookPoint("h", "m", time_axis=1, neuron_axis=2, width=5)
    pool(x, point, space, method)  # the mask's counts, weights, last positions: once per batch, not per hook
    with OpCount() as ops:
        pool(x, point, space, method)
    total, kernels, syncs = BOUNDS[method, padding, path][dtype == torch.bfloat16]
    assert ops.total <= total and ops.kernels <= kernels and ops.syncs <= syncs, ops.by_name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_operations_per_hook_of_a_whole_recording_stay_bounded(tiny_model_dir, dtype):
    """The whole per-hook path of ``HookedModel.pooled`` (nnsight request, layout, pooling), padded mean."""
    model = load(tiny_model_dir("gpt2"), device="cpu", dtype=dtype)
    inputs = model.text_inputs(PADDED)
    points = [p for p in model.select(None) if not p.derived]  # derived norms add their own arithmetic
    last = [max(points, key=lambda p: p.order)]
    counts = []
    for chosen in (points, last):
        with OpCount() as ops:
            model.pooled(inputs, chosen, "mean")
        counts.append(ops)
    hooks = len(points) - 1
    per_hook = (counts[0].total - counts[1].total) / hooks
    kernels = (counts[0].kernels - counts[1].kernels) / hooks
    limit = 4.5 if dtype == "float32" else 5.5  # measured 4.3 and 5.3 (bf16: the cast); 17.2 before the change
    assert per_hook <= limit, (per_hook, counts[0].by_name - counts[1].by_name)
    assert kernels <= 2.0, (kernels, counts[0].by_name - counts[1].by_name)  # 7.7 before


def test_prepared_masks_check_padding_once_per_space():
    masks = {"input": torch.ones(2, 4, dtype=torch.bool), "decoder": torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()}
    with OpCount() as ops:
        spaces = prepare_masks(masks)
    assert spaces["input"].full and not spaces["decoder"].full and spaces["decoder"].prefix is None
    assert ops.syncs == 2  # one host sync per space and batch, none per hook
    assert prepare_masks({"input": torch.ones(2, 4, dtype=torch.bool, device="meta")})["input"].prefix is None
    assert prepare_masks({"input": torch.zeros(2, 4, dtype=torch.bool)})["input"].prefix is None  # nothing valid


def test_one_copy_to_the_host_gives_every_tensor_back():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 8, generator=generator)
    tensors = {"a": base[:, 2:5], "b": torch.randn(7, generator=generator), "c": base.t(), "d": torch.zeros(0, 4)}
    flat, layout = pack(tensors)  # non-contiguous and empty tensors too
    assert flat.shape == (sum(t.numel() for t in tensors.values()),)
    arrays = unpack(flat.numpy(), layout)
    assert list(arrays) == list(tensors)
    for name, tensor in tensors.items():
        assert arrays[name].flags["C_CONTIGUOUS"], name
        np.testing.assert_array_equal(arrays[name], tensor.numpy(), err_msg=name)
    rows = HostCopy(tensors).wait()  # on the CPU: nothing packed, the same arrays
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(rows[name], tensor.numpy(), err_msg=name)


@pytest.mark.parametrize("lengths", [(6.0, 6.0, 6.0), (6.0, 4.5, 2.0)], ids=["equal", "ragged"])
def test_a_batch_on_a_device_is_prepared_from_its_cpu_copies(tiny_model_dir, lengths):
    """The masks' common prefix and Seamless' padding guard read the CPU copies ``ModelInputs.to`` keeps, so a
    batch on a GPU waits for nothing before its forward pass (the H200 profile: 5 of 7 syncs per batch were
    ours). Moved to the meta device, whose values cannot be read at all, the batch would raise if they were."""
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="speech", device="cpu")
    generator = np.random.default_rng(7)
    waves = [(0.1 * generator.standard_normal(int(s * 16000))).astype(np.float32) for s in lengths]
    inputs = model.speech_inputs(waves, frames=300)
    moved = inputs.to("meta").to("meta")  # the copies survive a second move
    assert all(mask.is_meta for mask in moved.masks.values()) and moved.extras["frames"].is_meta
    assert moved.host_masks.keys() == inputs.masks.keys()
    for space, mask in inputs.masks.items():
        assert torch.equal(moved.host_masks[space], mask)
    assert torch.equal(moved.host_extras["frames"], inputs.extras["frames"])
    prepared, reference = prepare_masks(moved.masks, moved.host_masks), prepare_masks(inputs.masks)
    assert {s: m.prefix for s, m in prepared.items()} == {s: m.prefix for s, m in reference.items()}
    assert (prepared["input"].prefix == 299) == (lengths[1] == 6.0)
    with pytest.raises(RuntimeError, match="meta"):  # the guard's old read of the device tensor
        bool((moved.extras["frames"] == 300).all())
    with model.adapter.batch_guard(model.model, moved):
        pass
    # the teacher-forced pass of a generation keeps the copies that still hold: not the decoder's, which it changes
    generation = Generation(torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 9, 4]]), 1, torch.tensor([3, 2, 3]))
    forced = generation.teacher_forced(moved)
    assert "decoder" not in forced.host_masks and forced.host_masks.keys() == moved.host_masks.keys() - {"decoder"}
    assert torch.equal(forced.masks["decoder"], generation.decoder_mask)
    assert prepare_masks(forced.masks, forced.host_masks)["input"].prefix == prepared["input"].prefix
