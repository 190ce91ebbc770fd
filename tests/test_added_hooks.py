"""Hooks added with ``model.add_hook`` / ``model.hooks()`` against TransformerLens 3.9's (the same functions on
the same tiny GPT-2, every parameter random) and against plain torch hooks on the HF modules; their removal;
generation under them; and recording's refusal while they are held."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_transformerlens_names import TEXT

import hookpoints as hp
from analyses.intervention_sweep import run_sweep
from hookpoints.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # HookedTransformer is deprecated in 3.x

TEXTS = [TEXT, "a calm river"]
Z, POST, RESID = "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post", "blocks.0.hook_resid_post"


def triple_head_1(z, hook):  # in place, returns None: [batch, pos, head, d_head] in both libraries
    z[:, :, 1] *= 3


def shift_post(x, hook):  # a new tensor
    return x + 0.5


def double(x, hook):
    return x * 2


def plus_ramp(x, hook):  # not a constant, which the next LayerNorm would take out again
    return x + torch.linspace(0, 1, x.shape[-1])


@pytest.fixture(autouse=True)
def no_hooks_left(pair):
    model, peer = pair
    model.reset_hooks()
    peer.reset_hooks()
    yield
    model.reset_hooks()
    peer.reset_hooks()


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=5e-5, rtol=5e-5)


def test_add_hook_equals_transformerlens_add_hook(pair):
    model, peer = pair
    names = [Z, POST, "blocks.1.hook_resid_post"]
    with torch.no_grad():
        plain = peer(TEXT)
        for library in (model, peer):
            library.add_hook(Z, triple_head_1)
            library.add_hook(POST, shift_post)
        logits = peer(TEXT)
        _, cache = peer.run_with_cache(TEXT, names_filter=names)
    assert not torch.allclose(logits, plain, atol=1e-3)  # the hooks change the output
    close(model(TEXT), logits)
    output, got = model.run_with_cache(TEXT, names=names)
    close(output.logits, logits)
    for name in names:  # the hooked points cached after their hooks, as TransformerLens caches them
        close(got[name], cache[name])
    model.reset_hooks()
    close(model(TEXT), plain)


def test_run_with_hooks_runs_its_hooks_after_the_added_ones(pair):
    model, peer = pair
    with torch.no_grad():
        peer.add_hook(RESID, double)
        expected = peer.run_with_hooks(TEXT, fwd_hooks=[(RESID, plus_ramp)])  # 2x + ramp, not 2(x + ramp)
        peer.reset_hooks()
        other_order = peer.run_with_hooks(TEXT, fwd_hooks=[(RESID, plus_ramp), (RESID, double)])
    assert not torch.allclose(expected, other_order, atol=1e-3)
    model.add_hook(RESID, double)
    close(model.run_with_hooks(TEXT, fwd_hooks=[(RESID, plus_ramp)]).logits, expected)
    # a neuron edit comes after the added hook too: neuron 3 set to 0.25 whatever the doubling made
    edit = model.edit(RESID, [3], [0.25])

    def set_neuron_3(x, hook):
        x[..., 3] = 0.25

    with torch.no_grad():
        peer.add_hook(RESID, double)
        expected = peer.run_with_hooks(TEXT, fwd_hooks=[(RESID, set_neuron_3)])
    close(model.run_with_edits(TEXT, [edit]).logits, expected)


def test_added_hook_equals_a_torch_hook_on_the_hf_module(pair):
    """Neurons 3 and 7 of block 1's MLP activation ablated: the output of module ``transformer.h.1.mlp.act``."""
    model, _ = pair
    inputs = model.inputs(TEXTS)

    def zero(module, args, output):
        output = output.clone()
        output[..., [3, 7]] = 0.0
        return output

    handle = model.model.transformer.h[1].mlp.act.register_forward_hook(zero)
    try:
        with torch.no_grad():
            expected = model.model(**inputs.kwargs).logits
    finally:
        handle.remove()
    model.add_hook(POST, hp.ablate([3, 7]))
    close(model(TEXTS), expected)
    _, cache = model.run_with_cache(TEXTS, names=POST)
    assert not cache[POST][..., [3, 7]].any()  # cached after the ablation


def test_cache_with_a_hook_that_changes_nothing_equals_the_plain_cache(pair):
    """With hooks added, run_with_cache reads through torch hooks instead of nnsight: the same tensors, derived
    norm points and attention maps included."""
    model, _ = pair
    names = ["hook_embed", "hook_pos_embed", "blocks.*", "ln_final.*", "blocks.1.attn.hook_pattern"]
    plain_output, plain = model.run_with_cache(TEXTS, names=names)
    model.add_hook("hook_embed", lambda x, hook: None)
    output, got = model.run_with_cache(TEXTS, names=names)
    assert set(got) == set(plain) and len(got) > 20
    close(output.logits, plain_output.logits)
    for name in plain:
        close(got[name], plain[name])
    assert torch.equal(got.mask, plain.mask)


