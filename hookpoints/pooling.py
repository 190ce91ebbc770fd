"""Pooling a hook's activations over positions, per example, with padding excluded.

A recording pools hundreds of hook points per batch, so what every hook of a space shares (its padding mask on
the device, the counts, each example's last position, whether the batch has padding at all) is prepared once
per batch (:func:`prepare_masks`), and each hook pays only its own reductions: on a GPU, a mean is one kernel
without padding (or with the same padding in every example) and three with (docs/benchmarks.md, "Per-hook
cost of recording").

>>> spaces = prepare_masks(inputs.masks)  # once per batch  # doctest: +SKIP
>>> pool(output, point, spaces[point.space], "mean")  # [batch, width] float32  # doctest: +SKIP
"""

from __future__ import annotations

import math
from functools import cached_property

import torch

from hookpoints.derived import derive_norm, map_rows
from hookpoints.errors import UserError
from hookpoints.points import HookPoint
from hookpoints.probe import first_tensor
from hookpoints.settings import POOLINGS


class SpaceMask:
    """One space's padding mask, prepared once per batch for all its hook points.

    ``prefix``: when every example's valid positions are the same first ``prefix`` positions (no padding, or
    equal-length examples: 6 s of speech fixed to 300 frames has 299 in each), hooks are pooled over that slice
    without the mask: one read of each tensor, one kernel for a mean. Else None (``check=False``: not looked at,
    nothing waits for the device). ``weights`` (CPU only): ``valid / counts`` as ``[batch, 1, pos]`` float32: a
    mean as one matmul, which on the CPU reads a large tensor faster than a reduction over its middle axis.

    >>> space = SpaceMask(torch.tensor([[True, True, False], [True, False, False]]))
    >>> space.prefix, space.counts.tolist(), space.last.tolist()
    (None, [[2.0], [1.0]], [1, 0])
    >>> SpaceMask(torch.tensor([[True, True, False], [True, True, False]])).prefix
    2
    """

    def __init__(self, mask: torch.Tensor, check: bool = True, host: torch.Tensor | None = None):
        self.valid = mask.to(dtype=torch.bool)  # [batch, pos]
        # read from ``host`` (the mask's CPU copy) where given: else a GPU mask waits for the device here
        self.prefix = _common_prefix(self.valid if host is None else host.to(dtype=torch.bool)) if check else None
        self._moved: dict[torch.device, SpaceMask] = {}

    @property
    def full(self) -> bool:
        """Every position of every example is valid."""
        return self.prefix == self.valid.shape[1]

    # Made on first use (a batch whose hooks are all pooled without the mask needs none of them):

    @cached_property
    def padding(self) -> torch.Tensor:
        return ~self.valid[..., None]  # [batch, pos, 1]

    @cached_property
    def counts(self) -> torch.Tensor:
        return self.valid.sum(1, keepdim=True).clamp(min=1).float()  # [batch, 1]

    @cached_property
    def last(self) -> torch.Tensor:
        return self.valid.shape[1] - 1 - self.valid.flip(1).int().argmax(1)  # [batch]

    @cached_property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.valid.shape[0], device=self.valid.device)  # [batch]

    @cached_property
    def weights(self) -> torch.Tensor | None:
        if self.valid.device.type != "cpu":
            return None
        weights = self.valid.float() / self.counts  # [batch, pos]
        if self.prefix is not None:
            weights = weights[:, : self.prefix].contiguous()  # [batch, prefix]
        return weights[:, None, :]  # [batch, 1, pos or prefix]

    def on(self, device: torch.device) -> SpaceMask:
        """The same mask on ``device`` (a model split over devices), made once per device."""
        if self.valid.device == device:
            return self
        if device not in self._moved:
            moved = SpaceMask(self.valid.to(device), check=False)
            moved.prefix = self.prefix
            self._moved[device] = moved
        return self._moved[device]


def _common_prefix(valid: torch.Tensor) -> int | None:
    """The length L when every row of ``valid`` (``[batch, pos]``) is L trues then falses, L > 0; else None."""
    if valid.is_meta or valid.shape[0] == 0:
        return None
    lengths = valid.sum(1)  # [batch]
    prefixes = torch.arange(valid.shape[1], device=valid.device)[None, :] < lengths[:, None]  # [batch, pos]
    low, high = torch.aminmax(lengths)
    uniform = (valid == prefixes).all() & (low == high) & (low > 0)
    length = int(torch.where(uniform, low, -1))  # the one host sync
    return length if length > 0 else None


