"""Pooled recording through plain torch forward hooks: the reference the nnsight trace is checked against.

:func:`pooled_direct` gives exactly ``HookedModel.pooled``'s values (``tests/test_direct.py``) without nnsight:
each hook point's module gets a forward (pre-)hook that pools its tensor with :func:`hookpoints.pooling.pool`,
and the hook of the last point in execution order stops the forward pass (as the trace's ``tracer.stop()``).
The recorder does not use it: on an H200 it measured exactly as fast as the trace (docs/benchmarks.md, GPU),
so the cost of recording there is the pooling, not nnsight. ``bench/gpu.py`` times it beside the trace.

>>> pooled = pooled_direct(model, inputs, model.select(["blocks.0.*"]), "mean")  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from hookpoints.attention import eager as eager_attention
from hookpoints.attention import needs_eager
from hookpoints.inputs import ModelInputs
from hookpoints.mask_skips import MaskSkips, settle
from hookpoints.points import HookPoint
from hookpoints.pooling import pool, prepare_masks
from hookpoints.probe import first_input


class _Stop(Exception):
    """Raised by the last hook: everything asked for is pooled."""


def pooled_direct(
    model, inputs: ModelInputs, points: list[HookPoint], pooling, *, defer_check: bool = False
) -> dict[str, torch.Tensor]:
    """Hook name -> ``[batch, width]`` float32 (``[valid positions, width]`` for ``none``), as
    ``HookedModel.pooled``; ``pooling`` is a method or a function of the hook point (``defer_check`` as there:
    transformers' mask questions answered from the CPU masks, :mod:`hookpoints.mask_skips`)."""
    methods = {point.name: pooling(point) if callable(pooling) else pooling for point in points}
    pooled: dict[str, torch.Tensor] = {}
    last = max(points, key=lambda p: p.order).name if points else None
    modules = dict(model.model.named_modules())
    spaces = prepare_masks(inputs.masks, inputs.host_masks)
    handles = []

    def keeper(point: HookPoint):
        mask = spaces.get(point.space)
        key_mask = model.adapter.key_mask(inputs, point.key_space) if point.keys is not None else None

        def keep(value) -> None:
            if point.name in pooled:
                raise RuntimeError(f"hook {point.name}'s module ran twice in one forward pass")
            pooled[point.name] = pool(value, point, mask, methods[point.name], key_mask)
            if point.name == last and len(pooled) == len(points):
                raise _Stop

        return keep

    for point in points:
        keep = keeper(point)
        module = modules[point.module]
        if point.io == "input":
            hook = module.register_forward_pre_hook(
                lambda m, args, kwargs, keep=keep: keep(first_input(m, args, kwargs)), with_kwargs=True
            )
        else:
            hook = module.register_forward_hook(lambda m, args, output, keep=keep: keep(output))
        handles.append(hook)
    skips = MaskSkips.for_batch(inputs)
    try:
        with (
            torch.inference_mode(),
            model.adapter.batch_guard(model.model, inputs),
            eager_attention(needs_eager(p.module for p in points)),
            skips,
        ):
            model.model(**inputs.kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [point.name for point in points if point.name not in pooled]
    if missing:
        raise RuntimeError(f"hook points {missing[:3]} did not run in the forward pass")
    return settle(skips, pooled, defer_check)
