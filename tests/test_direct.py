"""Pooling through plain torch hooks (hookpoints.direct) gives exactly the nnsight trace's values."""

from __future__ import annotations

import pytest
import torch

from hookpoints.direct import pooled_direct
from hookpoints.loading import load

TEXTS = ["Hello there.", "Das Wetter ist heute wirklich sehr schön, finde ich.", "Hoy hace sol."]


@pytest.mark.parametrize(("family", "pooling"), [("llama", "mean"), ("gpt2", "max"), ("seamless_m4t_v2", "last")])
def test_direct_hooks_equal_the_trace(tiny_model_dir, family, pooling):
    model = load(tiny_model_dir(family), device="cpu")
    inputs = model.text_inputs(TEXTS)  # padded: the masks matter
    points = model.select(None)
    assert len(points) > 10
    expected = model.pooled(inputs, points, pooling)
    got = pooled_direct(model, inputs, points, pooling)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_direct_hooks_stop_after_the_last_point(tiny_model_dir):
    model = load(tiny_model_dir("llama"), device="cpu")
    inputs = model.text_inputs(TEXTS)
    points = model.select(["blocks.0.*"])  # (the probe's own forward pass runs here)
    ran = []
    handle = model.model.lm_head.register_forward_hook(lambda *_: ran.append(True))
    try:
        pooled = pooled_direct(model, inputs, points, "none")
    finally:
        handle.remove()
    assert not ran  # the LM head never ran
    assert pooled.keys() == {point.name for point in points}


def test_direct_hooks_equal_the_trace_on_attention_maps_and_norm_scales(tiny_model_dir):
    model = load(tiny_model_dir("llama"), device="cpu")
    inputs = model.text_inputs(TEXTS)
    points = model.select(["blocks.0.attn.hook_pattern", "blocks.1.ln1.hook_scale", "blocks.1.ln1.hook_normalized"])
    assert len(points) == 3
    expected = model.pooled(inputs, points, "mean")
    got = pooled_direct(model, inputs, points, "mean")
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
