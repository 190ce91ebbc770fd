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

from hookpoints.adapters.base import max_positions
from hookpoints.errors import UserError
from hookpoints.generation import positions, takes_position_ids
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
        return _from_kwargs(model, {"input_ids": inputs}).to(model.device)
    if isinstance(inputs, Mapping):
        return _from_kwargs(model, dict(inputs)).to(model.device)
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 1:
        if not (inputs.is_floating_point() if isinstance(inputs, torch.Tensor) else inputs.dtype.kind == "f"):
            raise UserError(  # no 16 kHz waveform is integers: token ids of one example (TL's tokens[0])
                f"inputs are a 1-D {inputs.dtype} array; token ids need a batch axis: give a [batch, tokens] tensor "
                "(ids[None]); a waveform is floats in [-1, 1]"
            )
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
        waves = [load_audio(path, path.name) for path in paths]
        return model.speech_inputs(waves, names=[f"audio file {path}" for path in paths])
    audio = next((item for item in inputs if _audio_file(item)), None)
    if audio is not None:  # its path would be tokenised as text, without a word
        if "speech" in model.adapter.modalities(model.model.config):
            raise UserError(
                f"{str(audio)[-60:]!r} is an audio file; model {model.source} was loaded for text input: load it "
                "with modality='speech' to read audio"
            )
        raise UserError(f"model {model.source} ({model.adapter.name}) takes text, not audio files ({audio})")
    texts = [str(item) for item in inputs]
    if not all(text.strip() for text in texts):
        raise UserError("inputs hold an empty string: give every example some text")
    return model.text_inputs(texts)


def _audio_file(item) -> bool:
    """A Path with an audio suffix, or a string naming an existing such file (a text that only ends like one is
    text)."""
    if not str(item).lower().endswith(AUDIO_SUFFIXES):
        return False
    if isinstance(item, Path):
        return True
    if len(item) > 4096:
        return False
    try:
        return Path(item).expanduser().is_file()
    except (OSError, ValueError):  # not a usable path (a NUL byte, a name too long)
        return False


def _from_kwargs(model, kwargs: dict) -> ModelInputs:
    """Forward arguments given as tensors; the ``input`` space's mask from their attention mask.

    Token ids are checked against the model (vocabulary, longest input, the mask's shape). A left-padded batch
    gets position ids counted from each example's first real token (what HF's ``generate`` and TransformerLens
    do), so a model with absolute positions (GPT-2) gives each example what it gives alone."""
    tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise UserError("a dict of inputs needs tensors (input_ids, input_features, attention_mask, ...)")
    first = next(iter(tensors.values()))
    if first.dim() == 0 or first.shape[0] == 0:
        raise UserError(f"inputs hold no example ({_describe(first)}): give at least one")
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        _check_ids(model, ids, mask)
        if isinstance(mask, torch.Tensor) and "position_ids" not in kwargs and _left_padded(mask):
            if takes_position_ids(model.model):
                kwargs = {**kwargs, "position_ids": positions(mask)}
    if mask is None:
        mask = torch.ones(first.shape[:2], dtype=torch.bool)
    return ModelInputs(kwargs, {"input": mask.bool()})


def _check_ids(model, ids: torch.Tensor, mask) -> None:
    """Token ids the model can read: ``[batch, tokens]`` integers within its vocabulary and context."""
    if ids.dim() != 2 or ids.is_floating_point():
        raise UserError(f"input_ids must be a [batch, tokens] integer tensor, not {_describe(ids)}")
    if ids.shape[1] == 0:  # an IndexError deep in transformers' mask code
        raise UserError(f"input_ids hold no tokens ({_describe(ids)}): give at least one per example")
    if isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
        raise UserError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}: give them alike")
    try:
        vocab = getattr(model.model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):  # a model without one input embedding
        vocab = None
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
        raise UserError(f"token id {bad} is out of range for {model.source} (vocabulary of {vocab}: 0..{vocab - 1})")
    longest = max_positions(model.model)
    if longest and ids.shape[1] > longest:
        raise UserError(f"input_ids hold {ids.shape[1]} positions, more than the {longest} {model.source} takes")


def _left_padded(mask: torch.Tensor) -> bool:
    """Whether some example's padding comes before its real tokens."""
    valid = mask.bool()
    return bool((valid[:, 1:] & ~valid[:, :-1]).any())


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
