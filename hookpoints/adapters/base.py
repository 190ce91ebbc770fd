"""What an adapter knows about a model family: canonical names, the class to load, and probe inputs.

An adapter lists *stacks* (a ModuleList of layers that share a layout, e.g. SeamlessM4T v2's text decoder)
and the *points* inside every layer of a stack, plus *singles* outside the stacks (embeddings, final norm).
Everything else (widths, neuron axes, which positions a tensor indexes) is measured by the shape probe.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from hookpoints.derived import norm_kind
from hookpoints.errors import UserError
from hookpoints.inputs import KEYS, ModelInputs
from hookpoints.points import HookPoint, module_alias

LAYER_OUTPUT = "hook_resid_post"


@dataclass(frozen=True)
class Point:
    """A hook point inside every layer of a stack."""

    submodule: str  # canonical name inside the layer: "ffn.fc1", "attn.hook_q", "hook_resid_post"
    module: str | None = None  # module path inside the layer ("" = the layer itself); default: submodule
    io: str = "output"
    part: tuple[int, int] | None = None  # (index, count) of equal neuron slices (GPT-2's fused qkv)
    heads: str | None = None  # config attribute with the head count, for [heads, d_head] neurons
    derived: str | None = None  # "normalized" / "scale": TransformerLens' norm internals, from the norm's input


@dataclass(frozen=True)
class Stack:
    """A ModuleList of layers that share one layout."""

    component: str  # speech_encoder, text_encoder, text_decoder, audio_encoder, lm, encoder
    layers: str  # module path of the ModuleList
    prefix: str  # canonical name prefix: "text_decoder.layers" -> text_decoder.layers.{l}.{submodule}
    points: tuple[Point, ...]
    config: str | None = None  # attribute of the model config holding this stack's sub-config, if any
    output: str = LAYER_OUTPUT  # the point that is the whole layer's output


@dataclass(frozen=True)
class Single:
    """A hook point outside the layer stacks (embeddings, final norms, projectors)."""

    name: str
    module: str
    component: str
    submodule: str
    io: str = "output"
    derived: str | None = None  # as Point.derived


@dataclass(frozen=True)
class Adapter:
    """A model family: how it is named, which class loads it, and how to probe it."""

    name: str
    model_types: tuple[str, ...]
    stacks: tuple[Stack, ...] = ()
    singles: tuple[Single, ...] = ()
    components: dict[str, str] = field(default_factory=dict)  # module path prefix -> component
    #: (canonical name or in-layer suffix, alias): other names of the same tensor (TransformerLens 4's, ...)
    renames: tuple[tuple[str, str], ...] = ()
    #: forward arguments held per example, not per token (an audio LLM's features): a left-padded batch keeps
    #: them as they are (hookpoints.generation.left_padded; a decoder-only family that continues its inputs)
    per_example_kwargs: tuple[str, ...] = ()
    #: those of them that hold a position in each example's tokens (Ultravox's ``audio_token_start_idx``): a
    #: left-padded batch moves them with the token they point at
    per_example_positions: tuple[str, ...] = ()

    # -- loading and inputs (overridden per family) -----------------------------------------------------

    def check_template(self, model: nn.Module, tokenizer, template: str) -> None:
        """A UserError for a speech prompt template this family cannot take (its text checked beforehand)."""

    def model_class(self, config, modality: str) -> type[nn.Module]:
        raise NotImplementedError

    def modalities(self, config) -> tuple[str, ...]:
        """The input modalities this family's models take (the first is the default)."""
        return ("text",)

    def probe_inputs(self, model: nn.Module, modality: str = "text") -> ModelInputs:
        """A tiny batch of 2 whose position counts differ per space (so the probe can tell them apart), of the
        input ``modality`` the model was loaded for: an audio LLM's text probe leaves its audio out, so the
        points of its audio tower are unavailable on text, as they are in its forward pass."""
        raise NotImplementedError

    def text_inputs(self, model: nn.Module, tokenizer, texts: list[str]) -> ModelInputs:
        raise NotImplementedError

    def with_bos(self, model: nn.Module, tokenizer, inputs: ModelInputs) -> ModelInputs:
        """``inputs`` with the BOS token first in every example (TransformerLens' ``prepend_bos``)."""
        raise UserError(f"prepend_bos applies to token-fed text models (decoder-only LMs, BERT), not {self.name}")

    # -- speech and tasks (overridden by families that take speech or generate) -------------------------

    def tasks(self, config, modality: str) -> tuple[str, ...]:
        """The tasks (hookpoints.tasks) this family runs on ``modality`` input; every model can do forward."""
        return ("forward",)

    def speech_inputs(
        self, model: nn.Module, processor, tokenizer, waveforms: list, *, frames: int | None = None
    ) -> ModelInputs:
        """Inputs for 16 kHz ``waveforms``; ``frames`` fixes the feature frames by truncation / zero-padding."""
        raise NotImplementedError

    def source_inputs(self, model: nn.Module, tokenizer, texts: list[str], languages: list[str]) -> ModelInputs:
        """Text inputs marked with their source language (model codes); plain text inputs by default."""
        return self.text_inputs(model, tokenizer, texts)

    def language_token(self, model: nn.Module, tokenizer, code: str) -> int | None:
        """The token id that names language ``code`` (``deu``) for this model, or None if it has none."""
        return None

    def languages(self, model: nn.Module, tokenizer) -> list[str]:
        """The language codes the model can be told (for error messages); none by default."""
        return []

    def decoder_prompt(
        self, model: nn.Module, tokenizer, targets: list[str], *, task: str = "asr", sources: list[str] | None = None
    ) -> torch.Tensor:
        """``[batch, prompt]`` decoder token ids that start ``task`` into each target language (``sources``: the
        inputs' own languages, where known; Whisper names the source language when it translates)."""
        raise NotImplementedError

    def generate_kwargs(self, kwargs: dict) -> dict:
        """``generate`` arguments when the encoder's output replaces its input (some families need more)."""
        return kwargs

    def prompt_kwargs(self, model: nn.Module, prompt: torch.Tensor) -> dict:
        """``generate`` arguments that say what ``prompt`` already says (Whisper: else it detects the language
        first, one more decoder pass than the steps, before it decodes from the prompt)."""
        return {}

    def batch_guard(self, model: nn.Module, inputs: ModelInputs) -> AbstractContextManager:
        """Held around every forward pass of a padded batch: fixes that keep padding out of the values."""
        return nullcontext()

    # -- naming -----------------------------------------------------------------------------------------

    def hook_points(self, model: nn.Module) -> list[HookPoint]:
        """The canonical hook points present in this model (not yet probed)."""
        modules = dict(model.named_modules())
        points = []
        for stack in self.stacks:
            layers = modules.get(stack.layers)
            if layers is None:
                continue  # e.g. no speech encoder in SeamlessM4Tv2ForTextToText
            config = getattr(model.config, stack.config) if stack.config else model.config
            for layer in range(len(layers)):
                base = f"{stack.layers}.{layer}"
                for point in stack.points:
                    module = base if point.module == "" else f"{base}.{point.module or point.submodule}"
                    if module not in modules:
                        continue
                    heads = getattr(config, point.heads, None) if point.heads else None
                    name = f"{stack.prefix}.{layer}.{point.submodule}"
                    derived = _derived(modules[module], point.derived, name)
                    points.append(
                        HookPoint(
                            name=name,
                            module=module,
                            io="input" if derived else point.io,
                            component=stack.component,
                            layer=layer,
                            submodule=point.submodule,
                            part=point.part,
                            heads=heads,
                            canonical=True,
                            layer_output=point.submodule == stack.output,
                            aliases=self.aliases(name)
                            + (() if derived else _module_alias(module, point.io, point.part)),
                            derived=derived and derived[0],
                            eps=derived and derived[1],
                        )
                    )
        for single in self.singles:
            if single.module in modules:
                derived = _derived(modules[single.module], single.derived, single.name)
                points.append(
                    HookPoint(
                        name=single.name,
                        module=single.module,
                        io="input" if derived else single.io,
                        component=single.component,
                        submodule=single.submodule,
                        canonical=True,
                        aliases=self.aliases(single.name)
                        + (() if derived else _module_alias(single.module, single.io, None)),
                        derived=derived and derived[0],
                        eps=derived and derived[1],
                    )
                )
        return points

    def aliases(self, name: str) -> tuple[str, ...]:
        """Other names of the canonical hook point ``name`` (from ``renames``)."""
        found = []
        for canonical, alias in self.renames:
            if name == canonical:
                found.append(alias)
            elif name.endswith("." + canonical):
                found.append(name[: -len(canonical)] + alias)
        return tuple(found)

    def key_mask(self, inputs: ModelInputs, space: str) -> torch.Tensor | None:
        """``[batch, keys]``: the keys an attention map over ``space`` attends to (others are stored as 0):
        the space's valid positions, its padding being masked in attention (or ``extras[KEYS + space]`` where the
        batch says otherwise: a teacher-forced decoder pass's prompt); None: every key."""
        keys = inputs.extras.get(KEYS + space)
        return keys if keys is not None else inputs.masks.get(space)

    def key_positions(self, model: nn.Module, space: str) -> int | None:
        """The most key positions an attention map over ``space`` can have (its row layout in the store)."""
        return max_positions(model)

    def locate(self, module: str) -> tuple[str | None, int | None, str | None]:
        """(component, layer, submodule) of a bare module path."""
        for stack in self.stacks:
            match = re.match(rf"^{re.escape(stack.layers)}\.(\d+)(?:\.(.+))?$", module)
            if match:
                return stack.component, int(match.group(1)), match.group(2) or ""
        for prefix, component in self.components.items():
            if module == prefix or module.startswith(prefix + "."):
                return component, None, module[len(prefix) + 1 :] or None
        return None, None, None


