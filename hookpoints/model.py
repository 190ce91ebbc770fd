"""HookedModel: a HuggingFace model traced by nnsight, with named hook points."""

from __future__ import annotations

import inspect
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import PurePath

import nnsight
import torch
from torch import nn

from hookpoints.adapters.base import Adapter, max_positions
from hookpoints.alignment import CHECK, check_alignment
from hookpoints.api_methods import ModelApi
from hookpoints.attention import Hook as AttentionHook
from hookpoints.attention import eager as eager_attention
from hookpoints.attention import install as install_attention_hooks
from hookpoints.attention import needs_eager
from hookpoints.audio import MIN_SECONDS, SAMPLE_RATE
from hookpoints.errors import UserError
from hookpoints.generate_methods import GenerationMethods, Pooling, pooling_methods
from hookpoints.generation import Generation
from hookpoints.inputs import ModelInputs
from hookpoints.languages import model_code
from hookpoints.mask_skips import MaskSkips, settle
from hookpoints.placement import execution_device
from hookpoints.points import INPUT_SUFFIX, HookPoint, HookPointSet
from hookpoints.pooling import SpaceMask, pool, prepare_masks
from hookpoints.probe import measure, observe
from hookpoints.settings import check_template_text
from hookpoints.tasks import get_task
from hookpoints.tl_weights import WeightsApi

__all__ = ["HookedModel", "Pooling"]


