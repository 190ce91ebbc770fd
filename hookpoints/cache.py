"""Activations of one forward pass, by hook-point name, in TransformerLens' layout (``run_with_cache``).

A hook point's tensor keeps the batch axis and puts positions second: ``[batch, pos, d]``, per-head hook points
(``attn.hook_q/k/v/z``) ``[batch, pos, head, d_head]``, and ``[batch, d]`` for a tensor with no position axis.
The padding masks of every position space come along (``cache.masks``; ``cache.mask_of(name)`` is the one a
hook's positions use), so padded positions can be left out. ``cache.pooled("mean" | "last" | "max")`` drops the
position axis, averaging (or taking the last or the largest) over each example's valid positions only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import torch

from hookpoints.attention import eager as eager_attention
from hookpoints.attention import needs_eager
from hookpoints.cache_attribution import CacheAttribution
from hookpoints.errors import UserError
from hookpoints.inputs import ModelInputs
from hookpoints.points import HookPoint, closest_names
from hookpoints.pooling import pool_positions, positions_first
from hookpoints.probe import first_tensor

CACHE_POOLINGS = ("mean", "last", "max")
_PER_HEAD = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
            "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}  # fmt: skip
_LAYER_TYPES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
#: Which hook points to cache: globs, or a function of the hook name (TransformerLens' ``names_filter``).
Names = str | list[str] | Callable[[str], bool] | None


class ActivationCache(CacheAttribution, Mapping):
    """Hook name -> tensor, with the padding masks of the batch (like TransformerLens' ``ActivationCache``).

    >>> output, cache = model.run_with_cache(["Hello world", "Hi"], names="blocks.*.hook_resid_post")  # doctest: +SKIP
    >>> cache["blocks.0.hook_resid_post"].shape  # [batch, pos, d_model]  # doctest: +SKIP
    torch.Size([2, 3, 64])
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        points: dict[str, HookPoint],
        masks: dict[str, torch.Tensor],
        pooling: str | None = None,
        layers: int | None = None,
        model=None,
    ):
        self._tensors = tensors
        self.points = points  # hook name -> HookPoint (its layout, space and aliases)
        self.masks = masks  # space -> [batch, pos] bool: which positions are real (not padding)
        self.pooling = pooling  # None, or how positions were pooled away
        self._aliases = {alias: point.name for point in points.values() for alias in point.aliases}
        self.batchless = False  # made by without_batch_axis (run_with_cache's remove_batch_dim)
        self.layers = layers  # the model's number of blocks: cache["resid_pre", -1] is the last one's
        self.model = model  # the HookedModel that made it (cfg, W_U, final norm: hookpoints.cache_attribution)

    def __getitem__(self, name: str | tuple) -> torch.Tensor:
        """By hook name or alias, or TransformerLens' shorthand: ``cache["resid_pre", 0]``, ``cache["scale", 2,
        "ln1"]``, ``cache["embed"]`` (:func:`act_name`)."""
        if isinstance(name, tuple):
            name = act_name(*self._layer_from_end(name))
        elif isinstance(name, str) and name not in self._tensors and name not in self._aliases:
            name = act_name(name)  # TransformerLens looks a string up as given, then as get_act_name's shorthand
        return self._tensors[self._name(name)]

    def _layer_from_end(self, key: tuple) -> tuple:
        """TransformerLens' negative layer index (``cache["resid_post", -1]``) counted from the model's blocks."""
        if len(key) < 2 or not isinstance(key[1], int) or key[1] >= 0:
            return key
        if self.layers is None or key[1] < -self.layers:
            raise UserError(f"layer {key[1]} is not a block of this model ({self.layers or 'no'} blocks)")
        return (key[0], self.layers + key[1], *key[2:])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors or name in self._aliases

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}: {list(t.shape)}" for name, t in list(self._tensors.items())[:4])
        more = f", ... ({len(self)} in all)" if len(self) > 4 else ""
        return f"ActivationCache({shown}{more})"

    def _name(self, name: str) -> str:
        if name in self._tensors:
            return name
        if name in self._aliases:
            return self._aliases[name]
        close = closest_names(name, [*self._tensors, *self._aliases], count=3, cutoff=0.8)  # a typo
        held = list(self._tensors)
        listed = ", ".join(held[:8]) + (" ..." if len(held) > 8 else "")
        raise KeyError(
            f"{name!r} is not in this cache ("
            + (f"closest: {', '.join(close)}" if close else f"it holds: {listed}")
            + ")"
        )

    def _need_batch_axis(self, what: str) -> None:
        if self.batchless:
            raise UserError(f"cannot {what} a cache without its batch axis: run_with_cache without remove_batch_dim")

    @property
    def mask(self) -> torch.Tensor | None:
        """``[batch, pos]`` bool: the real (non-padding) positions of the model's input."""
        return self.masks.get("input")

    def mask_of(self, name: str) -> torch.Tensor | None:
        """``[batch, pos]`` bool mask of hook ``name``'s positions, or None when it has no position axis (or its
        space's padding is unknown: raw tensor inputs give only the ``input`` space's mask)."""
        point = self.points[self._name(name)]
        if point.time_axis is None or self.pooling:
            return None
        return self.masks.get(point.space)

    def without_batch_axis(self) -> ActivationCache:
        """One example's cache without its batch axis: ``[pos, d_model]`` (``remove_batch_dim=True``)."""
        if self.batchless or any(t.shape[0] != 1 for t in self._tensors.values()):
            raise UserError("only a cache of one example loses its batch axis")
        tensors = {name: t[0] for name, t in self._tensors.items()}
        masks = {space: m[0] for space, m in self.masks.items()}
        cache = ActivationCache(tensors, self.points, masks, self.pooling, self.layers, self.model)
        cache.batchless = True
        return cache

    def to(self, device: torch.device | str) -> ActivationCache:
        """The cache with every tensor and mask moved to ``device``."""
        tensors = {name: t.to(device) for name, t in self._tensors.items()}
        masks = {space: m.to(device) for space, m in self.masks.items()}
        moved = ActivationCache(tensors, self.points, masks, self.pooling, self.layers, self.model)
        moved.batchless = self.batchless
        return moved

    def stack_activation(self, name: str, layer: int | None = -1, sublayer_type: str | None = None) -> torch.Tensor:
        """Hook ``name`` of every block before ``layer`` (-1 or None: every block) stacked on a new first axis:
        ``[layers, batch, pos, d]``, as TransformerLens' ``stack_activation`` (``name``: its shorthand,
        ``"resid_post"``, ``"q"``, or ``"scale"`` with ``sublayer_type="ln1"``).

        >>> cache.stack_activation("resid_post").shape  # [layers, batch, pos, d_model]  # doctest: +SKIP
        """
        stop = self._blocks_before(layer)
        return torch.stack([self[act_name(name, block, sublayer_type)] for block in range(stop)])

    def _blocks_before(self, layer: int | None) -> int:
        """``layer`` as a block count (-1 or None: every block), checked."""
        if not self.layers:
            raise UserError("this model has no blocks (blocks.{l}.*) to stack: index the cache by hook name")
        if layer is None or layer == -1:
            return self.layers
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer <= self.layers:
            raise UserError(f"layer must be -1 or a block count from 0 to {self.layers}, not {layer!r}")
        return layer

    def pooled(self, method: str) -> ActivationCache:
        """Each tensor pooled over its example's valid positions: ``[batch, pos, *d] -> [batch, *d]`` (float32).

        >>> cache.pooled("mean")["blocks.0.hook_resid_post"].shape  # [batch, d_model]  # doctest: +SKIP
        torch.Size([2, 64])
        """
        if method not in CACHE_POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(CACHE_POOLINGS)} or None, not {method!r}")
        self._need_batch_axis("pool")
        if self.pooling:
            raise UserError(f"this cache is already pooled ({self.pooling})")
        pooled = {}
        for name, tensor in self._tensors.items():
            point = self.points[name]
            if point.keys is not None:
                raise UserError(
                    f"hook {name} is an attention map [batch, head, query_pos, key_pos]: ask for it without pooling"
                )
            if point.time_axis is None:
                pooled[name] = tensor.float()  # one vector per example already
                continue
            mask = self.masks.get(point.space)
            if mask is None:
                raise UserError(
                    f"cannot pool hook {name}: the padding mask of its {point.space!r} positions is unknown for "
                    "raw tensor inputs; pass strings, waveforms or audio paths, or pool yourself"
                )
            flat = tensor.flatten(2).float()  # [batch, pos, width]
            pooled[name] = pool_positions(flat, mask, method).reshape(tensor.shape[0], *tensor.shape[2:])
        return ActivationCache(pooled, self.points, self.masks, method, self.layers, self.model)

    def mean(self, name: str) -> torch.Tensor:
        """Hook ``name``'s mean over every valid position of every example: ``[*d]`` (for mean ablation).

        A cache pooled by mean gives the same (each example's mean weighed by its valid positions); one pooled
        by last or max cannot and is refused.
        """
        self._need_batch_axis("average")
        tensor = self[name].float()
        point = self.points[self._name(name)]
        if point.keys is not None:
            raise UserError(f"hook {name} is an attention map [batch, head, query_pos, key_pos]: average it yourself")
        if point.time_axis is None:
            return tensor.mean(0)
        mask = self.masks.get(point.space)
        if self.pooling:
            if self.pooling != "mean" or mask is None:
                raise UserError(
                    f"cannot average {name} over positions: this cache is pooled by {self.pooling}; pass a cache "
                    "from run_with_cache without pooling (or pooling='mean')"
                )
            counts = mask.sum(1).to(tensor.device, tensor.dtype)  # [batch] valid positions per example
            return torch.tensordot(counts, tensor, dims=1) / counts.sum()
        if mask is None:  # raw tensor inputs: padding there would be averaged in, without a word (as pooled says)
            raise UserError(
                f"cannot average hook {name} over positions: the padding mask of its {point.space!r} positions is "
                "unknown for raw tensor inputs; pass strings, waveforms or audio paths, or average it yourself"
            )
        return tensor[mask.to(tensor.device)].mean(0)