def test_hooks_context_matches_transformerlens_and_is_removed_even_on_an_exception(pair):
    model, peer = pair
    hooks = [(Z, triple_head_1), (lambda name: name.endswith("hook_resid_post"), shift_post)]  # a name filter
    with torch.no_grad():
        plain = peer(TEXT)
        with peer.hooks(fwd_hooks=hooks):
            expected = peer(TEXT, return_type="loss")
            peer.add_hook(POST, shift_post)  # added inside the block: stays after it, as add_hook's do
        kept = peer(TEXT)
    with model.hooks(fwd_hooks=hooks) as same:
        assert same is model
        close(model(TEXT, return_type="loss"), expected)
        model.add_hook(POST, shift_post)
    close(model(TEXT), kept)
    model.reset_hooks()
    with pytest.raises(RuntimeError, match="inside"):
        with model.hooks(fwd_hooks=hooks):
            raise RuntimeError("inside the block")
    close(model(TEXT), plain)
    with model.hooks(fwd_hooks=hooks, reset_hooks_end=False):
        pass
    assert not torch.allclose(model(TEXT), plain, atol=1e-3)  # kept, until reset_hooks
    model.reset_hooks()
    close(model(TEXT), plain)


def test_generate_under_hooks_equals_generate_with_fwd_hooks(pair):
    model, _ = pair
    steering = [(RESID, hp.steer(torch.linspace(-3, 3, model.model.config.n_embd), 2.0))]
    plain = model.generate(TEXTS, max_new_tokens=6)
    given = model.generate(TEXTS, max_new_tokens=6, fwd_hooks=steering)
    with model.hooks(fwd_hooks=steering):
        held = model.generate(TEXTS, max_new_tokens=6)
    assert torch.equal(held.sequences, given.sequences)
    assert not torch.equal(held.sequences, plain.sequences)
    assert torch.equal(model.generate(TEXTS, max_new_tokens=6).sequences, plain.sequences)  # removed


def test_recording_refuses_while_hooks_are_added(pair, tmp_path):
    model, _ = pair
    model.add_hook(RESID, double)
    message = r"^the model has 1 hook added \(add_hook/hooks\(\)\): reset_hooks\(\) before"
    rows = [{"id": "a", "text": TEXT}]
    with pytest.raises(UserError, match=message + " recording$"):
        hp.record(model, rows, tmp_path / "store", run="r1", hooks=RESID, progress=False)
    assert not (tmp_path / "store").exists()  # refused before a store was made
    inputs, points = model.inputs(TEXTS), model.select([RESID])
    with pytest.raises(UserError, match=message + " recording$"):
        model.pooled(inputs, points, "mean")
    with pytest.raises(UserError, match=message + " recording$"):
        model.pooled_generating(inputs, None, points, "mean", 2)
    with pytest.raises(UserError, match=message + " generate_edited"):
        model.pooled_per_step(inputs, None, points, "mean", 2)
    with pytest.raises(UserError, match=message + " generate_edited"):  # the sweep's decoding
        model.generate_edited(inputs, None, [model.edit(RESID, [3], [0.0])], 2)
    with pytest.raises(UserError, match=message + " generate with edits"):
        model.generate(inputs, max_new_tokens=2, edits=[model.edit(RESID, [3], [0.0])])
    with pytest.raises(UserError, match=message + " the sweep$"):  # before any stored row is deleted
        run_sweep(None, None, [SimpleNamespace(model=model)])
    with model.hooks(fwd_hooks=[(POST, double)]):
        with pytest.raises(UserError, match="the model has 2 hooks added"):
            model.pooled(inputs, points, "mean")
    model.reset_hooks()
    assert set(model.pooled(inputs, points, "mean")) == {RESID}


def test_bad_hooks_are_refused_in_one_line(pair):
    model, _ = pair
    with pytest.raises(UserError, match="no hook point is called 'blocks.0.hook_resid_pots'.*blocks.0.hook_resid_post"):
        model.add_hook("blocks.0.hook_resid_pots", double)
    with pytest.raises(UserError, match="matches no recordable hook point"):
        model.add_hook("blocks.*.hook_nothing", double)
    with pytest.raises(UserError, match="add_hook: the hook of 'blocks.0.hook_resid_post' must be a function"):
        model.add_hook(RESID, 3)
    with pytest.raises(UserError, match="add_hook: dir must be 'fwd' or 'bwd', not 'backward'"):
        model.add_hook(RESID, double, dir="backward")
    with pytest.raises(UserError, match="hooks\\(\\): the hook of .* must be a function"):
        with model.hooks(fwd_hooks=[(RESID, double), (POST, "ablate")]):
            pass
    with pytest.raises(UserError, match="fwd_hooks must be a list"):
        with model.hooks(fwd_hooks=RESID):
            pass
    with pytest.raises(UserError, match="no hook point is called 'blocks.0.nope'"):
        with model.hooks(fwd_hooks=[(RESID, double), ("blocks.0.nope", double)]):
            pass
    assert model._hook_entries == []  # nothing half-added
