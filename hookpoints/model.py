"""HookedModel: a HuggingFace model traced by nnsight, with named hook points."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace

import nnsight
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from hookpoints.adapters.base import Adapter
from hookpoints.api_methods import ModelApi
from hookpoints.attention import Hook as AttentionHook
from hookpoints.attention import eager as eager_attention
from hookpoints.attention import install as install_attention_hooks
from hookpoints.attention import needs_eager
from hookpoints.editing import NeuronEdit, apply_edit
from hookpoints.errors import UserError
from hookpoints.generation import Generation, TokenCollector, greedy_kwargs, lengths_after, without_encoder_inputs
from hookpoints.inputs import ModelInputs
from hookpoints.points import INPUT_SUFFIX, HookPoint, HookPointSet
from hookpoints.pooling import pool, pool_positions, positions_first
from hookpoints.probe import first_tensor, measure, observe

#: A pooling method for every hook point, or a function choosing one per hook point.
Pooling = str | Callable[[HookPoint], str]


class HookedModel(ModelApi):
    """A model wrapped by nnsight whose tensors are reachable by hook-point name.

    >>> model = HookedModel.from_pretrained("facebook/seamless-m4t-v2-large", modality="speech")
    >>> [p.name for p in model.select(["text_decoder.layers.*.cross_attention.k_proj"])][:1]
    ['text_decoder.layers.0.cross_attention.k_proj']
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        *,
        tokenizer=None,
        processor=None,
        source: str = "",
        modality: str = "text",
        traced=None,
        remote: bool | str = False,
        prepend_bos: bool = False,
    ):
        self.model = model.eval()
        # TransformerLens prepends BOS to text (GPT-2 and LLaMA by default); hookpoints feeds exactly what the
        # tokenizer emits unless this is set (recording and text_inputs read it; the run's config keeps it).
        self.prepend_bos = prepend_bos
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.processor = processor
        self.source = source
        self.modality = modality
        # remote: traces run on NDIF (True) or through nnsight's local simulation of it ("local"); the model
        # wrapper must then be remotable (hookpoints.remote builds one).
        self.remote = remote
        if traced is None:
            install_attention_hooks(self.model)  # rot q/k, scores, patterns (hookpoints.attention)
            with warnings.catch_warnings():  # nnsight notes it serves a submodule called `output` as `E_output`
                warnings.simplefilter("ignore", UserWarning)
                traced = nnsight.NNsight(self.model)
        self.traced = traced
        # module path -> envoy; by path, so submodules nnsight renames (BERT's `output`) are found too.
        root = self.traced.path
        self._envoys = {path.removeprefix(root).removeprefix("."): envoy for path, envoy in self.traced.named_modules()}
        self._points: HookPointSet | None = None
        self._every_step: frozenset[str] | None = None

    @classmethod
    def from_pretrained(cls, source: str, **options) -> HookedModel:
        """Load a checkpoint by hub id or local folder (see :func:`hookpoints.loading.load`)."""
        from hookpoints.loading import load

        return load(source, **options)

    # -- hook points ------------------------------------------------------------------------------------

    @property
    def hook_points(self) -> HookPointSet:
        """Every hook point of the model, measured by one probe forward pass (done once, on first use)."""
        if self._points is None:
            self._points = self._probe()
        return self._points

    def select(self, patterns: str | list[str] | None = None) -> list[HookPoint]:
        """Recordable hook points matching glob ``patterns`` (default: the listed ones), in execution order."""
        if isinstance(patterns, str):
            patterns = [patterns]
        if not patterns:  # attention maps only when named: they hold a row per query position
            return [p for p in self.hook_points.listed() if p.unavailable is None and p.key_space is None]
        return self.hook_points.select(patterns)

    def _probe(self) -> HookPointSet:
        weights = next(self.model.parameters()).device
        inputs = self.adapter.probe_inputs(self.model).to(weights)
        if weights.type == "meta":  # a remote model's local stand-in: HF mask code calls .item() on the mask
            inputs.kwargs.pop("attention_mask", None)  # (all ones in the probe batch anyway)
        with eager_attention():
            seen = observe(self.model, inputs)
        lengths = {space: mask.shape[1] for space, mask in inputs.masks.items()}
        canonical = self.adapter.hook_points(self.model)
        named = {(p.module, p.io) for p in canonical if p.part is None}
        bare = []
        for module, instance in self.model.named_modules():
            if isinstance(instance, AttentionHook):  # named by the adapter; its input is its output
                continue
            for io in ("output", "input"):
                if module and (module, io) not in named:
                    component, layer, submodule = self.adapter.locate(module)
                    name = module if io == "output" else module + INPUT_SUFFIX
                    bare.append(HookPoint(name, module, io, component, layer, submodule))
        measured = (measure(p, seen.get((p.module, p.io)), lengths, inputs.batch_size) for p in (*canonical, *bare))
        return HookPointSet(self._key_layout(point) for point in measured)

    def _key_layout(self, point: HookPoint) -> HookPoint:
        """An attention map's row layout: its key axis padded to the key space's longest length."""
        if point.key_space is None or point.unavailable:
            return point
        keys = self.adapter.key_positions(self.model, point.key_space)
        if keys is None:
            return replace(point, unavailable=f"the longest {point.key_space} length of this model is unknown")
        return replace(point, keys=keys, width=point.heads * keys)

    # -- inputs and recording --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device (the CPU for a remote model, whose weights are on NDIF)."""
        return torch.device("cpu") if self.remote else next(self.model.parameters()).device

    def text_inputs(self, texts: list[str]) -> ModelInputs:
        """Tokenised, right-padded text inputs with their position masks (BOS first with ``prepend_bos``)."""
        if self.tokenizer is None:
            raise UserError(f"model {self.source} has no tokenizer: save one next to it (tokenizer.save_pretrained)")
        inputs = self.adapter.text_inputs(self.model, self.tokenizer, texts)
        if self.prepend_bos:
            inputs = self.adapter.with_bos(self.model, self.tokenizer, inputs)
        return inputs.to(self.device)

    def speech_inputs(self, waveforms: list, *, frames: int | None = None) -> ModelInputs:
        """Inputs for 16 kHz mono ``waveforms`` (``[samples]`` arrays), through the checkpoint's feature extractor."""
        if self.modality != "speech":
            raise UserError(f"model {self.source} was loaded for {self.modality} input; load it with modality speech")
        if self.processor is None:
            raise UserError(
                f"model {self.source} has no feature extractor: save one next to it (feature_extractor.save_pretrained)"
            )
        inputs = self.adapter.speech_inputs(self.model, self.processor, self.tokenizer, waveforms, frames=frames)
        return inputs.to(self.device)

    def source_inputs(self, texts: list[str], languages: list[str]) -> ModelInputs:
        """Text inputs marked with their source languages (model codes, e.g. ``deu``), for translation."""
        if self.tokenizer is None:
            raise UserError(f"model {self.source} has no tokenizer: save one next to it (tokenizer.save_pretrained)")
        return self.adapter.source_inputs(self.model, self.tokenizer, texts, languages).to(self.device)

    @property
    def tasks(self) -> tuple[str, ...]:
        """What this model can be asked to do on its input (``forward``, ``asr``, ``s2tt``, ``t2tt``)."""
        return self.adapter.tasks(self.model.config, self.modality)

    def language_token(self, code: str) -> int | None:
        """The token id naming language ``code`` (``deu``), or None if the model does not know it."""
        return self.adapter.language_token(self.model, self.tokenizer, code)

    @property
    def languages(self) -> list[str]:
        """Language codes the model can be told (source or target), e.g. ``['cmn', 'deu', 'eng', ...]``."""
        return self.adapter.languages(self.model, self.tokenizer)

    def decoder_prompt(self, targets: list[str]) -> torch.Tensor:
        """``[batch, prompt]`` decoder ids that start generation into each target language."""
        return self.adapter.decoder_prompt(self.model, self.tokenizer, targets).to(self.device)

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
        if not isinstance(inputs, ModelInputs):
            inputs = self.inputs(inputs)
        if edits:
            if encoder_outputs is not None:
                raise UserError("generate: give edits or encoder_outputs, not both")
            return self.generate_edited(inputs, prompt, list(edits), max_new_tokens)[0]
        kwargs = {**inputs.kwargs, "decoder_input_ids": prompt}
        if encoder_outputs is not None:
            kwargs = {**without_encoder_inputs(kwargs), "encoder_outputs": encoder_outputs}
            if "input_features" in inputs.kwargs:
                kwargs["inputs"] = None  # SeamlessM4T's speech generate() looks up its input under this name too
        with torch.inference_mode(), self.adapter.batch_guard(self.model, inputs):
            sequences = self.model.generate(**kwargs, **greedy_kwargs(max_new_tokens))
        return self._generation(sequences, prompt.shape[1])

    def pooled_generating(
        self, inputs: ModelInputs, prompt: torch.Tensor, points: list[HookPoint], pooling: Pooling, max_new_tokens: int
    ) -> tuple[dict[str, torch.Tensor], Generation]:
        """Record a generating task: the encoder once, greedy generation, one teacher-forced decoder pass.

        1. One traced pass through the encoder records its hook points and keeps its output (then stops).
        2. ``generate`` decodes from that output: the encoder does not run again.
        3. One traced pass of the decoder over ``prompt + generated[:-1]`` (hookpoints.generation) records the
           decoder's hook points, pooled over the generated tokens' steps.
        """
        encoder = self._module_path(self.model.get_encoder())
        inside = [p for p in points if p.module == encoder or p.module.startswith(encoder + ".")]
        methods = _methods(inside, pooling)
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
        pooled.update(self.pooled(decoder_inputs, outside, pooling) if outside else {})
        return pooled, generation

    def generate_edited(
        self,
        inputs: ModelInputs,
        prompt: torch.Tensor,
        edits: list[NeuronEdit],
        max_new_tokens: int,
        *,
        record: list[HookPoint] = (),
    ) -> tuple[Generation, dict[str, list[torch.Tensor]]]:
        """Greedy decoding from ``prompt`` with every edit applied at every position of every call.

        One nnsight trace of ``generate``: at each step, each edited hook point's tensor is edited as its
        module runs (decoder hooks at every step, the prompt's positions included; encoders and
        cross-attention keys and values at step 0, the only time they run). ``record`` hook points are
        saved after the edits, per call: name -> ``[batch, pos, width]`` tensors, one per call (the test that
        edits land exactly where they should). Without edits the output equals :meth:`generate`'s.
        """
        every_step = self.modules_run_every_step(inputs, prompt)
        by_point: dict[str, list[NeuronEdit]] = {}
        for edit in edits:
            by_point.setdefault(edit.point.name, []).append(edit)
        targets = {edit.point.name: edit.point for edit in edits} | {point.name: point for point in record}
        ordered = sorted(targets.values(), key=lambda p: p.order)
        recorded: dict[str, list[torch.Tensor]] = {point.name: [] for point in record}
        wanted = {point.name for point in record}
        collector = TokenCollector()
        kwargs = {**inputs.kwargs, "decoder_input_ids": prompt, "streamer": collector}
        with warnings.catch_warnings():
            # A batch whose examples all stop early ends the step loop before max_new_tokens; nnsight warns.
            warnings.simplefilter("ignore", UserWarning)
            with (
                torch.inference_mode(),
                self.adapter.batch_guard(self.model, inputs),
                eager_attention(needs_eager(p.module for p in ordered)),
                self.traced.trace(fn="generate", **kwargs, **greedy_kwargs(max_new_tokens)) as tracer,
            ):
                for step in tracer.iter[:max_new_tokens]:
                    for point in ordered:
                        if step > 0 and point.module not in every_step:
                            continue  # it ran at step 0 only (an encoder, cross-attention keys/values)
                        envoy = self._envoys[point.module]
                        value = envoy.output if point.io == "output" else envoy.input
                        for edit in by_point.get(point.name, ()):
                            apply_edit(value, edit)
                        if point.name in wanted:
                            recorded[point.name].append(positions_first(value, point).clone().save())
        generation = self._generation(collector.sequences().to(self.device), prompt.shape[1])
        return generation, recorded

    def modules_run_every_step(self, inputs: ModelInputs, prompt: torch.Tensor) -> frozenset[str]:
        """Module paths that run at every step of ``generate`` (not only at step 0), found once by watching
        two steps of a one-example generation with plain forward hooks."""
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
            try:
                with torch.inference_mode(), self.adapter.batch_guard(self.model, one):
                    kwargs = {**first, "decoder_input_ids": prompt[:1], **greedy_kwargs(3), "min_new_tokens": 3}
                    self.model.generate(**kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            self._every_step = frozenset(path for path, count in calls.items() if count >= 3)
        return self._every_step

    def _module_path(self, module: nn.Module) -> str:
        return next(path for path, candidate in self.model.named_modules() if candidate is module)

    def decode(self, generation: Generation) -> list[str]:
        """The generated text of every example (special tokens and EOS left out)."""
        tokens = [generation.generated(i) for i in range(generation.sequences.shape[0])]
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    def _generation(self, sequences: torch.Tensor, prompt_length: int) -> Generation:
        eos = self.model.generation_config.eos_token_id
        return Generation(sequences, prompt_length, lengths_after(sequences, prompt_length, eos))

    def envoy(self, point: HookPoint):
        """The nnsight envoy of a hook point's module (to read or edit it inside a trace)."""
        return self._envoys[point.module]

    def pooled(self, inputs: ModelInputs, points: list[HookPoint], pooling: Pooling) -> dict[str, torch.Tensor]:
        """One nnsight trace over the batch; each hook point pooled per example, in float32.

        Returns hook name -> ``[batch, width]`` (or ``[valid positions, width]`` for pooling ``none``).
        ``pooling`` is a method for every hook point or a function choosing one per hook point.
        The trace stops after the last requested tensor, so later layers and the LM head do not run.
        """
        methods = _methods(points, pooling)
        saved: dict[str, torch.Tensor] = {}  # filled inside the trace (nnsight keeps only saved names set there)
        options = {"remote": self.remote} if self.remote else {}
        with (
            torch.inference_mode(),
            self.adapter.batch_guard(self.model, inputs),
            eager_attention(needs_eager(p.module for p in points)),
            self.traced.trace(**inputs.kwargs, **options) as tracer,
        ):
            saved.update(self._request(points, inputs, methods))
            tracer.stop()
        return {name: tensor.detach() for name, tensor in saved.items()}

    def _request(
        self, points: list[HookPoint], inputs: ModelInputs, methods: dict[str, str]
    ) -> dict[str, torch.Tensor]:
        """Inside a trace: each hook point's pooled value, requested in execution order (as nnsight needs).

        ``methods`` (hook name -> pooling) is plain data: a remote trace (NDIF) ships the trace's code and
        what it refers to, and a function of a hookpoints module would make the server import that module.
        """
        saved = {}
        values = {}  # (module, io) -> value: several hook points read one tensor (a norm's input)
        for point in sorted(points, key=lambda p: p.order):
            key = (point.module, point.io)
            if key not in values:
                envoy = self._envoys[point.module]
                values[key] = envoy.output if point.io == "output" else envoy.input
            mask, key_mask = inputs.masks.get(point.space), inputs.masks.get(point.key_space)
            saved[point.name] = pool(values[key], point, mask, methods[point.name], key_mask).save()
        return saved

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


def _methods(points: list[HookPoint], pooling: Pooling) -> dict[str, str]:
    """Hook name -> pooling method (``pooling`` is one method for all, or a function of the hook point)."""
    return {point.name: pooling(point) if callable(pooling) else pooling for point in points}
