"""The shape probe: one small forward pass that measures every module's tensors.

Plain torch hooks on every module record, for its first input and its output, the tensor's shape, when it
appeared, and how often the module ran. A hook point's layout follows from the shape: axis 0 is the batch,
the axis whose length equals one space's length (the probe batch gives every space a different length) is
the time axis, and the remaining axes hold the neurons.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from hookpoints.derived import is_map
from hookpoints.inputs import ModelInputs
from hookpoints.points import HookPoint

#: hookpoints.attention's per-head hooks, ``[batch, pos, head, d_head]``
ROTARY_HOOKS = ("hook_rot_q", "hook_rot_k")


@dataclass(frozen=True)
class Seen:
    """What the probe saw of one tensor."""

    shape: tuple[int, ...] | None  # None when the value holds no tensor
    order: int
    calls: int = 1


def first_tensor(value):
    """The tensor a hook point means: the value itself, the first item of a tuple, or of a ModelOutput."""
    if isinstance(value, Mapping):
        value = next(iter(value.values()), None)
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


def first_input(module: nn.Module, args: tuple, kwargs: dict):
    """A module's first input (its ``:input`` hook point): the first positional argument, else the keyword
    argument :func:`first_input_key` names."""
    if args:
        return args[0]
    key = first_input_key(module, kwargs)
    return None if key is None else kwargs[key]


def first_input_key(module: nn.Module, kwargs: dict) -> str | None:
    """The keyword argument that is a module's first input when it gets no positional one: the one named as
    ``forward``'s first parameter (``generate`` calls an encoder ``encoder(attention_mask=..., ...,
    input_features=...)``), else the first one (attention modules' ``hidden_states=``)."""
    name = _first_parameter(type(module))
    return name if name in kwargs else next(iter(kwargs), None)


@functools.cache
def _first_parameter(kind: type) -> str | None:
    try:
        names = list(inspect.signature(kind.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names[1] if len(names) > 1 else None


def observe(model: nn.Module, inputs: ModelInputs) -> dict[tuple[str, str], Seen]:
    """Run ``model`` once on ``inputs``; map (module path, "input" | "output") to what was seen."""
    counter = itertools.count()
    seen: dict[tuple[str, str], Seen] = {}

    def note(key: tuple[str, str], value) -> None:
        if key in seen:
            seen[key] = replace(seen[key], calls=seen[key].calls + 1)
            return
        tensor = first_tensor(value)
        seen[key] = Seen(tuple(tensor.shape) if tensor is not None else None, next(counter))

    def on_input(name):
        def hook(module, args, kwargs):
            note((name, "input"), first_input(module, args, kwargs))

        return hook

    def on_output(name):
        def hook(module, args, output):
            note((name, "output"), output)

        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(on_input(name), with_kwargs=True))
            handles.append(module.register_forward_hook(on_output(name)))
    try:
        with torch.inference_mode():
            model(**inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def measure(point: HookPoint, seen: Seen | None, lengths: dict[str, int], batch: int) -> HookPoint:
    """``point`` with its layout filled in (or ``unavailable`` set to the reason it cannot be recorded)."""
    if seen is None:
        return replace(point, unavailable="its module does not run in a forward pass of this model and input")
    if seen.calls > 1:
        return replace(point, order=seen.order, unavailable=f"its module runs {seen.calls} times per forward pass")
    shape = seen.shape
    if shape is None:
        return replace(point, order=seen.order, unavailable="its value is not a tensor")
    if is_map(point.module):
        return _measure_map(point, shape, seen.order, lengths)
    if len(shape) < 2 or shape[0] not in (batch, 1):  # 1: broadcast over the batch (position embeddings)
        return replace(point, order=seen.order, unavailable=f"its tensor has no batch axis (shape {list(shape)})")
    time = [(axis, space) for axis in range(1, len(shape)) for space, n in lengths.items() if shape[axis] == n]
    if len({axis for axis, _ in time}) > 1:
        return replace(point, order=seen.order, unavailable=f"its tensor has several position axes ({list(shape)})")
    if len(time) > 1:
        return replace(point, order=seen.order, unavailable=f"its positions match several spaces ({list(shape)})")
    time_axis, space = time[0] if time else (None, None)
    neuron_axes = [axis for axis in range(1, len(shape)) if axis != time_axis]
    if not neuron_axes:
        return replace(point, order=seen.order, unavailable=f"its tensor has no neuron axis ({list(shape)})")
    if neuron_axes != list(range(neuron_axes[0], neuron_axes[-1] + 1)):  # Phi's q_layernorm: [batch, head, pos, d]
        return replace(point, order=seen.order, unavailable=_split_neurons(shape, time_axis))
    width = math.prod(shape[axis] for axis in neuron_axes)
    if point.part:
        if width % point.part[1]:
            return replace(point, order=seen.order, unavailable=f"{width} neurons do not split in {point.part[1]}")
        width //= point.part[1]
    if point.derived and point.derived.endswith("scale"):
        # one divisor per normalised vector: [batch, pos, 1], or one per head for a per-head norm (Qwen3's q_norm)
        width = math.prod(shape[axis] for axis in neuron_axes[:-1])
    heads = point.heads
    if heads is None and point.module.rsplit(".", 1)[-1] in ROTARY_HOOKS and len(neuron_axes) == 2:
        heads = shape[neuron_axes[0]]  # an attention module's hook_rot_q/k under its module path: [.., head, d_head]
    return replace(
        point, width=width, heads=heads, neuron_axis=neuron_axes[0], time_axis=time_axis, space=space, order=seen.order
    )


def _split_neurons(shape: tuple[int, ...], time_axis: int) -> str:
    return (
        f"its positions (axis {time_axis} of {list(shape)}) lie between its neuron axes, e.g. [batch, head, pos, "
        "d_head], a layout hookpoints does not record: record the module before or after it (for attention heads "
        "the q/k projection, or hook_rot_q / hook_rot_k)"
    )


def _measure_map(point: HookPoint, shape: tuple[int, ...], order: int, lengths: dict[str, int]) -> HookPoint:
    """An attention map ``[batch, head, query_pos, key_pos]``: positions are queries, neurons [head, key]."""
    spaces = [[space for space, n in lengths.items() if n == shape[axis]] for axis in (2, 3)]
    if len(shape) != 4 or len(spaces[0]) != 1 or len(spaces[1]) != 1:
        return replace(point, order=order, unavailable=f"its attention map's positions are ambiguous ({list(shape)})")
    # keys (the row layout) are set by the model, which knows the key space's longest length
    return replace(
        point, heads=shape[1], neuron_axis=1, time_axis=2, space=spaces[0][0], key_space=spaces[1][0], order=order
    )
