"""Gradients at hook points: TransformerLens' backward hooks and ``run_with_cache(..., incl_bwd=True)``.

A backward hook ``fn(grad, hook)`` gets the gradient of the hook point's tensor in cache layout (``[batch, pos,
d]``, ``[batch, pos, head, d_head]``, ...) during a backward pass, and may return a tensor of that shape to
replace it, as TransformerLens' ``add_hook(name, fn, dir="bwd")``. TransformerLens runs them as a torch full
backward hook on the HookPoint module, and this module copies that behaviour exactly:

- ``grad`` is the gradient of the point's value *after* its forward hooks (what the cache holds);
- a returned tensor replaces the gradient of the value *before* them (the HookPoint's input), so the forward
  hooks' own derivative is bypassed; the hooks of one point each get the same ``grad`` (a change in place is
  seen by the later ones and kept), and the last tensor returned wins;
- the hooks belong to the forward pass that ran with them: a later ``backward()`` of its output runs them
  even after ``reset_hooks()`` (TransformerLens' too, whatever its ``run_with_hooks`` warning says).

Here they are tensor hooks on the module's tensor (a copy of a module's output that replaces it), one held
before every forward change of the point (``first``) and one after them (``last``); see :func:`backward_changes`.
``run_with_cache``'s gradients are one more backward hook per cached point, held last, as TransformerLens'
``save_hook``.

Derived hook points (a norm's ``hook_scale`` / ``hook_normalized``: computed from the norm's input, no tensor
of the HF model's forward pass) get TransformerLens' gradient computed from the norm output's, ``g``, with the
norm's gain ``w`` (``out = normalized * w + b``): ``normalized``: ``g * w``; ``scale``: ``-sum(g * w *
normalized) / scale`` (:func:`_derived_changes`). They are cached (``incl_bwd``); a backward hook there, which
could replace them, is refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from hookpoints.derived import derive_norm
from hookpoints.errors import UserError
from hookpoints.hook_fns import layout, resolve_hooks, write_back
from hookpoints.points import HookPoint

#: ``fn(grad, hook) -> grad | None``, as TransformerLens' backward hooks.
BwdFn = Callable[[torch.Tensor, HookPoint], torch.Tensor | None]


def check_backward_points(points: list[HookPoint], caller: str) -> None:
    """A UserError for a backward hook on a derived hook point (no tensor of the model's forward pass to replace
    the gradient of; ``run_with_cache(incl_bwd=True)`` computes theirs).

    >>> check_backward_points(model.select(["blocks.0.ln1.hook_scale"]), "add_hook")  # doctest: +SKIP
    """
    for point in points:
        if point.derived:
            io = "" if point.io == "output" else ":input"
            raise UserError(
                f"{caller}: {point.name} is computed from {point.module}{io}, not a tensor of the model's forward "
                f"pass, so a backward hook cannot replace its gradient; hook {point.module}{io} or {point.module}"
            )


def resolve_bwd_hooks(model, bwd_hooks, caller: str) -> list[tuple[HookPoint, BwdFn]]:
    """``[(name, glob or predicate, fn)]`` -> ``[(HookPoint, fn)]``: names checked, derived points refused."""
    if not isinstance(bwd_hooks, (list, tuple)):
        raise UserError(f"{caller}: bwd_hooks must be a list of (hook name or glob, function) pairs")
    resolved = resolve_hooks(model, list(bwd_hooks))
    check_backward_points([point for point, _ in resolved], caller)
    return resolved


def grad_saver(grads: dict[str, torch.Tensor]) -> BwdFn:
    """A backward hook that keeps the gradient under ``NAME_grad`` (``run_with_cache``'s ``incl_bwd``)."""

    def save(grad: torch.Tensor, hook: HookPoint) -> None:
        grads[f"{hook.name}_grad"] = grad.detach().clone()

    save.reads_only = True  # needs no copy before the forward changes: it replaces nothing
    return save


def backward_changes(model, hooks: list[tuple[HookPoint, BwdFn]], batch: int, roots: list[torch.Tensor]):
    """``(first, last)``: changes (hookpoints.hook_fns.hooked) to hold before and after every forward change,
    that run ``hooks`` (in order, per point) in the backward pass of the forward pass they are held in.

    ``roots`` gets each hooked tensor as the forward pass made it: ``torch.autograd.grad(output, roots)``
    reaches every hook (and fills no parameter's ``.grad``)."""
    by_name: dict[str, list[BwdFn]] = {}
    points: dict[str, HookPoint] = {}
    for point, fn in hooks:
        by_name.setdefault(point.name, []).append(fn)
        points[point.name] = point
    first, last = [], []
    for name, fns in by_name.items():
        point, state = points[name], {}
        if point.derived:
            last += _derived_changes(model, point, fns, batch, roots)
            continue
        if not all(getattr(fn, "reads_only", False) for fn in fns):
            first.append((point, _before(point, batch, state)))
        last.append((point, _after(point, fns, batch, state, roots)))
    return first, last


def _shared(tensor: torch.Tensor, point: HookPoint, batch: int) -> bool:
    """Whether the module's tensor is one the batch shares (``[1, pos, d]`` position embeddings)."""
    return point.keys is None and tensor.shape[0] == 1 and batch > 1


def _own(tensor: torch.Tensor, point: HookPoint, batch: int) -> torch.Tensor:
    """A copy of the module's tensor; one shared by the batch repeated to ``batch`` examples, so each example
    has its own gradient (TransformerLens' ``hook_pos_embed`` is ``[batch, pos, d]``)."""
    if _shared(tensor, point, batch):
        return tensor.expand(batch, *tensor.shape[1:]).clone()
    return tensor.clone()


def _in_place(tensor: torch.Tensor, point: HookPoint, batch: int) -> bool:
    """Whether the hooks go on the module's tensor itself, not on a copy that replaces it: a module's *input*
    (``hook_resid_mid`` is ``ln_2``'s input) has other readers (the residual sum) that a copy would not reach;
    its forward changes are made in place too (hookpoints.hook_fns.user_hook)."""
    return point.io == "input" and not _shared(tensor, point, batch)


def _before(point: HookPoint, batch: int, state: dict) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """Held before the point's forward changes: where a replacement gradient goes (the value before them)."""

    def replace(grad: torch.Tensor) -> torch.Tensor | None:
        new = state.pop("replacement", None)
        if new is None:
            return None
        grad = grad.clone()
        write_back(grad, point, new.to(grad.dtype), batch)
        return grad

    def change(tensor: torch.Tensor) -> torch.Tensor | None:
        if not tensor.requires_grad:
            return None  # nothing before it has a gradient: there is nothing to replace
        own = tensor if _in_place(tensor, point, batch) else _own(tensor, point, batch)
        own.register_hook(replace)
        state["before"] = (own, own._version)
        return None if own is tensor else own

    state["replace"] = replace
    return change


def _after(point: HookPoint, fns: list[BwdFn], batch: int, state: dict, roots: list[torch.Tensor]):
    """Held after the point's forward changes: runs ``fns`` on the gradient of the value after them."""
    replaces = not all(getattr(fn, "reads_only", False) for fn in fns)

    def change(tensor: torch.Tensor) -> torch.Tensor | None:
        in_place = _in_place(tensor, point, batch)
        if not tensor.requires_grad:  # frozen weights: nothing before it needs a gradient, so it starts here
            in_place = in_place and tensor.is_leaf
            tensor = tensor.requires_grad_() if in_place else tensor.detach().requires_grad_()
        roots.append(tensor)
        own = tensor if in_place else _own(tensor, point, batch)
        before = state.get("before")  # no forward change since the copy before them: one tensor, hooked twice
        unchanged = before is not None and before[0] is own and before[1] == own._version

        def run(grad: torch.Tensor) -> torch.Tensor | None:
            x = layout(grad, point, batch)  # a copy: the hooks may change it in place
            replacement = None
            for fn in fns:
                result = fn(x, point)
                if result is not None:
                    replacement = _checked(result, x, point)
            if replaces:
                state["replacement"] = x if replacement is None else replacement
            return state["replace"](grad) if unchanged else None  # else the copy before the changes replaces it

        own.register_hook(run)
        return None if own is tensor else own

    return change


def _derived_changes(model, point: HookPoint, fns: list[BwdFn], batch: int, roots: list[torch.Tensor]) -> list:
    """A derived norm point's read-only backward hooks ``fns``: the norm's input kept, and its output's gradient
    turned into TransformerLens' gradient of ``hook_normalized`` / ``hook_scale`` (see the module docstring)."""
    from hookpoints.cache import hook_tensor

    module = dict(model.model.named_modules())[point.module]
    laid = dataclasses.replace(point, derived=None)  # lays out the computed gradient as the value is laid out
    kept = {}

    def keep_input(tensor: torch.Tensor) -> None:
        kept["x"] = tensor.detach()

    def on_output(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.requires_grad:
            tensor = tensor.detach().requires_grad_()
        roots.append(tensor)
        own = tensor.clone()
        gain = _gain(module, point, kept["x"])

        def run(grad: torch.Tensor) -> None:
            x = kept["x"]
            normalized = derive_norm(x, point.derived.replace("scale", "normalized"), point.eps)
            value = grad.float() * gain  # d loss / d normalized
            if point.derived.endswith("scale"):
                value = -(value * normalized).sum(-1, keepdim=True) / derive_norm(x, point.derived, point.eps)
            value = hook_tensor(value.to(grad.dtype), laid, batch)
            for fn in fns:
                if fn(value, point) is not None:
                    raise UserError(f"a backward hook on {point.name} (a derived point) cannot replace its gradient")

        own.register_hook(run)
        return own

    return [(point, keep_input), (dataclasses.replace(point, io="output", derived=None, part=None), on_output)]


def _gain(module: torch.nn.Module, point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """The norm's per-feature gain ``w`` (``out = normalized * w [+ b]``), in float32: a LayerNorm's weight; an
    RMSNorm's (``weight``, Gemma's ``1 + weight``) read off its output for a row of ones, whose scale is
    ``sqrt(1 + eps)``."""
    with torch.no_grad():
        if point.derived.startswith("ln_"):
            weight = getattr(module, "weight", None)
            return torch.ones(x.shape[-1], device=x.device) if weight is None else weight.float()
        ones = torch.ones(1, x.shape[-1], dtype=x.dtype, device=x.device)
        return module.forward(ones)[0].float() * math.sqrt(1 + point.eps)


def _checked(result, grad: torch.Tensor, point: HookPoint) -> torch.Tensor:
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != tuple(grad.shape):
        got = list(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise UserError(
            f"backward hook for {point.name} returned {got}; return a gradient of shape {list(grad.shape)} or None"
        )
    return result.to(grad.device)
