"""Transformers' "can this attention mask be skipped?" answered from the batch's CPU masks: no host sync.

Before each SDPA attention, transformers' ``masking_utils`` asks whether a padding mask is all true, to pass no
mask (``is_causal``, the flash kernel) instead of a built one: ``padding_mask.all()``, read on the host. For a
batch on a GPU that read waits until the GPU has run everything queued so far, and the GPU then idles while the
host refills its queue: with hundreds of hook points, each costing the host Python time, that idle was about
half of what recording Seamless added per batch on an H200 (docs/benchmarks.md, "Fifth run").

Inside :class:`MaskSkips` the question is answered without reading the GPU, from the masks' CPU copies
(``ModelInputs.host_masks``):

- a batch with padding in any of its masks: **no**, build the mask. Always right: a built mask of all-true
  positions attends exactly as no mask (only the attention kernel may differ, within float rounding).
- a batch without padding: transformers' own answer for an all-true mask of that shape, and where that answer
  is "skip", the claim "this mask is all true" is checked on the device (``padding_mask.all()``, no sync) and
  read later with the pooled rows (:func:`check_claims`): a wrong claim raises before anything is written.

Only the thread holding a :class:`MaskSkips` gets these answers (a notebook recording in one thread leaves
another thread's forward passes alone). On the CPU the sync is free, so CPU masks get transformers' own
answer (``ANSWER_CPU_MASKS`` turns the host answers on for CPU masks too, for tests).

>>> with MaskSkips.for_batch(inputs) as skips:  # doctest: +SKIP
...     model(**inputs.kwargs)
>>> skips.verdict()  # [1] float32 on the device: 1.0 when every claim held (None: no claim made)
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

from hookpoints.inputs import ModelInputs

#: The pooled rows' key of :meth:`MaskSkips.verdict` (copied to the host with them, checked by :func:`check_claims`).
MASK_CHECK = "__mask_skip_check__"
#: Answer for CPU masks too (tests: the CPU runs the same path a GPU batch does).
ANSWER_CPU_MASKS = False
_QUESTIONS = ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa")

_HELD = threading.local()  # .skips: the MaskSkips this thread holds
_LOCK = threading.Lock()
_ORIGINALS: dict[str, object] = {}  # transformers' functions while replaced
_HOLDERS = 0


def _dispatcher(original):
    def question(padding_mask, *args, **kwargs):
        skips = getattr(_HELD, "skips", None)
        if skips is None or padding_mask is None or (padding_mask.device.type == "cpu" and not ANSWER_CPU_MASKS):
            return original(padding_mask, *args, **kwargs)
        return skips.answer(original, padding_mask, *args, **kwargs)

    return question


def _install() -> None:
    global _HOLDERS
    from transformers import masking_utils

    with _LOCK:
        if _HOLDERS == 0:
            for name in _QUESTIONS:
                original = getattr(masking_utils, name, None)
                if original is not None:
                    _ORIGINALS[name] = original
                    setattr(masking_utils, name, _dispatcher(original))
        _HOLDERS += 1


def _uninstall() -> None:
    global _HOLDERS
    from transformers import masking_utils

    with _LOCK:
        _HOLDERS -= 1
        if _HOLDERS == 0:
            for name, original in _ORIGINALS.items():
                setattr(masking_utils, name, original)
            _ORIGINALS.clear()


class MaskSkips:
    """While held, transformers' mask-skip questions about non-CPU masks are answered without a host sync.

    Only in the thread that holds it: transformers' functions are replaced while any thread holds one, by
    dispatchers that give every other thread transformers' own answer.
    """

    def __init__(self, padded: bool):
        self.padded = padded  # some mask of the batch has padding (on its CPU copy)
        self.claims: list[torch.Tensor] = []  # each: the mask's all() on its device, claimed true
        self._outer: MaskSkips | None = None

    @classmethod
    def for_batch(cls, inputs: ModelInputs) -> contextlib.AbstractContextManager:
        """A :class:`MaskSkips` for ``inputs``, or a context that changes nothing when a mask has no CPU copy."""
        if not inputs.masks or any(space not in inputs.host_masks for space in inputs.masks):
            return contextlib.nullcontext()
        return cls(padded=any(not bool(mask.all()) for mask in inputs.host_masks.values()))

    def __enter__(self) -> MaskSkips:
        _install()
        self._outer = getattr(_HELD, "skips", None)
        _HELD.skips = self
        return self

    def __exit__(self, *exc) -> None:
        _HELD.skips = self._outer
        _uninstall()

    def answer(self, original, padding_mask: torch.Tensor, *args, **kwargs) -> bool:
        """Transformers' ``original`` question about ``padding_mask``, answered without reading it."""
        if self.padded:
            return False  # build the mask: right whatever it holds
        stand_in = torch.ones(padding_mask.shape, dtype=torch.bool)  # on the CPU: nothing waits
        skip = bool(original(stand_in, *args, **kwargs))
        if skip:
            self.claims.append(padding_mask.all())  # [] bool on the mask's device, read with the rows
        return skip

    def verdict(self) -> torch.Tensor | None:
        """``[1]`` float32 on the claims' device: 1.0 when every "all true" claim held; None without claims."""
        if not self.claims:
            return None
        device = self.claims[0].device
        held = torch.stack([claim.to(device, non_blocking=True) for claim in self.claims]).all()
        return held.reshape(1).to(torch.float32)


def check_claims(values: dict) -> dict:
    """``values`` without :data:`MASK_CHECK`; raises if a claim of :class:`MaskSkips` was wrong (the batch's
    attention ignored padding: its rows must not be written)."""
    verdict = values.pop(MASK_CHECK, None)
    if verdict is not None and not bool(np.asarray(verdict).reshape(-1)[0]):
        raise RuntimeError(
            "a padding mask that the batch's CPU masks called all true was not: its attention skipped the mask, "
            "so this batch's rows are wrong and were not written (hookpoints/mask_skips.py; please report it)"
        )
    return values


def settle(skips, values: dict, defer: bool) -> dict:
    """After the forward pass of ``skips`` (a :class:`MaskSkips` or a null context): with ``defer``, its
    verdict joins ``values`` (the pooled rows) under :data:`MASK_CHECK`, to cross to the host with them and be
    read by :func:`check_claims`; without, it is read now (one host sync, after the forward pass)."""
    verdict = skips.verdict() if isinstance(skips, MaskSkips) else None
    if verdict is not None and defer:
        values[MASK_CHECK] = verdict
    elif verdict is not None:
        check_claims({MASK_CHECK: verdict.cpu().numpy()})
    return values
