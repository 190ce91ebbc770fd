"""Attention internals as hook points: rotary q/k, attention scores and patterns.

HuggingFace attention modules hand their post-rotary queries and keys to an attention function
(``config._attn_implementation``) and never expose the scores. :func:`install` gives every attention module
four identity submodules, as TransformerLens' HookPoints (``hook_rot_q``, ``hook_rot_k``: ``[batch, pos,
head, d_head]``; ``hook_attn_scores``, ``hook_pattern``: ``[batch, head, query_pos, key_pos]``), and points the
model at :func:`attention`, which calls them:

- for a model that ran on ``sdpa`` it passes the rotary q/k through their hooks and runs the ``sdpa``
  implementation's function with its own masks (boolean, or None for plain causal attention): the model's
  output equals the stock model's;
- for a model that ran on ``eager``, outside :func:`eager`, it runs the family's own ``eager_attention_forward``
  (with the mask made additive as below): the stock arithmetic;
- inside :func:`eager` (what hookpoints enters when a trace asks for scores or patterns) it computes
  ``softmax(q k^T * scaling + position_bias + mask)`` itself, as the families' ``eager_attention_forward``
  does (Gemma 2's soft-capping and GPT-OSS's attention sinks included; a boolean mask becomes 0 / the dtype's
  minimum; no mask on a causal module, SDPA's ``is_causal`` case, becomes the causal mask), through the two
  map hooks, and returns the pattern as the attention weights.

Models whose attention modules do not call transformers' attention interface (Falcon, GPT-J: they branch on
the implementation's name and add the mask themselves) are left as they are, without these hook points.

A query the module scaled by ``1 / sqrt(d_head)`` before the call (``scaling=1.0``: Whisper, OPT) reaches
``hook_rot_q`` unscaled (q itself, TransformerLens' meaning) and is scaled again after it.

Masked entries of the scores hold the additive mask (about ``-3.4e38``, TransformerLens: ``-inf``); a
pattern's masked entries are 0. Grouped-query keys are repeated per query head before the scores.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from hookpoints.derived import MAP_HOOKS

NAME = "hookpoints"
HOOKS = ("hook_rot_q", "hook_rot_k", *MAP_HOOKS)
_STATE = threading.local()


class Hook(nn.Module):
    """An identity module: a named place in the forward pass (TransformerLens' HookPoint)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def install(model: nn.Module) -> list[str]:
    """Route ``model``'s attention through :func:`attention` and give its attention modules the hooks.

    Only models on the ``sdpa`` or ``eager`` implementation are changed (flash / flex attention stay as
    they are, without these hook points). Returns the module paths that got hooks.
    """
    _register()
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}.values()
    implementations = {getattr(c, "_attn_implementation", None) for c in configs}
    if not implementations <= {"sdpa", "eager", NAME, None}:
        return []
    attention_modules = [m for m in model.modules() if _is_attention(m) and getattr(m, "config", None) is not None]
    if not all(_dispatches(m) for m in attention_modules):
        return []  # e.g. Falcon: it branches on the implementation's name and would misread hookpoints' masks
    hooked = []
    for path, module in list(model.named_modules()):
        config = getattr(module, "config", None)
        if _is_attention(module) and config is not None and not hasattr(module, "hook_pattern"):
            for hook in HOOKS:
                module.add_module(hook, Hook())
            module.hookpoints_native = getattr(config, "_attn_implementation", None)  # what it ran before
            hooked.append(path)
    if hooked:
        for config in configs:
            if getattr(config, "_attn_implementation", None) is not None:
                config._attn_implementation = NAME
    return hooked


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith(("Attention", "SelfAttention")) and any(
        isinstance(child, nn.Linear) or type(child).__name__ == "Conv1D" for child in module.children()
    )


