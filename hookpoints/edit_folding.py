"""Replacement edits of ``nn.Linear`` outputs folded into the layers' weights while a generation runs.

Replacing output neuron ``j`` of a Linear with ``v`` at every position of every call (a :class:`NeuronEdit`)
equals setting weight row ``j`` to 0 and ``bias[j]`` to ``v``: ``out_j = x . 0 + v = v`` exactly (a dot product
with a zero row is exactly 0 for finite ``x``, and the bias is ``v`` rounded to the layer's dtype, as
``hookpoints.editing.placed`` rounds it). A folded tensor needs no hook: a decoder step with only folded edits
dispatches no more aten ops than a plain one (tests/test_edit_folding.py). On a GPU, where generation is
launch-bound, that removes one Python hook and one ``where`` kernel per edited tensor and step.

Only exact folds are made (:meth:`FoldedEdits.why_not`); every other edit keeps its
:class:`~hookpoints.editing.EditGroup` hook. The original rows are restored when the ``with`` block ends, raised or
not, so the model is bit-identical afterwards. A one-shot forward hook per folded module compares the module's
output at the folded neurons with the values on its first call; the comparisons are read once after the
generation (one host sync), and a mismatch raises ``RuntimeError`` naming the module.

Where folding differs from the hook path: an input holding inf or NaN gives NaN at the folded neurons
(``0 * inf``), where the hook path gives ``v`` (on the first call the check raises; later calls are not
checked); a replacement by ``-0.0`` may come out as ``+0.0`` (equal as numbers); and gradients: the folded
layer's weight row would get ``x``'s gradient where a hook gives none, so a folded layer refuses to run with
gradients enabled (``generate_edited`` runs under ``torch.inference_mode``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from operator import is_ as op_is

import torch
from torch import nn

from hookpoints.editing import EditGroup, NeuronEdit, block_shape, groups
from hookpoints.probe import first_tensor


@contextmanager
def edits_applied(model: nn.Module, edits: list[NeuronEdit], *, fold: bool = True) -> Iterator[FoldedEdits | None]:
    """Every edit applied to every call of ``model`` while held: replacements of Linear outputs folded into the
    weights (with ``fold``), one :class:`EditGroup` hook per other edited tensor; the folded edits, if any.

    >>> with edits_applied(model.model, edits) as folded, torch.inference_mode():
    ...     model.model.generate(**kwargs)
    """
    modules = dict(model.named_modules())
    edit_groups = groups(edits)
    folded = FoldedEdits(model, edit_groups, modules) if fold else None
    handles = []
    try:
        for (path, io), group in (folded.rest if folded else edit_groups).items():
            if io == "output":
                handles.append(modules[path].register_forward_hook(group.output_hook))
            else:
                handles.append(modules[path].register_forward_pre_hook(group.input_hook, with_kwargs=True))
        with folded or nullcontext():  # the weights restored on the way out, raised or not
            yield folded
    finally:
        for handle in handles:
            handle.remove()


class FoldedEdits:
    """The foldable edit groups folded into their Linear layers while held; ``rest``: the groups left to hooks.

    >>> folded = FoldedEdits(model.model, groups(edits))  # (module path, io) -> EditGroup
    >>> with folded:  # rows zeroed, biases set, checks armed; restored on exit
    ...     model.model.generate(**kwargs)  # with hooks for folded.rest only
    >>> folded.modules  # the module paths whose edits were folded
    """

    def __init__(self, model: nn.Module, edit_groups: dict[tuple[str, str], EditGroup], modules: dict | None = None):
        modules = dict(model.named_modules()) if modules is None else modules  # path -> module
        # Parameters whose storage another parameter shares (tied weights, flat buffers): never written.
        storages = Counter(
            p.untyped_storage().data_ptr() for m in modules.values() for p in m._parameters.values() if p is not None
        )
        self.rest: dict[tuple[str, str], EditGroup] = {}
        self.folds: list[_Fold] = []
        for (path, io), group in edit_groups.items():
            module = modules.get(path)
            if module is not None and io == "output" and self.why_not(module, group, storages) is None:
                self.folds.append(_Fold(path, module, group))
            else:
                self.rest[path, io] = group
        self._by_module = {id(fold.module): fold for fold in self.folds}
        self._flags: list[tuple[str, torch.Tensor]] = []  # (module path, [] bool on the device: output == values)

    @property
    def modules(self) -> list[str]:
        return [fold.path for fold in self.folds]

    @staticmethod
    def why_not(module: nn.Module, group: EditGroup, storages: Counter | None = None) -> str | None:
        """Why ``group`` (edits of ``module``'s output) cannot be folded exactly, or None when it can."""
        if type(module) is not nn.Linear:
            return f"a {type(module).__name__}, not exactly nn.Linear (subclasses compute differently)"
        if module.bias is None:
            return "the Linear has no bias"
        if hasattr(module, "_hf_hook"):
            return "accelerate hooks it (offloaded or mapped weights)"
        if module._forward_hooks or torch.nn.modules.module._global_forward_hooks:
            return "other forward hooks read its output (they would see the edited values)"
        weight, bias = module.weight, module.bias
        if any(type(p) is not nn.Parameter or p.is_meta or not p.is_floating_point() for p in (weight, bias)):
            return "its weights are not plain floating-point tensors in memory (quantised, sharded or offloaded)"
        if weight.is_inference() or bias.is_inference():
            return "its weights were made under torch.inference_mode and cannot be written outside it"
        if storages is not None and any(storages[p.untyped_storage().data_ptr()] > 1 for p in (weight, bias)):
            return "its weight or bias is shared with another parameter"
        for edit in group.edits:
            point = edit.point
            count = point.part[1] if point.part else 1
            if edit.add or point.io != "output" or point.width is None or point.neuron_axis is None:
                return "an edit adds to its neurons" if edit.add else "an edit is not of a probed output"
            if module.out_features != point.width * count:
                return f"hook {point.name} lists {point.width} x {count} neurons, the Linear has {module.out_features}"
            if point.time_axis is not None and point.time_axis > point.neuron_axis:
                return f"hook {point.name}'s neurons are not the output's last axis"
        return None

    def __enter__(self) -> FoldedEdits:
        try:
            with torch.no_grad():
                for fold in self.folds:
                    fold.apply()
                    fold.handle = fold.module.register_forward_hook(self._check)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._restore()
        if kind is None:
            self.verify()

    def verify(self) -> None:
        """Raise ``RuntimeError`` if any folded module's first output differed from the values (one host sync)."""
        flags, self._flags = self._flags, []
        if not flags or bool(torch.cat([same for _, same in flags]).all()):  # [all folded neurons that ran]
            return
        wrong = [path for path, same in flags if not bool(same.all())]
        more = f" (and {len(wrong) - 1} more modules)" if len(wrong) > 1 else ""
        raise RuntimeError(
            f"folded edits did not land: module {wrong[0]}'s output differs from its replacement values{more} "
            "(an inf or NaN in its input, or a forward that does not compute x @ weight.T + bias)"
        )

    def _check(self, module: nn.Module, args, output) -> None:
        """The one-shot forward hook: compare the folded neurons with the values (on the device, read later)."""
        fold = self._by_module[id(module)]
        fold.handle.remove()  # later calls run hook-free
        fold.handle = None
        tensor = output if type(output) is torch.Tensor else first_tensor(output)
        if tensor is not None and tensor.requires_grad:  # d out_j / d weight_j is x here, 0 through a hook
            raise RuntimeError(
                f"folded edits of {fold.path} ran with gradients: the weights' gradients would differ from the hook "
                "path's; run under torch.no_grad / inference_mode, or with fold=False"
            )
        self._flags.append((fold.path, fold.landed(tensor)))

    def _restore(self) -> None:
        with torch.no_grad():
            for fold in self.folds:
                if fold.handle is not None:
                    fold.handle.remove()
                    fold.handle = None
                fold.restore()


class _Fold:
    """One Linear's replaced output neurons: ``rows`` and their ``values``, and the original rows while folded."""

    def __init__(self, path: str, module: nn.Linear, group: EditGroup):
        self.path, self.module, self.point = path, module, group.point
        # [k] int64 on the weights' device, [k] float64 on the CPU, {(device, dtype): [k] values there}
        self.rows, self.values, self._values_on = _rows(group, module.weight.device)
        self.saved: tuple[torch.Tensor, torch.Tensor] | None = None  # ([k, in] weight rows, [k] bias entries)
        self.handle = None  # the one-shot check hook while armed

    def values_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[k] the values rounded to ``dtype`` (as hookpoints.editing.placed rounds them), placed once."""
        found = self._values_on.get((device, dtype))
        if found is None:
            found = self._values_on[device, dtype] = self.values.to(device, dtype)
        return found

    def apply(self) -> None:
        weight, bias = self.module.weight, self.module.bias  # [out, in], [out]
        self.saved = (weight.index_select(0, self.rows), bias.index_select(0, self.rows))
        weight.index_fill_(0, self.rows, 0)
        bias.index_copy_(0, self.rows, self.values_on(bias.device, bias.dtype))

    def restore(self) -> None:
        if self.saved is not None:
            self.module.weight.index_copy_(0, self.rows, self.saved[0])
            self.module.bias.index_copy_(0, self.rows, self.saved[1])
            self.saved = None

    def landed(self, tensor: torch.Tensor | None) -> torch.Tensor:
        """[n] bool on the device: ``tensor`` (the module's output) holds the values at the folded neurons."""
        point, out = self.point, self.module.out_features
        if tensor is None or tensor.dim() < 2 or tensor.shape[-1] != out:
            raise RuntimeError(f"folded module {self.path} returned no [batch, ..., {out}] tensor")
        if math.prod(block_shape(tensor, point)) != out or point.time_axis == tensor.dim() - 1:
            raise RuntimeError(
                f"folded module {self.path}'s output {list(tensor.shape)} is not laid out as {point.name}"
            )
        expected = self.values_on(tensor.device, tensor.dtype)  # [k]
        return tensor.index_select(-1, self.rows).eq(expected).view(-1)  # [batch x ... x k]


def _rows(group: EditGroup, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The group's replaced rows (a part's offset added; a later edit's value wins, as in EditGroup) and values,
    made once per device and kept with the group's first edit (as ``placed`` keeps its masks)."""
    cache = group.edits[0]._placed
    found = cache.get(("fold", device))
    if found is not None and len(found[0]) == len(group.edits) and all(map(op_is, found[0], group.edits)):
        return found[1:]
    chosen: dict[int, float] = {}
    for edit in group.edits:
        offset = edit.point.part[0] * edit.point.width if edit.point.part else 0
        for neuron, value in zip(edit.neurons.tolist(), edit.values.tolist(), strict=True):  # floats: exact
            chosen[neuron + offset] = value
    rows = sorted(chosen)
    made = (
        torch.tensor(rows, dtype=torch.int64, device=device),  # [k]
        torch.tensor([chosen[row] for row in rows], dtype=torch.float64),  # [k]
        {},
    )
    cache["fold", device] = (tuple(group.edits), *made)
    return made
