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
from hookpoints.editing import EditGroup, NeuronEdit, own_inputs
from hookpoints.errors import UserError
from hookpoints.generation import (
    Generation,
    TokenCollector,
    extended,
    greedy_kwargs,
    lengths_after,
    without_encoder_inputs,
)
from hookpoints.generation_requests import GenerationRequests
from hookpoints.hook_fns import hooked
from hookpoints.inputs import ModelInputs
from hookpoints.points import HookPoint
from hookpoints.pooling import pool_positions, positions_first
from hookpoints.probe import first_input, first_tensor
from hookpoints.settings import Sampling

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


class GenerationMethods(GenerationRequests):
    """Mixed into :class:`~hookpoints.model.HookedModel`: decoding, edited decoding, recording while decoding.

    >>> texts = model.source_inputs(["Hallo Welt"], ["deu"])  # SeamlessM4T text: marked with its language
    >>> generation = model.generate(texts, model.decoder_prompt(["eng"], task="t2tt"), 20)
    >>> model.decode(generation)

    A decoder-only LM continues its inputs (no decoder prompt)::

        generation = gpt2.generate(["The cat sat on", "Hello"], max_new_tokens=20)
    """

    def generate(
        self,
        inputs: ModelInputs,
        prompt: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        *,
        encoder_outputs=None,
        edits: list[NeuronEdit] | None = None,
        fwd_hooks=(),
        sampling: Sampling | None = None,
        sample_keys: list | None = None,
    ) -> Generation:
        """Greedy decoding from ``prompt`` (an encoder-decoder's decoder prompt; none for a decoder-only LM, which
        continues its inputs); from ``encoder_outputs`` when given (no encoder run). With ``sampling``
        (:class:`~hookpoints.settings.Sampling`) each example's tokens are drawn from its own stream, keyed by
        ``sample_keys`` (one per example; default its index in the batch; hookpoints.sampling).

        With ``edits``, every edit is applied at every step (:meth:`generate_edited`). With ``fwd_hooks``
        (``[(name or glob, fn)]``, as :meth:`run_with_hooks` takes them) each ``fn(tensor, hook)`` runs at every
        call of its module, as TransformerLens' hooks do during its ``generate`` with the KV cache: over the whole
        prompt at the first step, over the newest position after it (an encoder's hooks once). ``inputs`` may also
        be strings, waveforms or audio paths (hookpoints.user_inputs).

        >>> model.generate(["The cat"], max_new_tokens=8, fwd_hooks=[("blocks.1.hook_resid_post", hp.steer(v, 4.0))])
        """
        if edits:  # generate_edited applies its edits only
            self.check_no_added_hooks("generate with edits (or give the edits as fwd_hooks: hp.ablate, hp.steer)")
        inputs, prompt = self._check_request(inputs, prompt, max_new_tokens, [] if edits is None else edits)
        if encoder_outputs is not None and self.continues:  # HF's ValueError about unused model_kwargs
            raise UserError(f"{self.source} continues its inputs: its generate takes no encoder_outputs")
        changes = self._hook_changes(inputs, fwd_hooks)
        if edits:
            if encoder_outputs is not None or changes:
                raise UserError("generate: give edits, or encoder_outputs or fwd_hooks, not both")
            return self.generate_edited(
                inputs, prompt, list(edits), max_new_tokens, sampling=sampling, sample_keys=sample_keys
            )[0]
        if encoder_outputs is not None and changes:  # the encoder does not run: its hooks would never be called
            encoder = self._module_path(self.model.get_encoder())
            idle = next((point.name for point, _ in changes if _runs_with_encoder(point, encoder)), None)
            if idle is not None:
                raise UserError(
                    f"generate: hook {idle} is read in the encoder, which does not run from encoder_outputs"
                )
        collector = TokenCollector()
        kwargs, start, prompt_inputs = self._start(inputs, prompt)
        if encoder_outputs is not None:
            kwargs = {**without_encoder_inputs(kwargs), "encoder_outputs": encoder_outputs}
            if "input_features" in inputs.kwargs:
                kwargs = self.adapter.generate_kwargs(kwargs)
        # the caller's tensors kept (the given encoder_outputs too: cross-attention's k_proj:input is its tensor)
        kwargs = {**own_inputs(kwargs, [point for point, _ in changes]), "streamer": collector}
        kwargs.update(greedy_kwargs(max_new_tokens), **self._sampled(inputs, sampling, sample_keys))
        fingerprint = LogitsFingerprint(self.model.get_output_embeddings())
        with (
            torch.inference_mode(),
            hooked(self, changes),  # before the guard: its zeroing of padding comes after an input hook's change
            self.adapter.batch_guard(self.model, inputs),
            eager_attention(needs_eager(point.module for point, _ in changes)),  # maps: their hooks run eagerly
            fingerprint,
        ):
            self.model.generate(**kwargs)
        # What generate returns differs by family (Whisper's drops the prompt and trailing EOS); the streamer
        # sees exactly the prompt, then each step's tokens.
        generation = self._generation(collector.sequences().to(self.device), start.shape[1], prompt_inputs)
        check_prompt(generation, start)
        generation.fingerprint = fingerprint.result()
        check_steps(generation)
        return generation

    def pooled_generating(
        self,
        inputs: ModelInputs,
        prompt: torch.Tensor | None,
        points: list[HookPoint],
        pooling: Pooling,
        max_new_tokens: int,
        *,
        sampling: Sampling | None = None,
        sample_keys: list | None = None,
    ) -> tuple[dict[str, torch.Tensor], Generation]:
        """Record a generating task: the encoder once, generation (greedy, or ``sampling`` as in :meth:`generate`),
        one teacher-forced decoder pass.

        1. One traced pass through the encoder records its hook points and keeps its output (then stops).
        2. ``generate`` decodes from that output: the encoder does not run again.
        3. One traced pass of the decoder over ``prompt + generated[:-1]`` (hookpoints.generation) records the
           decoder's hook points, pooled over the generated tokens' steps.

        A decoder-only LM (``prompt`` None) generates, then records every hook point in one teacher-forced pass
        over ``input + generated[:-1]``, pooled over the generated tokens' steps.
        """
        self.check_no_added_hooks()  # its generate would apply them
        self._check_generates()
        inputs = self.generation_inputs(inputs)  # texts too, as generate takes them
        prompt = self.checked_prompt(inputs, prompt, max_new_tokens)
        if self.continues:
            generation = self.generate(inputs, None, max_new_tokens, sampling=sampling, sample_keys=sample_keys)
            self._check_no_audio_generated(inputs, generation)
            return self.pooled(generation.teacher_forced(inputs), points, pooling, check=generation), generation
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
        generation = self.generate(
            inputs, prompt, max_new_tokens, encoder_outputs=encoder_outputs, sampling=sampling, sample_keys=sample_keys
        )
        decoder_inputs = generation.teacher_forced(inputs, encoder_outputs=encoder_outputs)
        outside = [p for p in points if p.name not in saved]
        pooled = {name: tensor.detach() for name, tensor in saved.items()}
        pooled.update(self.pooled(decoder_inputs, outside, pooling, check=generation))
        return pooled, generation

    def generate_edited(
        self,
        inputs: ModelInputs,
        prompt: torch.Tensor | None,
        edits: list[NeuronEdit],
        max_new_tokens: int,
        *,
        record: list[HookPoint] = (),
        fold: bool = True,
        sampling: Sampling | None = None,
        sample_keys: list | None = None,
    ) -> tuple[Generation, dict[str, list[torch.Tensor]]]:
        """Greedy decoding from ``prompt`` with every edit applied at every position of every call.

        One nnsight trace of ``generate``: at each step, each edited hook point's tensor is edited as its
        module runs (decoder hooks at every step, the prompt's positions included; encoders and
        cross-attention keys and values at step 0, the only time they run). ``record`` hook points are
        saved after the edits, per call: name -> ``[batch, pos, width]`` tensors, one per call (the test that
        edits land exactly where they should). Without edits the output equals :meth:`generate`'s.

        A decoder-only LM takes ``prompt`` None (it continues its inputs, left-padded: ``record``'s first call
        holds the padding first). Without ``record`` (and not remote), plain torch hooks edit instead of nnsight,
        and with ``fold`` (the default) replacements of ``nn.Linear`` outputs are folded into the layers' weights for
        the generation (hookpoints.edit_folding: no hook at all for them, the same values; ``fold=False`` keeps a
        hook per tensor). ``sampling`` / ``sample_keys``: as in :meth:`generate` (the same draws with and without
        edits: common random numbers).
        """
        self.check_no_added_hooks("generate_edited (the sweep's and per-step recording's decoding, without them)")
        inputs, prompt = self._check_request(inputs, prompt, max_new_tokens, edits)
        sampled = self._sampled(inputs, sampling, sample_keys)
        if isinstance(record, str) or any(isinstance(point, str) for point in record):
            record = self.select(record)  # names or globs, as run_with_cache takes them
        modules = dict(self.model.named_modules())
        for point in [edit.point for edit in edits] + list(record):
            if point.module not in modules:
                raise UserError(f"hook {point.name} is on module {point.module}, which this model does not have")
        if not record and not self.remote:
            return self._generate_with_torch_hooks(inputs, prompt, edits, max_new_tokens, fold, sampled), {}
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
        kwargs, start, prompt_inputs = self._start(inputs, prompt)
        kwargs = {**own_inputs(kwargs, [edit.point for edit in edits]), "streamer": collector}  # caller's kept
        prompt_mask = None if prompt_inputs is None else prompt_inputs.masks["input"]  # left-padded: keys as alone
        with warnings.catch_warnings():
            # A batch whose examples all stop early ends the step loop before max_new_tokens; nnsight warns.
            warnings.simplefilter("ignore", UserWarning)
            with (
                edits_applied(self.model, inputs_hooked, fold=False),
                torch.inference_mode(),
                self.adapter.batch_guard(self.model, inputs),
                eager_attention(needs_eager(p.module for p in ordered)),
                changing_keys(changes_keys(edit.point.module for edit in edits)),
                self.traced.trace(fn="generate", **kwargs, **greedy_kwargs(max_new_tokens), **sampled) as tracer,
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
                            keys = (
                                None
                                if prompt_mask is None or point.key_space != "input"
                                else extended(prompt_mask, step)
                            )
                            recorded[point.name].append(positions_first(value, point, keys).clone().save())
        generation = self._generation(collector.sequences().to(self.device), start.shape[1], prompt_inputs)
        check_prompt(generation, start)
        return generation, recorded

    def _generate_with_torch_hooks(
        self,
        inputs: ModelInputs,
        prompt: torch.Tensor | None,
        edits: list[NeuronEdit],
        max_new_tokens: int,
        fold: bool = True,
        sampled: dict | None = None,
    ) -> Generation:
        """:meth:`generate_edited` without recording: the same edits on the same tensors at every call, from plain
        torch hooks (nnsight's per-edit hand-off costs ~0.1 ms per hook point and step, which dominates a small
        model's step; bench/whisper_interventions.py). With ``fold``, replacements of Linear outputs are folded
        into the weights for the generation and restored after it (hookpoints.edit_folding.FoldedEdits); each
        other edited tensor gets one hook making one in-place ``where`` per call from masks placed once
        (hookpoints.editing.EditGroup; bench/edit_overhead.py)."""
        collector = TokenCollector()
        kwargs, start, prompt_inputs = self._start(inputs, prompt)
        kwargs = {**own_inputs(kwargs, [edit.point for edit in edits]), "streamer": collector}  # caller's kept
        with (
            edits_applied(self.model, edits, fold=fold),
            torch.inference_mode(),
            self.adapter.batch_guard(self.model, inputs),
        ):
            self.model.generate(**kwargs, **greedy_kwargs(max_new_tokens), **(sampled or {}))
        generation = self._generation(collector.sequences().to(self.device), start.shape[1], prompt_inputs)
        check_prompt(generation, start)
        return generation

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
                    kwargs = self._start(one, None if prompt is None else prompt[:1])[0]
                    kwargs.update(greedy_kwargs(3), min_new_tokens=3)
                    self.model.generate(**kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            self._every_step = frozenset(path for path, count in calls.items() if count >= 3)
        return self._every_step

    def decode(self, generation: Generation) -> list[str]:
        """The generated text of every example (special tokens and EOS left out)."""
        if not isinstance(generation, Generation):
            raise UserError(f"decode takes what generate returns, not {type(generation).__name__}")
        tokens = [generation.generated(i) for i in range(generation.sequences.shape[0])]
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    def _generation(
        self, sequences: torch.Tensor, prompt_length: int, prompt_inputs: ModelInputs | None = None
    ) -> Generation:
        eos = self.model.generation_config.eos_token_id
        lengths = lengths_after(sequences, prompt_length, eos)
        return Generation(sequences, prompt_length, lengths, prompt_inputs=prompt_inputs)

    def pooled_per_step(
        self,
        inputs: ModelInputs,
        prompt: torch.Tensor,
        points: list[HookPoint],
        pooling: str,
        max_new_tokens: int,
        *,
        sampling: Sampling | None = None,
        sample_keys: list | None = None,
    ) -> tuple[dict[str, torch.Tensor], Generation]:
        """Record with hooks at every step of ``generate`` (the reference the teacher-forced pass is tested on).

        Decoder hooks keep each step's newest position (step 0: the prompt's last), pooled over the steps each
        example took; hooks that run once (encoders, cross-attention keys and values, at step 0) are pooled over
        their positions as in :meth:`pooled`.
        """
        generation, seen = self.generate_edited(
            inputs, prompt, [], max_new_tokens, record=points, sampling=sampling, sample_keys=sample_keys
        )
        every_step = self.modules_run_every_step(inputs, prompt)
        pooled = {}
        for point in points:
            calls = [call.float() for call in seen[point.name]]  # [batch, pos, width] per call
            if point.space == generation.space and point.module in every_step:
                newest = torch.cat([call[:, -1:, :] for call in calls], dim=1)  # [batch, steps, width]
                pooled[point.name] = pool_positions(newest, generation.step_mask, pooling)
                continue
            mask = inputs.masks.get(point.space) if point.time_axis is not None else None
            if mask is None:
                mask = torch.ones(calls[0].shape[:2], dtype=torch.bool)
            pooled[point.name] = pool_positions(calls[0], mask, pooling)
        return pooled, generation
