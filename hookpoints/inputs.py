"""A batch ready for the model: forward arguments plus which positions of each sequence are real."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: ``extras[KEYS + space]``: the keys attention maps over ``space`` attend to, where they differ from the space's
#: valid positions (a teacher-forced decoder pass: the steps are the positions, the prompt is keys too).
KEYS = "keys:"


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
    #: The masks and extras as they were on the CPU before :meth:`to` moved them (they are small). Decisions that
    #: read their values (a common valid prefix, equal lengths) read these, so a batch on a GPU waits for nothing.
    host_masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    host_extras: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return next(iter(self.masks.values())).shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelInputs:
        """On ``device``; with ``dtype``, floating-point model arguments (speech features) cast to it too.

        To a GPU, every tensor is copied from pinned memory without blocking: a copy from pageable memory
        first waits for everything queued on the GPU, which would stop the recorder from preparing the next
        batch while the GPU still runs this one."""
        pin = torch.device(device).type == "cuda"

        def move_one(value, cast_to: torch.dtype | None = None):
            if not isinstance(value, torch.Tensor):
                return value
            cast = cast_to if cast_to is not None and value.is_floating_point() else None
            if pin and value.device.type == "cpu":
                value = value.pin_memory()
            return value.to(device, cast, non_blocking=pin)  # to the CPU: blocking, so the values are there

        move = {k: move_one(v, dtype) for k, v in self.kwargs.items()}
        masks = {k: move_one(v) for k, v in self.masks.items()}
        extras = {k: move_one(v) for k, v in self.extras.items()}
        host_masks, host_extras = _on_cpu(self.masks, self.host_masks), _on_cpu(self.extras, self.host_extras)
        return ModelInputs(move, masks, extras, host_masks, host_extras)


def _on_cpu(tensors: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CPU copies of ``tensors``: those already kept, else those that are on the CPU now."""
    return {**{k: v for k, v in tensors.items() if v.device.type == "cpu"}, **kept}


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
