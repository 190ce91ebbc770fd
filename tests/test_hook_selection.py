"""One hook-selection rule (hookpoints.points.HookNames) on a model's hook points and on the hooks a store holds:
names, aliases (bare module paths) and ``:input`` hooks select the same hooks in ``record`` and in the analyses."""

from __future__ import annotations

import pytest
from hookpoints.analyses.examples import open_runs
from hookpoints.analyses.hook_matrix import shared_hooks
from hookpoints.analyses.hooks import run_hooks, select_hooks
from hookpoints.analyses.layers import layer_hooks

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.manifest import read_manifest
from hookpoints.points import HookNames
from hookpoints.recorder import record

PATTERNS = [
    ["transformer.h.1.mlp.c_proj:input"],  # an alias of an input hook, by name
    ["transformer.h.*.mlp.c_proj:input"],  # aliases of input hooks, by glob
    ["*:input"],  # every input hook (and only those)
    ["transformer.h.*"],  # module-path aliases of outputs: never an input hook
    ["blocks.*.hook_resid_post"],  # canonical names
    ["blocks.0.attn.hook_q", "transformer.h.0.ln_1"],  # a slice of a fused projection; an alias of a layer norm
    ["blocks.1.*", "*.c_fc:input"],
]


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory):
    from hookpoints.store.catalog import Store

    folder = tmp_path_factory.mktemp("selection")
    (folder / "m.jsonl").write_text('{"id": "a", "text": "one two"}\n{"id": "b", "text": "three"}\n')
    model = load(tiny_model_dir("gpt2"))
    store = Store.open(str(folder / "store"), create=True)
    record(model, read_manifest(folder / "m.jsonl"), store, "r", hooks=["blocks.*", "*:input", "transformer.h.*"])
    return model, store


@pytest.mark.parametrize("patterns", PATTERNS, ids=lambda p: " ".join(p))
def test_model_and_store_select_the_same_hooks(recorded, patterns):
    model, store = recorded
    with store.query() as session:
        hooks = run_hooks(session, "r")
        stored = {h.hook for h in hooks}
        from_store = [h.hook for h in select_hooks(hooks, patterns, "of run 'r'")]
        group = open_runs(session, ["r"])
        from_ranking = [h.hook for h in shared_hooks(session, group.runs, patterns=patterns)]
        from_layers = {h.hook for h in layer_hooks(session, "r", patterns)}
    from_model = [p.name for p in model.select(patterns) if p.name in stored]
    assert from_model and sorted(from_store) == sorted(from_model)
    assert from_ranking == from_store and from_layers == set(from_store)


def test_aliases_pick_canonical_names_and_input_hooks_stay_apart(recorded):
    model, store = recorded
    with store.query() as session:
        hooks = run_hooks(session, "r")
    assert [h.hook for h in select_hooks(hooks, ["transformer.h.1.mlp.c_proj:input"], "")] == ["blocks.1.mlp.hook_post"]
    outputs = {h.hook for h in select_hooks(hooks, ["transformer.h.*"], "")}
    inputs = {h.hook for h in select_hooks(hooks, ["*:input"], "")}
    assert outputs and inputs and not outputs & inputs
    assert all(h.io == "input" for h in hooks if h.hook in inputs)
    assert all(h.io == "output" for h in hooks if h.hook in outputs)
    # the fused q/k/v slices share one module: no module-path alias names one of them
    assert "blocks.0.attn.hook_q" not in {h.hook for h in select_hooks(hooks, ["transformer.h.0.attn.c_attn"], "")}


def test_a_pattern_selecting_nothing_is_a_user_error(recorded):
    _, store = recorded
    with store.query() as session:
        hooks = run_hooks(session, "r")
        with pytest.raises(UserError, match="--hooks nothing.\\* matches no hook point of run 'r'"):
            select_hooks(hooks, ["blocks.0.hook_resid_post", "nothing.*"], "of run 'r'")
        with pytest.raises(UserError, match="matches no hook point the run\\(s\\) share"):
            shared_hooks(session, ("r",), patterns=["transformer.h.9.*"])
        with pytest.raises(UserError, match="closest: blocks.0.hook_resid_post"):  # a typo names what was meant
            select_hooks(hooks, ["blocks.*.hook_resid_pots"], "of run 'r'")


def test_hook_names_rule():
    names = HookNames([("a.hook", ("m.a",)), ("a.in", ("m.a:input",)), ("b.hook", ())])
    assert names.match("m.*") == ["a.hook"]
    assert names.match("m.*:input") == ["a.in"]
    assert names.match("*") == ["a.hook", "a.in", "b.hook"]  # canonical names carry no :input
    assert names.match("*:input") == ["a.in"]  # a module path's :input alias only for globs that ask for it
    assert names.match("m.a:input") == ["a.in"] and names.match("nothing") == []
