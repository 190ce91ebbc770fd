"""Greedy generation, and the teacher-forced pass that records the decoder over what was generated.

A decoder step ``k`` reads one position and picks generated token ``k``: step 0 reads the prompt (its last
position picks the first token), step ``k > 0`` reads generated token ``k - 1`` at position ``prompt + k - 1``.
With a causal decoder, one forward pass over ``prompt + generated[:-1]`` computes every step's values at once,
position ``prompt - 1 + k`` holding step ``k`` (the KV cache of ``generate`` only avoids recomputing them).
So the recorder generates, then runs that one pass and pools decoder hooks over the *step positions*
(:attr:`Generation.decoder_mask`): one per generated token, the EOS included. Encoder hooks see the same input
as in ``generate``. ``tests/test_generation.py`` checks this against hooks at every step of ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hookpoints.inputs import KEYS, ModelInputs


@dataclass
class Generation:
    """Greedy output for a batch: the prompt, then generated tokens (padding after an example's EOS)."""

    sequences: torch.Tensor  # [batch, prompt + steps]
    prompt_length: int
    lengths: torch.Tensor  # [batch] generated tokens per example, EOS included
    fingerprint: object = None  # hookpoints.alignment.Fingerprint: generate's top logits per step, if kept

    @property
    def steps(self) -> int:
        return self.sequences.shape[1] - self.prompt_length

    @property
    def step_mask(self) -> torch.Tensor:
        """``[batch, steps]``: which decoder steps each example took."""
        return torch.arange(self.steps, device=self.lengths.device)[None, :] < self.lengths[:, None]

    @property
    def decoder_mask(self) -> torch.Tensor:
        """``[batch, prompt + steps - 1]``: the positions of the teacher-forced pass that are decoder steps."""
        before = torch.zeros(
            (self.sequences.shape[0], self.prompt_length - 1), dtype=torch.bool, device=self.lengths.device
        )
        return torch.cat([before, self.step_mask], dim=1)

    @property
    def key_mask(self) -> torch.Tensor:
        """``[batch, prompt + steps - 1]``: the positions the teacher-forced pass reads for each example (the whole
        prompt, then its steps): the keys its decoder self-attention attends to (the prompt's are no step)."""
        read = self.prompt_length - 1 + self.lengths  # [batch]
        return torch.arange(self.sequences.shape[1] - 1, device=self.lengths.device)[None, :] < read[:, None]

    def generated(self, example: int) -> list[int]:
        """Example ``example``'s generated token ids (EOS included)."""
        start = self.prompt_length
        return self.sequences[example, start : start + int(self.lengths[example])].tolist()

    def teacher_forced(self, inputs: ModelInputs, *, encoder_outputs=None) -> ModelInputs:
        """``inputs`` with the decoder fed ``prompt + generated[:-1]`` and its ``decoder`` space = the steps;
        with ``encoder_outputs``, the encoder's input is replaced by its output (the encoder does not run)."""
        kwargs = dict(inputs.kwargs)
        if encoder_outputs is not None:
            kwargs = {**without_encoder_inputs(kwargs), "encoder_outputs": encoder_outputs}
        kwargs["decoder_input_ids"] = self.sequences[:, :-1].to(self.sequences.device)
        masks = dict(inputs.masks)
        masks["decoder"] = self.decoder_mask
        host = {space: mask for space, mask in inputs.host_masks.items() if space != "decoder"}  # still true
        extras = {**inputs.extras, KEYS + "decoder": self.key_mask}
        host_extras = {key: value for key, value in inputs.host_extras.items() if key != KEYS + "decoder"}
        return ModelInputs(kwargs, masks, extras, host, host_extras)


class TokenCollector:
    """A ``generate`` streamer that keeps what it is given: the prompt, then each step's tokens."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    def put(self, tokens: torch.Tensor) -> None:
        self.chunks.append(tokens if tokens.dim() == 2 else tokens[:, None])

    def end(self) -> None:
        pass

    def sequences(self) -> torch.Tensor:
        return torch.cat(self.chunks, dim=1)  # [batch, prompt + steps]


def without_encoder_inputs(kwargs: dict) -> dict:
    """Forward arguments without what only the encoder reads (the attention mask stays: it masks cross-attention)."""
    return {key: value for key, value in kwargs.items() if key not in ("input_features", "input_ids", "inputs_embeds")}


def greedy_kwargs(max_new_tokens: int) -> dict:
    """Arguments that make ``generate`` greedy and deterministic, whatever the checkpoint's defaults."""
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }


def lengths_after(sequences: torch.Tensor, prompt_length: int, eos: int | list[int] | None) -> torch.Tensor:
    """Generated tokens per example: up to and including the first EOS after the prompt, else all."""
    new = sequences[:, prompt_length:]  # [batch, steps]
    if eos is None or new.shape[1] == 0:
        return torch.full((sequences.shape[0],), new.shape[1], dtype=torch.long)
    ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=new.device)
    is_eos = torch.isin(new, ids)
    first = is_eos.int().argmax(1) + 1  # [batch]
    return torch.where(is_eos.any(1), first, torch.full_like(first, new.shape[1])).long()