def act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """A hook name from TransformerLens' shorthand, as its ``utils.get_act_name`` makes it.

    >>> act_name("resid_pre", 0), act_name("k6"), act_name("scale", 4, "ln1"), act_name("normalized")
    ('blocks.0.hook_resid_pre', 'blocks.6.attn.hook_k', 'blocks.4.ln1.hook_scale', 'ln_final.hook_normalized')
    """
    if not isinstance(name, str):
        raise UserError(f"a hook name is a string (or TransformerLens' shorthand, 'resid_pre', 0), not {name!r}")
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)
    name = _ALIASES.get(name, name)
    if name in _PER_HEAD:
        layer_type = "attn"
    elif name in ("pre", "post", "mid", "pre_linear"):
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPES:
        layer_type = _LAYER_TYPES[layer_type]
    full = (f"blocks.{layer}." if layer is not None else "") + (f"{layer_type}." if layer_type else "") + f"hook_{name}"
    return f"ln_final.{full}" if name in ("scale", "normalized") and layer is None else full


def hook_tensor(value, point: HookPoint, batch: int) -> torch.Tensor:
    """A hook point's tensor in cache layout: ``[batch, pos, *shape]`` (``[batch, *shape]`` without positions).

    Attention maps keep TransformerLens' ``[batch, head, query_pos, key_pos]``.
    """
    if point.keys is not None:
        return first_tensor(value)
    x = positions_first(value, point)  # [batch or 1, pos, width]
    if x.shape[0] == 1 and batch > 1:  # broadcast over the batch (position embeddings)
        x = x.expand(batch, -1, -1)
    if point.time_axis is None:
        x = x[:, 0]  # [batch, width]
    return x.reshape(*x.shape[:-1], *point.shape)


