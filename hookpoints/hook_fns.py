"""Interventions in a plain forward pass: hook functions over named hook points, and neuron edits.

``model.run_with_hooks(inputs, fwd_hooks=[(name_or_glob, fn)])`` works as in TransformerLens: ``fn(tensor,
hook)`` gets the hook point's tensor in cache layout (``[batch, pos, d]``, ``[batch, pos, head, d_head]`` for
per-head points; see hookpoints.cache) and the :class:`HookPoint` (``hook.name``), and returns a tensor of the
same shape to replace it (or None after changing it in place). Everything after the hook point reads the new
values. The ready-made functions below ablate, patch and steer. ``model.run_with_edits(inputs, edits)`` applies
:class:`~hookpoints.editing.NeuronEdit` s (the edits the intervention sweep makes during generation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch

from hookpoints.editing import NeuronEdit, apply_edit
from hookpoints.errors import UserError
from hookpoints.points import HookPoint
from hookpoints.pooling import check_width
from hookpoints.probe import first_input_key, first_tensor

#: ``fn(tensor, hook) -> tensor | None``, as in TransformerLens.
HookFn = Callable[[torch.Tensor, HookPoint], torch.Tensor | None]


def layout(tensor: torch.Tensor, point: HookPoint, batch: int | None = None) -> torch.Tensor:
    """The module's tensor in cache layout (a copy): ``[batch, pos, *shape]`` or ``[batch, *shape]``; attention
    maps as they are (``[batch, head, query_pos, key_pos]``). A tensor shared by the batch (``[1, pos, d]``
    position embeddings) is repeated to ``batch`` examples, as the cache shows it."""
    if point.keys is not None:
        return tensor.clone()
    base = tensor.unsqueeze(1) if point.time_axis is None else tensor.movedim(point.time_axis, 1)
    flat = base.reshape(*base.shape[:2], -1)  # [batch, pos, all neurons]
    if point.part:
        index, count = point.part
        width = flat.shape[-1] // count
        flat = flat[..., index * width : (index + 1) * width]
    check_width(flat.shape[-1], point)
    x = flat.reshape(*flat.shape[:2], *point.shape)
    x = x[:, 0] if point.time_axis is None else x
    if batch is not None and x.shape[0] == 1 and batch > 1:
        return x.expand(batch, *x.shape[1:]).clone()
    return x.clone()


def write_back(tensor: torch.Tensor, point: HookPoint, new, batch: int | None = None) -> torch.Tensor | None:
    """Write ``new`` (cache layout) into the module's ``tensor`` in place (the inverse of :func:`layout`).

    Returns a new tensor to replace the module's instead when ``tensor`` is shared by the batch (``[1, ...]``)
    and ``new`` holds one value per example."""
    expected = layout(tensor, point, batch).shape
    if not isinstance(new, torch.Tensor):
        raise UserError(
            f"hook function for {point.name} returned {type(new).__name__}; return a tensor of shape "
            f"{list(expected)} or None (after changing it in place)"
        )
    if tuple(new.shape) != tuple(expected):
        raise UserError(f"hook function for {point.name} returned shape {list(new.shape)}, expected {list(expected)}")
    if point.keys is not None:
        tensor.copy_(new)
        return None
    if tensor.shape[0] != new.shape[0]:  # shared by the batch: a tensor of the batch's size replaces it
        tensor = tensor.expand(new.shape[0], *tensor.shape[1:]).clone()
        write_back(tensor, point, new)
        return tensor
    base = tensor.unsqueeze(1) if point.time_axis is None else tensor.movedim(point.time_axis, 1)
    flat = base.reshape(*base.shape[:2], -1).clone()  # [batch, pos, all neurons]
    values = new.reshape(*flat.shape[:2], -1).to(flat.dtype)
    if point.part:
        index, count = point.part
        width = flat.shape[-1] // count
        flat[..., index * width : (index + 1) * width] = values
    else:
        flat = values
    restored = flat.reshape(base.shape)
    restored = restored.squeeze(1) if point.time_axis is None else restored.movedim(1, point.time_axis)
    tensor.copy_(restored)
    return None


@contextmanager
def hooked(model, edits: Sequence[tuple[HookPoint, Callable[[torch.Tensor], torch.Tensor | None]]]):
    """Plain torch hooks that call ``change(tensor)`` on each hook point's tensor while held: it changes the
    tensor in place, or returns a tensor that replaces it (one of the batch's size, for a tensor the batch shares)."""
    modules = dict(model.model.named_modules())
    handles = []

    def on_output(change):
        def hook(module, args, output):
            new = change(_tensor_of(output, module))
            return None if new is None else _replaced(output, new)

        return hook

    def on_input(change):
        def hook(module, args, kwargs):
            if args:
                new = change(_tensor_of(args[0], module))
                return None if new is None else ((_replaced(args[0], new), *args[1:]), kwargs)
            key = first_input_key(module, kwargs)
            new = change(_tensor_of(kwargs.get(key), module))
            return None if new is None else (args, {**kwargs, key: _replaced(kwargs[key], new)})

        return hook

    try:
        for point, change in edits:
            module = modules[point.module]
            if point.io == "output":
                handles.append(module.register_forward_hook(on_output(change)))
            else:
                handles.append(module.register_forward_pre_hook(on_input(change), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _replaced(value, new: torch.Tensor):
    """``value`` (a tensor, or a tuple whose first item holds it) with its tensor replaced by ``new``."""
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple) and value:
        return (_replaced(value[0], new), *value[1:])
    raise UserError(f"cannot replace the tensor inside a {type(value).__name__}; change it in place instead")


def _tensor_of(value, module) -> torch.Tensor:
    tensor = first_tensor(value)
    if tensor is None:
        raise UserError(f"module {type(module).__name__}'s value holds no tensor to change")
    return tensor


def user_hook(point: HookPoint, fn: HookFn, batch: int | None = None) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """``fn`` (TransformerLens style) as a change of the module's tensor (in place, or a replacement of a
    tensor the ``batch`` shares). Derived hook points (a norm's ``hook_scale`` / ``hook_normalized``) are computed
    for ``fn`` to read; changing them is refused (they are no tensor of the model)."""
    if point.derived:
        return _read_only(point, fn, batch)

    def change(tensor: torch.Tensor) -> torch.Tensor | None:
        x = layout(tensor, point, batch)
        result = fn(x, point)
        if tensor.requires_grad and point.io == "output":  # a graph is kept: autograd may have saved it (a softmax's
            own = tensor.clone()  # output); the copy replaces the module's output for every reader
            return write_back(own, point, x if result is None else result, batch) or own
        return write_back(tensor, point, x if result is None else result, batch)

    return change


def _read_only(point: HookPoint, fn: HookFn, batch: int | None) -> Callable[[torch.Tensor], None]:
    from hookpoints.cache import hook_tensor

    def read(tensor: torch.Tensor) -> None:
        x = hook_tensor(tensor, point, batch or tensor.shape[0])
        before = x.clone()
        result = fn(x, point)
        if result is not None and not isinstance(result, torch.Tensor):
            raise UserError(f"hook function for {point.name} returned {type(result).__name__}; return None")
        changed = [t for t in (x, result) if t is not None and not _same(t, before)]
        if changed:
            io = "" if point.io == "output" else ":input"
            raise UserError(
                f"hook {point.name} is computed from {point.module}'s {point.io} and can be read but not changed "
                f"by a hook function; change {point.module}{io} (the norm's input) or {point.module} (its output)"
            )

    return read


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.isclose(a, b.to(a.dtype), rtol=0, atol=0, equal_nan=True).all())


def edit_hook(edit: NeuronEdit) -> Callable[[torch.Tensor], None]:
    """A :class:`NeuronEdit` as an in-place change of the module's tensor."""
    return lambda tensor: apply_edit(tensor, edit)


def resolve_hooks(model, fwd_hooks) -> list[tuple[HookPoint, HookFn]]:
    """``[(name, glob or predicate, fn)]`` -> ``[(HookPoint, fn)]``; unknown names are a UserError."""
    if not isinstance(fwd_hooks, (list, tuple)):
        raise UserError(f"fwd_hooks must be a list of (hook name or glob, function) pairs, not {fwd_hooks!r}")
    resolved = []
    for item in fwd_hooks:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and callable(item[1])):
            raise UserError(f"each of fwd_hooks must be a (hook name or glob, function) pair, not {item!r}")
        names, fn = item
        if callable(names):
            points = [p for p in model.hook_points if p.unavailable is None and names(p.name)]
            if not points:  # as run_with_cache's names filter: not a forward pass left silently unhooked
                raise UserError(
                    "the names filter of a hook function picks no hook point; list them with model.hook_points"
                )
        elif isinstance(names, str):
            points = model.select([names])
        else:
            raise UserError(f"a hook name must be a string, a glob or a function of the name, not {names!r}")
        resolved += [(point, fn) for point in points]
    return resolved


