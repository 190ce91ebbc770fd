"""Whisper: a log-mel speech encoder (two convolutions, then Transformer layers) and a text decoder.

Names mirror SeamlessM4T's so that the two can be compared: ``speech_encoder.layers.{l}.fc1``,
``text_decoder.layers.{l}.encoder_attn.k_proj`` ... Whisper's convolutions are ``[batch, channels, time]``
(neurons on axis 1); ``conv1`` runs at the mel frame rate (space ``input``), everything after ``conv2`` at half
of it (space ``encoder``). ``{self_attn,encoder_attn}.hook_attn_scores`` / ``hook_pattern`` are the attention
maps (``[batch, head, query_pos, key_pos]``; the decoder's cross-attention over encoder positions;
hookpoints.attention).
"""

from __future__ import annotations

import torch
from transformers import WhisperForConditionalGeneration

from hookpoints.adapters.base import Adapter, Point, Single, Stack
from hookpoints.errors import UserError
from hookpoints.inputs import ModelInputs
from hookpoints.languages import SEAMLESS_CODES

#: Model codes (``eng``, ``cmn``) -> Whisper's language tokens' codes (``en``, ``zh``).
WHISPER_CODES = {three: two for two, three in SEAMLESS_CODES.items()}

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
#: attention maps ([batch, head, query_pos, key_pos], hookpoints.attention): recorded only when named
MAPS = ("hook_attn_scores", "hook_pattern")
ENCODER_LAYER = (
    Point("self_attn_layer_norm"),
    *(Point(f"self_attn.{name}") for name in ATTENTION),
    *(Point(f"self_attn.{name}") for name in MAPS),
    Point("final_layer_norm"),
    Point("fc1"),
    Point("fc2"),
    Point("hook_resid_post", ""),
)
DECODER_LAYER = (
    Point("self_attn_layer_norm"),
    *(Point(f"self_attn.{name}") for name in ATTENTION),
    *(Point(f"self_attn.{name}") for name in MAPS),
    Point("encoder_attn_layer_norm"),
    *(Point(f"encoder_attn.{name}") for name in ATTENTION),
    *(Point(f"encoder_attn.{name}") for name in MAPS),
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

    def key_positions(self, model, space):
        config = model.config
        return config.max_source_positions if space == "encoder" else config.max_target_positions

    def key_mask(self, inputs, space):
        """Every encoder position: Whisper attends over its whole window (the silence after a short utterance
        is input, not masked padding), in its encoder and in the decoder's cross-attention."""
        return None if space == "encoder" else super().key_mask(inputs, space)

    def tasks(self, config, modality):
        """asr (``<|transcribe|>``) everywhere; s2tt (``<|translate|>``, X -> English) on multilingual checkpoints
        only: English-only (``.en``) ones were never trained to translate."""
        return ("forward", "asr", "s2tt") if multilingual(config) else ("forward", "asr")

    def language_token(self, model, tokenizer, code):
        """``<|en|>`` for ``eng``; an English-only checkpoint knows English only."""
        if tokenizer is None or (not multilingual(model.config) and code != "eng"):
            return None
        return tokenizer.get_vocab().get(f"<|{WHISPER_CODES.get(code, code)}|>")

    def languages(self, model, tokenizer):
        if not multilingual(model.config):
            return ["eng"]
        lang_to_id = getattr(model.generation_config, "lang_to_id", None) or {}
        codes = [token.strip("<|>") for token in lang_to_id]
        return sorted(SEAMLESS_CODES.get(code, code) for code in codes)

    def decoder_prompt(self, model, tokenizer, targets, *, task="asr", sources=None):
        """What Whisper's decoder starts from: ``<|startoftranscript|>`` [``<|lang|>`` ``<|transcribe|>`` or
        ``<|translate|>``] ``<|notimestamps|>``; English-only checkpoints take no language or task token.

        asr names the speech's language (= the target), s2tt the *source* language and translates into English.
        """
        vocab = tokenizer.get_vocab()
        needed = ["<|notimestamps|>"]
        if multilingual(model.config):
            needed.append("<|translate|>" if task == "s2tt" else "<|transcribe|>")
        missing = [token for token in needed if token not in vocab]
        if missing:  # a tokenizer that is not Whisper's (a converted or hand-made checkpoint)
            raise UserError(f"this Whisper's tokenizer has no {missing[0]} token: save Whisper's own tokenizer with it")
        start, plain = model.config.decoder_start_token_id, vocab["<|notimestamps|>"]
        if not multilingual(model.config):
            return torch.tensor([[start, plain]] * len(targets))
        if task == "s2tt":
            if any(target != "eng" for target in targets):
                raise UserError("Whisper translates into English only: give --tgt-lang eng (or none)")
            if sources is None:
                raise UserError("task s2tt with Whisper needs each speech's language: add a 'language' column")
            languages, marker = sources, vocab["<|translate|>"]
        else:
            languages, marker = targets, vocab["<|transcribe|>"]
        tokens = [self.language_token(model, tokenizer, code) for code in languages]
        if None in tokens:
            code = languages[tokens.index(None)]
            kind = "source" if task == "s2tt" else "target"
            known = ", ".join(self.languages(model, tokenizer))
            raise UserError(f"unknown {kind} language {code!r} for Whisper; it knows: {known}")
        return torch.tensor([[start, token, marker, plain] for token in tokens])

    def prompt_kwargs(self, model, prompt):
        """``language`` (per example) and ``task`` from a multilingual prompt: without them ``generate`` runs a
        language-detection pass first (its LM-head call would be taken for step 0) and keeps its result only
        for the processors' begin index, while decoding from the prompt given."""
        generation = model.generation_config
        lang_to_id = getattr(generation, "lang_to_id", None)
        if not multilingual(model.config) or not lang_to_id or prompt.shape[1] < 3:
            return {}
        languages = {token_id: token for token, token_id in lang_to_id.items()}
        tasks = {token_id: task for task, token_id in (getattr(generation, "task_to_id", None) or {}).items()}
        found = [languages.get(int(token)) for token in prompt[:, 1]]
        task = {tasks.get(int(token)) for token in prompt[:, 2]}
        if None in found or len(task) != 1 or None in task:
            return {}
        return {"language": found, "task": task.pop()}

    def probe_inputs(self, model, modality="text"):
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

    def speech_inputs(self, model, processor, tokenizer, waveforms, *, frames=None):
        features, frame_mask = window_features(processor, waveforms, frames)
        decoder = torch.full((len(waveforms), 1), model.config.decoder_start_token_id)
        encoder_lengths = (frame_mask.sum(1) - 1) // 2 + 1  # conv2: kernel 3, stride 2, padding 1
        return ModelInputs(
            {"input_features": features, "decoder_input_ids": decoder},
            {
                "input": frame_mask,
                "encoder": lengths_mask(encoder_lengths, features.shape[-1] // 2),
                "decoder": torch.ones(decoder.shape, dtype=torch.bool),
            },
        )


def multilingual(config) -> bool:
    """transformers' rule: English-only Whisper checkpoints have 51,864 tokens, multilingual ones more."""
    return config.vocab_size >= 51865


def window_features(processor, waveforms, frames: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features in the extractor's fixed window (``[batch, mels, window]``) and the real frames' mask.

    Whisper-style encoders always read the whole window (30 s in the real models): the silence after an
    utterance is part of the input, but the mask keeps it out of pooling.
    """
    if frames is not None:
        raise UserError(
            "--frames applies to models that read variable-length speech (SeamlessM4T); Whisper-style encoders "
            "read a fixed window: drop --frames"
        )
    batch = processor(waveforms, sampling_rate=16_000, return_tensors="pt", return_attention_mask=True)
    return batch["input_features"], batch["attention_mask"].bool()


def lengths_mask(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``[batch, total]``: true at the first ``lengths[i]`` positions of row ``i``."""
    return torch.arange(total)[None, :] < lengths[:, None]


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
