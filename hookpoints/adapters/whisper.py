"""Whisper: a log-mel speech encoder (two convolutions, then Transformer layers) and a text decoder.

Names mirror SeamlessM4T's so that the two can be compared: ``speech_encoder.layers.{l}.fc1``,
``text_decoder.layers.{l}.encoder_attn.k_proj`` ... Whisper's convolutions are ``[batch, channels, time]``
(neurons on axis 1); ``conv1`` runs at the mel frame rate (space ``input``), everything after ``conv2`` at half
of it (space ``encoder``).
"""

from __future__ import annotations

import torch
from transformers import WhisperForConditionalGeneration

from hookpoints.adapters.base import Adapter, Point, Single, Stack
from hookpoints.inputs import ModelInputs

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
ENCODER_LAYER = (
    Point("self_attn_layer_norm"),
    *(Point(f"self_attn.{name}") for name in ATTENTION),
    Point("final_layer_norm"),
    Point("fc1"),
    Point("fc2"),
    Point("hook_resid_post", ""),
)
DECODER_LAYER = (
    Point("self_attn_layer_norm"),
    *(Point(f"self_attn.{name}") for name in ATTENTION),
    Point("encoder_attn_layer_norm"),
    *(Point(f"encoder_attn.{name}") for name in ATTENTION),
    Point("final_layer_norm"),
    Point("fc1"),
    Point("fc2"),
    Point("hook_resid_post", ""),
)


class Whisper(Adapter):
    def modalities(self, config):
        return ("speech",)

    def model_class(self, config, modality):
        return WhisperForConditionalGeneration

    def probe_inputs(self, model):
        config = model.config
        frames = 2 * config.max_source_positions  # Whisper only takes full 30 s windows
        features = torch.randn(2, config.num_mel_bins, frames, generator=torch.Generator().manual_seed(0))
        decoder = torch.full((2, 5), config.decoder_start_token_id)
        return ModelInputs(
            {"input_features": features, "decoder_input_ids": decoder},
            {
                "input": torch.ones(2, frames, dtype=torch.bool),
                "encoder": torch.ones(2, config.max_source_positions, dtype=torch.bool),
                "decoder": torch.ones(decoder.shape, dtype=torch.bool),
            },
        )


WHISPER = Whisper(
    name="whisper",
    model_types=("whisper",),
    stacks=(
        Stack("speech_encoder", "model.encoder.layers", "speech_encoder.layers", ENCODER_LAYER),
        Stack("text_decoder", "model.decoder.layers", "text_decoder.layers", DECODER_LAYER),
    ),
    singles=(
        Single("speech_encoder.conv1", "model.encoder.conv1", "speech_encoder", "conv1"),
        Single("speech_encoder.conv2", "model.encoder.conv2", "speech_encoder", "conv2"),
        Single("speech_encoder.layer_norm", "model.encoder.layer_norm", "speech_encoder", "layer_norm"),
        Single("text_decoder.layer_norm", "model.decoder.layer_norm", "text_decoder", "layer_norm"),
    ),
    components={
        "model.encoder": "speech_encoder",
        "model.decoder": "text_decoder",
        "proj_out": "text_decoder",
    },
)
