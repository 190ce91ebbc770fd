"""The TransformerLens-style methods of a HookedModel (``run_with_cache``, ``run_with_hooks``, ...).

Kept apart from hookpoints.model so the model class stays small; the work is done in hookpoints.cache
(activations by name) and hookpoints.hook_fns (interventions), on inputs from hookpoints.user_inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hookpoints.added_hooks import AddedHooks
from hookpoints.editing import NeuronEdit, check_edits, own_inputs
from hookpoints.errors import UserError
from hookpoints.inputs import ModelInputs

RETURN_TYPES = ("logits", "loss", "both", None)


class LogitsAndLoss(NamedTuple):
    """``model(inputs, return_type="both")``: unpacks as ``logits, loss`` (TransformerLens' ``Output``)."""

    logits: torch.Tensor
    loss: torch.Tensor


class ModelApi(AddedHooks):
    """Mixed into :class:`~hookpoints.model.HookedModel`: the methods a notebook calls."""

    def __call__(
        self,
        inputs,
        return_type: str | None = "logits",
        *,
        loss_per_token: bool = False,
        attention_mask: torch.Tensor | None = None,
    ):
        """One forward pass (with the added hooks), as TransformerLens' ``model(input, return_type=...)``:
        ``"logits"`` ``[batch, pos, d_vocab]``; ``"loss"`` the mean next-token cross-entropy over real positions
        (a position and the next both real; ``loss_per_token``: ``[batch, pos - 1]``, 0 where not real);
        ``"both"`` ``(logits, loss)``; None nothing. Loss is for decoder-only LMs on text. ``attention_mask``
        goes with ``[batch, pos]`` token ids (0 marks padding), as TransformerLens takes it.

        >>> model(["The cat sat", "Hi"], return_type="loss")  # tensor(5.72)
        """
        self._check_return_type(return_type)
        if attention_mask is not None:
            if not isinstance(inputs, torch.Tensor):
                raise UserError("attention_mask goes with [batch, pos] token ids, not with texts (they get their own)")
            if not isinstance(attention_mask, torch.Tensor):
                raise UserError(
                    f"attention_mask must be a [batch, pos] tensor (0 at padding), not {attention_mask!r:.40}"
                )
            inputs = {"input_ids": inputs, "attention_mask": attention_mask}
        batch = self.inputs(inputs)
        return self._returned(self._forward(batch, []), batch, return_type, loss_per_token)

    def _check_return_type(self, return_type, *, output: bool = False) -> None:
        """A UserError unless ``return_type`` is one of :data:`RETURN_TYPES` (or with ``output``, "output": the HF
        model's output object) that this model gives."""
        if return_type not in RETURN_TYPES and not (output and return_type == "output"):
            also = "'output' (the model's output object), " if output else ""
            raise UserError(f"return_type must be {also}'logits', 'loss', 'both' or None, not {return_type!r:.60}")
        wants_loss = return_type in ("loss", "both")
        headless = self.model.get_output_embeddings() is None  # BertModel: hidden states, no logits
        if (wants_loss or return_type == "logits") and (headless or wants_loss and not self.continues):
            why = (
                "has no LM head (no logits)" if headless else "is not a decoder-only LM (next-token loss is undefined)"
            )
            supported = "None" if headless else "'logits' and None"
            raise UserError(f"{self.source} ({self.adapter.name}) {why}: model(...) supports return_type {supported}")
        if wants_loss and self.modality != "text":
            raise UserError(
                f"{self.source} was loaded for {self.modality} input: next-token loss is for text (return_type "
                "'logits' and None here; load it with modality='text')"
            )

    def _returned(self, output, batch: ModelInputs, return_type, loss_per_token: bool = False):
        """The model ``output`` as ``return_type`` asks (checked by :meth:`_check_return_type`)."""
        if return_type == "output":
            return output
        if return_type is None:
            return None
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise UserError(
                f"{self.source} ({type(self.model).__name__}) outputs no logits: model(...) supports return_type None "
                "here (run_with_cache for its tensors)"
            )
        if return_type == "logits":
            return logits
        ids = batch.kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor):  # inputs_embeds: nothing says which token comes next
            raise UserError("next-token loss needs the token ids (input_ids); these inputs have none: use 'logits'")
        loss = next_token_loss(logits, ids, batch.masks["input"], per_token=loss_per_token)
        return loss if return_type == "loss" else LogitsAndLoss(logits, loss)

    def inputs(self, inputs) -> ModelInputs:
        """Strings, waveforms, audio paths or tensors as a padded batch (see hookpoints.user_inputs)."""
        from hookpoints.user_inputs import as_inputs

        return as_inputs(self, inputs)

    def run_with_cache(
        self,
        inputs,
        names=None,
        pooling: str | None = None,
        *,
        names_filter=None,
        remove_batch_dim: bool = False,
        return_type: str | None = "output",
        incl_bwd: bool = False,
    ):
        """One forward pass; ``(output, cache)`` with the ``names`` hook points' tensors (globs or a predicate).

        ``names_filter`` is TransformerLens' name for ``names``; ``remove_batch_dim`` (one example) drops the
        batch axis of every cached tensor, as TransformerLens does. ``return_type`` as in ``model(...)``
        ("logits", "loss", "both", None); the default "output" is the HF model's output object (``.logits``).
        ``incl_bwd`` (with ``return_type="loss"``): also backpropagate the loss and cache each point's gradient
        as ``NAME_grad``, as TransformerLens (no parameter's ``.grad`` is touched).

        >>> output, cache = model.run_with_cache(["Hello world", "Hi"], names="blocks.*.hook_resid_post")
        >>> cache["blocks.0.hook_resid_post"].shape, cache.mask.shape  # [batch, pos, d_model], [batch, pos]
        >>> cache["resid_post", 0].shape  # TransformerLens' shorthand
        >>> loss, cache = model.run_with_cache("Hi there", names="blocks.*", return_type="loss", incl_bwd=True)
        >>> cache["blocks.0.hook_resid_post_grad"].shape  # [batch, pos, d_model]
        """
        from hookpoints.cache import run_with_cache, select_names

        if names is not None and names_filter is not None:
            raise UserError("give names or names_filter (TransformerLens' name for it), not both")
        self._check_return_type(return_type, output=True)
        if incl_bwd and return_type != "loss":
            raise UserError(
                f"incl_bwd backpropagates the output, which must be a scalar: pass return_type='loss', not "
                f"{return_type!r:.40} (TransformerLens' rule too)"
            )
        inputs = self.inputs(inputs)
        if remove_batch_dim and inputs.batch_size != 1:
            raise UserError(f"remove_batch_dim needs one example, not {inputs.batch_size}")
        scalar = (lambda output: self._returned(output, inputs, "loss")) if incl_bwd else None
        points = select_names(self, names_filter or names)
        output, cache = run_with_cache(self, inputs, points, pooling, scalar=scalar)
        returned = output if incl_bwd else self._returned(output, inputs, return_type)
        return returned, cache.without_batch_axis() if remove_batch_dim else cache

    def run_with_hooks(
        self,
        inputs,
        fwd_hooks=(),
        bwd_hooks=(),
        *,
        return_type: str | None = "output",
        reset_hooks_end: bool = True,
    ):
        """One forward pass with ``fn(tensor, hook)`` applied at each ``(name or glob, fn)``, after the added hooks
        (:meth:`add_hook`); the model output (``return_type`` as in :meth:`run_with_cache`).

        ``bwd_hooks``: ``fn(grad, hook)`` pairs run when you call ``.backward()`` on the output (the pass keeps
        a graph while autograd is on), as TransformerLens'. ``reset_hooks_end=False`` leaves this call's hooks
        added, until :meth:`reset_hooks`.

        >>> model.run_with_hooks(["Hi"], fwd_hooks=[("blocks.0.mlp.hook_post", hp.ablate([3]))]).logits
        >>> loss = model.run_with_hooks("Hi there", bwd_hooks=[("blocks.0.hook_resid_post", fn)], return_type="loss")
        >>> loss.backward()  # fn(grad, hook) runs; the weights' .grad fill
        """
        from hookpoints.backward import resolve_bwd_hooks
        from hookpoints.hook_fns import resolve_hooks, user_hook

        self._check_return_type(return_type, output=True)
        inputs = self.inputs(inputs)
        fwd, bwd = resolve_hooks(self, fwd_hooks), resolve_bwd_hooks(self, bwd_hooks, "run_with_hooks")
        if not reset_hooks_end:  # as TransformerLens: they stay added after the call
            self._add(list(fwd_hooks), None, "run_with_hooks")
            self._add(list(bwd_hooks), None, "run_with_hooks", "bwd")
            fwd, bwd = [], []
        changes = [(point, user_hook(point, fn, inputs.batch_size)) for point, fn in fwd]
        return self._returned(self._forward(inputs, changes, bwd), inputs, return_type)

    def run_with_edits(self, inputs, edits: list[NeuronEdit]):
        """One forward pass with neuron ``edits`` applied at every position; the model output.

        >>> model.run_with_edits(["Hi"], [model.edit("blocks.0.mlp.hook_post", [3, 7], [0.0, 0.0])]).logits
        """
        from hookpoints.hook_fns import edit_hook

        check_edits(edits)
        return self._forward(self.inputs(inputs), [(edit.point, edit_hook(edit)) for edit in edits])

    def edit(self, name: str, neurons, values, *, add: bool = False) -> NeuronEdit:
        """A :class:`NeuronEdit` of hook ``name``: set (or with ``add``, shift) ``neurons`` to ``values``."""
        from hookpoints.hook_fns import neuron_indices  # the one rule for neuron numbers (ablate, patch, ...)

        if neurons is None:
            raise UserError(f"edit of {name}: neurons must be whole numbers (the neurons to edit), not None")
        neurons = torch.tensor(neuron_indices(neurons), dtype=torch.long)
        try:
            values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"edit of {name}: values must be real numbers, not {values!r:.40}") from None
        if values.numel() == 1 and neurons.numel() > 1:
            values = values.expand(neurons.numel()).clone()
        return NeuronEdit(self.hook_points.get(name), neurons, values, add=add)

    def to_tokens(self, inputs) -> torch.Tensor:
        """Texts as the ``[batch, pos]`` token ids a forward pass reads, as TransformerLens' ``to_tokens``: the
        BOS first with ``prepend_bos``, shorter texts padded at the end (``model.inputs(texts).masks["input"]``).

        >>> model.to_tokens("The cat sat").shape  # [1, pos]
        """
        ids = self.inputs(inputs).kwargs.get("input_ids")
        if ids is None:
            raise UserError(f"{self.source} ({self.modality} input) reads no token ids: to_tokens is for text input")
        return ids

    def to_str_tokens(self, inputs) -> list[str] | list[list[str]]:
        """Each token as the text it decodes to, as TransformerLens' ``to_str_tokens``: position ``i`` of a cached
        tensor is ``to_str_tokens(text)[i]``. A text (or 1-D token ids) gives a list; a list of texts one list
        per text, its padding left out; ``[batch, pos]`` ids one list per row, every position.

        >>> model.to_str_tokens("The cat sat")  # ['The', ' cat', ' sat']
        """
        if isinstance(inputs, torch.Tensor) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            ids = _token_ids(inputs)
            rows = [ids] if ids.dim() == 1 else list(ids)
            pieces = [self._pieces(row.tolist()) for row in rows]
            return pieces[0] if ids.dim() == 1 else pieces
        batch = self.inputs(inputs)
        ids = batch.kwargs.get("input_ids")
        if ids is None:
            raise UserError(f"{self.source} ({self.modality} input) reads no tokens: to_str_tokens is for text input")
        mask = batch.masks["input"].to(ids.device)
        pieces = [self._pieces(row[real].tolist()) for row, real in zip(ids, mask, strict=True)]
        return pieces[0] if isinstance(inputs, str) else pieces

    def to_string(self, tokens) -> str | list[str]:
        """Token ids back to text, special tokens kept, as TransformerLens' ``to_string``: ``[pos]`` (or a list of
        ids) gives one string, ``[batch, pos]`` one per row.

        >>> model.to_string(model.to_tokens("The cat sat")[0])  # 'The cat sat'
        """
        ids = _token_ids(tokens)
        if ids.dim() == 1:
            return self.tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False)
        return self.tokenizer.batch_decode(ids.tolist(), clean_up_tokenization_spaces=False)

    def _pieces(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([token], clean_up_tokenization_spaces=False) for token in ids]

    def _forward(self, inputs: ModelInputs, changes, bwd_hooks=(), roots: list | None = None):
        """The model's forward pass with the added hooks' changes, then ``changes``, on their tensors.

        Backward hooks (the added ones, then ``bwd_hooks``: ``[(HookPoint, fn)]``) make it keep a graph while
        autograd is on, whose backward runs them; with ``roots`` (a list, filled: hookpoints.backward) always."""
        from hookpoints.attention import eager, needs_eager
        from hookpoints.backward import backward_changes
        from hookpoints.hook_fns import hooked

        bwd = [*self._added_resolved("bwd"), *bwd_hooks]
        grad = roots is not None or (bool(bwd) and torch.is_grad_enabled())
        first, last = (
            backward_changes(self, bwd, inputs.batch_size, [] if roots is None else roots) if grad else ([], [])
        )
        changes = [*first, *self._added_changes(inputs.batch_size), *changes, *last]  # added ones first, as TL
        maps = needs_eager(point.module for point, _ in changes)  # the SDPA path never calls the map hooks
        with (
            torch.enable_grad() if grad else torch.no_grad(),  # no_grad, not inference_mode: a probe may train on it
            hooked(self, changes),  # before the guard: its zeroing of padding comes after an input hook's change
            self.adapter.batch_guard(self.model, inputs),
            eager(maps),
        ):
            return self.model(**own_inputs(inputs.kwargs, [point for point, _ in changes]))  # caller's untouched


