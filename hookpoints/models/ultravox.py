"""Ultravox (fixie-ai, v0.5): a Whisper encoder, a stacking SwiGLU projector, and a LLaMA language model.

transformers 5.23 ships no Ultravox class; the hub checkpoints carry their own modelling code, which would
need ``trust_remote_code`` (running code downloaded with the weights). This module re-implements the
architecture of ``ultravox_model.py`` (v0.5) with transformers' own Whisper encoder and causal LM, under the
same module names (``audio_tower``, ``multi_modal_projector``, ``language_model``) and config keys, and
registers ``model_type="ultravox"`` with ``AutoConfig``. So a hub checkpoint loads with its weights and no
remote code: its ``model.safetensors`` holds the projector, and ``audio_model_id`` / ``text_model_id`` name
the Whisper and LLaMA checkpoints whose weights fill the other two parts (as Ultravox's own code does).

hookpoints records its forward passes (the LALM paper's setting) and its greedy continuations (task
``continue``): :class:`UltravoxModel` generates through transformers' ``GenerationMixin``, the audio read at
the first step only (the KV cache holds the prompt after it).

Speech goes in as log-mel features (``audio_values``, ``[batch, mels, frames]``, up to the encoder's
window) with ``audio_lens`` (real frames per example); the projector's output replaces ``audio_token_len``
placeholder embeddings from ``audio_token_start_idx`` of each prompt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.activations import get_activation
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.whisper.modeling_whisper import WhisperEncoder


@strict
class UltravoxConfig(PreTrainedConfig):
    """Ultravox's configuration (the keys of the hub checkpoints' ``config.json``)."""

    model_type = "ultravox"
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_model_id: str | None = None  # a Whisper checkpoint whose encoder fills audio_tower
    text_model_id: str | None = None  # a causal LM checkpoint that fills language_model
    stack_factor: int = 8  # encoder frames stacked into one audio token
    hidden_size: int = 4096  # the projector's inner width (before SwiGLU halves it)
    projector_act: str = "swiglu"
    projector_ln_mid: bool = True  # v0.5: RMSNorm after the first linear layer (v0.4.1 and before: at the end)
    norm_init: float = 0.4
    ignore_index: int = -100


class UltravoxAudioEncoder(WhisperEncoder):
    """Whisper's encoder, reading up to its window (not exactly it), with padded frames masked by ``audio_len``."""

    def forward(self, input_features: torch.Tensor, audio_len: torch.Tensor | None = None, **kwargs):
        window = self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if input_features.shape[-1] > window:
            raise ValueError(f"Ultravox's encoder reads at most {window} frames, got {input_features.shape[-1]}")
        hidden = F.gelu(self.conv1(input_features))
        hidden = F.gelu(self.conv2(hidden)).permute(0, 2, 1)  # [batch, positions, d_model]
        hidden = hidden + self.embed_positions.weight[: hidden.shape[1]]
        mask = None
        if audio_len is not None:
            lengths = encoder_lengths(audio_len)
            valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
            mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=valid)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden))


