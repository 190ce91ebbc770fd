"""Greedy generation, and the teacher-forced pass that records the decoder over what was generated.

A decoder step ``k`` reads one position and picks generated token ``k``: step 0 reads the prompt (its last
position picks the first token), step ``k > 0`` reads generated token ``k - 1`` at position ``prompt + k - 1``.
With a causal decoder, one forward pass over ``prompt + generated[:-1]`` computes every step's values at once,
position ``prompt - 1 + k`` holding step ``k`` (the KV cache of ``generate`` only avoids recomputing them).
So the recorder generates, then runs that one pass and pools decoder hooks over the *step positions*
(:attr:`Generation.decoder_mask`): one per generated token, the EOS included. Encoder hooks see the same input
as in ``generate``. ``tests/test_generation.py`` checks this against hooks at every step of ``generate``.

A decoder-only LM (task ``continue``) has no decoder prompt: it continues its input. The batch is left-padded
(:func:`left_padded`) so every example's last token sits at the prompt's last position, as HF's ``generate``
and TransformerLens need; the steps are then positions of the ``input`` space (:attr:`Generation.space`).
``tests/test_continue.py`` checks it against HF's ``generate`` one example at a time and TransformerLens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from hookpoints.errors import UserError
from hookpoints.inputs import KEYS, ModelInputs

#: Forward arguments a decoder-only LM's generation reads (anything else would be dropped by left padding).
TOKEN_KWARGS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class Generation:
    """Greedy output for a batch: the prompt, then generated tokens (padding after an example's EOS)."""

    sequences: torch.Tensor  # [batch, prompt + steps]
    prompt_length: int
    lengths: torch.Tensor  # [batch] generated tokens per example, EOS included
    fingerprint: object = None  # hookpoints.alignment.Fingerprint: generate's top logits per step, if kept
    #: A decoder-only LM's left-padded input that generate continued (its ``input`` mask: the prompt's real
    #: tokens); None for an encoder-decoder, whose decoder prompt has no padding.
    prompt_inputs: ModelInputs | None = field(default=None, repr=False)

    @property
    def space(self) -> str:
        """The position space of the steps: ``decoder``, or ``input`` for a decoder-only LM (task ``continue``)."""
        return "decoder" if self.prompt_inputs is None else "input"

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
        keys = torch.arange(self.sequences.shape[1] - 1, device=self.lengths.device)[None, :] < read[:, None]
        if self.prompt_inputs is not None:  # a left-padded prompt: its padding is no key
            keys = keys & self.attention_mask.bool().to(keys.device)
        return keys

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[batch, prompt + steps - 1]`` of a decoder-only LM's teacher-forced pass: the prompt's real tokens,
        then every step's (as ``generate`` extends it)."""
        return extended(self.prompt_inputs.masks["input"].to(self.sequences.device), self.steps - 1).long()

    def generated(self, example: int) -> list[int]:
        """Example ``example``'s generated token ids (EOS included)."""
        start = self.prompt_length
        return self.sequences[example, start : start + int(self.lengths[example])].tolist()

    def teacher_forced(self, inputs: ModelInputs, *, encoder_outputs=None) -> ModelInputs:
        """``inputs`` with the decoder fed ``prompt + generated[:-1]`` and its ``decoder`` space = the steps;
        with ``encoder_outputs``, the encoder's input is replaced by its output (the encoder does not run).
        A decoder-only LM's pass is built from the input generate continued (``inputs`` is not read)."""
        if self.prompt_inputs is not None:
            return self._continued()
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

    def _continued(self) -> ModelInputs:
        """A decoder-only LM's teacher-forced pass: the left-padded prompt, then ``generated[:-1]``; its ``input``
        space = the steps (position ids counted from each example's first real token, as ``generate`` counts)."""
        given = self.prompt_inputs  # its other arguments (an audio LLM's features) and spaces are per example
        attention = self.attention_mask  # [batch, prompt + steps - 1]
        kwargs = {**given.kwargs, "input_ids": self.sequences[:, :-1], "attention_mask": attention}
        if "position_ids" in given.kwargs:
            kwargs["position_ids"] = positions(attention)
        masks = {**given.masks, "input": self.decoder_mask}
        return ModelInputs(kwargs, masks, {**given.extras, KEYS + "input": self.key_mask})


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


def extended(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """A left-padded prompt's mask (``[batch, prompt]``) after ``steps`` generated tokens (``[batch, prompt +
    steps]``: the tokens generate has added are all real)."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], steps)], dim=1)


def takes_position_ids(model) -> bool:
    """Whether ``model``'s forward takes ``position_ids`` (then a left-padded batch gets :func:`positions`)."""
    return "position_ids" in inspect.signature(model.forward).parameters


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each example's first real token (``[batch, pos]``; padding at 0), as HF's
    ``generate`` and TransformerLens count them for a left-padded batch."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_padded(
    inputs: ModelInputs, *, with_positions: bool, carried: tuple[str, ...] = (), moved: tuple[str, ...] = ()
) -> ModelInputs:
    """A decoder-only LM's token batch with every example's padding moved before its tokens (a stable sort of
    each row by its mask: the tokens keep their order), so that all prompts end at the last position.
    ``with_positions``: position ids too (for models that take them; :func:`positions`). ``carried``: forward
    arguments held per example, not per token (an audio LLM's features), kept as they are, with the masks of
    their spaces; any other argument is refused (it would be misaligned by the padding's move). ``moved``: those
    of them that hold one position per example in its tokens (``[batch]``: Ultravox's first audio token), moved
    with the token they point at; a position on padding or past the tokens is refused."""
    mask = inputs.masks.get("input")
    other = [name for name in inputs.kwargs if name not in TOKEN_KWARGS and name not in carried]
    if "input_ids" not in inputs.kwargs or mask is None or other:
        given = ", ".join(other) or "no input_ids"
        raise UserError(
            f"a decoder-only LM generates from token ids: give texts or input_ids with an attention_mask, not {given}"
        )
    empty = (~mask.bool()).all(1).nonzero()
    if len(empty):  # HF would continue it from nothing (attention over no key)
        raise UserError(
            f"example {int(empty[0])} has no tokens (its attention_mask is all 0): give every example at least one"
        )
    order = torch.sort(mask.int(), dim=1, stable=True).indices  # [batch, pos]: padding first, tokens in order
    ids = inputs.kwargs["input_ids"].gather(1, order.to(inputs.kwargs["input_ids"].device))
    mask = mask.gather(1, order.to(mask.device))
    given = inputs.kwargs.get("position_ids")
    if isinstance(given, torch.Tensor):  # generate counts them itself: others would be dropped without a word
        given = given.expand(ids.shape).gather(1, order.to(given.device)).to(mask.device)
        if not torch.equal(given[mask.bool()], positions(mask)[mask.bool()]):
            raise UserError(
                "generate counts each example's positions from its first token (0, 1, 2, ...): give input_ids and "
                "an attention_mask without position_ids of your own"
            )
    kwargs = {name: value for name, value in inputs.kwargs.items() if name in carried}
    for name in moved:
        if name in kwargs:
            kwargs[name] = moved_positions(kwargs[name], order, inputs.masks["input"], name)
    kwargs.update(input_ids=ids, attention_mask=mask.long())
    if with_positions:
        kwargs["position_ids"] = positions(mask)
    masks = {space: value for space, value in inputs.masks.items() if space != "input"}
    return ModelInputs(kwargs, {**masks, "input": mask}, dict(inputs.extras))


def moved_positions(given: torch.Tensor, order: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """Each example's position ``given[i]`` of a token, after its row was reordered by ``order`` (``[batch,
    pos]``: new position -> old); ``mask`` is the row's real tokens before. A UserError for a position that
    points at padding or past the row (the audio would land on other tokens without a word)."""
    given = torch.as_tensor(given)
    width = order.shape[1]
    old = given.reshape(-1).long().to(order.device)  # [batch]
    if old.shape[0] != order.shape[0] or bool(((old < 0) | (old >= width)).any()):
        raise UserError(f"{name} must hold one position per example within its {width} tokens, not {given.tolist()}")
    real = mask.bool().to(order.device).gather(1, old[:, None])[:, 0]
    if not bool(real.all()):
        bad = int((~real).nonzero()[0])
        raise UserError(f"example {bad}'s {name} {int(old[bad])} points at padding: it must point at one of its tokens")
    # the tokens from there on must be one run: padding between them would be moved out, shifting what follows
    valid = mask.bool().to(order.device)
    last = width - 1 - valid.flip(1).int().argmax(1)  # [batch]: each row's last real token
    after = torch.arange(width, device=order.device)[None, :] >= old[:, None]
    gaps = (valid & after).sum(1) != last - old + 1
    if bool(gaps.any()):
        bad = int(gaps.nonzero()[0])
        raise UserError(
            f"example {bad} has padding (attention_mask 0) between its tokens after its {name} {int(old[bad])}: "
            "give its tokens from there on without gaps"
        )
    new = torch.argsort(order, dim=1).gather(1, old[:, None])[:, 0]  # [batch]: old position -> new
    return new.to(device=given.device, dtype=given.dtype)


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