def _dispatches(module: nn.Module) -> bool:
    """Whether an attention module computes attention through transformers' attention interface (the function
    ``config._attn_implementation`` names), so that it runs hookpoints' function and reads its masks."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def _family_eager(module: nn.Module):
    """The module's family's own ``eager_attention_forward`` (its modeling file's), or None."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


@contextlib.contextmanager
def eager(on: bool = True) -> Iterator[None]:
    """Within: attention computes scores and patterns itself (through their hooks); else SDPA."""
    before = getattr(_STATE, "eager", False)
    _STATE.eager = on or before
    try:
        yield
    finally:
        _STATE.eager = before


@contextlib.contextmanager
def changing_keys(on: bool = True) -> Iterator[None]:
    """Within: ``hook_rot_k`` gets a copy of the keys (see :func:`_own_keys`); for edits made through nnsight,
    which :func:`_own_keys` cannot see (torch hooks on the hook module it sees itself)."""
    before = getattr(_STATE, "copy_keys", False)
    _STATE.copy_keys = on or before
    try:
        yield
    finally:
        _STATE.copy_keys = before


def changes_keys(modules: Iterable[str]) -> bool:
    """Whether any of these module paths is a ``hook_rot_k``."""
    return any(module.rsplit(".", 1)[-1] == "hook_rot_k" for module in modules)


def _own_keys(key: torch.Tensor, hook: nn.Module) -> torch.Tensor:
    """The keys ``hook_rot_k`` gets: a copy while something may change them (a torch hook on it, or an nnsight
    edit within :func:`changing_keys`). With a KV cache they are the cache's own tensor (HF updates the cache
    before attention): a change in place would land in the cache and be made again at the next step, so an
    added edit would add up (TransformerLens' cache holds the keys before this hook)."""
    if hook._forward_hooks or hook._forward_pre_hooks or getattr(_STATE, "copy_keys", False):
        return key.clone()
    return key


def _prescaled(module: nn.Module, scaling) -> float | None:
    """The factor ``module`` multiplied its query by before calling the attention function with ``scaling=1.0``
    (Whisper, Qwen2-Audio's encoder, OPT, Voxtral: ``q_proj(x) * self.scaling``), or None."""
    factor = getattr(module, "scaling", None)
    if isinstance(scaling, float) and scaling == 1.0 and isinstance(factor, float) and factor not in (0.0, 1.0):
        return factor
    return None


def needs_eager(modules: Iterable[str]) -> bool:
    """Whether any of these module paths is a score or pattern hook."""
    return any(module.rsplit(".", 1)[-1] in MAP_HOOKS for module in modules)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function hookpoints installs: ``[batch, head, pos, d_head]`` q/k/v in, as HF's own."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not hasattr(module, "hook_pattern"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    prescaled = _prescaled(module, scaling)
    if prescaled is None:
        query = module.hook_rot_q(query.transpose(1, 2)).transpose(1, 2)  # hooked as [batch, pos, head, d_head]
    else:  # the hook gets q itself (TransformerLens' hook_rot_q), the attention the query as the module scaled it
        query = (module.hook_rot_q(query.transpose(1, 2) / prescaled) * prescaled).transpose(1, 2)
    key = module.hook_rot_k(_own_keys(key, module.hook_rot_k).transpose(1, 2)).transpose(1, 2)
    native_sdpa = getattr(module, "hookpoints_native", None) == "sdpa"
    if native_sdpa and not getattr(_STATE, "eager", False):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    mask = attention_mask
    if mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True):  # SDPA's is_causal case
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()[None, None]
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:  # True = attend (SDPA-format masks, SeamlessM4T's Conformer chunk masks)
            mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
    own = _family_eager(module)
    if not getattr(_STATE, "eager", False) and own is not None:  # a model that ran eager, no map asked for:
        return own(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)  # its arithmetic
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # [batch, head, key_pos, d_head]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [batch, head, query_pos, key_pos]
    if kwargs.get("softcap") is not None:  # Gemma 2: softcap * tanh(scores / softcap), before the mask
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    if kwargs.get("position_bias") is not None:
        scores = scores + kwargs["position_bias"]
    if mask is not None:
        scores = scores + mask
    scores = module.hook_attn_scores(scores)
    sinks = kwargs.get("s_aux")  # GPT-OSS: one more logit per head, in the softmax but attending to nothing
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1).to(scores.dtype)
        pattern = nn.functional.softmax(torch.cat([scores, sink], -1), dim=-1, dtype=torch.float32)[..., :-1]
        pattern = pattern.to(query.dtype)  # rows sum to less than 1: the rest went to the sink
    else:
        pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = module.hook_pattern(pattern)
    weights = nn.functional.dropout(pattern, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [batch, query_pos, head, d_head]
    return output, pattern


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # boolean or None (causal): SDPA's fast paths
