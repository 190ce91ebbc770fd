"""Gradients at hook points (``run_with_cache(..., incl_bwd=True)``), backward hooks (``add_hook(dir="bwd")``,
``run_with_hooks(bwd_hooks=...)``, ``hooks(bwd_hooks=...)``) and ``return_type`` of run_with_cache / run_with_hooks,
against TransformerLens 3.9 on the tiny GPT-2 whose every parameter is random, and against plain torch autograd
on the HF model."""

from __future__ import annotations

import pytest
import torch
from test_transformerlens_names import TEXT

from hookpoints.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # HookedTransformer is deprecated in 3.x

TEXTS = [TEXT, "a calm river", "The weather"]
NAMES = [
    "hook_embed",
    "hook_pos_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_k",
    "blocks.0.attn.hook_v",
    "blocks.0.attn.hook_attn_scores",
    "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_z",
    "blocks.0.hook_attn_out",
    "blocks.0.hook_resid_mid",
    "blocks.1.mlp.hook_pre",
    "blocks.1.mlp.hook_post",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_resid_post",
]
#: TransformerLens 3.9's cached gradients of these disagree with its own autograd (its retain_grad on the norm's
#: output times the gain), about 0 where the true gradient is not; hookpoints' equal the HF model's autograd
#: (test_derived_norm_gradients_equal_torch_autograd), and are left out of the comparison with TransformerLens.
DERIVED = ("hook_scale", "hook_normalized")
#: TransformerLens parameter -> the HF GPT-2's (untied ones: TL's W_E is no copy of the tied unembedding)
PARAMS = {
    "pos_embed.W_pos": "transformer.wpe.weight",
    "blocks.0.ln1.w": "transformer.h.0.ln_1.weight",
    "blocks.0.mlp.W_in": "transformer.h.0.mlp.c_fc.weight",
    "blocks.1.attn.b_O": "transformer.h.1.attn.c_proj.bias",
}


@pytest.fixture(autouse=True)
def clean(pair):
    model, peer = pair
    for library in (model, peer):
        library.reset_hooks()
    model.model.zero_grad(set_to_none=True)
    peer.zero_grad(set_to_none=True)
    yield
    model.reset_hooks()
    peer.reset_hooks()


def close(actual, expected, msg=""):
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=1e-4, msg=msg)


def real(tensor: torch.Tensor, name: str, mask: torch.Tensor, i: int) -> torch.Tensor:
    """Example ``i``'s values at real positions (an attention map: real queries and keys)."""
    valid = mask[i]
    if name.removesuffix("_grad").endswith(("hook_pattern", "hook_attn_scores")):
        return tensor[i][:, valid][:, :, valid]
    return tensor[i][valid]


