"""What ``generate`` is asked: the checks of its arguments, and the arguments HF's ``generate`` gets.

Kept apart from hookpoints.generate_methods so each stays small. Two kinds of model generate:

- an encoder-decoder (SeamlessM4T, Whisper) decodes from a decoder prompt (``model.decoder_prompt``) given
  beside its inputs;
- a decoder-only LM (GPT-2, LLaMA, Qwen2, ...; task ``continue``) continues its inputs: no prompt is given, the
  batch is left-padded (hookpoints.generation.left_padded) and its tokens are the prompt.
"""

from __future__ import annotations

import torch

from hookpoints.adapters.base import max_positions
from hookpoints.editing import check_edits
from hookpoints.errors import UserError, check_count
from hookpoints.generation import Generation, left_padded, takes_position_ids
from hookpoints.hook_fns import resolve_hooks, user_hook
from hookpoints.inputs import ModelInputs
from hookpoints.sampling import sampling_kwargs
from hookpoints.settings import Sampling, check_sampling
from hookpoints.tasks import get_task

#: A decoder-only LM continues by the argmax of its logits, as TransformerLens' greedy ``generate`` does: a
#: checkpoint's own logits processors (Qwen2.5-Instruct's ``repetition_penalty`` 1.05, ``no_repeat_ngram_size``,
#: banned or forced tokens) would pick other tokens, without a word (the logits themselves are unchanged).
PLAIN_ARGMAX = {
    "repetition_penalty": None,
    "encoder_repetition_penalty": None,
    "no_repeat_ngram_size": None,
    "min_length": None,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
}


