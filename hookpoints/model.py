"""HookedModel: a HuggingFace model traced by nnsight, with named hook points."""

from __future__ import annotations

import warnings

import nnsight
import torch
from torch import nn

from hookpoints.adapters.base import Adapter
from hookpoints.inputs import ModelInputs
from hookpoints.points import INPUT_SUFFIX, HookPoint, HookPointSet
from hookpoints.pooling import pool
from hookpoints.probe import measure, observe
from store.errors import UserError


class HookedModel:
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
    ):
        self.model = model.eval()
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.processor = processor
        self.source = source
        self.modality = modality
        # remote: traces run on NDIF (True) or through nnsight's local simulation of it ("local"); the model
        # wrapper must then be remotable (hookpoints.remote builds one).
        self.remote = remote
        if traced is None:
            with warnings.catch_warnings():  # nnsight notes it serves a submodule called `output` as `E_output`
                warnings.simplefilter("ignore", UserWarning)
                traced = nnsight.NNsight(self.model)
        self.traced = traced
        # module path -> envoy; by path, so submodules nnsight renames (BERT's `output`) are found too.
        root = self.traced.path
        self._envoys = {path.removeprefix(root).removeprefix("."): envoy for path, envoy in self.traced.named_modules()}
        self._points: HookPointSet | None = None

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

    def select(self, patterns: list[str] | None = None) -> list[HookPoint]:
        """Recordable hook points matching glob ``patterns`` (default: the listed ones), in execution order."""
        if not patterns:
            return [p for p in self.hook_points.listed() if p.unavailable is None]
        return self.hook_points.select(patterns)

    def _probe(self) -> HookPointSet:
        weights = next(self.model.parameters()).device
        inputs = self.adapter.probe_inputs(self.model).to(weights)
        if weights.type == "meta":  # a remote model's local stand-in: HF mask code calls .item() on the mask
            inputs.kwargs.pop("attention_mask", None)  # (all ones in the probe batch anyway)
        seen = observe(self.model, inputs)
        lengths = {space: mask.shape[1] for space, mask in inputs.masks.items()}
        canonical = self.adapter.hook_points(self.model)
        named = {(p.module, p.io) for p in canonical if p.part is None}
        bare = []
        for module, _ in self.model.named_modules():
            for io in ("output", "input"):
                if module and (module, io) not in named:
                    component, layer, submodule = self.adapter.locate(module)
                    name = module if io == "output" else module + INPUT_SUFFIX
                    bare.append(HookPoint(name, module, io, component, layer, submodule))
        return HookPointSet(
            measure(point, seen.get((point.module, point.io)), lengths, inputs.batch_size)
            for point in (*canonical, *bare)
        )

    # -- inputs and recording --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device (the CPU for a remote model, whose weights are on NDIF)."""
        return torch.device("cpu") if self.remote else next(self.model.parameters()).device

    def text_inputs(self, texts: list[str]) -> ModelInputs:
        """Tokenised, right-padded text inputs with their position masks."""
        if self.tokenizer is None:
            raise UserError(f"model {self.source} has no tokenizer: save one next to it (tokenizer.save_pretrained)")
        return self.adapter.text_inputs(self.model, self.tokenizer, texts).to(self.device)

    def pooled(self, inputs: ModelInputs, points: list[HookPoint], pooling: str) -> dict[str, torch.Tensor]:
        """One nnsight trace over the batch; each hook point pooled per example, in float32.

        Returns hook name -> ``[batch, width]`` (or ``[valid positions, width]`` for pooling ``none``).
        The trace stops after the last requested tensor, so later layers and the LM head do not run.
        """
        saved = {}
        options = {"remote": self.remote} if self.remote else {}
        with torch.inference_mode(), self.traced.trace(**inputs.kwargs, **options) as tracer:
            for point in sorted(points, key=lambda p: p.order):
                envoy = self._envoys[point.module]
                value = envoy.output if point.io == "output" else envoy.input
                saved[point.name] = pool(value, point, inputs.masks.get(point.space), pooling).save()
            tracer.stop()
        return {name: tensor.detach() for name, tensor in saved.items()}
