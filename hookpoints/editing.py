"""Neuron edits: set (or shift) chosen neurons of a hook point, at every position of every call.

An edit names neurons by their index in the hook's vector (the index the store's ``activations`` and
``scores`` use), whatever the tensor's layout: ``[batch, pos, width]`` projections, a Conformer conv's
``[batch, channels, time]``, ``[batch, pos, heads, d_head]`` attention heads, or one slice of a fused
projection (``part``). :func:`apply_edit` changes the module's tensor in place, so everything after the hook
point reads the edited values. ``HookedModel.generate_edited`` applies edits through nnsight during
generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hookpoints.errors import UserError
from hookpoints.points import HookPoint
from hookpoints.probe import first_tensor


@dataclass(frozen=True)
class NeuronEdit:
    """Replace neurons ``neurons`` of ``point`` with ``values`` (or, with ``add``, add ``values`` to them).

    >>> edit = model.edit("blocks.0.mlp.hook_post", [3, 7], [0.0, 0.0])  # a NeuronEdit
    >>> model.run_with_edits(["Hi"], [edit])
    """

    point: HookPoint
    neurons: torch.Tensor  # [k] int64: indices into the hook's vector
    values: torch.Tensor  # [k] float: the replacement values, or the steering vector's entries
    add: bool = False

    def __post_init__(self):
        if self.point.derived or self.point.keys is not None:
            raise UserError(
                f"hook {self.point.name} is computed from {self.point.module}'s {self.point.io} and cannot be edited; "
                f"edit {self.point.module}{'' if self.point.io == 'output' else ':input'} instead"
                if self.point.derived
                else f"hook {self.point.name} is an attention map and cannot be edited by neuron; "
                "edit the attention's q/k/v or z hook points instead"
            )
        width = self.point.width or 0
        if self.neurons.dim() != 1 or self.values.shape != self.neurons.shape:
            raise UserError(
                f"edit of {self.point.name}: {len(self.neurons)} neuron indices but {self.values.numel()} values"
            )
        if len(self.neurons) and (int(self.neurons.min()) < 0 or int(self.neurons.max()) >= width):
            bad = next(int(n) for n in self.neurons if not 0 <= int(n) < width)
            raise UserError(f"neuron {bad} is out of range for hook {self.point.name} (width {width}: 0..{width - 1})")
        if len(torch.unique(self.neurons)) != len(self.neurons):
            raise UserError(f"edit of {self.point.name} names a neuron twice")


def apply_edit(value, edit: NeuronEdit) -> None:
    """Edit the hook's tensor (a module's output or first input, possibly inside a tuple) in place."""
    tensor = first_tensor(value)
    point = edit.point
    if point.time_axis is None:
        view, lead = tensor, 1  # [batch, *neurons]
    else:
        view, lead = tensor.movedim(point.time_axis, 1), 2  # [batch, pos, *neurons] (a view of the tensor)
    shape = view.shape[lead:]
    flat = edit.neurons.to(tensor.device)
    if point.part:
        index, count = point.part
        flat = flat + index * (shape.numel() // count)
    coordinates = torch.unravel_index(flat, tuple(shape))  # one [k] index per neuron dimension
    where = (slice(None),) * lead + tuple(coordinates)
    values = edit.values.to(tensor.device, tensor.dtype)  # [k], broadcast over batch and positions
    if edit.add:
        view[where] = view[where] + values
    else:
        view[where] = values
