"""Shared by the Python API tests: randomised tiny models and activations read with plain torch hooks."""

from __future__ import annotations

import numpy as np
import torch


def randomise(model, seed: int = 1, scale: float = 0.1) -> None:
    """Shift every parameter (norm gains and biases too) by seeded noise: definitions that coincide at gain 1
    and bias 0 no longer do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_(scale * noise.to(parameter.dtype))


def raw_tensors(model, points, inputs) -> dict[str, torch.Tensor]:
    """Each hook point's module tensor as the module gives it (no layout change), by plain torch hooks."""
    modules = dict(model.model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def first(value):
        while isinstance(value, (tuple, list)):
            value = value[0]
        return value

    for point in points:
        module = modules[point.module]
        if point.io == "output":
            hook = lambda m, a, out, name=point.name: seen.__setitem__(name, first(out).detach().clone())  # noqa: E731
            handles.append(module.register_forward_hook(hook))
        else:
            hook = lambda m, args, name=point.name: seen.__setitem__(name, first(args).detach().clone())  # noqa: E731
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode(), model.adapter.batch_guard(model.model, inputs):
            model.model(**inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def sine(seconds: float, hz: float = 220.0, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * hz * t) + 0.05 * np.sin(2 * np.pi * 3 * hz * t)).astype(np.float32)
