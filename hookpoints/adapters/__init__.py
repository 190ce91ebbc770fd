"""Per-family adapters: canonical hook names, the class that loads a checkpoint, and probe inputs."""

from __future__ import annotations

from hookpoints.adapters.base import Adapter
from hookpoints.adapters.bert import BERT
from hookpoints.adapters.decoder_lm import GPT2, LLAMA
from hookpoints.adapters.generic import GENERIC
from hookpoints.adapters.qwen2_audio import QWEN2_AUDIO
from hookpoints.adapters.seamless import SEAMLESS_M4T_V2
from hookpoints.adapters.ultravox import ULTRAVOX
from hookpoints.adapters.whisper import WHISPER

ADAPTERS: tuple[Adapter, ...] = (SEAMLESS_M4T_V2, GPT2, LLAMA, BERT, WHISPER, QWEN2_AUDIO, ULTRAVOX)


def adapter_for(model_type: str) -> Adapter:
    """The adapter of a config's ``model_type`` (the generic one for families without their own)."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    return GENERIC
