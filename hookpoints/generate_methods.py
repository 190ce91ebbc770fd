"""The generating methods of a HookedModel: greedy decoding, with edits, and recording while generating.

Kept apart from hookpoints.model so the model class stays small (as hookpoints.api_methods). The mixin reads the
model's state (``model``, ``adapter``, ``traced``, ``_envoys``, ``device``) and calls its recording methods
(``pooled``, ``_request``, ``_module_path``); the decoding helpers live in hookpoints.generation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from transformers.modeling_outputs import BaseModelOutput

from hookpoints.alignment import LogitsFingerprint, check_prompt, check_steps
from hookpoints.attention import changes_keys, changing_keys, needs_eager
from hookpoints.attention import eager as eager_attention
from hookpoints.edit_folding import edits_applied
from hookpoints.editing import EditGroup, NeuronEdit, check_edits, own_inputs
from hookpoints.errors import UserError, check_count
from hookpoints.generation import Generation, TokenCollector, greedy_kwargs, lengths_after, without_encoder_inputs
from hookpoints.inputs import ModelInputs
from hookpoints.points import HookPoint
from hookpoints.pooling import pool_positions, positions_first
from hookpoints.probe import first_input, first_tensor
from hookpoints.tasks import get_task

#: A pooling method for every hook point, or a function choosing one per hook point.
Pooling = str | Callable[[HookPoint], str]


def pooling_methods(points: list[HookPoint], pooling: Pooling) -> dict[str, str]:
    """Hook name -> pooling method (``pooling`` is one method for all, or a function of the hook point)."""
    return {point.name: pooling(point) if callable(pooling) else pooling for point in points}


def _runs_with_encoder(point: HookPoint, encoder: str) -> bool:
    """Whether ``point`` is read in the encoder's pass: inside the encoder, or the input of a module holding it."""
    if point.module == encoder or point.module.startswith(encoder + "."):
        return True
    return point.io == "input" and (not point.module or encoder.startswith(point.module + "."))