class StackAudioFrames(nn.Module):
    """``[batch, T, C]`` -> ``[batch, ceil(T / k), k * C]``, zero-padding T to a multiple of k."""

    def __init__(self, stack_factor: int):
        super().__init__()
        self.stack_factor = stack_factor

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        batch, length, channels = frames.shape
        padded = math.ceil(length / self.stack_factor) * self.stack_factor
        frames = F.pad(frames, (0, 0, 0, padded - length))
        return frames.reshape(batch, padded // self.stack_factor, channels * self.stack_factor)


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class UltravoxRMSNorm(LlamaRMSNorm):
    def __init__(self, hidden_size: int, init: float = 1.0, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps)
        self.weight.data.fill_(init)


class UltravoxProjector(nn.Module):
    """Stack frames, RMSNorm, linear, SwiGLU, (RMSNorm), linear, (RMSNorm): audio tokens in the LM's space."""

    def __init__(self, config: UltravoxConfig):
        super().__init__()
        dim_in = config.audio_config.hidden_size * config.stack_factor
        dim_mid = config.hidden_size // 2 if config.projector_act == "swiglu" else config.hidden_size
        dim_out = config.text_config.hidden_size
        self._pad_and_stack = StackAudioFrames(config.stack_factor)
        self.ln_pre = UltravoxRMSNorm(dim_in, init=config.norm_init)
        self.linear_1 = nn.Linear(dim_in, config.hidden_size, bias=False)
        self.act = SwiGLU() if config.projector_act == "swiglu" else get_activation(config.projector_act)
        self.linear_2 = nn.Linear(dim_mid, dim_out, bias=False)
        if config.projector_ln_mid:
            self.ln_mid: nn.Module = UltravoxRMSNorm(dim_mid, init=config.norm_init)
            self.ln_post: nn.Module = nn.Identity()
        else:
            self.ln_mid = nn.Identity()
            self.ln_post = UltravoxRMSNorm(dim_out, init=config.norm_init)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        hidden = self.ln_pre(self._pad_and_stack(frames))
        hidden = self.ln_mid(self.act(self.linear_1(hidden)))
        return self.ln_post(self.linear_2(hidden))


class UltravoxModel(PreTrainedModel, GenerationMixin):
    config_class = UltravoxConfig
    config: UltravoxConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["WhisperEncoderLayer", "LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: UltravoxConfig):
        super().__init__(config)
        self.audio_tower = UltravoxAudioEncoder(config.audio_config)
        self.multi_modal_projector = UltravoxProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, source, *args, **kwargs):
        """Load the checkpoint; weights it lacks come from ``audio_model_id`` / ``text_model_id`` (as in Ultravox,
        where the projector, and any fine-tuned part, are saved and the rest is read from those checkpoints)."""
        model, info = super().from_pretrained(source, *args, output_loading_info=True, **kwargs)
        missing = set(info["missing_keys"])
        options = {key: kwargs[key] for key in ("dtype", "cache_dir", "token", "revision") if key in kwargs}
        audio_id, text_id = model.config.audio_model_id, model.config.text_model_id
        if audio_id:
            _fill(
                model.audio_tower,
                "audio_tower.",
                missing,
                lambda: _encoder(AutoModel.from_pretrained(audio_id, **options)),
            )
        if text_id:
            _fill(
                model.language_model,
                "language_model.",
                missing,
                lambda: AutoModelForCausalLM.from_pretrained(text_id, **options),
            )
        return model.eval()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        audio_values: torch.Tensor | None = None,
        audio_lens: torch.Tensor | None = None,
        audio_token_start_idx: torch.Tensor | None = None,
        audio_token_len: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        """One audio per example: its projected tokens replace the prompt's placeholders at
        ``audio_token_start_idx[i] : + audio_token_len[i]``. ``position_ids`` is named so that ``generate``
        counts a left-padded prompt's positions from each example's first token (as for LLaMA)."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [batch, tokens, d_model]
        # Not when a cache already holds the prompt (a later decoding step); a one-token prompt (one audio
        # token, no BOS) still reads its audio.
        cache = kwargs.get("past_key_values")
        if audio_values is not None and (cache is None or cache.get_seq_length() == 0):
            starts, lengths = _placement(audio_token_start_idx, audio_token_len, inputs_embeds.shape[0])
            audio = self.audio_tower(audio_values.to(self.audio_tower.dtype), audio_len=audio_lens)
            tokens = self.multi_modal_projector(audio.last_hidden_state.to(inputs_embeds.dtype))
            # each example's own audio tokens (its audio_lens), else the batch's
            made = audio_token_lengths(audio_lens, self.config.stack_factor) if audio_lens is not None else None
            inputs_embeds = inputs_embeds.clone()
            for i in range(inputs_embeds.shape[0]):
                start, length = int(starts[i]), int(lengths[i])
                own = tokens.shape[1] if made is None else int(made[i])
                if length > own or (made is not None and length != own):  # audio cut, or placeholders left as text
                    raise ValueError(f"example {i}'s audio makes {own} audio tokens, but audio_token_len says {length}")
                if attention_mask is not None and attention_mask.dim() == 2:
                    span = attention_mask[i, start : start + length]
                    if span.shape[0] != length or not bool(span.all()):  # the audio would land on padding
                        raise ValueError(
                            f"example {i}'s {length} audio tokens from position {start} are not all real tokens "
                            "of its prompt (attention_mask 1): audio_token_start_idx is off"
                        )
                inputs_embeds[i, start : start + length] = tokens[i, :length]
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )


def _placement(starts, lengths, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``audio_token_start_idx`` and ``audio_token_len`` as ``[batch]`` tensors; a one-line ValueError for
    missing ones or another count (a TypeError deep in the loop before)."""
    if starts is None or lengths is None:
        raise ValueError(
            "audio_values needs audio_token_start_idx and audio_token_len: where each example's audio tokens go "
            "in its prompt, and how many (model.speech_inputs builds them)"
        )
    starts, lengths = torch.as_tensor(starts).reshape(-1), torch.as_tensor(lengths).reshape(-1)
    if starts.numel() != batch or lengths.numel() != batch:
        raise ValueError(
            f"audio_token_start_idx and audio_token_len hold one value per example ({batch}), not "
            f"{starts.numel()} and {lengths.numel()}"
        )
    return starts, lengths


def _fill(part: nn.Module, prefix: str, missing: set[str], load) -> None:
    """Copy the weights ``part`` lacks (``missing`` keys under ``prefix``) from the model ``load()`` returns."""
    wanted = {key[len(prefix) :] for key in missing if key.startswith(prefix)}
    if wanted:
        state = load().state_dict()
        part.load_state_dict({key: value for key, value in state.items() if key in wanted}, strict=False)


def _encoder(model: nn.Module) -> nn.Module:
    """A Whisper checkpoint's encoder (from WhisperModel or WhisperForConditionalGeneration)."""
    return model.get_encoder() if hasattr(model, "get_encoder") else model.encoder


def encoder_lengths(frames: torch.Tensor) -> torch.Tensor:
    """Encoder positions for ``frames`` mel frames (Whisper's conv2: kernel 3, stride 2, padding 1)."""
    return (frames - 1) // 2 + 1


def audio_token_lengths(frames: torch.Tensor, stack_factor: int) -> torch.Tensor:
    """Audio tokens the projector makes from ``frames`` mel frames."""
    return (encoder_lengths(frames) + stack_factor - 1) // stack_factor


AutoConfig.register("ultravox", UltravoxConfig, exist_ok=True)
