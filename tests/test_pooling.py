"""Pooling over valid positions, against numpy on ragged examples (padding filled with junk)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hookpoints.points import HookPoint
from hookpoints.pooling import pool

LENGTHS = [5, 1, 3]


def padded(junk: float, channels_first: bool = False):
    rng = np.random.default_rng(0)
    examples = [rng.normal(size=(n, 4)).astype(np.float32) for n in LENGTHS]
    x = np.full((len(LENGTHS), max(LENGTHS), 4), junk, dtype=np.float32)  # [batch, pos, width]
    mask = np.zeros(x.shape[:2], dtype=bool)
    for i, example in enumerate(examples):
        x[i, : len(example)] = example
        mask[i, : len(example)] = True
    tensor = torch.from_numpy(x)
    point = HookPoint("h", "m", time_axis=1, neuron_axis=2, width=4)
    if channels_first:  # a convolution's [batch, channels, time]
        tensor = tensor.transpose(1, 2).contiguous()
        point = HookPoint("h", "m", time_axis=2, neuron_axis=1, width=4)
    return examples, tensor, torch.from_numpy(mask), point


@pytest.mark.parametrize("junk", [0.0, 1e6, float("nan"), float("inf")])
@pytest.mark.parametrize("channels_first", [False, True])
def test_pooling_ignores_padding_whatever_it_holds(junk, channels_first):
    examples, tensor, mask, point = padded(junk, channels_first)
    expected = {
        "mean": np.stack([e.mean(0) for e in examples]),
        "max": np.stack([e.max(0) for e in examples]),
        "last": np.stack([e[-1] for e in examples]),
        "none": np.concatenate(examples),
    }
    for method, want in expected.items():
        got = pool(tensor, point, mask, method).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=method)


def test_a_part_of_the_neurons_and_tuple_outputs():
    x = torch.arange(2 * 3 * 6, dtype=torch.float32).reshape(2, 3, 6)
    point = HookPoint("q", "m", time_axis=1, neuron_axis=2, width=2, part=(1, 3))
    got = pool((x, None), point, torch.ones(2, 3, dtype=torch.bool), "last")
    torch.testing.assert_close(got, x[:, -1, 2:4])


def test_vectors_without_positions():
    x = torch.randn(3, 7)
    point = HookPoint("pooler", "m", time_axis=None, neuron_axis=1, width=7)
    torch.testing.assert_close(pool(x, point, None, "mean"), x)