def run_with_cache(
    model,
    inputs: ModelInputs,
    points: list[HookPoint],
    pooling: str | None = None,
    scalar: Callable[[object], torch.Tensor] | None = None,
):
    """One forward pass of ``model`` (a HookedModel) on ``inputs``: ``(output, ActivationCache)``.

    With ``scalar`` (``fn(model output) -> scalar tensor``, TransformerLens' ``incl_bwd``): its value is
    backpropagated and each point's gradient cached as ``NAME_grad`` (hookpoints.backward); ``(value, cache)``."""
    if pooling is not None and pooling not in CACHE_POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(CACHE_POOLINGS)} or None, not {pooling!r}")
    saved: dict[str, torch.Tensor] = {}  # filled inside the trace (nnsight keeps only saved names set there)
    batch = inputs.batch_size
    readers = [(point, _reader(point, batch, saved)) for point in points]
    if scalar is not None:  # through torch hooks: backward hooks save each point's gradient, held last
        from hookpoints.backward import grad_saver

        if torch.is_inference_mode_enabled():
            raise UserError("incl_bwd needs autograd: call run_with_cache outside torch.inference_mode()")
        roots: list[torch.Tensor] = []
        save = grad_saver(saved)
        with torch.enable_grad():  # the scalar too: a notebook's torch.set_grad_enabled(False) would leave no graph
            value = scalar(model._forward(inputs, readers, [(point, save) for point in points], roots=roots))
            torch.autograd.grad(value, roots, allow_unused=True)  # runs the backward hooks; fills no .grad
        output = value.detach()
    elif model._hook_entries:  # hooks added (model.add_hook): the cache holds what they made, as in TransformerLens
        output = model._forward(inputs, readers)
    else:
        with (
            torch.no_grad(),  # not inference_mode: the cache holds tensors autograd and in-place changes take
            model.adapter.batch_guard(model.model, inputs),
            eager_attention(needs_eager(p.module for p in points)),
            model.traced.trace(**inputs.kwargs),
        ):
            for point in sorted(points, key=lambda p: p.order):  # nnsight needs requests in execution order
                envoy = model.envoy(point)
                value = envoy.output if point.io == "output" else envoy.input
                saved[point.name] = hook_tensor(value, point, batch).clone().save()
            output = model.traced.output.save()
    idle = [point.name for point in points if point.name not in saved]  # only through torch hooks (nnsight fails)
    if idle:
        raise UserError(
            f"hook point(s) {', '.join(idle[:3])}{' ...' if len(idle) > 3 else ''} did not run in this forward pass "
            "(an audio encoder on text, hook_embed with inputs_embeds): leave them out of names"
        )
    tensors = {point.name: saved[point.name] for point in points}
    named = {point.name: point for point in points}
    if scalar is not None:  # a point the value does not depend on has gradient 0 (TransformerLens: no entry)
        for point in points:
            tensors[f"{point.name}_grad"] = saved.get(f"{point.name}_grad", torch.zeros_like(tensors[point.name]))
            named[f"{point.name}_grad"] = point
    blocks = {p.layer for p in model.hook_points if p.layer is not None and p.name.startswith("blocks.")}
    layers = max(blocks) + 1 if blocks else None
    cache = ActivationCache(tensors, named, dict(inputs.masks), layers=layers)
    cache.model = model  # for its cfg, W_U and final norm (hookpoints.cache_attribution)
    return output, cache.pooled(pooling) if pooling else cache


def _reader(point: HookPoint, batch: int, saved: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], None]:
    """A change (hookpoints.hook_fns.hooked) that changes nothing and keeps the hook's tensor in cache layout.

    Held after the added hooks' torch hooks, it reads what they made, as TransformerLens' cache hook (added after
    them on the HookPoint) does; an nnsight trace reads a module's output before torch's forward hooks run."""

    def read(tensor: torch.Tensor) -> None:
        saved[point.name] = hook_tensor(tensor, point, batch).detach().clone()

    return read


def select_names(model, names: Names) -> list[HookPoint]:
    """The hook points ``names`` picks: globs (default: the listed ones) or a predicate over hook names."""
    if callable(names):
        chosen = [p for p in model.hook_points if p.unavailable is None and names(p.name)]
        if not chosen:
            raise UserError("the names filter picks no recordable hook point; list them with model.hook_points")
        return chosen
    if isinstance(names, str):
        names = [names]
    if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)):
        raise UserError(f"names must be a glob, a list of globs or a function of the hook name, not {names!r}")
    if names is not None and not names:  # not the default selection: an empty list asks for nothing
        raise UserError("names is empty: give a glob, a list of globs or a predicate (None: the listed hook points)")
    return model.select(list(names) if names else None)
