"""Pooling a hook's activations over positions, per example, with padding excluded."""

from __future__ import annotations

import torch

from hookpoints.points import HookPoint
from hookpoints.probe import first_tensor

POOLINGS = ("mean", "last", "max", "none")


def positions_first(value, point: HookPoint) -> torch.Tensor:
    """The hook's tensor as ``[batch, pos, width]`` (``pos`` = 1 when it has no time axis)."""
    tensor = first_tensor(value)
    if point.time_axis is None:
        tensor = tensor.reshape(tensor.shape[0], 1, -1)
    else:
        tensor = tensor.movedim(point.time_axis, 1).flatten(2)
    if point.part:
        index, count = point.part
        width = tensor.shape[-1] // count
        tensor = tensor[..., index * width : (index + 1) * width]
    return tensor


def pool(value, point: HookPoint, mask: torch.Tensor | None, method: str) -> torch.Tensor:
    """Pool one hook's activations over the valid positions of each example, in float32.

    Returns ``[batch, width]``, or for ``none`` the ``[valid positions, width]`` rows in the row-major order
    of ``mask.nonzero()``. It runs where the tensor lives (on the GPU for a model there), and half-precision
    activations (bf16, fp16) are summed in float32, so a mean over many positions loses nothing more.
    """
    x = positions_first(value, point)  # [batch, pos, width], the model's dtype
    if point.time_axis is None or mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return pool_positions(x, mask, method)


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
