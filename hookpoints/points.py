"""Hook points: named places in a model whose activations can be recorded or edited.

A hook point names one tensor: a module's output (or its first input), optionally one equal slice of its
neurons. Adapters give the tensors researchers talk about canonical names
(``text_decoder.layers.3.cross_attention.k_proj``, ``blocks.0.hook_resid_pre``); every module path of
``model.named_modules()`` is a hook name too, so nothing is out of reach.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from hookpoints.derived import MAP_HOOKS
from hookpoints.errors import UserError

INPUT_SUFFIX = ":input"
#: hook points computed from a norm's input (TransformerLens' meaning): never a module-path alias
DERIVED_SUFFIXES = ("hook_normalized", "hook_scale")
#: How TransformerLens names begin (blocks.0.hook_resid_post, hook_embed, ln_final.hook_scale, embed.ln...)
TL_PREFIXES = ("blocks.", "hook_", "ln_final.", "embed.", "pos_embed.", "unembed.")


class LayerIndex(int):
    """A hook point's layer number that TransformerLens code may also call: ``hook.layer == hook.layer() == 3``
    (TransformerLens' ``HookPoint.layer()`` is a method; hook functions written for it call it)."""

    def __call__(self) -> int:
        return int(self)


@dataclass(frozen=True)
class HookPoint:
    """One named tensor of a model, with what the shape probe learnt about it.

    ``width`` neurons lie on ``neuron_axis`` of the module's tensor (2 for ``[batch, pos, d_model]``, 1 for a
    Conformer conv's ``[batch, channels, time]``); ``time_axis`` indexes the positions of ``space``
    (``input`` tokens or frames, ``encoder`` outputs, ``decoder`` tokens), or is None when the tensor holds one
    vector per example. ``unavailable`` says why a hook point cannot be recorded, if it cannot.

    >>> point = model.hook_points.get("blocks.0.attn.hook_q")
    >>> point.width, point.shape  # (64, (4, 16)): 4 heads of 16
    """

    name: str
    module: str
    io: str = "output"  # "output", or "input" (the module's first input)
    component: str | None = None
    layer: int | None = None
    submodule: str | None = None
    part: tuple[int, int] | None = None  # (index, count): one of `count` equal slices of the neurons
    heads: int | None = None  # attention heads, when the neurons read as [heads, d_head]
    canonical: bool = False  # named by an adapter (not a bare module path)
    layer_output: bool = False  # the output of a whole layer (what layer-wise analyses compare)
    aliases: tuple[str, ...] = ()
    derived: str | None = None  # computed from the module's tensor (hookpoints.derived): "ln_normalized", ...
    eps: float | None = None  # the norm's epsilon, for derived norm values
    # Filled in by the shape probe:
    width: int | None = None
    neuron_axis: int | None = None
    time_axis: int | None = None
    space: str | None = None
    keys: int | None = None  # attention maps: key positions a row holds (the key space's longest length)
    key_space: str | None = None  # attention maps: the positions the keys index
    order: int = -1  # when the tensor appears in a forward pass (nnsight needs requests in this order)
    unavailable: str | None = None

    def __post_init__(self) -> None:
        if self.layer is not None and not isinstance(self.layer, LayerIndex):
            object.__setattr__(self, "layer", LayerIndex(self.layer))

    @property
    def shape(self) -> tuple[int, ...]:
        """The neurons' own shape: ``(heads, d_head)`` for attention projections, else ``(width,)``."""
        if self.heads and self.width and self.width % self.heads == 0:
            return (self.heads, self.width // self.heads)
        return (self.width or 0,)

    def row(self) -> dict:
        """The hook point as a row of the store's ``hooks`` table."""
        return {
            "hook": self.name,
            "module": self.module,
            "io": self.io,
            "component": self.component,
            "layer": self.layer,
            "submodule": self.submodule,
            "width": self.width,
            "shape": list(self.shape),
            "neuron_axis": self.neuron_axis,
            "space": self.space,
            "layer_output": self.layer_output,
        }

    def to_dict(self) -> dict:
        return asdict(self)


def module_alias(module: str, io: str) -> str:
    """The bare module path that also names a hook point: ``module``, or ``module:input`` for its input."""
    return module if io == "output" else module + INPUT_SUFFIX


def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


class HookNames:
    """Names and aliases of hook points, and the one rule that selects them by name or glob.

    Used on a model's hook points (:class:`HookPointSet`) and on the hooks a store holds
    (``hookpoints.analyses.hooks``), so ``--hooks`` picks the same hooks in ``record`` and in every analysis.
    A pattern without ``*?[`` is a name or an alias; a glob matches names and aliases, and ``module:input``
    names only match globs that ask for inputs (``*:input``).

    Example::

        names = HookNames([("blocks.0.hook_resid_post", ("transformer.h.0",))])
        names.match("transformer.h.*")   # ['blocks.0.hook_resid_post']
    """

    def __init__(self, entries: Iterable[tuple[str, Iterable[str]]]):
        self._names: dict[str, str] = {}  # every name and alias -> canonical name
        for canonical, aliases in entries:
            for name in (canonical, *aliases):
                self._names.setdefault(name, canonical)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def canonical(self, name: str) -> str | None:
        """The canonical name ``name`` stands for (itself, or the hook it is an alias of), or None."""
        return self._names.get(name)

    def aliases(self) -> list[str]:
        return [name for name, canonical in self._names.items() if name != canonical]

    def match(self, pattern: str) -> list[str]:
        """Canonical names ``pattern`` selects, each once, in the order they were given."""
        if not is_glob(pattern):
            return [self._names[pattern]] if pattern in self._names else []
        inputs = INPUT_SUFFIX in pattern
        chosen = {
            canonical: None
            for name, canonical in self._names.items()
            if (INPUT_SUFFIX in name) == inputs and fnmatch.fnmatchcase(name, pattern)
        }
        return list(chosen)


class HookPointSet:
    """All hook points of a model: look-up by name or alias, and selection by glob.

    >>> [p.name for p in model.hook_points.select(["blocks.*.hook_resid_post"])]
    ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
    """

    def __init__(self, points: Iterable[HookPoint]):
        self._points: dict[str, HookPoint] = {}
        for point in sorted(points, key=lambda p: (p.order < 0, p.order, p.name)):
            self._points[point.name] = point
        self.names = HookNames((p.name, p.aliases) for p in self._points.values())

    def __iter__(self) -> Iterator[HookPoint]:
        return iter(self._points.values())

    def __len__(self) -> int:
        return len(self._points)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def listed(self) -> list[HookPoint]:
        """What ``hookpoints hooks`` shows by default: the canonical names that run on the model's input (not an
        audio LLM's audio tower on text), or every module output if there are none."""
        canonical = [p for p in self if p.canonical and p.unavailable is None]
        return canonical or [p for p in self if p.unavailable is None and INPUT_SUFFIX not in p.name]

    def get(self, name: str) -> HookPoint:
        """The hook point called ``name`` (a canonical name, an alias or a module path)."""
        if not isinstance(name, str):
            raise UserError(f"a hook point name is a string, not {type(name).__name__} ({name!r:.60})")
        canonical = self.names.canonical(name)
        if canonical is not None:
            return self._points[canonical]
        raise UserError(f"no hook point is called {name!r}; {self._closest(name)}")

    def select(self, patterns: Iterable[str]) -> list[HookPoint]:
        """The recordable hook points matching any of the glob ``patterns``, in execution order."""
        chosen: dict[str, HookPoint] = {}
        for pattern in patterns:
            if not is_glob(pattern):
                point = self.get(pattern)
                if point.unavailable:
                    raise UserError(f"hook point {pattern!r} cannot be recorded: {point.unavailable}")
                chosen[point.name] = point
                continue
            matches = [self._points[canonical] for canonical in self.names.match(pattern)]
            if is_glob(pattern) and not any(hook in pattern for hook in MAP_HOOKS):
                # attention maps (big: a row of [head, key_pos] per query position) only when a pattern names them
                matches = [point for point in matches if point.key_space is None]
            usable = [point for point in matches if point.unavailable is None]
            if not usable:
                reason = f" ({matches[0].unavailable})" if matches else ""
                raise UserError(
                    f"hook pattern {pattern!r} matches no recordable hook point{reason}; {self._closest(pattern)}"
                )
            chosen.update((point.name, point) for point in usable)
        return sorted(chosen.values(), key=lambda p: p.order)

    def _closest(self, name: str) -> str:
        names = [p.name for p in self.listed()] + self.names.aliases()
        close = closest_names(name, names, cutoff=0.5)
        hint = ""
        if name.startswith(TL_PREFIXES) and not any(p.name.startswith(TL_PREFIXES) for p in self._points.values()):
            listed = self.listed()
            examples = [p.name for p in listed if p.layer_output or (p.layer == 0 and not p.submodule)]
            hint = "this model has no TransformerLens names in hookpoints (they name GPT-2, LLaMA-layout LMs and BERT)"
            hint += f"; its names look like {(examples or names)[0]}; " if examples or names else "; "
        if not close:
            return hint + "run `hookpoints hooks MODEL` to list the names"
        return hint + "closest: " + ", ".join(close)


def closest_names(name: str, names: Iterable[str], *, count: int = 5, cutoff: float = 0.6) -> list[str]:
    """The ``names`` nearest a misspelt name or glob (its ``*`` read as a layer number, ``?`` as a letter).

    >>> closest_names("blocks.*.hook_resid_pots", ["blocks.0.hook_resid_post", "blocks.0.attn.hook_q"])
    ['blocks.0.hook_resid_post']
    """
    probe = name.replace("*", "0").replace("?", "x")
    return difflib.get_close_matches(probe, list(names), n=count, cutoff=cutoff)
