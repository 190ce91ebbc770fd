"""Hook points computed from a module's tensor: TransformerLens' norm internals and attention maps.

TransformerLens' ``ln*.hook_normalized`` is the normalised value *before* the norm's gain and bias, and
``ln*.hook_scale`` the divisor (``[batch, pos, 1]``). HuggingFace norms never expose either, so both are
computed from the norm's input ``x`` with the arithmetic TransformerLens documents::

    LayerNorm: x = x - mean(x);  scale = sqrt(mean(x^2) + eps);  normalized = x / scale
    RMSNorm:                     scale = sqrt(mean(x^2) + eps);  normalized = x / scale

Attention maps (``hook_pattern``, ``hook_attn_scores``: ``[batch, head, query_pos, key_pos]``) are laid out
for the store as one row per query position: ``[head, key_pos]`` with the key axis padded to the key space's
longest possible length (``HookPoint.keys``), entries past the example's own keys set to 0.
"""

from __future__ import annotations

import torch

from hookpoints.errors import UserError

#: derived kinds: (centre first, return the scale)
NORM_KINDS = {
    "ln_normalized": (True, False),
    "ln_scale": (True, True),
    "rms_normalized": (False, False),
    "rms_scale": (False, True),
}
MAP_HOOKS = ("hook_pattern", "hook_attn_scores")


def norm_kind(module: torch.nn.Module, what: str) -> tuple[str, float] | None:
    """(derived kind, eps) for ``what`` ("normalized" or "scale") of a LayerNorm or RMSNorm module, else None."""
    if isinstance(module, torch.nn.LayerNorm):
        return f"ln_{what}", float(module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is not None and hasattr(module, "weight") and not hasattr(module, "bias"):
        return f"rms_{what}", float(eps)
    return None


def derive_norm(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The normalised value (``[..., d]``) or scale (``[..., 1]``) of the norm input ``x``, in float32.

    The normalised value is ``layer_norm`` / ``rms_norm`` without gain and bias (one operation: a recording
    computes it for every hook_normalized of every batch), the scale the arithmetic above.
    """
    centre, scale_only = NORM_KINDS[kind]
    x = x if x.dtype == torch.float32 else x.float()
    if not scale_only:
        norm = torch.nn.functional.layer_norm if centre else torch.nn.functional.rms_norm
        return norm(x, x.shape[-1:], eps=eps)
    if centre:
        x = x - x.mean(-1, keepdim=True)
    return x.square().mean(-1, keepdim=True).add_(eps).sqrt_()  # [..., 1]


def is_map(module: str) -> bool:
    """Whether a module path is an attention-map hook (its tensor is ``[batch, head, query_pos, key_pos]``)."""
    return module.rsplit(".", 1)[-1] in MAP_HOOKS


def map_rows(tensor: torch.Tensor, keys: int, key_mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """``[batch, head, query, key]`` -> ``[batch, query, head * keys]``, keys padded with 0 to ``keys``.

    With ``key_mask``, stored key ``j`` is the ``j``-th key an example attends to: its keys are moved before the
    masked ones (a stable sort; a no-op for right padding), so a left-padded batch (a decoder-only LM's
    continuation, hookpoints.generation) stores what the example gives alone, not keys shifted by its padding."""
    batch, heads, queries, present = tensor.shape
    if present > keys:
        raise UserError(
            f"hook {name}: {present} key positions, more than the {keys} this hook point is laid out for "
            "(the model's longest input); shorten the input"
        )
    if key_mask is not None and key_mask.shape[-1] == present:
        kept = key_mask.to(tensor.device, torch.bool)  # [batch, keys]
        order = torch.sort((~kept).int(), dim=-1, stable=True).indices  # its keys first, in order
        kept = kept.gather(-1, order)
        tensor = tensor.gather(-1, order[:, None, None, :].expand(tensor.shape))
        tensor = torch.where(kept[:, None, None, :], tensor, 0.0)
    tensor = torch.nn.functional.pad(tensor, (0, keys - present))  # [batch, head, query, keys]
    return tensor.transpose(1, 2).flatten(2)  # [batch, query, head * keys]