# -- ready-made hook functions --------------------------------------------------------------------------


def _neuron_view(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    """``x`` as ``[lead..., width]`` (neurons flat, numbered as in the store). An attention map ``[batch, head,
    query, key]`` becomes the store's rows ``[batch, query, head * keys]`` (its key axis padded with 0 to
    ``hook.keys``), so neuron ``n`` is head ``n // keys``, key ``n % keys``."""
    if hook.keys is not None:
        padded = torch.nn.functional.pad(x, (0, hook.keys - x.shape[-1]))  # [batch, head, query, keys]
        return padded.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
    lead = 1 if hook.time_axis is None else 2
    return x.reshape(*x.shape[:lead], -1)


def _from_neuron_view(flat: torch.Tensor, x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    """The inverse of :func:`_neuron_view`: ``flat`` back in ``x``'s shape."""
    if hook.keys is not None:
        batch, heads, queries, keys = x.shape
        return flat.reshape(batch, queries, heads, hook.keys).transpose(1, 2)[..., :keys]
    return flat.reshape(x.shape)


def neuron_indices(neurons) -> list[int] | None:
    """``neurons`` (an int, a sequence, a numpy array or tensor of ints; None: all) as a list of Python ints.

    numpy and torch integers were refused as "out of range" (``topk(...).indices``); a boolean mask was read as
    indices 0 and 1."""
    if neurons is None:
        return None
    if hasattr(neurons, "tolist"):  # numpy arrays and tensors, and their scalars
        neurons = neurons.tolist()
    chosen = list(neurons) if isinstance(neurons, Iterable) and not isinstance(neurons, str | bytes) else [neurons]
    for n in chosen:
        if isinstance(n, bool) or not hasattr(n, "__index__"):
            raise UserError(
                f"neuron indices must be whole numbers, not {n!r}"
                + (" (for a boolean mask, pass mask.nonzero() indices)" if isinstance(n, bool) else "")
            )
    return [int(n) for n in chosen]


def _chosen(neurons: list[int] | None, hook: HookPoint) -> list[int] | slice:
    """``neurons`` (from :func:`neuron_indices`) into the hook's flat vector (all of them for None); out of range is a
    UserError."""
    if neurons is None:
        return slice(None)
    width = hook.width or 0
    bad = [n for n in neurons if not 0 <= n < width]
    if bad:
        raise UserError(f"neuron {bad[0]!r} is out of range for hook {hook.name} (width {width}: 0..{width - 1})")
    return neurons


def _check_cache(cache, what: str) -> None:
    if not isinstance(cache, Mapping):
        raise UserError(f"{what} needs a cache from run_with_cache, not {type(cache).__name__}")


def ablate(neurons: Sequence[int] | None = None, value: float = 0.0) -> HookFn:
    """Set ``neurons`` (flat indices, as in the store; default: all) to ``value`` at every position.

    >>> model.run_with_hooks(["Hi"], fwd_hooks=[("blocks.0.mlp.hook_post", ablate([3, 7]))])  # doctest: +SKIP
    """
    neurons = neuron_indices(neurons)

    def fn(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        flat = _neuron_view(x, hook).clone()
        flat[..., _chosen(neurons, hook)] = value
        return _from_neuron_view(flat, x, hook)

    return fn


def mean_ablate(cache, neurons: Sequence[int] | None = None) -> HookFn:
    """Replace ``neurons`` (default: all) by their mean over ``cache``'s valid positions (TransformerLens' mean
    ablation; the cache is usually from other inputs).

    >>> _, reference = model.run_with_cache(texts, names="blocks.0.mlp.hook_post")  # doctest: +SKIP
    >>> model.run_with_hooks(["Hi"], fwd_hooks=[("blocks.0.mlp.hook_post", mean_ablate(reference))])  # doctest: +SKIP
    """
    _check_cache(cache, "mean_ablate")
    neurons = neuron_indices(neurons)

    def fn(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if hook.name not in cache:
            raise UserError(f"cannot mean-ablate {hook.name}: the cache does not hold it (cache it with names=...)")
        mean = cache.mean(hook.name).reshape(-1).to(x.device, x.dtype)  # [width]
        flat = _neuron_view(x, hook).clone()
        chosen = _chosen(neurons, hook)
        flat[..., chosen] = mean[chosen]
        return _from_neuron_view(flat, x, hook)

    return fn


def patch(cache) -> HookFn:
    """Replace the tensor by the same hook's tensor in ``cache`` (activation patching; same shapes needed).

    >>> _, clean = model.run_with_cache(["The cat"], names="blocks.1.hook_resid_post")  # doctest: +SKIP
    >>> model.run_with_hooks(["The dog"], fwd_hooks=[("blocks.1.hook_resid_post", patch(clean))])  # doctest: +SKIP
    """
    _check_cache(cache, "patch")

    def fn(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if hook.name not in cache:
            raise UserError(f"cannot patch {hook.name}: the cache does not hold it (cache it with names=...)")
        source = cache[hook.name]
        if source.shape != x.shape and getattr(cache, "pooling", None):
            raise UserError(
                f"cannot patch {hook.name}: the cache is pooled ({cache.pooling}), one vector per example; patch "
                "from a cache of run_with_cache without pooling"
            )
        if source.shape != x.shape:
            raise UserError(
                f"cannot patch {hook.name}: the cache holds shape {list(source.shape)}, this run {list(x.shape)} "
                "(patch inputs of the same batch size and length)"
            )
        return source.to(x.device, x.dtype)

    fn.reads_positions = True  # the cache's positions: generate refuses it on a left-padded batch
    return fn


def steer(vector, scale: float = 1.0) -> HookFn:
    """Add ``scale * vector`` (``[d]``, or the hook's ``[head, d_head]``) at every position.

    >>> model.run_with_hooks(["Hi"], fwd_hooks=[("blocks.1.hook_resid_post", steer(direction, 4.0))])  # doctest: +SKIP
    """
    try:
        vector = torch.as_tensor(vector)
    except (TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"steering vector must be numbers ([d] or [head, d_head]), not {vector!r:.60}") from error
    if not (bool(torch.isfinite(vector).all()) and math.isfinite(scale)):  # made every later activation NaN
        raise UserError("steering vector and scale must be finite numbers (no NaN or inf)")

    def fn(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if vector.numel() != (hook.width or 0):
            raise UserError(f"steering vector has {vector.numel()} entries, hook {hook.name} has {hook.width} neurons")
        flat = _neuron_view(x, hook)
        return _from_neuron_view(flat + scale * vector.reshape(-1).to(x.device, x.dtype), x, hook)

    return fn
