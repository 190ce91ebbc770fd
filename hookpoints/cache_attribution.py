"""Direct logit attribution on an ActivationCache, as TransformerLens 3.9's ``ActivationCache`` does it.

``accumulated_resid`` (the logit lens), ``decompose_resid`` (the residual stream as the sum of the embeddings and
each block's attention and MLP outputs), ``apply_ln_to_stack`` (a stack divided by the *cached* norm scale of
the layer it feeds, centred first for LayerNorm models) and ``logit_attrs`` (each component's dot product with
the tokens' unembedding directions). The cache reads its model's ``cfg``, ``W_U`` and final norm
(hookpoints.tl_weights). Values are unfolded, as TransformerLens' ``from_pretrained_no_processing``: the final
norm's gain and bias are not in ``W_U`` (docs/gotchas.md).

Positions that are padding (``cache.mask`` False) hold NaN in everything divided by a cached scale, and a
``pos_slice`` of one position that is padding in some example is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from hookpoints.errors import UserError

#: TransformerLens' ``Slice`` input: None (everything), an int (one index, the axis dropped), a tuple
#: (``slice(*tuple)``), a slice, or a list / array / tensor of indices.
SliceInput = int | tuple | slice | list | np.ndarray | torch.Tensor | None


def as_index(value: SliceInput, what: str):
    """``value`` as what indexes one axis, as TransformerLens' ``Slice``; else a UserError."""
    if value is None:
        return slice(None)
    if isinstance(value, bool):
        raise UserError(f"{what} must be an int, a tuple, a slice or a list of indices, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, tuple):
        if not 1 <= len(value) <= 3 or not all(part is None or _whole(part) for part in value):
            raise UserError(f"{what} as a tuple is (stop,), (start, stop) or (start, stop, step), not {value!r:.60}")
        return slice(*value)
    if isinstance(value, slice):
        if not all(part is None or _whole(part) for part in (value.start, value.stop, value.step)):
            raise UserError(f"{what} as a slice needs whole numbers (or None), not {value!r:.60}")
        return value
    if isinstance(value, (list, np.ndarray, torch.Tensor)):
        index = torch.as_tensor(np.asarray(value))
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.dim() != 1:
            raise UserError(f"{what} as indices must be a flat list of whole numbers, not {value!r:.60}")
        return index
    raise UserError(f"{what} must be an int, a tuple, a slice or a list of indices, not {value!r:.60}")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def take(tensor: torch.Tensor, index, dim: int) -> torch.Tensor:
    """``tensor`` indexed by ``index`` along ``dim`` (TransformerLens' ``Slice.apply``)."""
    if isinstance(index, slice) and index == slice(None):
        return tensor
    where = [slice(None)] * tensor.dim()
    where[dim] = index.to(tensor.device) if isinstance(index, torch.Tensor) else index
    try:
        return tensor[tuple(where)]
    except IndexError as error:
        raise UserError(f"slice out of range for an axis of {tensor.shape[dim]}: {error}") from None


class CacheAttribution:
    """Mixed into :class:`~hookpoints.cache.ActivationCache`: TransformerLens' logit lens and attribution."""

    model = None  # the HookedModel that made the cache (run_with_cache sets it)

    def accumulated_resid(
        self,
        layer: int | None = None,
        *,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream entering blocks 0 to ``layer`` (None or -1: every block, then the last block's
        output), stacked: ``[components, batch, pos, d_model]``, as TransformerLens' ``accumulated_resid``
        (``incl_mid``: each block's ``resid_mid`` before ``layer`` too; ``mlp_input``: ``layer``'s own
        ``resid_mid``; ``return_labels``: also ``["0_pre", "0_mid", ..., "final_post"]``). ``apply_ln``: the
        final norm applied to each component anew (gain and bias included) for the whole stream (the logit
        lens), else divided by ``layer``'s cached ``ln1`` (``ln2``) scale (:meth:`apply_ln_to_stack`).

        >>> stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)  # doctest: +SKIP
        >>> logits = stack @ model.W_U + model.b_U  # [components, batch, pos, d_vocab]  # doctest: +SKIP
        """
        last = self._blocks_before(-1 if layer is None else layer)
        if mlp_input and last == self.layers:
            raise UserError(f"mlp_input is for a block's MLP input: give a layer below {self.layers}")
        names, labels = [], []
        for block in range(last + 1):
            if block == self.layers:
                names.append(f"blocks.{self.layers - 1}.hook_resid_post")
                labels.append("final_post")
                continue
            names.append(f"blocks.{block}.hook_resid_pre")
            labels.append(f"{block}_pre")
            if (incl_mid and block < last) or (mlp_input and block == last):
                names.append(f"blocks.{block}.hook_resid_mid")
                labels.append(f"{block}_mid")
        index = as_index(pos_slice, "pos_slice")
        stacked = torch.stack([take(self._needed(name, "accumulated_resid"), index, -2) for name in names])
        if apply_ln:
            if last == self.layers:
                stacked = self._final_norm(stacked, index)
            else:
                stacked = self.apply_ln_to_stack(
                    stacked, last, mlp_input=mlp_input, pos_slice=pos_slice, has_batch_dim=not self.batchless
                )
        return (stacked, labels) if return_labels else stacked

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream entering ``layer`` (None or -1: the unembedding) as the stack of what wrote it:
        ``hook_embed``, ``hook_pos_embed`` (absolute positions only), then each earlier block's
        ``hook_attn_out`` and ``hook_mlp_out`` (``mode`` "attn" / "mlp": only those; ``mlp_input``: ``layer``'s
        own ``hook_attn_out`` too): ``[components, batch, pos, d_model]``, labels ``["embed", "pos_embed",
        "0_attn_out", "0_mlp_out", ...]``, as TransformerLens' ``decompose_resid``. ``apply_ln``: divided by the
        cached scale of the norm that reads it (:meth:`apply_ln_to_stack`).

        >>> stack, labels = cache.decompose_resid(apply_ln=True, return_labels=True)  # doctest: +SKIP
        >>> cache.logit_attrs(stack, " cat").shape  # [components, batch, pos]  # doctest: +SKIP
        """
        model = self._dla_model("decompose_resid")
        last = self._blocks_before(-1 if layer is None else layer)
        if mode not in ("all", "mlp", "attn"):
            raise UserError(f"mode must be 'all', 'mlp' or 'attn', not {mode!r:.40}")
        if mlp_input and last == self.layers:
            raise UserError(f"mlp_input is for a block's MLP input: give a layer below {self.layers}")
        names, labels = [], []
        if incl_embeds:
            if model.modality != "text":
                raise UserError(
                    f"{model.source} reads {model.modality}: at those positions hook_embed is a placeholder's "
                    "embedding, not what the language model reads; use incl_embeds=False (blocks.0.hook_resid_pre "
                    "is what the first block reads)"
                )
            names.append("hook_embed")
            labels.append("embed")
            if "hook_pos_embed" in model.hook_points:
                names.append("hook_pos_embed")
                labels.append("pos_embed")
        for block in range(last):
            for kind in ("attn", "mlp"):
                if mode in ("all", kind):
                    names.append(f"blocks.{block}.hook_{kind}_out")
                    labels.append(f"{block}_{kind}_out")
        if mlp_input and mode != "mlp":
            names.append(f"blocks.{last}.hook_attn_out")
            labels.append(f"{last}_attn_out")
        if not names:
            raise UserError("decompose_resid has no component to stack: layer 0 without incl_embeds")
        index = as_index(pos_slice, "pos_slice")
        stacked = torch.stack([take(self._needed(name, "decompose_resid"), index, -2) for name in names])
        if apply_ln:
            stacked = self.apply_ln_to_stack(stacked, last, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stacked, labels) if return_labels else stacked

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
        has_batch_dim: bool = True,
    ) -> torch.Tensor:
        """``residual_stack`` (``[components, batch, pos, d_model]``, its positions already ``pos_slice``d) as
        the input of ``layer``'s ``ln1`` (``mlp_input``: ``ln2``; None or -1: ``ln_final``), as TransformerLens'
        ``apply_ln_to_stack``: centred (LayerNorm models) and divided by that norm's *cached* ``hook_scale``, so
        the components still sum to the normalised stream; no gain or bias. NaN at padding positions.

        >>> stack = cache.decompose_resid()  # doctest: +SKIP
        >>> cache.apply_ln_to_stack(stack).shape  # [components, batch, pos, d_model]  # doctest: +SKIP
        """
        model = self._dla_model("apply_ln_to_stack")
        last = self._blocks_before(-1 if layer is None else layer)
        if not isinstance(residual_stack, torch.Tensor) or residual_stack.dim() < 2:
            raise UserError(f"residual_stack must be a [components, ..., d_model] tensor, not {residual_stack!r:.40}")
        if not residual_stack.is_floating_point():
            raise UserError(f"residual_stack must hold real numbers, not {residual_stack.dtype}")
        if residual_stack.shape[-1] != model.cfg.d_model:
            raise UserError(
                f"residual_stack's last axis is {residual_stack.shape[-1]}, not d_model {model.cfg.d_model}"
            )
        if mlp_input and last == self.layers:
            raise UserError(f"mlp_input is for a block's MLP input: give a layer below {self.layers}")
        name = "ln_final.hook_scale" if last == self.layers else f"blocks.{last}.ln{2 if mlp_input else 1}.hook_scale"
        pos, batch = as_index(pos_slice, "pos_slice"), as_index(batch_slice, "batch_slice")
        if has_batch_dim:
            residual_stack = take(residual_stack, batch, 1)
        scale = take(self._needed(name, "apply_ln_to_stack"), pos, -2)  # [batch, pos, 1]
        if not self.batchless:
            scale = take(scale, batch, 0)
        if residual_stack.shape[1:-1] != scale.shape[:-1]:  # else it broadcasts, or fails in torch
            raise UserError(
                f"residual_stack's [batch, pos] axes are {list(residual_stack.shape[1:-1])}, the cache's (with "
                f"pos_slice and batch_slice) {list(scale.shape[:-1])}: give the stack as decompose_resid sliced it"
            )
        mask = self._real(pos, batch, scale.shape[:-1])
        if model.cfg.normalization_type == "LN":
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        scaled = residual_stack / scale.to(residual_stack.device)
        return scaled.masked_fill(~mask.to(scaled.device)[..., None], float("nan"))

    def logit_attrs(
        self,
        residual_stack: torch.Tensor,
        tokens,
        incorrect_tokens=None,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
        has_batch_dim: bool = True,
    ) -> torch.Tensor:
        """Each component's direct effect on the logit of ``tokens`` (with ``incorrect_tokens``: on the logit
        difference): ``residual_stack`` through :meth:`apply_ln_to_stack` (``ln_final``), dotted with
        :meth:`~hookpoints.model.HookedModel.tokens_to_residual_directions`, as TransformerLens' ``logit_attrs``.
        ``tokens``: a string (one token), an int, or ids ``[batch]`` / ``[batch, pos]``. ``[components, batch,
        pos]``; NaN at padding.

        >>> stack, labels = cache.decompose_resid(return_labels=True)  # doctest: +SKIP
        >>> cache.logit_attrs(stack, " Mary", " John", pos_slice=-1).shape  # [components, batch]  # doctest: +SKIP
        """
        model = self._dla_model("logit_attrs")
        directions = model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = model.tokens_to_residual_directions(incorrect_tokens)
            if _token_shape(tokens) != _token_shape(incorrect_tokens):
                raise UserError(
                    f"tokens and incorrect_tokens must have the same shape, not {tuple(_token_shape(tokens))} and "
                    f"{tuple(_token_shape(incorrect_tokens))}"
                )
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(
            residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
        )
        # ids per example and position: exactly the stack's [batch, pos] (a one-example stack: its [pos] too).
        # Broadcasting alone would lay [batch] ids along the positions when there are as many of each.
        ids, axes = directions.shape[:-1], scaled.shape[1:-1]
        if ids and ids != axes and ids != axes[next((i for i, n in enumerate(axes) if n != 1), len(axes)) :]:
            raise UserError(
                f"tokens of shape {tuple(_token_shape(tokens))} do not fit the stack's {tuple(axes)} [batch, pos]: "
                "give one token, or ids of the stack's shape ([batch] ids go with pos_slice of one position)"
            )
        return (scaled * directions.to(scaled.device)).sum(-1)

    # -- what every method needs ------------------------------------------------------------------------

    def _dla_model(self, what: str):
        """The cache's model, where the method applies to it; else a UserError saying why not."""
        if self.model is None:
            raise UserError(f"{what} needs the model: use a cache made by model.run_with_cache")
        if self.pooling:
            raise UserError(
                f"{what} needs positions: this cache is pooled ({self.pooling}); run_with_cache without pooling"
            )
        self.model._tl_points(what)
        if "ln_final.hook_scale" not in self.model.hook_points:
            raise UserError(
                f"{what} is for decoder-only LMs (a final norm, then the unembedding); {self.model.source} has no "
                "ln_final (BERT is post-LayerNorm: its residual stream is normed again in every block)"
            )
        return self.model

    def _needed(self, name: str, what: str) -> torch.Tensor:
        if name not in self:
            pattern = name.replace(".0.", ".*.", 1) if name.startswith("blocks.") else name
            for block in range(self.layers or 0):
                pattern = pattern.replace(f"blocks.{block}.", "blocks.*.")
            raise UserError(f"{what} needs {name}: add {pattern!r} to run_with_cache's names")
        return self[name]

    def _final_norm(self, stack: torch.Tensor, index) -> torch.Tensor:
        """Each component of ``stack`` through the model's final norm module (TransformerLens' ``recompute_ln``);
        NaN at padding."""
        model = self._dla_model("accumulated_resid(apply_ln=True)")
        norm = model.model.get_submodule(model.hook_points.get("ln_final.hook_scale").module)
        device = next(norm.parameters(), stack).device
        normed = torch.stack([norm(component.to(device)) for component in stack])
        mask = self._real(index, slice(None), stack.shape[1:-1])
        return normed.masked_fill(~mask.to(normed.device)[..., None], float("nan"))

    def _real(self, pos, batch, shape: torch.Size) -> torch.Tensor:
        """``cache.mask`` sliced as the scale is (``[batch, pos]`` -> ``shape``); a UserError where one position
        (an int ``pos_slice``) is padding in some example (TransformerLens' ``pos_slice=-1`` habit, right-padded)."""
        if self.mask is None:
            return torch.ones(shape, dtype=torch.bool)
        mask = take(self.mask, pos, -1)
        if not self.batchless:
            mask = take(mask, batch, 0)
        if isinstance(pos, int) and not bool(mask.all()):
            padded = torch.nonzero(~mask.reshape(-1)).flatten().tolist()
            raise UserError(
                f"position {pos} is padding in example(s) {padded[:8]}: index each example's last real position "
                "(cache.mask.sum(1) - 1) in the full stack yourself, or give texts of one length"
            )
        return mask


def _token_shape(tokens) -> torch.Size:
    """The shape TransformerLens compares ``tokens`` and ``incorrect_tokens`` by: () for a string or an int."""
    return tokens.shape if isinstance(tokens, torch.Tensor) else torch.Size([])