class TokenAdapter(Adapter):
    """Families fed token ids (decoder-only LMs, BERT encoders): probed with random ids, record tokenised text."""

    def probe_inputs(self, model, modality="text"):
        ids = random_ids(model, 2, 11)
        mask = ids.new_ones(ids.shape)
        return ModelInputs({"input_ids": ids, "attention_mask": mask}, {"input": mask.bool()})

    def text_inputs(self, model, tokenizer, texts):
        ids, mask = token_batch(tokenizer, texts, max_length=max_positions(model))
        return ModelInputs({"input_ids": ids, "attention_mask": mask}, {"input": mask.bool()})

    def with_bos(self, model, tokenizer, inputs):
        """Prepend BOS where the tokenizer did not already put one first (as TransformerLens does)."""
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        if bos is None:
            raise UserError("prepend_bos: the tokenizer has no BOS (or CLS) token")
        ids, mask = inputs.kwargs["input_ids"], inputs.kwargs["attention_mask"]  # [batch, tokens], right-padded
        if bool((ids[:, 0] == bos).all()):
            return inputs
        ids = torch.cat([ids.new_full((ids.shape[0], 1), bos), ids], dim=1)
        mask = torch.cat([mask.new_ones((mask.shape[0], 1)), mask], dim=1)
        limit = max_positions(model)
        ids, mask = (ids[:, :limit], mask[:, :limit]) if limit else (ids, mask)
        return ModelInputs({**inputs.kwargs, "input_ids": ids, "attention_mask": mask}, {"input": mask.bool()})