def prepare_masks(masks: dict[str, torch.Tensor], host: dict[str, torch.Tensor] | None = None) -> dict[str, SpaceMask]:
    """Each space's mask prepared for pooling (once per batch; a mask on the meta device stays as it is).
    ``host``: the masks' CPU copies (``ModelInputs.host_masks``), read instead of a GPU mask (no host sync)."""
    host = host or {}
    return {space: SpaceMask(mask, host=host.get(space)) for space, mask in masks.items()}


def positions_first(value, point: HookPoint, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The hook's tensor as ``[batch, pos, width]`` (``pos`` = 1 when it has no time axis).

    Derived hook points are computed here (hookpoints.derived): a norm's normalised value or scale from its
    input; an attention map as ``[batch, query_pos, head * keys]``, keys past ``key_mask`` set to 0.
    """
    tensor = first_tensor(value)
    if point.derived:
        tensor = derive_norm(tensor, point.derived, point.eps)
    if point.keys is not None:
        return map_rows(tensor, point.keys, key_mask, point.name)
    if point.time_axis is None:
        tensor = tensor.reshape(tensor.shape[0], 1, -1)
    elif point.time_axis != 1 or tensor.dim() != 3:  # [batch, pos, width] already: no view to make
        tensor = tensor.movedim(point.time_axis, 1).flatten(2)
    if point.part:
        index, count = point.part
        width = tensor.shape[-1] // count
        tensor = tensor[..., index * width : (index + 1) * width]
    check_width(tensor.shape[-1], point)
    return tensor


def check_width(width: int, point: HookPoint) -> None:
    """A UserError unless a tensor gives the ``point.width`` values per position the probe measured: a tensor
    whose length follows the input along an axis that is no position space (a Conformer's left-padded depthwise
    conv input) was measured as one vector of the probe's length, and would be cut wrongly or stored ragged."""
    if point.width is not None and width != point.width:
        raise UserError(
            f"hook {point.name} has {width} values per position here, {point.width} in the probe's forward pass: "
            "its tensor's size follows the input along an axis hookpoints cannot line up with the input's "
            "positions; use another hook point (model.select() lists the usual ones)"
        )


def pool(
    value,
    point: HookPoint,
    mask: SpaceMask | torch.Tensor | None,
    method: str,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool one hook's activations over the valid positions of each example, in float32.

    Returns ``[batch, width]``, or for ``none`` the ``[valid positions, width]`` rows in the row-major order
    of ``mask.nonzero()``. It runs where the tensor lives (on the GPU for a model there), and half-precision
    activations (bf16, fp16) are summed in float32, so a mean over many positions loses nothing more.
    ``mask``: the space's :class:`SpaceMask` (a ``[batch, pos]`` tensor is prepared here, for one-off use,
    without looking for a common prefix: nothing waits for the device).
    """
    x = positions_first(value, point, key_mask)  # [batch, pos, width], the model's dtype
    space = mask if isinstance(mask, SpaceMask) or mask is None else SpaceMask(mask, check=False)
    if method == "mean" and is_scores(point):
        return mean_of_scores(x, space)
    if point.time_axis is None or space is None:
        return pool_all(x, method)
    return pool_prepared(x, space, method)


def is_scores(point: HookPoint) -> bool:
    """Whether ``point`` is an attention map of scores (``hook_attn_scores``: the additive mask at keys not seen)."""
    return point.keys is not None and point.module.endswith("hook_attn_scores")


def scores_for_half(rows: torch.Tensor) -> torch.Tensor:
    """Pooled attention-score rows (float32) ready for float16 storage: the mask's entries (the model dtype's
    minimum, about -3.4e38 for float32 and bf16 models) become float16's minimum (-65,504) instead of -inf, so the
    rows stay finite and usable; any other value is left to the cast (beyond float16's range: inf, flagged)."""
    return rows.masked_fill(rows <= torch.finfo(torch.float32).min / 2, torch.finfo(torch.float16).min)


def mean_of_scores(x: torch.Tensor, space: SpaceMask | None) -> torch.Tensor:
    """Attention scores (``[batch, query_pos, head * keys]``) averaged over the valid query positions that see each
    key, in float32. A causal attention's scores hold the additive mask at the keys a query cannot see (the dtype's
    minimum; TransformerLens: -inf): a plain mean over queries was -inf on a GPU and a finite -1e37 through the
    CPU's matmul, both meaningless. NaN still propagates; a key no query sees gives 0."""
    seen = ~(x <= torch.finfo(x.dtype).min / 2)  # [batch, query_pos, width]; NaN counts as seen
    if space is not None:
        seen = seen & space.on(x.device).valid[..., None]
    total = torch.where(seen, x, 0).sum(1, dtype=torch.float32)  # [batch, width]
    return total / seen.sum(1).clamp(min=1)


def pool_all(x: torch.Tensor, method: str) -> torch.Tensor:
    """Pool ``x`` (``[batch, pos, width]``) over every position, in float32: one pass, no mask, one kernel."""
    if method == "mean":
        return x.mean(1, dtype=torch.float32)
    if method == "max":
        return _float(x.amax(1))
    if method == "last":
        return x[:, -1].to(torch.float32, copy=True)  # a copy: the activation itself is not kept alive
    if method == "none":
        return _float(x.reshape(-1, x.shape[-1]))  # [batch * pos, width], row-major as mask.nonzero()
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {method!r}")


def pool_positions(x: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool ``x`` (``[batch, pos, width]``) over the positions where ``mask`` (``[batch, pos]``) is true; the
    result is float32 whatever ``x``'s precision (nothing here waits for a GPU, but ``none``'s row count)."""
    return pool_prepared(x, SpaceMask(mask.to(x.device), check=False), method)


def pool_prepared(x: torch.Tensor, space: SpaceMask, method: str) -> torch.Tensor:
    """:func:`pool_positions` with the mask prepared once per batch (:class:`SpaceMask`)."""
    space = space.on(x.device)
    if x.shape[0] == 1 and space.valid.shape[0] != 1:  # broadcast over the batch (position embeddings)
        x = x.expand(space.valid.shape[0], -1, -1)
    if space.prefix is not None:  # the same valid positions in every example: the slice, no mask
        if space.prefix != x.shape[1]:
            x = x[:, : space.prefix]  # [batch, prefix, width]
        if method == "mean" and space.weights is not None:  # the CPU: one matmul, no padding in it
            return torch.bmm(space.weights, _float(x))[:, 0]  # [batch, width]
        return pool_all(x, method)
    if method == "mean" and space.weights is not None:  # the CPU
        # A batched matmul with the mask's weights reads x once and writes only [batch, width]...
        mean = torch.bmm(space.weights, _float(x))[:, 0]  # [batch, width]
        if math.isfinite(mean.sum()):  # (a host sync, on the CPU: cheap)
            return mean
        # ...but 0 * inf = nan: if padding holds non-finite values, mask them out instead.
        return _padded_sum(x, space.padding).div_(space.counts)
    if method == "mean":  # a GPU: nothing waits for the device
        return _padded_sum(x, space.padding).div_(space.counts)
    if method == "max":
        return _float(x.masked_fill(space.padding, float("-inf")).amax(1))
    if method == "last":
        return _float(x[space.rows, space.last])
    if method == "none":
        return _float(x[space.valid])  # [valid positions, width]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {method!r}")


def masked_sum(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[batch, width]`` float32 sums of ``x`` (``[batch, pos, width]``, any precision) over the positions
    where ``valid`` (``[batch, pos]``) is true, accumulated in float32; nothing waits for the device (the GPU
    mean's path)."""
    return _padded_sum(x, ~valid[..., None])


def _padded_sum(x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Sums over positions, in float32, of ``x`` with the ``padding`` (``[batch, pos, 1]``) positions zeroed."""
    return x.masked_fill(padding, 0).sum(1, dtype=torch.float32)


def _float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, without a dispatcher call when it is float32 already."""
    return x if x.dtype == torch.float32 else x.float()