class GenerationRequests:
    """Mixed into :class:`~hookpoints.model.HookedModel` (through GenerationMethods): argument checks of the
    generating methods, and ``generate``'s arguments for a batch."""

    @property
    def continues(self) -> bool:
        """Whether this is a decoder-only LM that generates by continuing its inputs (task ``continue``)."""
        return "continue" in self.tasks

    def _check_generates(self) -> None:
        """A UserError unless the model has a generating task (encoder-decoder families, decoder-only LMs) and its
        weights are here (a model on NDIF, ``remote=True``, has none: HF's ``generate`` would run on the meta
        device)."""
        if self.remote is True:
            raise UserError(
                f"{self.source} runs on NDIF (--remote), where hookpoints records forward passes only: generate "
                "(or record a generating task) with the model loaded locally"
            )
        if not any(get_task(task).generates for task in self.tasks):
            raise UserError(
                f"model {self.source} ({self.adapter.name}, {self.modality} input) does not generate here: "
                "generate is for the encoder-decoder families (SeamlessM4T v2, Whisper) and decoder-only LMs"
            )

    def _check_request(self, inputs, prompt, max_new_tokens, edits) -> tuple[ModelInputs, torch.Tensor | None]:
        """Checks the arguments of ``generate`` and ``generate_edited``: the inputs as a batch, the prompt on device
        (None for a decoder-only LM, which continues its inputs)."""
        self._check_generates()
        check_edits(edits)
        inputs = self.generation_inputs(inputs)
        return inputs, self.checked_prompt(inputs, prompt, max_new_tokens)

    def generation_inputs(self, inputs) -> ModelInputs:
        """``inputs`` as a batch to generate from (:meth:`inputs`). Bare strings are refused for a text encoder that
        reads the source language's token first (SeamlessM4T): its tokenizer would mark every text with its default
        language (``__eng__``), so a German text was translated as English, without a word."""
        if isinstance(inputs, ModelInputs):
            return inputs
        texts = [inputs] if isinstance(inputs, str) else inputs
        bare = isinstance(texts, (list, tuple)) and bool(texts) and all(isinstance(t, str) for t in texts)
        if bare and self.modality == "text" and "t2tt" in self.tasks:
            raise UserError(
                f"{self.adapter.name}'s text encoder reads each text's source language first: give "
                "model.source_inputs(texts, languages) (model codes such as 'deu'), not bare strings"
            )
        return self.inputs(inputs)

    def checked_prompt(self, inputs: ModelInputs, prompt, max_new_tokens) -> torch.Tensor | None:
        """``prompt`` as ``[batch, prompt]`` token ids on the model's device, one row per example of ``inputs``;
        a UserError for anything else (a one-row prompt for a larger batch failed deep in the decoder). A
        decoder-only LM takes no prompt (None): its inputs are the prompt."""
        if self.continues:
            if prompt is not None:
                hint = f"max_new_tokens={prompt}" if isinstance(prompt, int) and not isinstance(prompt, bool) else ""
                raise UserError(
                    f"{self.source} is a decoder-only LM: it continues its inputs and takes no decoder prompt "
                    f"(model.generate(texts, max_new_tokens=20){'; give ' + hint if hint else ''})"
                )
            if "input" not in inputs.masks:  # a hand-built ModelInputs: a KeyError
                raise UserError(
                    "a decoder-only LM generates from token ids: give texts, or a ModelInputs with an 'input' mask "
                    "(model.inputs(...) builds one)"
                )
            self.check_room(int(inputs.masks["input"].shape[1]), max_new_tokens)
            return None
        if (
            not isinstance(prompt, torch.Tensor)
            or prompt.dim() != 2
            or prompt.is_floating_point()
            or not prompt.numel()
        ):
            raise UserError(
                f"the decoder prompt must be a [batch, tokens] tensor of token ids (model.decoder_prompt(...)), "
                f"not {prompt!r:.80}"
            )
        if prompt.shape[0] != inputs.batch_size:
            raise UserError(
                f"the decoder prompt has {prompt.shape[0]} rows for {inputs.batch_size} examples: give one per "
                f"example (model.decoder_prompt([target] * {inputs.batch_size}))"
            )
        vocab = getattr(self.model.get_output_embeddings(), "out_features", None)
        if vocab is not None and (int(prompt.min()) < 0 or int(prompt.max()) >= vocab):
            bad = int(prompt.max()) if int(prompt.max()) >= vocab else int(prompt.min())
            raise UserError(f"decoder prompt token {bad} is out of range for {self.source} (vocabulary of {vocab})")
        self.check_room(prompt.shape[1], max_new_tokens)
        return prompt.to(self.device)

    def check_room(self, prompt_length: int, max_new_tokens) -> None:
        """A UserError when the prompt and ``max_new_tokens`` run past the decoder's learned positions (Whisper:
        448; its ``generate`` raises a ValueError there; GPT-2: 1,024, past which its position embedding fails).
        Sinusoidal decoders (SeamlessM4T) have no limit."""
        check_count("max new tokens", max_new_tokens)
        if self.continues:
            limit, what, positions = max_positions(self.model), "input", "positions"
        else:
            limit = getattr(self.model.config, "max_target_positions", None)
            what, positions = "decoder prompt", "decoder positions"
        if limit is not None and prompt_length >= limit:  # no new token fits: "give at most 0" named no fix
            raise UserError(
                f"the {what} alone holds {prompt_length} tokens, as many as the {limit} {positions} of "
                f"{self.source} or more: no new token fits; shorten it"
            )
        if limit is not None and prompt_length + max_new_tokens > limit:
            raise UserError(
                f"max new tokens {max_new_tokens} after a {prompt_length}-token {what} runs past the "
                f"{limit} {positions} of {self.source}: give at most {limit - prompt_length}"
            )

    def _start(self, inputs: ModelInputs, prompt: torch.Tensor | None) -> tuple[dict, torch.Tensor, ModelInputs | None]:
        """What ``generate`` starts from: its keyword arguments, the sequence its output must begin with, and (a
        decoder-only LM) the left-padded input it continues."""
        if not self.continues:
            kwargs = {**inputs.kwargs, **self.adapter.prompt_kwargs(self.model, prompt), "decoder_input_ids": prompt}
            return kwargs, prompt, None
        given = left_padded(
            inputs,
            with_positions=takes_position_ids(self.model),
            carried=self.adapter.per_example_kwargs,
            moved=self.adapter.per_example_positions,
        )
        kwargs = {name: value for name, value in given.kwargs.items() if name != "position_ids"}  # generate's own
        return {**kwargs, "pad_token_id": self._pad_token(), **PLAIN_ARGMAX}, given.kwargs["input_ids"], given

    def _hook_changes(self, inputs: ModelInputs, fwd_hooks) -> list:
        """The added hooks (``model.add_hook``), then ``fwd_hooks``, as (hook point, change of its tensor) pairs for
        :func:`hookpoints.hook_fns.hooked`."""
        resolved = [*self._added_resolved(), *(resolve_hooks(self, fwd_hooks) if fwd_hooks else [])]
        if not resolved:
            return []
        mask = inputs.masks.get("input")
        padded = self.continues and mask is not None and not bool(mask.all())  # generate moves its padding first
        if padded and any(getattr(fn, "reads_positions", False) for _, fn in resolved):
            raise UserError(
                "generate: patch(cache) reads positions as run_with_cache lays them out (padding last), but generate "
                "left-pads prompts of different lengths: patch a batch of one, or of prompts of one length"
            )
        return [(point, user_hook(point, fn, inputs.batch_size)) for point, fn in resolved]

    def _check_no_audio_generated(self, inputs: ModelInputs, generation: Generation) -> None:
        """An audio LLM that generated its audio token (``<|AUDIO|>``) cannot be teacher-forced: its forward
        would read the generated one as audio (HF's ValueError: tokens and features do not match)."""
        audio = getattr(self.model.config, "audio_token_id", None)
        fed = generation.sequences[:, generation.prompt_length : -1]  # the generated tokens the pass reads
        if audio is not None and "input_features" in inputs.kwargs and bool(fed.eq(audio).any()):
            example = int(fed.eq(audio).any(1).nonzero()[0])
            raise UserError(
                f"example {example} generated the audio token (id {audio}), which record's teacher-forced pass "
                "(--per-step too) reads as audio: record it with hooks at every step (model.pooled_per_step)"
            )

    def _sampled(self, inputs: ModelInputs, sampling: Sampling | None, keys: list | None) -> dict:
        """``generate``'s arguments for ``sampling`` (none for greedy decoding; hookpoints.sampling)."""
        if check_sampling(sampling) is None and keys is not None:
            raise UserError("sample_keys key the streams of sampled decoding: give sampling=hp.Sampling(...) too")
        return sampling_kwargs(sampling, keys, inputs.batch_size)

    def _pad_token(self) -> int:
        """The id generate pads finished examples with (the tokenizer's pad, else EOS; HF warns without one)."""
        for candidate in (
            self.model.generation_config.pad_token_id,
            getattr(self.tokenizer, "pad_token_id", None),
            self.model.generation_config.eos_token_id,
        ):
            if isinstance(candidate, (list, tuple)):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        return 0
