"""Neuron edits: set (or shift) chosen neurons of a hook point, at every position of every call.

An edit names neurons by their index in the hook's vector (the index the store's ``activations`` and
``scores`` use), whatever the tensor's layout: ``[batch, pos, width]`` projections, a Conformer conv's
``[batch, channels, time]``, ``[batch, pos, heads, d_head]`` attention heads, or one slice of a fused
projection (``part``). :func:`apply_edit` changes the module's tensor in place, so everything after the hook
point reads the edited values. The edits of one tensor form an :class:`EditGroup`: a mask and values placed
once on the tensor's device and dtype, then one in-place ``torch.where`` per call (a decoder step's cost is one
aten op per edited tensor; tests/test_edit_fast_path.py, bench/edit_overhead.py). ``HookedModel.generate_edited``
applies them from torch hooks, or through nnsight when it also records; from torch hooks, replacements of
``nn.Linear`` outputs are folded into the layers' weights instead (hookpoints.edit_folding: no hook, no op per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.utils import ModelOutput

from hookpoints.errors import UserError
from hookpoints.points import HookPoint
from hookpoints.probe import first_input, first_tensor


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
    #: (device, dtype, mask shape) -> Placed (mask and values on the hook's device): placed once, reused at
    #: every step of a generation and every later call; ("fold", device) -> a folded group's rows
    #: (hookpoints.edit_folding).
    _placed: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        kinds = (self.point, self.neurons, self.values)
        if not isinstance(self.point, HookPoint) or not all(isinstance(t, torch.Tensor) for t in kinds[1:]):
            raise UserError("make a NeuronEdit with model.edit(name, neurons, values): it checks and converts them")
        if self.neurons.is_floating_point() or self.neurons.dtype == torch.bool:
            raise UserError(
                f"edit of {self.point.name}: neuron indices must be an integer tensor, not {self.neurons.dtype}"
            )
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
        if not bool(torch.isfinite(self.values).all()):  # NaN made every later value NaN; a fold's check misfired
            bad = int((~torch.isfinite(self.values)).nonzero()[0])
            raise UserError(
                f"edit of {self.point.name}: value {float(self.values[bad])} for neuron {int(self.neurons[bad])} "
                "is not a finite number"
            )


def check_edits(edits) -> None:
    """A UserError unless ``edits`` is a list (or tuple) of :class:`NeuronEdit`."""
    if not isinstance(edits, list | tuple) or not all(isinstance(edit, NeuronEdit) for edit in edits):
        raise UserError(f"edits must be a list of NeuronEdit (model.edit(...)), not {edits!r:.80}")


def apply_edit(value, edit: NeuronEdit) -> None:
    """Edit the hook's tensor (a module's output or first input, possibly inside a tuple) in place."""
    EditGroup([edit]).apply(value)


def block_shape(tensor: torch.Tensor, point: HookPoint) -> torch.Size:
    """``tensor``'s shape without its batch axis and with its time axis set to 1: the shape of an edit's mask,
    which broadcasts over batch and positions (``[1, width]``, ``[1, heads, d_head]``, ``[channels, 1]``)."""
    shape = tensor.shape
    if point.time_axis is None:
        return shape[1:]
    return shape[1 : point.time_axis] + (1,) + shape[point.time_axis + 1 :]


def placed(edit: NeuronEdit, block: torch.Size, device: torch.device, dtype: torch.dtype) -> Placed:
    """The edit as a :class:`Placed` mask and values of ``block`` shape on ``device`` in ``dtype``: True and the
    edit's value at its neurons, False and 0 elsewhere. Made and copied once per device, dtype and shape, then reused
    at every call and generation step (no copy, no allocation per step)."""
    key = (device, dtype, tuple(block))
    if key not in edit._placed:
        point = edit.point
        neuron_shape = [size for axis, size in enumerate(block, 1) if axis != point.time_axis]
        size, count = math.prod(neuron_shape), point.part[1] if point.part else 1
        if size != (point.width or 0) * count:  # a tensor unlike the probed one: refuse rather than misplace
            raise UserError(
                f"hook {point.name}'s tensor has {size} neurons per position here, the hook point lists "
                f"{point.width}{f' x {count} parts' if point.part else ''}; edit a hook point of this model"
            )
        flat = edit.neurons.to(device)
        if point.part:
            flat = flat + point.part[0] * point.width
        mask = torch.zeros(neuron_shape, dtype=torch.bool, device=device)
        values = torch.zeros(neuron_shape, dtype=dtype, device=device)
        mask.view(-1)[flat] = True
        values.view(-1)[flat] = edit.values.to(device, dtype)
        edit._placed[key] = Placed(mask.view(block), values.view(block), edit.add, point.time_axis)
    return edit._placed[key]


#: Most elements a tensor may have for an edit by ``where`` (which reads and writes every element, one op) rather
#: than by indexed assignment (which touches only the edited neurons but costs ~3x the host time per call). A
#: decoder step's tensors (batch x 1 position) are far below either; a long forward pass is above. On a GPU a
#: ``where`` over 4 M elements streams ~16 MB, a few microseconds, about one kernel launch (an estimate: no GPU
#: measured it); on a CPU one over 16 k elements costs about what the indexed assignment does (bench/edit_overhead.py).
WHERE_MAX = {"cpu": 1 << 14}
WHERE_MAX_OTHER = 1 << 22


class Placed:
    """An edit (or several merged) ready to apply: ``[*block]`` mask and values (or shifts, with ``add``)."""

    def __init__(self, mask: torch.Tensor, values: torch.Tensor, add: bool, time_axis: int | None):
        self.mask = mask  # [*block] bool: the edited neurons (block: the tensor's shape, batch dropped, time 1)
        self.values = values  # [*block]: their values (0 elsewhere)
        self.add = add
        self.time_axis = time_axis
        self.most = WHERE_MAX.get(mask.device.type, WHERE_MAX_OTHER)
        self._indexed: tuple | None = None  # (one [k] index per neuron axis, [k] values), made when first needed

    def apply(self, tensor: torch.Tensor) -> None:
        """One in-place ``where`` (one kernel; two with ``add``): the values at the mask, the tensor elsewhere;
        an indexed assignment on tensors over ``WHERE_MAX`` elements."""
        if tensor.numel() > self.most:
            return self._apply_indexed(tensor)
        new = tensor + self.values if self.add else self.values
        if tensor.requires_grad:  # out= does not take part in autograd; an in-place copy does
            tensor.copy_(torch.where(self.mask, new, tensor))
        else:
            torch.where(self.mask, new, tensor, out=tensor)

    def _apply_indexed(self, tensor: torch.Tensor) -> None:
        if self._indexed is None:
            mask, values = self.mask, self.values  # [*neurons], with the time axis' 1 dropped below
            if self.time_axis is not None:
                mask, values = mask.squeeze(self.time_axis - 1), values.squeeze(self.time_axis - 1)
            coordinates = mask.nonzero(as_tuple=True)  # once per placement (a host sync on a GPU)
            self._indexed = (coordinates, values[coordinates])
        coordinates, values = self._indexed
        if self.time_axis is None:
            view, lead = tensor, 1  # [batch, *neurons]
        else:
            view, lead = tensor.movedim(self.time_axis, 1), 2  # [batch, pos, *neurons] (a view of the tensor)
        where = (slice(None),) * lead + coordinates
        view[where] = view[where] + values if self.add else values

    def then(self, later: Placed) -> Placed | None:
        """This edit followed by ``later`` as one, or None where they cannot merge exactly (a replacement and a
        shift, or two shifts of one neuron: t + a + b is not t + (a + b) in floating point)."""
        if self.add != later.add or (self.add and bool((self.mask & later.mask).any())):
            return None
        values = self.values + later.values if self.add else torch.where(later.mask, later.values, self.values)
        return Placed(self.mask | later.mask, values, self.add, self.time_axis)


class EditGroup:
    """Every edit of one module tensor (one module's output or input), applied as few ``where`` s as exact.

    The merged masks are cached per device, dtype and shape; one group lives for one generation (or forward).

    >>> group = EditGroup([edit_a, edit_b])  # the same module, e.g. GPT-2's fused q and k slices
    >>> group.apply(tensor)
    """

    def __init__(self, edits: list[NeuronEdit]):
        self.edits = list(edits)
        self.point = self.edits[0].point  # the time axis is the module's, the same for every edit of it
        self._placed: dict = {}  # (device, dtype, mask shape) -> the merged steps
        self._seen: dict = {}  # (shape, dtype, device) of a tensor -> the same steps: one look-up per call

    def steps(self, tensor: torch.Tensor) -> list[Placed]:
        """The merged edits for ``tensor``'s device, dtype and shape (placed on the first call, then reused)."""
        key = (tensor.device, tensor.dtype, block_shape(tensor, self.point))
        found = self._placed.get(key)
        if found is None:
            found = []
            for edit in self.edits:
                one = placed(edit, key[2], tensor.device, tensor.dtype)
                merged = found[-1].then(one) if found else None
                if merged is None:
                    found.append(one)
                else:
                    found[-1] = merged
            self._placed[key] = found
        return found

    def apply(self, value) -> None:
        """Edit the hook's tensor (the value itself, or the first tensor in a tuple) in place."""
        tensor = value if type(value) is torch.Tensor else first_tensor(value)
        if tensor is None:
            raise UserError(f"hook {self.point.name}: module {self.point.module} passed no tensor to edit")
        key = (tensor.shape, tensor.dtype, tensor.device)
        seen = self._seen.get(key)
        if seen is None:
            steps = self.steps(tensor)
            one = steps[0] if len(steps) == 1 and not steps[0].add and tensor.numel() <= steps[0].most else None
            seen = self._seen[key] = (one, steps)  # `one`: a single replacement by where (the usual case)
        one, steps = seen
        if one is not None and not tensor.requires_grad:
            torch.where(one.mask, one.values, tensor, out=tensor)  # what one.apply does, without its checks
            return
        for step in steps:
            step.apply(tensor)

    def output_hook(self, module, args, output) -> None:
        """A torch forward hook editing the module's output: ``module.register_forward_hook(group.output_hook)``."""
        self.apply(output)

    def input_hook(self, module, args, kwargs) -> None:
        """A torch forward pre-hook editing the module's first input (:func:`first_input`):
        ``module.register_forward_pre_hook(group.input_hook, with_kwargs=True)``."""
        self.apply(first_input(module, args, kwargs))


def groups(edits: list[NeuronEdit]) -> dict[tuple[str, str], EditGroup]:
    """The edits grouped by the tensor they change: (module path, "output" | "input") -> its group."""
    by_tensor: dict[tuple[str, str], list[NeuronEdit]] = {}
    for edit in edits:
        by_tensor.setdefault((edit.point.module, edit.point.io), []).append(edit)
    return {key: EditGroup(group) for key, group in by_tensor.items()}


def own_inputs(kwargs: dict, points) -> dict:
    """``kwargs`` with its floating-point tensors copied when an edit changes a module's input (in place) at one
    of ``points``: a module may be handed the caller's own tensor (SeamlessM4T's feature projection reads
    ``input_features`` as given, Whisper's ``conv1`` too), which the edit would change for every later call."""
    if not any(point.io == "input" for point in points):
        return kwargs
    return {key: _copied(value) for key, value in kwargs.items()}


def _copied(value):
    """``value``'s floating-point tensors copied, inside an ``encoder_outputs`` (a ModelOutput, a tuple) too."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_floating_point() else value
    if isinstance(value, ModelOutput):
        return type(value)(**{key: _copied(item) for key, item in value.items()})
    if isinstance(value, tuple):
        return tuple(_copied(item) for item in value)
    return value