def next_token_loss(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, *, per_token: bool = False
) -> torch.Tensor:
    """Cross-entropy of predicting token ``t + 1`` from position ``t`` (TransformerLens' ``lm_cross_entropy_loss``
    given the attention mask): counted where both positions are real (``mask``), in float32. The mean over those,
    or with ``per_token`` ``[batch, pos - 1]`` (0 elsewhere).

    >>> next_token_loss(logits, ids, mask)  # doctest: +SKIP
    """
    tokens, mask = tokens.to(logits.device), mask.to(logits.device, torch.bool)
    log_probs = logits.float().log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]  # [batch, pos - 1]
    counted = mask[:, :-1] & mask[:, 1:]
    losses = -log_probs.masked_fill(~counted, 0.0)
    if per_token:
        return losses
    if not bool(counted.any()):
        raise UserError("no example has two real tokens: next-token loss needs at least two per example")
    return losses.sum() / counted.sum()


def _token_ids(tokens) -> torch.Tensor:
    """``tokens`` (a tensor or a list of ids) as a ``[pos]`` or ``[batch, pos]`` integer tensor; else a UserError."""
    try:
        ids = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.dim() not in (1, 2) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UserError(
            f"token ids must be a [pos] or [batch, pos] tensor (or list) of whole numbers, not {tokens!r:.60}"
        )
    return ids
