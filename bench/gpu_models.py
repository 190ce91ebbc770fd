"""The two random-weight models bench/gpu.py measures, built on the device from their configs, and their
inputs (see bench/gpu.py). Imported by bench/gpu.py after it has made ``hookpoints`` importable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    SeamlessM4Tv2Config,
)

from hookpoints.adapters import adapter_for
from hookpoints.adapters.seamless import TABLE1
from hookpoints.inputs import ModelInputs
from hookpoints.model import HookedModel
from hookpoints.placement import Placement
from hookpoints.tiny import build_tiny

SEAMLESS_SIZES = (
    "vocab_size", "hidden_size", "encoder_layers", "decoder_layers", "speech_encoder_layers", "encoder_ffn_dim",
    "decoder_ffn_dim", "speech_encoder_intermediate_size", "encoder_attention_heads", "decoder_attention_heads",
    "speech_encoder_attention_heads", "conv_depthwise_kernel_size", "adaptor_stride", "max_position_embeddings",
    "initializer_range",
)  # fmt: skip
LLAMA_1B = {
    "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 2048, "tie_word_embeddings": True,
}  # fmt: skip
LLAMA_SMOKE = {**LLAMA_1B, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}  # fmt: skip
SAMPLE_RATE = 16000


def build(family: str, folder: Path, placement: Placement, smoke: bool) -> HookedModel:
    """A random-weight model at full (or, smoke, tiny) size, built on the device in its precision."""
    tiny = build_tiny("seamless_m4t_v2" if family == "seamless" else "llama", folder / family, seed=0)
    if family == "seamless":
        config = AutoConfig.from_pretrained(tiny)
        if not smoke:
            large = SeamlessM4Tv2Config()
            for key in SEAMLESS_SIZES:
                setattr(config, key, getattr(large, key))
        modality = "speech"
    else:
        config = LlamaConfig(**(LLAMA_SMOKE if smoke else LLAMA_1B), bos_token_id=1, eos_token_id=2)
        modality = "text"
    adapter = adapter_for(config.model_type)
    model_class = adapter.model_class(config, modality) if family == "seamless" else LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(placement.torch_device()):
        model = model_class._from_config(config, dtype=placement.torch_dtype()).eval()
    if family == "seamless":
        model.generation_config = GenerationConfig.from_pretrained(tiny)
    processor = AutoFeatureExtractor.from_pretrained(tiny) if modality == "speech" else None
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    return HookedModel(model, adapter, tokenizer=tokenizer, processor=processor, source=family, modality=modality)


def waveforms(n: int, seconds: float, seed: int) -> list[np.ndarray]:
    """Speech-like noise: a few tones under noise, different per example."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    waves = []
    for _ in range(n):
        tones = sum(np.sin(2 * np.pi * rng.uniform(100, 3000) * t) for _ in range(3))
        waves.append((0.1 * tones + 0.05 * rng.standard_normal(len(t))).astype(np.float32))
    return waves


def batch_of(model: HookedModel, n: int, size: int, seed: int) -> ModelInputs:
    """One batch: ``n`` speech examples (``size`` frames) or ``n`` random token sequences of ``size``."""
    if model.modality == "speech":
        return model.speech_inputs(waveforms(n, size / 50, seed), frames=size)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.model.config.vocab_size, (n, size), generator=generator)
    mask = torch.ones_like(ids)
    return ModelInputs({"input_ids": ids, "attention_mask": mask}, {"input": mask.bool()}).to(model.device)


def table1_points(model: HookedModel, family: str):
    if family == "seamless":
        patterns = [f"{group}.layers.*.{sub}" for group in ("speech_encoder", "text_decoder") for sub in TABLE1[group]]
        return model.select(patterns)
    return model.select(None)