class HookedModel(GenerationMethods, ModelApi, WeightsApi):
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
        if patterns is not None and not (
            isinstance(patterns, list | tuple) and all(isinstance(p, str) for p in patterns)
        ):
            raise UserError(f"hook patterns must be a glob or a list of globs, not {patterns!r:.80}")
        if not patterns:  # attention maps only when named: they hold a row per query position
            return [p for p in self.hook_points.listed() if p.unavailable is None and p.key_space is None]
        return self.hook_points.select(patterns)

    def _probe(self) -> HookPointSet:
        weights = execution_device(self.model)  # meta: a remote model's stand-in (offloaded weights are not)
        inputs = self.adapter.probe_inputs(self.model, self.modality).to(weights, self.model.dtype)
        if weights.type == "meta":  # a remote model's local stand-in: HF mask code calls .item() on the mask
            inputs.kwargs.pop("attention_mask", None)  # (all ones in the probe batch anyway)
        with eager_attention():
            seen = observe(self.model, inputs)
        lengths = {space: mask.shape[1] for space, mask in inputs.masks.items()}
        canonical = self.adapter.hook_points(self.model)
        named = {(p.module, p.io) for p in canonical if p.part is None}
        bare = []
        for module, instance in self.model.named_modules():
            # an attention hook's input is its output: only the output gets a (module-path) name
            for io in ("output",) if isinstance(instance, AttentionHook) else ("output", "input"):
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
        """Where inputs go: the model's device (its main device when accelerate split it over several; the CPU
        for a remote model, whose weights are on NDIF)."""
        return torch.device("cpu") if self.remote else execution_device(self.model)

    def text_inputs(self, texts: list[str]) -> ModelInputs:
        """Tokenised, right-padded text inputs with their position masks (BOS first with ``prepend_bos``)."""
        if self.tokenizer is None:
            raise UserError(f"model {self.source} has no tokenizer: save one next to it (tokenizer.save_pretrained)")
        self.check_text_lengths(texts)
        inputs = self.adapter.text_inputs(self.model, self.tokenizer, texts)
        if self.prepend_bos:
            inputs = self.adapter.with_bos(self.model, self.tokenizer, inputs)
        return inputs.to(self.device)

    def speech_inputs(
        self,
        waveforms: list,
        *,
        frames: int | None = None,
        names: list[str] | None = None,
        template: str | None = None,
    ) -> ModelInputs:
        """Inputs for 16 kHz mono ``waveforms`` (``[samples]`` arrays), through the checkpoint's feature extractor.
        ``names`` (e.g. their files) name a refused waveform; default ``waveform i``. ``template`` (audio LLMs):
        the prompt's text around the audio, which goes at ``{audio}``.

        >>> qwen.speech_inputs(waves, template="{audio}Generate the caption in English:")
        """
        if self.modality != "speech":
            if "speech" not in self.adapter.modalities(self.model.config):
                raise UserError(f"model {self.source} ({self.adapter.name}) takes text, not waveforms or audio")
            raise UserError(f"model {self.source} was loaded for {self.modality} input; load it with modality speech")
        if self.processor is None:
            raise UserError(
                f"model {self.source} has no feature extractor: save one next to it (feature_extractor.save_pretrained)"
            )
        if isinstance(waveforms, str | PurePath) or any(isinstance(w, str | PurePath) for w in waveforms):
            raise UserError(  # a path was read as a waveform of one sample per character
                "speech_inputs takes waveforms ([samples] arrays at 16 kHz), not audio paths: give the paths to "
                "generate or run_with_cache, or read them with hookpoints.audio.load_audio"
            )
        names = names or [f"waveform {i}" for i in range(len(waveforms))]
        window = getattr(self.processor, "n_samples", None)  # a fixed window (Whisper: 30 s) cuts the rest silently
        longest = max(range(len(waveforms)), key=lambda i: len(waveforms[i]), default=None)
        if window is not None and longest is not None and len(waveforms[longest]) > window:
            raise UserError(
                f"{names[longest]} lasts {len(waveforms[longest]) / SAMPLE_RATE:.1f} s; {self.source} reads at most "
                f"{window / SAMPLE_RATE:g} s (the rest would be cut off): split it into shorter pieces"
            )
        shortest = min(range(len(waveforms)), key=lambda i: len(waveforms[i]), default=None)
        if shortest is not None and len(waveforms[shortest]) < MIN_SECONDS * SAMPLE_RATE:  # as audio files
            raise UserError(
                f"{names[shortest]} holds {len(waveforms[shortest])} samples; speech models need at least "
                f"{MIN_SECONDS * 1000:.0f} ms ({MIN_SECONDS * SAMPLE_RATE:.0f} samples at 16 kHz): drop it"
            )
        options = {"frames": frames}
        if template is not None:
            self.check_template(template)
            options["template"] = template
        inputs = self.adapter.speech_inputs(self.model, self.processor, self.tokenizer, waveforms, **options)
        return inputs.to(self.device, self.model.dtype)  # features in the model's precision (bf16 on a GPU)

    def check_template(self, template) -> None:
        """A UserError unless ``template`` is text with one ``{audio}`` and this model's speech prompt takes one."""
        if "template" not in inspect.signature(self.adapter.speech_inputs).parameters:
            raise UserError(f"a prompt template applies to audio LLMs (Qwen2-Audio, Ultravox), not {self.adapter.name}")
        check_template_text(template)
        if self.tokenizer is None:  # its text is tokenised (a TypeError from template_ids)
            raise UserError(f"a prompt template needs {self.source}'s tokenizer: save one next to it")
        self.adapter.check_template(self.model, self.tokenizer, template)  # its special tokens

    def source_inputs(self, texts: list[str], languages: list[str]) -> ModelInputs:
        """Text inputs marked with their source languages (model codes, e.g. ``deu``), for translation."""
        if self.tokenizer is None:
            raise UserError(f"model {self.source} has no tokenizer: save one next to it (tokenizer.save_pretrained)")
        lists = all(isinstance(given, list | tuple) for given in (texts, languages))
        if not lists or len(texts) != len(languages):  # a string was read letter by letter: 'abc' as 3 texts
            raise UserError("source_inputs takes a list of texts and a list of their languages, one per text")
        unknown = next((code for code in languages if self.language_token(model_code(str(code))) is None), None)
        if unknown is not None:
            raise UserError(
                f"unknown source language {unknown!r} for model {self.source}; it knows: {', '.join(self.languages)}"
            )
        self.check_text_lengths(texts, marked=True)
        return self.adapter.source_inputs(self.model, self.tokenizer, texts, languages).to(self.device)

    def check_text_lengths(
        self, texts: list[str], names: list[str] | None = None, *, marked: bool = False, room: int = 0
    ) -> None:
        """Refuse, naming it, a text with more tokens than the model has positions: tokenising would cut it off
        without a word. ``marked``: a language token and EOS go around each text (:meth:`source_inputs`);
        ``room``: positions to leave after each text (a decoder-only LM's ``max_new_tokens``)."""
        limit = max_positions(self.model)
        if not limit or self.tokenizer is None or not texts:
            return
        tokenized = self.tokenizer(list(texts), add_special_tokens=not marked, verbose=False)["input_ids"]
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.cls_token_id
        counts = [
            len(ids) + (2 if marked else int(self.prepend_bos and (not ids or ids[0] != bos))) for ids in tokenized
        ]
        worst = max(range(len(counts)), key=counts.__getitem__)
        if counts[worst] + room > limit:
            name = names[worst] if names else f"text {worst}"
            if room:
                raise UserError(
                    f"{name} has {counts[worst]} tokens: with {room} new tokens it runs past the {limit} positions "
                    f"of {self.source}; shorten it or give max new tokens of at most {max(limit - counts[worst], 0)}"
                )
            raise UserError(
                f"{name} has {counts[worst]} tokens, more than the {limit} positions of {self.source} (the rest "
                "would be cut off): shorten or split it"
            )

    @property
    def tasks(self) -> tuple[str, ...]:
        """What this model can be asked to do on its input (``forward``, ``asr``, ``s2tt``, ``t2tt``)."""
        return self.adapter.tasks(self.model.config, self.modality)

    def language_token(self, code: str) -> int | None:
        """The token id naming language ``code`` (``deu``), or None if the model does not know it."""
        return self.adapter.language_token(self.model, self.tokenizer, code)

    def knows_language(self, code: str) -> bool:
        """Whether the model can be told language ``code`` (``deu``): a token names it, or it is the model's only
        language (an English-only Whisper, whose prompt names none)."""
        return self.language_token(code) is not None or self.languages == [code]

    @property
    def languages(self) -> list[str]:
        """Language codes the model can be told (source or target), e.g. ``['cmn', 'deu', 'eng', ...]``."""
        return self.adapter.languages(self.model, self.tokenizer)

    def decoder_prompt(
        self, targets: list[str], *, task: str = "asr", sources: list[str] | None = None
    ) -> torch.Tensor:
        """``[batch, prompt]`` decoder ids that start ``task`` into each target language (``sources``: the
        inputs' own languages, where the manifest has them). Codes are read as manifest labels are (``de``,
        ``de_de`` and ``DEU`` are ``deu``)."""
        self._check_generates()
        if self.continues:
            raise UserError(
                f"{self.source} is a decoder-only LM: it continues its inputs and has no decoder prompt "
                "(model.generate(texts, max_new_tokens=20))"
            )
        targets = [targets] if isinstance(targets, str) else targets  # "eng" was read as languages e, n, g
        if not isinstance(targets, list | tuple) or not targets or not get_task(task).generates:
            raise UserError(
                f"decoder_prompt takes a list of target languages (one per example) and a generating task "
                f"(asr, s2tt, t2tt), not {targets!r:.60} and {task!r}"
            )
        targets = [model_code(str(code)) for code in targets]
        sources = None if sources is None else [model_code(str(code)) for code in sources]
        unknown = next((code for code in targets if not self.knows_language(code)), None)
        if unknown is not None:
            known = self.languages
            listed = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
            hint = f"; it knows: {listed}" if known else ""
            raise UserError(f"unknown target language {unknown!r} for model {self.source}{hint}")
        prompt = self.adapter.decoder_prompt(self.model, self.tokenizer, targets, task=task, sources=sources)
        return prompt.to(self.device)

    def _module_path(self, module: nn.Module) -> str:
        return next(path for path, candidate in self.model.named_modules() if candidate is module)

    def envoy(self, point: HookPoint):
        """The nnsight envoy of a hook point's module (to read or edit it inside a trace; an attention map's
        module runs only within ``hookpoints.attention.eager()``, see docs/gotchas.md)."""
        return self._envoys[point.module]

    def pooled(
        self,
        inputs: ModelInputs,
        points: list[HookPoint],
        pooling: Pooling,
        *,
        check: Generation | None = None,
        defer_check: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One nnsight trace over the batch; each hook point pooled per example, in float32.

        Returns hook name -> ``[batch, width]`` (or ``[valid positions, width]`` for pooling ``none``).
        ``pooling`` is a method for every hook point or a function choosing one per hook point.
        The trace stops after the last requested tensor, so later layers and the LM head do not run.
        ``check`` (a teacher-forced pass over that generation): the LM head runs too, and its logits must give
        back the ones ``generate`` saw at every step (:func:`hookpoints.alignment.check_alignment`).
        Transformers' attention-mask questions are answered from the masks' CPU copies (no host sync,
        :mod:`hookpoints.mask_skips`); their check is read here, or with ``defer_check`` returned under
        ``MASK_CHECK`` for the caller to copy with the rows and pass to :func:`~hookpoints.mask_skips.check_claims`.
        """
        self.check_no_added_hooks()  # its trace runs without them: the rows would not be what the notebook sees
        methods = pooling_methods(points, pooling)
        saved: dict[str, torch.Tensor] = {}  # filled inside the trace (nnsight keeps only saved names set there)
        options = {"remote": self.remote} if self.remote else {}
        # once per batch, before the trace, from the masks' CPU copies: nothing waits for the GPU
        spaces = prepare_masks(inputs.masks, inputs.host_masks)
        skips = nullcontext() if self.remote else MaskSkips.for_batch(inputs)
        with (
            torch.inference_mode(),
            self.adapter.batch_guard(self.model, inputs),
            eager_attention(needs_eager(p.module for p in points)),
            skips,
            self.traced.trace(**inputs.kwargs, **options) as tracer,
        ):
            head = self._module_path(self.model.get_output_embeddings()) if check is not None else None
            late = [p for p in points if head is not None and _encloses(p, head)]  # their output ends after the head's
            saved.update(self._request([p for p in points if p not in late], inputs, methods, spaces))
            if check is not None:
                logits = self._envoys[head].output[:, check.prompt_length - 1 :, :]  # [batch, steps, vocab]
                saved[CHECK] = logits.gather(2, check.fingerprint.indices.to(logits.device)).save()
            saved.update(self._request(late, inputs, methods, spaces))  # (nnsight: in execution order)
            tracer.stop()
        if check is not None:
            check_alignment(check, saved.pop(CHECK))
        settle(skips, saved, defer_check)
        return {name: tensor.detach() if tensor.requires_grad else tensor for name, tensor in saved.items()}

    def _request(
        self,
        points: list[HookPoint],
        inputs: ModelInputs,
        methods: dict[str, str],
        spaces: dict[str, SpaceMask] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Inside a trace: each hook point's pooled value, requested in execution order (as nnsight needs).

        ``methods`` (hook name -> pooling) is plain data: a remote trace (NDIF) ships the trace's code and
        what it refers to, and a function of a hookpoints module would make the server import that module.
        ``spaces``: the batch's masks prepared once (:func:`hookpoints.pooling.prepare_masks`); without them
        every space is pooled with its mask, and nothing waits for the device.
        """
        if spaces is None:
            spaces = {space: SpaceMask(mask, check=False) for space, mask in inputs.masks.items()}
        saved = {}
        values = {}  # (module, io) -> value: several hook points read one tensor (a norm's input)
        for point in sorted(points, key=lambda p: p.order):
            key = (point.module, point.io)
            if key not in values:
                envoy = self._envoys[point.module]
                values[key] = envoy.output if point.io == "output" else envoy.input
            key_mask = self.adapter.key_mask(inputs, point.key_space) if point.keys is not None else None
            saved[point.name] = pool(values[key], point, spaces.get(point.space), methods[point.name], key_mask).save()
        return saved


def _encloses(point: HookPoint, module: str) -> bool:
    """Whether ``point`` is the output of a module holding ``module`` (Ultravox's ``language_model`` holds its LM
    head): that output is ready only after ``module``'s."""
    inside = not point.module or module.startswith(point.module + ".")
    return point.io == "output" and point.module != module and inside
