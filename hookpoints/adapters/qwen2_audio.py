"""Qwen2-Audio: a Whisper-style audio encoder, a projector, and a Qwen2 language model.

The audio encoder's layers are ``audio_encoder.layers.{l}.*`` (Whisper's layout); the language model uses
TransformerLens names (``blocks.{l}.hook_resid_post`` ...) as for any decoder-only LM. Spaces: ``audio``
(mel frames), ``audio_encoder`` (encoder positions, half the frames), ``audio_tokens`` (after the encoder's
average pooling: the positions that replace the prompt's audio tokens) and ``input`` (the LM's tokens).
"""

from __future__ import annotations

import torch
from transformers import Qwen2AudioForConditionalGeneration

from hookpoints.adapters.base import Adapter, Single, Stack, random_ids, template_ids, token_batch
from hookpoints.adapters.decoder_lm import LLAMA_BLOCK, without_foreign_lm
from hookpoints.adapters.whisper import ENCODER_LAYER, lengths_mask, window_features
from hookpoints.errors import UserError
from hookpoints.inputs import ModelInputs


class Qwen2Audio(Adapter):
    def hook_points(self, model):
        """The TransformerLens names of the language model only where it has LLaMA's layout (decoder_lm)."""
        return without_foreign_lm(super().hook_points(model), model.config.text_config)

    def modalities(self, config):
        return ("text", "speech")

    def model_class(self, config, modality):
        return Qwen2AudioForConditionalGeneration

    def tasks(self, config, modality):
        """forward, and ``continue``: greedy generation after the text or the speech prompt (its audio tokens)."""
        return ("forward", "continue")

    def key_positions(self, model, space):
        """The audio encoder's maps have keys up to its window (Whisper's 1500 positions), the LM's its context."""
        if space == "audio_encoder":
            return model.config.audio_config.max_source_positions
        return super().key_positions(model, space)

    def probe_inputs(self, model, modality="text"):
        config = model.config
        high = min(config.audio_token_id, model.get_input_embeddings().num_embeddings)
        if modality == "text":  # the LM alone: the audio tower does not run on text
            ids = random_ids(model, 2, 11, high=high)
            return ModelInputs({"input_ids": ids, "attention_mask": ids.new_ones(ids.shape)}, {"input": ids > -1})
        frames = 2 * config.audio_config.max_source_positions
        features = torch.randn(2, config.audio_config.num_mel_bins, frames, generator=torch.Generator().manual_seed(0))
        feature_mask = torch.ones(2, frames, dtype=torch.long)
        encoder_lengths, token_lengths = model.model.audio_tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        n_audio = int(token_lengths[0])
        text = random_ids(model, 2, 4, high=high)
        ids = torch.cat([torch.full((2, n_audio), config.audio_token_id), text], dim=1)
        mask = torch.ones_like(ids)
        return ModelInputs(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "input_features": features,
                "feature_attention_mask": feature_mask,
            },
            {
                "input": mask.bool(),
                "audio": feature_mask.bool(),
                "audio_encoder": lengths_mask(encoder_lengths, frames // 2),
                "audio_tokens": lengths_mask(token_lengths, n_audio),
            },
        )

    def text_inputs(self, model, tokenizer, texts):
        ids, mask = token_batch(tokenizer, texts, max_length=model.config.text_config.max_position_embeddings)
        return ModelInputs({"input_ids": ids, "attention_mask": mask}, {"input": mask.bool()})

    def check_template(self, model, tokenizer, template: str) -> None:
        """A UserError for a template holding the audio token or its wrapping (:func:`checked_template`)."""
        checked_template(tokenizer, template, model.config.audio_token_id)

    def speech_inputs(self, model, processor, tokenizer, waveforms, *, frames=None, template=None):
        """A speech prompt: the audio's tokens (wrapped in ``<|audio_bos|>``/``<|audio_eos|>`` when the
        tokenizer has them), as Qwen2-Audio's processor expands ``<|AUDIO|>``; right-padded. ``template``: text
        around them, the audio at ``{audio}`` (an instruction, a chat turn)."""
        features, frame_mask = window_features(processor, waveforms, frames)
        tower = model.model.audio_tower
        encoder_lengths, token_lengths = tower._get_feat_extract_output_lengths(frame_mask.sum(-1))
        ids, mask = audio_prompts(tokenizer, token_lengths.tolist(), model.config.audio_token_id, template)
        window = features.shape[-1]
        return ModelInputs(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "input_features": features,
                "feature_attention_mask": frame_mask.long(),
            },
            {
                "input": mask.bool(),
                "audio": frame_mask,
                "audio_encoder": lengths_mask(encoder_lengths, window // 2),
                "audio_tokens": lengths_mask(token_lengths, (window // 2 - 2) // 2 + 1),
            },
        )


def audio_wrap(tokenizer) -> list[int] | None:
    """The ids of ``<|audio_bos|>`` and ``<|audio_eos|>``, or None where the tokenizer lacks them."""
    wrap = [tokenizer.convert_tokens_to_ids(t) for t in ("<|audio_bos|>", "<|audio_eos|>")]
    return wrap if all(isinstance(t, int) and t != tokenizer.unk_token_id for t in wrap) else None


def checked_template(tokenizer, template: str | None, audio_token: int) -> tuple[list[int], list[int]]:
    """:func:`template_ids`, refused when its text holds the audio token or its wrapping (as HF's chat text
    writes them): they would wrap the audio twice, or be audio tokens without features (HF's ValueError)."""
    before, after = template_ids(tokenizer, template)
    held = sorted({audio_token, *(audio_wrap(tokenizer) or [])} & {*before, *after})
    if held:
        raise UserError(
            f"the prompt template holds {', '.join(tokenizer.convert_ids_to_tokens(held))}: {{audio}} stands for "
            f"the audio's tokens with their <|audio_bos|>/<|audio_eos|>; leave them out, not {template!r:.60}"
        )
    return before, after


def audio_prompts(
    tokenizer, counts: list[int], audio_token: int, template: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, tokens]`` ids and mask: per example ``counts[i]`` audio tokens, wrapped when possible, with
    ``template``'s text (tokenised without special tokens) before and after them."""
    wrap = audio_wrap(tokenizer)
    before, after = checked_template(tokenizer, template, audio_token)
    rows = [
        [*before, *([wrap[0]] if wrap else []), *[audio_token] * n, *([wrap[1]] if wrap else []), *after]
        for n in counts
    ]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


QWEN2_AUDIO = Qwen2Audio(
    name="qwen2_audio",
    model_types=("qwen2_audio",),
    stacks=(
        Stack(
            "audio_encoder",
            "model.audio_tower.layers",
            "audio_encoder.layers",
            ENCODER_LAYER,
            config="audio_config",
        ),
        Stack("lm", "model.language_model.layers", "blocks", LLAMA_BLOCK, config="text_config"),
    ),
    singles=(
        Single("audio_encoder.conv1", "model.audio_tower.conv1", "audio_encoder", "conv1"),
        Single("audio_encoder.conv2", "model.audio_tower.conv2", "audio_encoder", "conv2"),
        Single("audio_encoder.layer_norm", "model.audio_tower.layer_norm", "audio_encoder", "layer_norm"),
        Single("audio_projector.linear", "model.multi_modal_projector.linear", "audio_projector", "linear"),
        Single("hook_embed", "model.language_model.embed_tokens", "lm", "hook_embed"),
        # TransformerLens' meaning, as for LLaMA: from the final norm's input, before its gain
        Single("ln_final.hook_scale", "model.language_model.norm", "lm", "ln_final.hook_scale", derived="scale"),
        Single(
            "ln_final.hook_normalized",
            "model.language_model.norm",
            "lm",
            "ln_final.hook_normalized",
            derived="normalized",
        ),
    ),
    components={
        "model.audio_tower": "audio_encoder",
        "model.multi_modal_projector": "audio_projector",
        "model.language_model": "lm",
        "lm_head": "lm",
    },
    # the audio's features and frame mask: merged into the prompt's audio tokens in their order, row by row
    per_example_kwargs=("input_features", "feature_attention_mask"),
)
