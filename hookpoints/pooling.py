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
    value,
    point: HookPoint,
    mask: torch.Tensor | None,
    method: str,
    key_mask: torch.Tensor | None = None,
    all_valid: bool = False,
) -> torch.Tensor:
    """Pool one hook's activations over the valid positions of each example, in float32.

    Returns ``[batch, width]``, or for ``none`` the ``[valid positions, width]`` rows in the row-major order
    of ``mask.nonzero()``. It runs where the tensor lives (on the GPU for a model there), and half-precision
    activations (bf16, fp16) are summed in float32, so a mean over many positions loses nothing more.
    ``all_valid``: the caller knows every position of ``mask`` is valid (see :func:`unpadded_spaces`).
    """
    x = positions_first(value, point, key_mask)  # [batch, pos, width], the model's dtype
    if point.time_axis is None or mask is None or all_valid and x.shape[0] == mask.shape[0]:
        return pool_all(x, method)
    return pool_positions(x, mask, method)


def pool_all(x: torch.Tensor, method: str) -> torch.Tensor:
    """Pool ``x`` (``[batch, pos, width]``) over every position, in float32: one pass, no mask."""
    if method == "none":
        return x.reshape(-1, x.shape[-1]).float()  # [batch * pos, width], row-major as mask.nonzero()
    if method == "mean":
        return x.sum(1, dtype=torch.float32) / x.shape[1]
    if method == "max":
        return x.amax(1).float()
    if method == "last":
        return x[:, -1].float()
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {method!r}")


def unpadded_spaces(masks: dict[str, torch.Tensor], device: torch.device) -> frozenset[str]:
    """The spaces whose every position is valid in this batch, on a GPU, where pooling them without a mask
    reads each tensor once instead of three times; on the CPU none (its masked matmul reads once already)."""
    if device.type in ("cpu", "meta"):
        return frozenset()
    return frozenset(space for space, mask in masks.items() if bool(mask.all()))


def pool_positions(x: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool ``x`` (``[batch, pos, width]``) over the positions where ``mask`` (``[batch, pos]``) is true; the
    result is float32 whatever ``x``'s precision (nothing here waits for a GPU, but ``none``'s row count)."""
    valid = mask.to(x.device, torch.bool)  # [batch, pos]
    if x.shape[0] == 1:  # broadcast over the batch (position embeddings)
        x = x.expand(valid.shape[0], -1, -1)
    if method == "none":
        return x[valid].float()  # [valid positions, width]
    if method == "mean":
        counts = valid.sum(1, keepdim=True).clamp(min=1)  # [batch, 1]
        if x.device.type != "cpu":  # no host sync on a GPU
            return masked_sum(x, valid) / counts
        x = x.float()
        # A batched matmul with the 0/1 mask reads x once and writes only [batch, width]...
        total = torch.bmm(valid[:, None, :].to(x.dtype), x)[:, 0]  # [batch, width]
        if not torch.isfinite(total).all():
            # ...but 0 * inf = nan: if padding holds non-finite values, mask them out instead.
            total = torch.where(valid[..., None], x, 0.0).sum(1)
        return total / counts
    if method == "max":
        return torch.where(valid[..., None], x, float("-inf")).amax(1).float()
    if method == "last":
        last = valid.shape[1] - 1 - valid.flip(1).int().argmax(1)  # [batch]
        return x[torch.arange(x.shape[0], device=x.device), last].float()
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {method!r}")


def masked_sum(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[batch, width]`` float32 sums of ``x`` (``[batch, pos, width]``, any precision) over the positions
    where ``valid`` is true, accumulated in float32; nothing waits for the device (the GPU mean's path)."""
    return torch.where(valid[..., None], x, 0).sum(1, dtype=torch.float32)