@pytest.mark.parametrize("inputs", [TEXT, TEXTS], ids=["one text", "padded batch"])
def test_gradients_equal_transformerlens(pair, inputs):
    """Every NAME_grad at real positions equals TransformerLens' given the same tokens and attention mask (its
    way of leaving padding out of the loss); no parameter's .grad is filled."""
    model, peer = pair
    mask = model.inputs(inputs).masks["input"]
    tokens = model.to_tokens(inputs)
    expected_loss, expected = peer.run_with_cache(
        tokens, attention_mask=mask.long(), names_filter=NAMES, incl_bwd=True, return_type="loss"
    )
    loss, cache = model.run_with_cache(inputs, names=NAMES, return_type="loss", incl_bwd=True)
    close(loss, expected_loss.detach())
    assert not loss.requires_grad
    assert set(cache) == {*NAMES, *(f"{name}_grad" for name in NAMES)} == set(expected.keys())
    for name in NAMES:
        for key in (name, f"{name}_grad"):
            assert cache[key].shape == expected[key].shape, key
            assert not cache[key].requires_grad
            for i in range(len(mask)):
                got, want = real(cache[key], key, mask, i), real(expected[key], key, mask, i)
                masked = torch.isinf(want)  # scores: TransformerLens -inf, HF the dtype's minimum (docs/gotchas.md)
                assert (got[masked] < -1e30).all()
                close(got[~masked], want[~masked], f"{key} example {i}")
        assert cache[f"{name}_grad"].abs().sum() > 0, name  # a gradient that can fail the comparison
    assert all(p.grad is None for p in model.model.parameters())  # TransformerLens fills its weights' .grad
    assert all(p.requires_grad for p in model.model.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gradients_of_rotary_and_rms_norm_models_equal_transformerlens(tiny_model_dir, tmp_path, family):
    """Rotary q/k, grouped-query keys, RMSNorm and Qwen3's per-head q/k norms in the graph: every gradient
    TransformerLens caches for one text (its norms' own hook_scale / hook_normalized aside: DERIVED)."""
    from test_transformerlens_names import NOT_GIVEN, transformerlens_model

    from hookpoints.loading import load

    model = load(tiny_model_dir(family))
    peer = transformerlens_model(family, tiny_model_dir(family), tmp_path)
    ids = model.to_tokens(TEXT)
    expected_loss, expected = peer.run_with_cache(ids, incl_bwd=True, return_type="loss")
    names = [n for n in expected.keys() if not n.startswith(NOT_GIVEN) and not n.endswith(("_grad", *DERIVED))]
    assert any(n.endswith("hook_rot_k") for n in names) and len(names) > 20
    loss, cache = model.run_with_cache(ids, names=names, return_type="loss", incl_bwd=True)
    close(loss, expected_loss.detach())
    for name in names:
        got, want = cache[f"{name}_grad"], expected[f"{name}_grad"]
        assert want.abs().sum() > 0 or name.endswith("hook_attn_scores"), name
        close(got.reshape(want.shape), want, f"{family} {name}_grad")


def test_gradients_equal_torch_autograd_on_the_hf_model(pair):
    """The HF model's own loss (labels, -100 at padding) backpropagated, gradients kept with retain_grad on the
    modules' tensors: block 0's output, block 1's MLP activation, c_proj's input (z) and ln_2's input."""
    model, _ = pair
    inputs = model.inputs(TEXTS)
    ids, mask = inputs.kwargs["input_ids"], inputs.masks["input"]
    hf = model.model
    kept = {}

    def keep(name, use_input=False):
        def hook(module, args, output):
            tensor = args[0] if use_input else (output[0] if isinstance(output, tuple) else output)
            tensor.retain_grad()
            kept[name] = tensor

        return hook

    modules = {
        "blocks.0.hook_resid_post": (hf.transformer.h[0], False),
        "blocks.1.mlp.hook_post": (hf.transformer.h[1].mlp.act, False),
        "blocks.0.attn.hook_z": (hf.transformer.h[0].attn.c_proj, True),
        "blocks.1.hook_resid_mid": (hf.transformer.h[1].ln_2, True),
    }
    handles = [module.register_forward_hook(keep(name, io)) for name, (module, io) in modules.items()]
    try:
        hf(**inputs.kwargs, labels=ids.masked_fill(~mask, -100)).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        hf.zero_grad(set_to_none=True)
    _, cache = model.run_with_cache(TEXTS, names=list(modules), return_type="loss", incl_bwd=True)
    for name, tensor in kept.items():
        close(cache[f"{name}_grad"], tensor.grad.reshape(cache[name].shape), name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_derived_norm_gradients_equal_torch_autograd(tiny_model_dir, family):
    """A norm's hook_normalized / hook_scale gradient (TransformerLens' meaning: before the gain, ``out =
    normalized * w + b``): from the HF model's autograd, the norm output's gradient ``g`` kept with retain_grad,
    ``g * w`` and ``-sum(g * w * normalized) / scale``; LayerNorm (GPT-2) and RMSNorm (LLaMA), a padded batch."""
    from hookpoints.loading import load

    model = load(tiny_model_dir(family))
    inputs = model.inputs(TEXTS)
    ids, mask = inputs.kwargs["input_ids"], inputs.masks["input"]
    hf = model.model
    norm = hf.transformer.h[1].ln_2 if family == "gpt2" else hf.model.layers[1].post_attention_layernorm
    kept = {}

    def keep(module, args, output):
        output.retain_grad()
        kept["x"], kept["out"] = args[0].detach(), output

    handle = norm.register_forward_hook(keep)
    try:
        hf(**inputs.kwargs, labels=ids.masked_fill(~mask, -100)).loss.backward()
    finally:
        handle.remove()
        hf.zero_grad(set_to_none=True)
    x, eps = kept["x"], norm.eps if family == "gpt2" else norm.variance_epsilon
    if family == "gpt2":
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    normalized_grad = kept["out"].grad * norm.weight
    scale_grad = -(normalized_grad * x / scale).sum(-1, keepdim=True) / scale
    names = ["blocks.1.ln2.hook_normalized", "blocks.1.ln2.hook_scale"]
    _, cache = model.run_with_cache(TEXTS, names=names, return_type="loss", incl_bwd=True)
    close(cache["blocks.1.ln2.hook_normalized_grad"], normalized_grad)
    close(cache["blocks.1.ln2.hook_scale_grad"], scale_grad)
    assert scale_grad.abs().sum() > 0 and normalized_grad.abs().sum() > 0


def test_gradients_with_frozen_weights_and_added_hooks(pair):
    """Frozen weights (requires_grad off) give the same gradients; an added forward hook is in the graph, an
    added backward hook replaces the gradient upstream of its point and not at it, as in TransformerLens."""
    model, peer = pair
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"]
    _, plain = model.run_with_cache(TEXT, names=names, return_type="loss", incl_bwd=True)
    model.model.requires_grad_(False)
    try:
        _, frozen = model.run_with_cache(TEXT, names=names, return_type="loss", incl_bwd=True)
    finally:
        model.model.requires_grad_(True)
    for name in names:
        close(frozen[f"{name}_grad"], plain[f"{name}_grad"], name)

    def ramp(x, hook):
        return x * torch.linspace(0.5, 2, x.shape[-1])

    def five(grad, hook):
        return grad * 5

    for library in (model, peer):
        library.add_hook("blocks.0.hook_resid_post", ramp)
        library.add_hook("blocks.0.hook_resid_post", five, dir="bwd")
    expected_loss, expected = peer.run_with_cache(TEXT, names_filter=names, incl_bwd=True, return_type="loss")
    loss, got = model.run_with_cache(TEXT, names=names, return_type="loss", incl_bwd=True)
    close(loss, expected_loss.detach())
    for name in names:
        close(got[f"{name}_grad"], expected[f"{name}_grad"], name)
    assert not torch.allclose(got["blocks.0.hook_resid_pre_grad"], plain["blocks.0.hook_resid_pre_grad"])


def scale_head_1(grad, hook):  # in place, returns None: [batch, pos, head, d_head] in both libraries
    grad[:, :, 1] *= 3


def times(factor):
    def fn(grad, hook):
        return grad * factor

    return fn


def plus_ramp(x, hook):
    return x * 2 + torch.linspace(0, 1, x.shape[-1])


SCENARIOS = {  # (forward hooks, backward hooks), the same functions in both libraries
    "scaled": ([], [("blocks.1.hook_resid_pre", times(3.0))]),
    "in place, per head": ([], [("blocks.0.attn.hook_z", scale_head_1)]),
    "one slice of a fused projection": ([], [("blocks.0.attn.hook_q", times(-2.0))]),
    "shared by the batch": ([], [("hook_pos_embed", times(4.0))]),
    "a module's input": ([], [("blocks.1.hook_resid_mid", times(0.5))]),
    "attention pattern": ([], [("blocks.0.attn.hook_pattern", times(3.0))]),
    "last one returned wins": ([], [("blocks.0.hook_resid_post", times(2.0)), ("blocks.0.hook_resid_post", times(3))]),
    "bypasses the forward hook": (
        [("blocks.0.hook_resid_post", plus_ramp)],
        [("blocks.0.hook_resid_post", lambda grad, hook: grad)],
    ),
    "a name filter": ([], [(lambda name: name.endswith("mlp.hook_post"), times(1.5))]),
}


def param_grads(library, names):
    params = dict(library.named_parameters())
    return {name: params[name].grad.clone() for name in names}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_backward_hooks_give_transformerlens_parameter_gradients(pair, scenario):
    """``run_with_hooks(..., bwd_hooks=...)``, then ``.backward()`` on its loss: every parameter gradient as
    TransformerLens' (a padded batch, its attention mask); without the hooks they differ."""
    model, peer = pair
    fwd, bwd = SCENARIOS[scenario]
    tokens, mask = model.to_tokens(TEXTS), model.inputs(TEXTS).masks["input"].long()
    peer.run_with_hooks(tokens, attention_mask=mask, return_type="loss", fwd_hooks=fwd).backward()
    unhooked = param_grads(peer, PARAMS)
    peer.zero_grad(set_to_none=True)
    peer.run_with_hooks(tokens, attention_mask=mask, return_type="loss", fwd_hooks=fwd, bwd_hooks=bwd).backward()
    expected = param_grads(peer, PARAMS)
    assert any(not torch.allclose(expected[n], unhooked[n]) for n in PARAMS), "the backward hooks change nothing"
    loss = model.run_with_hooks(TEXTS, fwd_hooks=fwd, bwd_hooks=bwd, return_type="loss")
    loss.backward()
    got = param_grads(model.model, PARAMS.values())
    for tl_name, hf_name in PARAMS.items():  # the same layout in both (GPT-2's Conv1D weight is [in, out])
        close(got[hf_name], expected[tl_name], f"{scenario}: {tl_name}")


def test_added_and_block_backward_hooks_run_in_later_passes(pair):
    """``add_hook(dir="bwd")`` and ``hooks(bwd_hooks=...)`` hold for later passes (``model(...)`` keeps a graph
    while they are added); they run in the backward of a pass made with them, even after ``reset_hooks()``
    (TransformerLens' too, despite its warning); ``reset_hooks_end=False`` keeps a call's hooks added."""
    model, peer = pair
    seen = []

    def record(grad, hook):
        seen.append(hook.name)

    assert not model(TEXT, return_type="loss").requires_grad  # no backward hooks: no graph, as before
    model.add_hook("blocks.*.hook_resid_post", record, dir="bwd")
    loss = model(TEXT, return_type="loss")
    model.reset_hooks()
    loss.backward()
    assert seen == ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]  # backward order
    model.check_no_added_hooks()  # backward hooks change no activation: recording is not refused
    seen.clear()
    with model.hooks(bwd_hooks=[("blocks.0.mlp.hook_post", record)]):
        model(TEXT, return_type="loss").backward()
    assert seen == ["blocks.0.mlp.hook_post"]
    model.run_with_hooks(TEXT, bwd_hooks=[("blocks.0.hook_mlp_out", record)], reset_hooks_end=False)
    assert len(model._hook_entries) == 1
    seen.clear()
    model(TEXT, return_type="loss").backward()
    assert seen == ["blocks.0.hook_mlp_out"]
    with torch.no_grad():  # autograd off: no graph, as TransformerLens'
        assert not model(TEXT, return_type="loss").requires_grad


def test_return_type_of_run_with_cache_and_run_with_hooks(pair):
    model, peer = pair
    with torch.no_grad():
        logits, expected_cache = peer.run_with_cache(TEXT, names_filter=["blocks.0.hook_resid_post"])
        loss = peer(TEXT, return_type="loss")
    output, cache = model.run_with_cache(TEXT, names="blocks.0.hook_resid_post")  # default: the HF output
    close(output.logits, logits)
    close(cache["blocks.0.hook_resid_post"], expected_cache["blocks.0.hook_resid_post"])
    close(model.run_with_cache(TEXT, names="blocks.0.hook_resid_post", return_type="logits")[0], logits)
    close(model.run_with_cache(TEXT, names="blocks.0.hook_resid_post", return_type="loss")[0], loss)
    both, _ = model.run_with_cache(TEXT, names="blocks.0.hook_resid_post", return_type="both")
    close(both.logits, logits)
    close(both.loss, loss)
    assert model.run_with_cache(TEXT, names="blocks.0.hook_resid_post", return_type=None)[0] is None
    close(model.run_with_hooks(TEXT).logits, logits)
    close(model.run_with_hooks(TEXT, return_type="logits"), logits)
    close(model.run_with_hooks(TEXT, return_type="loss"), loss)
    assert model.run_with_hooks(TEXT, return_type=None) is None


def test_bad_gradient_requests_are_one_line_user_errors(pair):
    model, _ = pair
    for return_type in ("logits", "both", None, "output"):
        with pytest.raises(UserError, match="^incl_bwd backpropagates the output, which must be a scalar"):
            model.run_with_cache(TEXT, names="blocks.0.hook_resid_post", incl_bwd=True, return_type=return_type)
    with pytest.raises(UserError, match="^return_type must be 'output' .*, not 'probs'"):
        model.run_with_cache(TEXT, names="blocks.0.hook_resid_post", return_type="probs")
    with pytest.raises(UserError, match="^return_type must be 'output'"):
        model.run_with_hooks(TEXT, return_type="tokens")
    with pytest.raises(UserError, match="no hook point is called 'blocks.0.hook_resid_pots'"):
        model.run_with_hooks(TEXT, bwd_hooks=[("blocks.0.hook_resid_pots", times(2))])
    with pytest.raises(UserError, match="no hook point is called 'blocks.0.hook_resid_pots'"):
        model.add_hook("blocks.0.hook_resid_pots", times(2), dir="bwd")
    with pytest.raises(UserError, match="^add_hook: dir must be 'fwd' or 'bwd', not 'both'$"):
        model.add_hook("blocks.0.hook_resid_post", times(2), dir="both")
    derived = "^{}: blocks.0.ln1.hook_scale is computed from transformer.h.0.ln_1:input, not a tensor of the model's "
    derived += "forward pass, so a backward hook cannot replace its gradient; hook transformer.h.0.ln_1:input or"
    with pytest.raises(UserError, match=derived.format("add_hook")):
        model.add_hook("blocks.0.ln1.hook_scale", times(2), dir="bwd")
    with pytest.raises(UserError, match=derived.format("run_with_hooks")):
        model.run_with_hooks(TEXT, bwd_hooks=[("blocks.0.ln1.hook_scale", times(2))])
    with pytest.raises(UserError, match="bwd_hooks must be a list"):
        model.run_with_hooks(TEXT, bwd_hooks="blocks.0.hook_resid_post")
    assert model._hook_entries == []
    loss = model.run_with_hooks(TEXT, bwd_hooks=[("blocks.0.hook_resid_post", lambda g, h: g[0])], return_type="loss")
    with pytest.raises(UserError, match=r"^backward hook for blocks.0.hook_resid_post returned \[\d+, 64\]; return"):
        loss.backward()


def test_incl_bwd_under_a_notebooks_no_grad(pair):
    """TransformerLens notebooks start with ``torch.set_grad_enabled(False)``: ``incl_bwd`` still backpropagates
    (the loss is computed with autograd on), the same gradients, and the caller's grad mode is left as it was;
    under ``torch.inference_mode()`` no graph can be made, which is one line."""
    model, _ = pair
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]
    expected_loss, expected = model.run_with_cache(TEXTS, names=names, return_type="loss", incl_bwd=True)
    for off in (torch.no_grad, lambda: torch.set_grad_enabled(False)):
        with off():
            loss, cache = model.run_with_cache(TEXTS, names=names, return_type="loss", incl_bwd=True)
            assert not torch.is_grad_enabled()
        close(loss, expected_loss)
        for name in names:
            close(cache[f"{name}_grad"], expected[f"{name}_grad"], name)
    assert torch.is_grad_enabled()
    with torch.inference_mode():
        with pytest.raises(
            UserError, match=r"^incl_bwd needs autograd: call run_with_cache outside torch.inference_mode\(\)$"
        ):
            model.run_with_cache(TEXT, names=names, return_type="loss", incl_bwd=True)
