"""What a user passes to ``run_with_cache`` / ``run_with_hooks`` turned into a batch (:class:`ModelInputs`).

Accepted: a string or a list of strings (text, tokenised by the model's tokenizer), a 1-D array or a list of
them (16 kHz mono waveforms, through the model's feature extractor), a list of WAV/FLAC paths, a
:class:`ModelInputs` as the model's own ``text_inputs`` / ``speech_inputs`` build it, or already-built tensors
(``input_ids`` ``[batch, tokens]``, or a dict of forward arguments). Strings, waveforms and paths get the padding
mask of every position space (input, encoder, decoder); raw tensors only the ``input`` space's mask (from their
``attention_mask``, else all positions count).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from hookpoints.errors import UserError
from hookpoints.inputs import ModelInputs

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def as_inputs(model, inputs) -> ModelInputs:
    """``inputs`` as a batch for ``model`` (a :class:`~hookpoints.model.HookedModel`) on its device.

    >>> batch = as_inputs(model, ["Hello world", "Hi"])  # doctest: +SKIP
    >>> batch.masks["input"].shape  # [batch, tokens]  # doctest: +SKIP
    """
    if isinstance(inputs, ModelInputs):
        return inputs.to(model.device)
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and not inputs.is_floating_point():
        return _from_kwargs({"input_ids": inputs}).to(model.device)
    if isinstance(inputs, Mapping):
        return _from_kwargs(dict(inputs)).to(model.device)
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 1:
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise UserError(
            f"inputs must be a string, a list of strings, waveforms or audio paths, input_ids or a dict of "
            f"tensors, not {_describe(inputs)}"
        )
    if all(isinstance(item, (np.ndarray, torch.Tensor)) for item in inputs):
        return model.speech_inputs([_waveform(item, i) for i, item in enumerate(inputs)])
    if not all(isinstance(item, (str, Path)) for item in inputs):
        kinds = sorted({type(item).__name__ for item in inputs})
        raise UserError(f"inputs mix {', '.join(kinds)}: give all strings, all waveforms or all audio paths")
    if model.modality == "speech":
        from hookpoints.audio import load_audio

        paths = [Path(item).expanduser() for item in inputs]
        for path in paths:
            if path.suffix.lower() not in AUDIO_SUFFIXES:
                raise UserError(
                    f"model {model.source} was loaded for speech: give audio files or waveforms, not text "
                    f"({str(path)[:60]!r}); load it with modality='text' to read text"
                )
        return model.speech_inputs([load_audio(path, path.name) for path in paths])
    texts = [str(item) for item in inputs]
    if not all(text.strip() for text in texts):
        raise UserError("inputs hold an empty string: give every example some text")
    return model.text_inputs(texts)


def _from_kwargs(kwargs: dict) -> ModelInputs:
    """Forward arguments given as tensors; the ``input`` space's mask from their attention mask."""
    tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise UserError("a dict of inputs needs tensors (input_ids, input_features, attention_mask, ...)")
    first = next(iter(tensors.values()))
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(first.shape[:2], dtype=torch.bool)
    return ModelInputs(kwargs, {"input": mask.bool()})


def _waveform(item, index: int) -> np.ndarray:
    array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if array.ndim != 1 or array.size == 0:
        raise UserError(f"waveform {index} has shape {list(array.shape)}: give 1-D 16 kHz mono samples")
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"waveform {index} holds {array.dtype} samples: give floats in [-1, 1]")
    return array.astype(np.float32)


def _describe(value) -> str:
    if isinstance(value, (list, tuple)) and not value:
        return "an empty list"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
