"""TransformerLens' ``model.cfg`` and weight accessors (``W_U``, ``b_U``, ``W_E``, ``W_pos``) of a HookedModel.

For the models with TransformerLens names (decoder-only LMs, BERT, an audio LLM's LLaMA-layout language model):
each value is what TransformerLens 3.9's ``HookedTransformer.from_pretrained_no_processing`` gives (no norm
folded into ``W_U``, no centring). Mixed into :class:`~hookpoints.model.HookedModel`; the widths come from the
adapter's hook points (``mlp.hook_post`` is ``d_mlp``, ``attn.hook_q`` is ``[n_heads, d_head]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hookpoints.adapters.base import max_positions
from hookpoints.errors import UserError

_NORMS = {"ln_scale": "LN", "rms_scale": "RMS"}


@dataclass(frozen=True)
class ModelConfig:
    """TransformerLens' ``HookedTransformerConfig`` fields researchers read, under its names (``model.cfg``).

    >>> model.cfg.n_layers, model.cfg.d_model, model.cfg.normalization_type  # (2, 64, 'LN')  # doctest: +SKIP
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int | None
    act_fn: str | None
    normalization_type: str  # "LN" (centre, then divide) or "RMS" (divide)
    positional_embedding_type: str  # "standard" (W_pos added to the embedding) or "rotary"
    n_key_value_heads: int | None  # None: every query head has its own keys and values
    eps: float
    model_name: str
    device: str
    dtype: torch.dtype


class WeightsApi:
    """Mixed into :class:`~hookpoints.model.HookedModel`: ``cfg``, ``W_U``, ``b_U``, ``W_E``, ``W_pos``."""

    @property
    def cfg(self) -> ModelConfig:
        """TransformerLens' config of this model (decoder-only LMs, BERT, an audio LLM's language model).

        >>> model.cfg.d_head  # 16  # doctest: +SKIP
        """
        points = self._tl_points("cfg")
        q, scale = points.get("blocks.0.attn.hook_q"), points.get("blocks.0.ln1.hook_scale")
        k = points.get("blocks.0.attn.hook_k")
        text = self.model.config.get_text_config()
        n_heads, d_head = q.shape
        d_vocab = self.model.get_input_embeddings().num_embeddings
        head = self.model.get_output_embeddings()
        param = next(self.model.parameters())
        return ModelConfig(
            n_layers=len({p.layer for p in points if p.name.endswith(".hook_resid_pre")}),
            d_model=points.get("blocks.0.hook_resid_pre").width,
            n_heads=n_heads,
            d_head=d_head,
            d_mlp=points.get("blocks.0.mlp.hook_post").width,
            d_vocab=d_vocab,
            d_vocab_out=head.weight.shape[0] if head is not None else d_vocab,
            n_ctx=max_positions(self.model),
            act_fn=getattr(text, "activation_function", None) or getattr(text, "hidden_act", None),
            normalization_type=_NORMS[scale.derived],
            positional_embedding_type="standard" if "hook_pos_embed" in points else "rotary",
            n_key_value_heads=k.heads if k.heads != n_heads else None,
            eps=scale.eps,
            model_name=str(self.source).rstrip("/").rsplit("/", 1)[-1],
            device=str(self.device),
            dtype=param.dtype,
        )

    def _tl_points(self, what: str):
        """The hook points, where this model has TransformerLens' names; else a UserError naming what to use."""
        points = self.hook_points
        if "blocks.0.hook_resid_pre" not in points or "blocks.0.attn.hook_q" not in points:
            raise UserError(
                f"{what} is for models with TransformerLens names (decoder-only LMs, BERT, an audio LLM's LLaMA-"
                f"layout language model); {self.source} ({self.adapter.name}) is named by module paths: read "
                "model.model.config and the modules' weights"
            )
        return points

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding ``[d_model, d_vocab]`` (the LM head's weight, transposed; a view of it).

        >>> model.W_U.shape  # [d_model, d_vocab]  # doctest: +SKIP
        """
        return self._head("W_U").weight.T

    @property
    def b_U(self) -> torch.Tensor:
        """The unembedding bias ``[d_vocab]``: zeros where the LM head has none (GPT-2, LLaMA), as TransformerLens."""
        head = self._head("b_U")
        if head.bias is not None:
            return head.bias
        return torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)

    @property
    def W_E(self) -> torch.Tensor:
        """The token embedding ``[d_vocab, d_model]`` (tied to ``W_U`` in GPT-2: the same storage)."""
        self._tl_points("W_E")
        return self.model.get_input_embeddings().weight

    @property
    def W_pos(self) -> torch.Tensor:
        """The learnt position embedding ``[n_ctx, d_model]`` (GPT-2, BERT); rotary models have none."""
        points = self._tl_points("W_pos")
        if "hook_pos_embed" not in points:
            raise UserError(f"{self.source} has rotary positions (no hook_pos_embed): it has no W_pos")
        return self.model.get_submodule(points.get("hook_pos_embed").module).weight

    def _head(self, what: str) -> torch.nn.Module:
        self._tl_points(what)
        head = self.model.get_output_embeddings()
        if head is None:
            raise UserError(f"{self.source} ({type(self.model).__name__}) has no LM head: it has no {what}")
        return head

    def to_single_token(self, string: str) -> int:
        """The id of the one token ``string`` is (no BOS), as TransformerLens' ``to_single_token``.

        >>> model.to_single_token(" cat")  # doctest: +SKIP
        """
        if not isinstance(string, str):
            raise UserError(f"to_single_token takes a string, not {string!r:.40}")
        if self.tokenizer is None:
            raise UserError(f"{self.source} has no tokenizer: give token ids")
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"{string!r:.40} is {len(ids)} tokens, not one: give a single token (or its id)")
        return ids[0]

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """The unembedding direction of each token, ``W_U[:, tokens]`` moved last, as TransformerLens gives it: a
        string (one token), an int or a one-element tensor give ``[d_model]``; a tensor of more ids ``[*shape,
        d_model]`` (``[batch]`` -> ``[batch, d_model]``, ``[batch, pos]`` -> ``[batch, pos, d_model]``).

        >>> model.tokens_to_residual_directions(" cat").shape  # [d_model]  # doctest: +SKIP
        """
        self._tl_points("tokens_to_residual_directions")
        W_U = self.W_U
        if isinstance(tokens, str):
            return W_U[:, self.to_single_token(tokens)]
        ids = _token_ids(tokens, W_U.shape[1])
        if ids.numel() == 1:  # TransformerLens: any one-element tensor is one token ([d_model], its shape dropped)
            return W_U[:, int(ids.item())]
        return W_U[:, ids.to(W_U.device)].movedim(0, -1)


def _token_ids(tokens, vocab: int) -> torch.Tensor:
    """``tokens`` (an int or an integer tensor) checked against the vocabulary; else a UserError."""
    if isinstance(tokens, bool) or not isinstance(tokens, (int, torch.Tensor)) and not hasattr(tokens, "__index__"):
        raise UserError(f"tokens must be a string, an int or a tensor of token ids, not {tokens!r:.40}")
    ids = torch.as_tensor(tokens) if not isinstance(tokens, torch.Tensor) else tokens
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UserError(f"token ids must be whole numbers, not a {ids.dtype} tensor")
    if ids.numel() == 0:
        raise UserError("tokens is empty: give at least one token id")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise UserError(
            f"token ids must be from 0 to {vocab - 1} (the vocabulary), not {int(ids.min())}..{int(ids.max())}"
        )
    return ids
