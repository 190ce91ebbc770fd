"""Pooling a hook's activations over positions, per example, with padding excluded."""

from __future__ import annotations

import torch

from hookpoints.derived import derive_norm, map_rows
from hookpoints.points import HookPoint
from hookpoints.probe import first_tensor
from hookpoints.settings import POOLINGS


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
    else:
        tensor = tensor.movedim(point.time_axis, 1).flatten(2)
    if point.part:
        index, count = point.part
        width = tensor.shape[-1] // count
        tensor = tensor[..., index * width : (index + 1) * width]
    return tensor


def pool(
    value, point: HookPoint, mask: torch.Tensor | None, method: str, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Pool one hook's activations over the valid positions of each example, in float32.

    Returns ``[batch, width]``, or for ``none`` the ``[valid positions, width]`` rows in the row-major order
    of ``mask.nonzero()``.
    """
    x = positions_first(value, point, key_mask).float()  # [batch, pos, width]
    if point.time_axis is None or mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return pool_positions(x, mask, method)


def pool_positions(x: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool ``x`` (``[batch, pos, width]``) over the positions where ``mask`` (``[batch, pos]``) is true."""
    valid = mask.to(x.device, torch.bool)  # [batch, pos]
    if x.shape[0] == 1:  # broadcast over the batch (position embeddings)
        x = x.expand(valid.shape[0], -1, -1)
    if method == "none":
        return x[valid]  # [valid positions, width]
    if method == "mean":
        counts = valid.sum(1, keepdim=True).clamp(min=1)  # [batch, 1]
        # A batched matmul with the 0/1 mask reads x once and writes only [batch, width]...
        total = torch.bmm(valid[:, None, :].to(x.dtype), x)[:, 0]  # [batch, width]
        if not torch.isfinite(total).all():
            # ...but 0 * inf = nan: if padding holds non-finite values, mask them out instead.
            total = torch.where(valid[..., None], x, 0.0).sum(1)
        return total / counts
    if method == "max":
        return torch.where(valid[..., None], x, float("-inf")).amax(1)
    if method == "last":
        last = valid.shape[1] - 1 - valid.flip(1).int().argmax(1)  # [batch]
        return x[torch.arange(x.shape[0], device=x.device), last]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {method!r}")
