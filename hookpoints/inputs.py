"""A batch ready for the model: forward arguments plus which positions of each sequence are real."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelInputs:
    """Keyword arguments for ``model.forward`` and a validity mask per position space.

    A *space* is a sequence a hook's positions can index: ``input`` (tokens or feature frames fed to the
    model), ``encoder`` (encoder outputs, when they are downsampled from the input), ``decoder`` (decoder
    tokens), ``audio``/``audio_encoder`` (an audio LLM's audio frames). Pooling uses these masks, so padding
    never counts.
    """

    kwargs: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # space -> [batch, positions] bool

    @property
    def batch_size(self) -> int:
        return next(iter(self.masks.values())).shape[0]

    def to(self, device: torch.device | str) -> ModelInputs:
        move = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}
        return ModelInputs(move, {k: v.to(device) for k, v in self.masks.items()})