def max_positions(model: nn.Module) -> int | None:
    """The longest input the (text) model takes, from its config."""
    config = model.config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _derived(module: nn.Module, what: str | None, name: str) -> tuple[str, float] | None:
    if what is None:
        return None
    kind = norm_kind(module, what)
    if kind is None:
        raise TypeError(f"{name}: {type(module).__name__} is neither a LayerNorm nor an RMSNorm")
    return kind


def _module_alias(module: str, io: str, part: tuple[int, int] | None) -> tuple[str, ...]:
    if part is not None:
        return ()
    return (module_alias(module, io),)


def token_batch(tokenizer, texts: list[str], *, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and attention mask ([batch, tokens] each) for ``texts``."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    encoded = tokenizer(
        texts,
        padding=True,
        padding_side="right",  # for this call: the tokenizer's own setting is the user's
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
    )
    return encoded["input_ids"], encoded["attention_mask"]


def template_ids(tokenizer, template: str | None) -> tuple[list[int], list[int]]:
    """The token ids of a speech prompt's text before and after its ``{audio}`` (none without a template)."""
    if template is None:
        return [], []
    before, after = template.split("{audio}")
    return [tokenizer(text, add_special_tokens=False)["input_ids"] if text else [] for text in (before, after)]


def random_ids(model: nn.Module, batch: int, length: int, *, low: int = 4, high: int | None = None) -> torch.Tensor:
    """Random token ids in ``[low, high)`` (default: the vocabulary past the first special ids), for probing."""
    high = high or model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    return torch.randint(low, max(low + 1, high), (batch, length), generator=generator)
