"""Run-time checks that the teacher-forced pass records the steps ``generate`` took, for every family.

Recording a generating task decodes with ``generate``, then records the decoder in one teacher-forced pass over
``prompt + generated[:-1]`` (hookpoints.generation). Had the stored sequence lost tokens (Whisper's
``generate`` returns its output without the decoder prompt and trailing EOS), every decoder activation would be
recorded one or more positions off, silently. Two checks make that impossible to miss:

- the sequence must start with the prompt ``generate`` was given (:func:`check_prompt`);
- the LM head's logits in the teacher-forced pass must give back, at every step an example took, the logits
  ``generate`` computed at that step (:class:`LogitsFingerprint` keeps each step's top ``k`` logits and their
  token ids; :func:`check_alignment` compares). A shifted pass reads different tokens at each position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Name under which the teacher-forced pass saves the fingerprinted logits (never a hook point's name).
CHECK = "__alignment_check__"
TOP = 4  # logits kept per step


@dataclass
class Fingerprint:
    values: torch.Tensor  # [batch, steps, TOP] float32: generate's largest logits at each step
    indices: torch.Tensor  # [batch, steps, TOP] their token ids


class LogitsFingerprint:
    """Held around ``generate``: a forward hook on the LM head keeps each call's top logits at the last position.

    Example::

        with LogitsFingerprint(model.get_output_embeddings()) as fingerprint:
            model.generate(...)
        fingerprint.result().values  # [batch, steps, 4]
    """

    def __init__(self, head: nn.Module):
        self.head = head
        self.values: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.handle = None

    def __enter__(self) -> LogitsFingerprint:
        self.handle = self.head.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _keep(self, module, args, output) -> None:
        top = output[:, -1, :].float().topk(TOP, dim=-1)  # output: [batch, pos, vocab]
        self.values.append(top.values)
        self.indices.append(top.indices)

    def result(self) -> Fingerprint:
        return Fingerprint(torch.stack(self.values, 1), torch.stack(self.indices, 1))


def check_prompt(generation, prompt: torch.Tensor) -> None:
    """The generated sequences must start with ``prompt`` (``[batch, prompt]``); raises RuntimeError if not."""
    head = generation.sequences[:, : prompt.shape[1]]
    if head.shape != prompt.shape or not torch.equal(head.cpu(), prompt.cpu()):
        raise RuntimeError(
            "generate() did not start from the decoder prompt it was given (its output begins "
            f"{head[0].tolist()}, the prompt is {prompt[0].tolist()}): the recorded decoder steps would be misaligned"
        )


def check_steps(generation) -> None:
    """generate must have called the LM head once per step it took; raises RuntimeError if not (an extra call,
    such as Whisper's language detection before decoding, would be taken for step 0)."""
    calls = generation.fingerprint.values.shape[1]
    if calls != generation.steps:
        raise RuntimeError(
            f"generate() ran the LM head {calls} times for {generation.steps} decoder steps (a pass besides "
            "decoding, e.g. language detection): the recorded decoder steps would be misaligned"
        )


def check_alignment(generation, logits: torch.Tensor) -> None:
    """``logits`` (``[batch, steps, TOP]``: the teacher-forced pass's logits at the fingerprint's token ids)
    must equal generate's at every step each example took; raises RuntimeError naming the first step that differs.
    """
    fingerprint = generation.fingerprint
    want = fingerprint.values.to(logits.device)
    if logits.shape != want.shape:
        raise RuntimeError(
            f"the teacher-forced pass has {logits.shape[1]} decoder steps, generate() took {want.shape[1]}: "
            "the recorded decoder steps would be misaligned"
        )
    got = logits.float()
    low_precision = logits.dtype in (torch.float16, torch.bfloat16)
    scale = want.abs().nan_to_num(nan=0.0, posinf=0.0).amax(dim=(1, 2), keepdim=True)  # [batch, 1, 1]
    tolerance = (3e-2 if low_precision else 2e-3) * (scale + 1)
    # NaN compares false with everything: a NaN where generate saw a number (or the reverse) is a difference
    close = ((got - want).abs() <= tolerance) | (got == want) | (got.isnan() & want.isnan())
    wrong = (~close).any(-1) & generation.step_mask.to(logits.device)  # [batch, steps]
    if bool(wrong.any()):
        example, step = (int(i) for i in wrong.nonzero()[0])
        raise RuntimeError(
            f"the teacher-forced pass does not reproduce generate()'s logits at step {step} of example {example} "
            f"(largest difference {float((got - want).abs()[example, step].max()):.3g}): the decoder activations "
            "would be recorded at the wrong positions"
        )
