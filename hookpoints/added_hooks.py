"""Hooks that stay on a HookedModel across calls: TransformerLens' ``add_hook``, ``reset_hooks`` and ``hooks()``.

An added hook is kept as data (its hook point and function), not as a torch hook on the module: the notebook
methods (``model(...)``, ``run_with_cache``, ``run_with_hooks``, ``run_with_edits``, ``generate``) apply the added
hooks first, then their own, as TransformerLens runs a HookPoint's hooks in the order they were added. Recording
into a store and the intervention sweep refuse to run while forward hooks are added
(:meth:`AddedHooks.check_no_added_hooks`): their rows would hold edited activations under the plain run's name.
Backward hooks (``dir="bwd"``, hookpoints.backward) run in the backward pass of a forward pass made with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hookpoints.errors import UserError
from hookpoints.hook_fns import HookFn, resolve_hooks, user_hook
from hookpoints.points import HookPoint


@dataclass(frozen=True)
class AddedHook:
    """One hook function on one hook point; ``level`` is the ``hooks()`` block that added it (None: ``add_hook``);
    ``direction`` "fwd" or "bwd"."""

    point: HookPoint
    fn: HookFn
    level: int | None = None
    direction: str = "fwd"


class AddedHooks:
    """Mixed into :class:`~hookpoints.model.HookedModel` (through ModelApi): hooks that apply to every later call.

    >>> model.add_hook("blocks.0.mlp.hook_post", hp.ablate([3]))  # doctest: +SKIP
    >>> ablated = model("The cat sat")  # logits with neuron 3 ablated  # doctest: +SKIP
    >>> model.reset_hooks()  # doctest: +SKIP
    """

    @property
    def _hook_entries(self) -> list[AddedHook]:
        return self.__dict__.setdefault("_added_hook_entries", [])

    def add_hook(self, name, hook: HookFn, dir: str = "fwd") -> None:  # noqa: A002 - TransformerLens' name
        """Add ``hook`` (``fn(tensor, hook)``, as in ``fwd_hooks``) at hook ``name`` (a name, glob or predicate of
        the name) for every later forward pass, until :meth:`reset_hooks`, as TransformerLens' ``add_hook``.
        ``dir="bwd"``: ``fn(grad, hook)`` runs in the backward pass of every later forward pass (which then
        keeps a graph while autograd is on) and may return a replacement gradient (hookpoints.backward).

        >>> model.add_hook("blocks.*.hook_resid_post", hp.steer(direction, 4.0))  # doctest: +SKIP
        """
        self._add([(name, hook)], None, "add_hook", dir)

    def reset_hooks(self) -> None:
        """Remove every added hook (:meth:`add_hook`, and ``hooks()`` blocks' own), as TransformerLens' ``reset_hooks``.

        >>> model.reset_hooks()  # doctest: +SKIP
        """
        self._hook_entries.clear()

    @contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), *, reset_hooks_end: bool = True) -> Iterator:
        """Add ``fwd_hooks`` and ``bwd_hooks`` (``[(name or glob, fn)]``) for the block; at its end (an exception
        too) they are removed, and hooks added with :meth:`add_hook` meanwhile stay (TransformerLens' ``hooks()``).

        >>> with model.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", hp.ablate([3]))]):  # doctest: +SKIP
        ...     loss = model(texts, return_type="loss")
        """
        level = self.__dict__.get("_added_hook_level", 0) + 1
        self.__dict__["_added_hook_level"] = level
        try:
            self._add(fwd_hooks, level, "hooks()")
            self._add(bwd_hooks, level, "hooks()", "bwd")
            yield self
        finally:
            if reset_hooks_end:
                self._hook_entries[:] = [entry for entry in self._hook_entries if entry.level != level]
            self.__dict__["_added_hook_level"] = level - 1

    def check_no_added_hooks(self, action: str = "recording") -> None:
        """A UserError while forward hooks are added: recording would store edited activations as the model's own
        (backward hooks change no activation).

        >>> model.check_no_added_hooks()  # doctest: +SKIP
        """
        count = len(self._added_resolved())
        if count:
            plural = "s" if count != 1 else ""
            raise UserError(
                f"the model has {count} hook{plural} added (add_hook/hooks()): reset_hooks() before {action}"
            )

    def _add(self, fwd_hooks, level: int | None, caller: str, direction: str = "fwd") -> None:
        if direction not in ("fwd", "bwd"):
            raise UserError(f"{caller}: dir must be 'fwd' or 'bwd', not {direction!r:.40}")
        if not isinstance(fwd_hooks, (list, tuple)):
            raise UserError(f"{caller}: {direction}_hooks must be a list of (hook name or glob, function) pairs")
        for item in fwd_hooks:
            if isinstance(item, (list, tuple)) and len(item) == 2 and not callable(item[1]):
                raise UserError(
                    f"{caller}: the hook of {item[0]!r} must be a function fn(tensor, hook), not {item[1]!r:.60}"
                )
        resolved = resolve_hooks(self, list(fwd_hooks))  # every name checked before any is added
        if direction == "bwd":
            from hookpoints.backward import check_backward_points

            check_backward_points([point for point, _ in resolved], caller)
        self._hook_entries.extend(AddedHook(point, fn, level, direction) for point, fn in resolved)

    def _added_resolved(self, direction: str = "fwd") -> list[tuple[HookPoint, HookFn]]:
        """The added forward (or backward) hooks as ``(hook point, fn)``, in the order they were added."""
        return [(entry.point, entry.fn) for entry in self._hook_entries if entry.direction == direction]

    def _added_changes(self, batch: int) -> list:
        """The added hooks as changes of their modules' tensors (:func:`hookpoints.hook_fns.hooked`)."""
        return [(point, user_hook(point, fn, batch)) for point, fn in self._added_resolved()]
