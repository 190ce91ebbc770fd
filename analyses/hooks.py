"""The hook points a run holds (its rows of the store's ``hooks`` table), and picking them with ``--hooks``.

A :class:`StoredHook` is a :class:`hookpoints.points.HookPoint` as the recorder wrote it (``HookPoint.row()``):
every analysis reads hooks through :func:`run_hooks` and selects them with :func:`select_hooks`, which uses the
same rule as the model (:class:`hookpoints.points.HookNames`): a name or a glob over the canonical names and
their aliases (the bare module path, ``module:input`` for an input hook), where ``:input`` names only match
globs that ask for inputs. The aliases of a stored hook are rebuilt from its ``module`` and ``io`` columns,
exactly as the adapter made them; a module split into several hook points (fused projections) has none.

Example::

    with store.query() as session:
        hooks = select_hooks(run_hooks(session, "r"), ["transformer.h.*.mlp"], "of run 'r'")
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hookpoints.analyses.arguments import name_list
from hookpoints.store.query import QuerySession

from hookpoints.errors import UserError
from hookpoints.points import DERIVED_SUFFIXES, INPUT_SUFFIX, HookNames, closest_names, module_alias

COLUMNS = "hook, module, io, component, layer, submodule, width, space, layer_output"


@dataclass(frozen=True)
class StoredHook:
    """One hook point of a run: where its neurons sit in the model, and whether it has positions."""

    hook: str
    component: str  # module group (speech_encoder, text_encoder, text_decoder, ...); "other" if unknown
    layer: int | None
    submodule: str  # the hook's own name when it has none; ``...:input`` for a module's input (cell_submodule)
    width: int
    space: str | None  # input | encoder | decoder: the positions it has; None: one vector per example
    layer_output: bool  # the output of a whole layer (what layer-wise analyses compare)
    order: int  # position in the run's hooks table (execution order when recorded)
    module: str | None = None
    io: str = "output"

    @property
    def positional(self) -> bool:
        """The hook has positions (a token or frame axis), so pooling applies."""
        return self.space is not None

    @classmethod
    def from_row(cls, row: dict, order: int) -> StoredHook:
        return cls(
            row["hook"],
            row["component"] or "other",
            row["layer"],
            cell_submodule(row["submodule"], row["hook"]),
            int(row["width"]),
            row["space"],
            bool(row["layer_output"]),
            order,
            row.get("module"),
            row.get("io") or "output",
        )


def cell_submodule(submodule: str | None, hook: str) -> str:
    """The submodule a hook's neurons count under in a layer (the paper's cell, section 5.2: layer l x
    submodule m, m one hooked activation): ``mlp.act:input`` for the input hook ``transformer.h.0.mlp.act:input``.

    A module's input and output hooks both had the module's path as their submodule (``mlp.act``), so their
    selected neurons were summed as one cell of the selection Gini and stacked as one bar of the figures.

    >>> cell_submodule("mlp.act", "transformer.h.0.mlp.act:input"), cell_submodule(None, "lm_head")
    ('mlp.act:input', 'lm_head')
    """
    if not submodule:
        return hook
    if hook.endswith(INPUT_SUFFIX) and not submodule.endswith(INPUT_SUFFIX):
        return submodule + INPUT_SUFFIX
    return submodule


def run_hooks(session: QuerySession, run: str) -> list[StoredHook]:
    """The run's hook points in the order they were recorded."""
    rows = session.sql(f"SELECT {COLUMNS} FROM hooks WHERE run = $run", {"run": run}).to_pylist()
    return [StoredHook.from_row(row, order) for order, row in enumerate(rows)]


def hook_names(hooks: list[StoredHook]) -> HookNames:
    """Names and aliases of stored hooks (module-path aliases only where one hook has that module and io)."""
    # derived points (a norm's hook_normalized / hook_scale, computed from its input) never take the module's alias
    derived = {h.hook for h in hooks if h.hook.endswith(DERIVED_SUFFIXES)}
    shared = Counter((h.module, h.io) for h in hooks if h.hook not in derived)
    return HookNames(
        (h.hook, (module_alias(h.module, h.io),) if h.module and h.hook not in derived and shared[h.module, h.io] == 1
         else ())
        for h in hooks
    )  # fmt: skip


def select_hooks(hooks: list[StoredHook], patterns: list[str], owner: str) -> list[StoredHook]:
    """The hooks any of ``patterns`` selects, in their order; a pattern that selects none is a UserError.

    ``owner`` finishes the error message ("of run 'r'", "the run(s) share").

    >>> with store.query() as session:  # doctest: +SKIP
    ...     chosen = select_hooks(run_hooks(session, "r1"), ["blocks.*.hook_resid_post"], "of run 'r1'")
    """
    patterns = name_list(patterns, "hook patterns")  # None or 5 was a TypeError, a string read letter by letter
    names = hook_names(hooks)
    chosen: set[str] = set()
    for pattern in patterns:
        matched = names.match(pattern)
        if not matched:
            listed = sorted(h.hook for h in hooks)
            close = closest_names(pattern, listed)  # a typo
            shown = f"closest: {', '.join(close)}" if close else f"it has {', '.join(listed[:8])}"
            raise UserError(
                f"--hooks {pattern} matches no hook point {owner}; {shown}"
                f"{' ...' if len(listed) > 8 and not close else ''} (globs match names and module paths; "
                "input hooks only match globs ending in :input)"
            )
        chosen.update(matched)
    return [h for h in hooks if h.hook in chosen]
