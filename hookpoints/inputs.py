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

    >>> batch = model.inputs(["Hallo Welt", "Hi"])  # a ModelInputs
    >>> batch.masks["input"].shape  # [batch, tokens]
    """

    kwargs: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # space -> [batch, positions] bool
    #: Adapter-private facts about the batch that are no model argument (e.g. the frames each example has alone).
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.masks.values())).shape[0]

    def to(self, device: torch.device | str) -> ModelInputs:
        move = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}
        masks = {k: v.to(device) for k, v in self.masks.items()}
        return ModelInputs(move, masks, {k: v.to(device) for k, v in self.extras.items()})


def fixed_frames(
    features: torch.Tensor, mask: torch.Tensor, frames: int | None, *, time_axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and frame mask cut or zero-padded to ``frames`` frames (unchanged when ``frames`` is None).

    Padded frames are masked (attention mask 0), so they change neither the model's values for real frames
    nor the pooling. ``features``: ``[batch, frames, dims]`` (time_axis 1) or ``[batch, dims, frames]`` (2).
    """
    if frames is None:
        return features, mask
    have = features.shape[time_axis]
    if have >= frames:
        return features.narrow(time_axis, 0, frames), mask[:, :frames]
    shape = list(features.shape)
    shape[time_axis] = frames - have
    features = torch.cat([features, features.new_zeros(shape)], dim=time_axis)
    return features, torch.cat([mask, mask.new_zeros((mask.shape[0], frames - have))], dim=1)