class GenerationMethods:
    """Mixed into :class:`~hookpoints.model.HookedModel`: decoding, edited decoding, recording while decoding.

    >>> texts = model.source_inputs(["Hallo Welt"], ["deu"])  # SeamlessM4T text: marked with its language
    >>> generation = model.generate(texts, model.decoder_prompt(["eng"], task="t2tt"), 20)
    >>> model.decode(generation)
    """

    def generate(
        self,
        inputs: ModelInputs,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        encoder_outputs=None,
        edits: list[NeuronEdit] | None = None,
    ) -> Generation:
        """Greedy decoding from ``prompt``; from ``encoder_outputs`` when given (no encoder run).

        With ``edits``, every edit is applied at every step (:meth:`generate_edited`). ``inputs`` may also be
        strings, waveforms or audio paths (hookpoints.user_inputs).
        """
        inputs, prompt = self._check_request(inputs, prompt, max_new_tokens, [] if edits is None else edits)
        if edits:
            if encoder_outputs is not None:
                raise UserError("generate: give edits or encoder_outputs, not both")
            return self.generate_edited(inputs, prompt, list(edits), max_new_tokens)[0]
        collector = TokenCollector()
        kwargs = {**inputs.kwargs, **self._prompt_kwargs(prompt), "decoder_input_ids": prompt, "streamer": collector}
        if encoder_outputs is not None:
            kwargs = {**without_encoder_inputs(kwargs), "encoder_outputs": encoder_outputs}
            if "input_features" in inputs.kwargs:
                kwargs = self.adapter.generate_kwargs(kwargs)
        fingerprint = LogitsFingerprint(self.model.get_output_embeddings())
        with torch.inference_mode(), self.adapter.batch_guard(self.model, inputs), fingerprint:
            self.model.generate(**kwargs, **greedy_kwargs(max_new_tokens))
        # What generate returns differs by family (Whisper's drops the prompt and trailing EOS); the streamer
        # sees exactly the prompt, then each step's tokens.
        generation = self._generation(collector.sequences().to(self.device), prompt.shape[1])
        check_prompt(generation, prompt)
        generation.fingerprint = fingerprint.result()
        check_steps(generation)
        return generation

    def pooled_generating(
        self, inputs: ModelInputs, prompt: torch.Tensor, points: list[HookPoint], pooling: Pooling, max_new_tokens: int
    ) -> tuple[dict[str, torch.Tensor], Generation]:
        """Record a generating task: the encoder once, greedy generation, one teacher-forced decoder pass.

        1. One traced pass through the encoder records its hook points and keeps its output (then stops).
        2. ``generate`` decodes from that output: the encoder does not run again.
        3. One traced pass of the decoder over ``prompt + generated[:-1]`` (hookpoints.generation) records the
           decoder's hook points, pooled over the generated tokens' steps.
        """
        prompt = self.checked_prompt(inputs, prompt, max_new_tokens)
        encoder = self._module_path(self.model.get_encoder())
        # the encoder's hook points, and the inputs of modules around it (Whisper's ``model:input`` is the
        # features): the teacher-forced pass gets the encoder's output instead of them
        inside = [p for p in points if _runs_with_encoder(p, encoder)]
        methods = pooling_methods(inside, pooling)
        saved: dict[str, torch.Tensor] = {}  # filled inside the trace (nnsight keeps only saved names set there)
        with (
            torch.inference_mode(),
            self.adapter.batch_guard(self.model, inputs),
            eager_attention(needs_eager(p.module for p in points)),
            self.traced.trace(**inputs.kwargs) as tracer,
        ):
            saved.update(self._request(inside, inputs, methods))
            encoded = self._envoys[encoder].output.save()
            tracer.stop()
        encoder_outputs = BaseModelOutput(last_hidden_state=first_tensor(encoded))
        generation = self.generate(inputs, prompt, max_new_tokens, encoder_outputs=encoder_outputs)
        decoder_inputs = generation.teacher_forced(inputs, encoder_outputs=encoder_outputs)
        outside = [p for p in points if p.name not in saved]
        pooled = {name: tensor.detach() for name, tensor in saved.items()}
        pooled.update(self.pooled(decoder_inputs, outside, pooling, check=generation))
        return pooled, generation

    def generate_edited(
        self,
        inputs: ModelInputs,
        prompt: torch.Tensor,
        edits: list[NeuronEdit],
        max_new_tokens: int,
        *,
        record: list[HookPoint] = (),
        fold: bool = True,
    ) -> tuple[Generation, dict[str, list[torch.Tensor]]]:
        """Greedy decoding from ``prompt`` with every edit applied at every position of every call.

        One nnsight trace of ``generate``: at each step, each edited hook point's tensor is edited as its
        module runs (decoder hooks at every step, the prompt's positions included; encoders and
        cross-attention keys and values at step 0, the only time they run). ``record`` hook points are
        saved after the edits, per call: name -> ``[batch, pos, width]`` tensors, one per call (the test that
        edits land exactly where they should). Without edits the output equals :meth:`generate`'s.

        Without ``record`` (and not remote), plain torch hooks edit instead of nnsight, and with ``fold`` (the
        default) replacements of ``nn.Linear`` outputs are folded into the layers' weights for the generation
        (hookpoints.edit_folding: no hook at all for them, the same values; ``fold=False`` keeps a hook per tensor).
        """
        inputs, prompt = self._check_request(inputs, prompt, max_new_tokens, edits)
        modules = dict(self.model.named_modules())
        for point in [edit.point for edit in edits] + list(record):
            if point.module not in modules:
                raise UserError(f"hook {point.name} is on module {point.module}, which this model does not have")
        if not record and not self.remote:
            return self._generate_with_torch_hooks(inputs, prompt, edits, max_new_tokens, fold), {}
        every_step = self.modules_run_every_step(inputs, prompt)
        # Inputs are edited by torch pre-hooks registered before the adapter's batch guard, as without recording:
        # nnsight hands a module its input after every pre-hook has run, so an input edit made there would land
        # after the guard zeroed a padded batch's frames (SeamlessM4T's adaptor convolutions) and reach real ones.
        inputs_hooked = [] if self.remote else [edit for edit in edits if edit.point.io == "input"]
        by_point: dict[str, list[NeuronEdit]] = {}
        for edit in edits:
            if self.remote or edit.point.io != "input":
                by_point.setdefault(edit.point.name, []).append(edit)
        edit_groups = {name: EditGroup(group) for name, group in by_point.items()}
        targets = {edit.point.name: edit.point for edit in edits} | {point.name: point for point in record}
        ordered = sorted(targets.values(), key=lambda p: p.order)
        recorded: dict[str, list[torch.Tensor]] = {point.name: [] for point in record}
        wanted = {point.name for point in record}
        collector = TokenCollector()
        given = own_inputs(inputs.kwargs, [edit.point for edit in edits])  # the caller's tensors never edited
        kwargs = {**given, **self._prompt_kwargs(prompt), "decoder_input_ids": prompt, "streamer": collector}
        with warnings.catch_warnings():
            # A batch whose examples all stop early ends the step loop before max_new_tokens; nnsight warns.
            warnings.simplefilter("ignore", UserWarning)
            with (
                edits_applied(self.model, inputs_hooked, fold=False),
                torch.inference_mode(),
                self.adapter.batch_guard(self.model, inputs),
                eager_attention(needs_eager(p.module for p in ordered)),
                changing_keys(changes_keys(edit.point.module for edit in edits)),
                self.traced.trace(fn="generate", **kwargs, **greedy_kwargs(max_new_tokens)) as tracer,
            ):
                for step in tracer.iter[:max_new_tokens]:
                    for point in ordered:
                        if step > 0 and point.module not in every_step:
                            continue  # it ran at step 0 only (an encoder, cross-attention keys/values)
                        envoy = self._envoys[point.module]
                        if point.io == "output":
                            value = envoy.output
                        elif self.remote:
                            value = envoy.input
                        else:  # as the edits' pre-hooks take it (generate calls an encoder by keyword)
                            value = first_input(modules[point.module], *envoy.inputs)
                        if point.name in edit_groups:
                            edit_groups[point.name].apply(value)
                        if point.name in wanted:
                            if first_tensor(value) is None:  # Whisper's model:input: generate runs the encoder
                                raise UserError(
                                    f"hook {point.name}: module {point.module} gets no tensor in generate; "
                                    "record it in a forward pass"
                                )
                            recorded[point.name].append(positions_first(value, point).clone().save())
        generation = self._generation(collector.sequences().to(self.device), prompt.shape[1])
        return generation, recorded

    def _generate_with_torch_hooks(
        self,
        inputs: ModelInputs,
        prompt: torch.Tensor,
        edits: list[NeuronEdit],
        max_new_tokens: int,
        fold: bool = True,
    ) -> Generation:
        """:meth:`generate_edited` without recording: the same edits on the same tensors at every call, from plain
        torch hooks (nnsight's per-edit hand-off costs ~0.1 ms per hook point and step, which dominates a small
        model's step; bench/whisper_interventions.py). With ``fold``, replacements of Linear outputs are folded
        into the weights for the generation and restored after it (hookpoints.edit_folding.FoldedEdits); each
        other edited tensor gets one hook making one in-place ``where`` per call from masks placed once
        (hookpoints.editing.EditGroup; bench/edit_overhead.py)."""
        collector = TokenCollector()
        given = own_inputs(inputs.kwargs, [edit.point for edit in edits])  # the caller's tensors never edited
        kwargs = {**given, **self._prompt_kwargs(prompt), "decoder_input_ids": prompt, "streamer": collector}
        with (
            edits_applied(self.model, edits, fold=fold),
            torch.inference_mode(),
            self.adapter.batch_guard(self.model, inputs),
        ):
            self.model.generate(**kwargs, **greedy_kwargs(max_new_tokens))
        generation = self._generation(collector.sequences().to(self.device), prompt.shape[1])
        check_prompt(generation, prompt)
        return generation

    def _check_generates(self) -> None:
        """A UserError unless the model has a generating task (encoder-decoder families: SeamlessM4T, Whisper)."""
        if not any(get_task(task).generates for task in self.tasks):
            raise UserError(
                f"model {self.source} ({self.adapter.name}, {self.modality} input) does not generate here: "
                "generate and decoder_prompt are for the encoder-decoder families (SeamlessM4T v2, Whisper)"
            )

    def _check_request(self, inputs, prompt, max_new_tokens: int, edits) -> tuple[ModelInputs, torch.Tensor]:
        """Checks the arguments of ``generate`` and ``generate_edited``: the inputs as a batch, the prompt on device."""
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

    def checked_prompt(self, inputs: ModelInputs, prompt, max_new_tokens: int) -> torch.Tensor:
        """``prompt`` as ``[batch, prompt]`` token ids on the model's device, one row per example of ``inputs``;
        a UserError for anything else (a one-row prompt for a larger batch failed deep in the decoder)."""
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

    def check_room(self, prompt_length: int, max_new_tokens: int) -> None:
        """A UserError when the prompt and ``max_new_tokens`` run past the decoder's learned positions (Whisper:
        448; its ``generate`` raises a ValueError there). Sinusoidal decoders (SeamlessM4T) have no limit."""
        check_count("max new tokens", max_new_tokens)
        limit = getattr(self.model.config, "max_target_positions", None)
        if limit is not None and prompt_length + max_new_tokens > limit:
            raise UserError(
                f"max new tokens {max_new_tokens} after a {prompt_length}-token decoder prompt runs past the "
                f"{limit} decoder positions of {self.source}: give at most {limit - prompt_length}"
            )

    def modules_run_every_step(self, inputs: ModelInputs, prompt: torch.Tensor) -> frozenset[str]:
        """Module paths that run at every step of ``generate`` (not only at step 0), found once by watching
        three steps of a one-example generation with plain forward hooks (attention computed eagerly, so the
        attention-map hooks, which SDPA skips, are seen too)."""
        if self._every_step is None:
            calls: dict[str, int] = {}
            handles = [
                module.register_forward_hook(lambda *_, path=path: calls.__setitem__(path, calls.get(path, 0) + 1))
                for path, module in self.model.named_modules()
                if path
            ]
            first = {name: value[:1] for name, value in inputs.kwargs.items()}
            one = ModelInputs(
                first, {k: v[:1] for k, v in inputs.masks.items()}, {k: v[:1] for k, v in inputs.extras.items()}
            )
            try:  # eager: attention maps' hook modules run only then (and, like queries, at every step)
                with torch.inference_mode(), self.adapter.batch_guard(self.model, one), eager_attention():
                    kwargs = {**first, **self._prompt_kwargs(prompt[:1]), "decoder_input_ids": prompt[:1]}
                    kwargs.update(greedy_kwargs(3), min_new_tokens=3)
                    self.model.generate(**kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            self._every_step = frozenset(path for path, count in calls.items() if count >= 3)
        return self._every_step

    def _prompt_kwargs(self, prompt: torch.Tensor) -> dict:
        return self.adapter.prompt_kwargs(self.model, prompt)

    def decode(self, generation: Generation) -> list[str]:
        """The generated text of every example (special tokens and EOS left out)."""
        if not isinstance(generation, Generation):
            raise UserError(f"decode takes what generate returns, not {type(generation).__name__}")
        tokens = [generation.generated(i) for i in range(generation.sequences.shape[0])]
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    def _generation(self, sequences: torch.Tensor, prompt_length: int) -> Generation:
        eos = self.model.generation_config.eos_token_id
        return Generation(sequences, prompt_length, lengths_after(sequences, prompt_length, eos))

    def pooled_per_step(
        self,
        inputs: ModelInputs,
        prompt: torch.Tensor,
        points: list[HookPoint],
        pooling: str,
        max_new_tokens: int,
    ) -> tuple[dict[str, torch.Tensor], Generation]:
        """Record with hooks at every step of ``generate`` (the reference the teacher-forced pass is tested on).

        Decoder hooks keep each step's newest position (step 0: the prompt's last), pooled over the steps each
        example took; hooks that run once (encoders, cross-attention keys and values, at step 0) are pooled over
        their positions as in :meth:`pooled`.
        """
        generation, seen = self.generate_edited(inputs, prompt, [], max_new_tokens, record=points)
        every_step = self.modules_run_every_step(inputs, prompt)
        pooled = {}
        for point in points:
            calls = [call.float() for call in seen[point.name]]  # [batch, pos, width] per call
            if point.space == "decoder" and point.module in every_step:
                newest = torch.cat([call[:, -1:, :] for call in calls], dim=1)  # [batch, steps, width]
                pooled[point.name] = pool_positions(newest, generation.step_mask, pooling)
                continue
            mask = inputs.masks.get(point.space) if point.time_axis is not None else None
            if mask is None:
                mask = torch.ones(calls[0].shape[:2], dtype=torch.bool)
            pooled[point.name] = pool_positions(calls[0], mask, pooling)
        return pooled, generation
