"""Ultravox (hookpoints.models.ultravox): Whisper encoder + stacking projector + LLaMA.

Names as for Qwen2-Audio: ``audio_encoder.layers.{l}.*`` (Whisper's layout), ``audio_projector.*`` and the
language model's TransformerLens names (``blocks.{l}.hook_resid_post`` ...). Spaces: ``audio`` (mel frames),
``audio_encoder`` (half of them), ``audio_tokens`` (after stacking ``stack_factor`` encoder positions) and
``input`` (the LM's tokens, audio placeholders included).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from hookpoints.adapters.base import Adapter, Single, Stack, random_ids, template_ids, token_batch
from hookpoints.adapters.decoder_lm import LLAMA_BLOCK, without_foreign_lm
from hookpoints.adapters.whisper import ENCODER_LAYER, lengths_mask
from hookpoints.errors import UserError
from hookpoints.inputs import ModelInputs
from hookpoints.models.ultravox import UltravoxModel, audio_token_lengths, encoder_lengths


class Ultravox(Adapter):
    def hook_points(self, model):
        """The TransformerLens names of the language model only where it has LLaMA's layout (decoder_lm)."""
        return without_foreign_lm(super().hook_points(model), model.config.text_config)

    def modalities(self, config):
        return ("text", "speech")

    def model_class(self, config, modality):
        return UltravoxModel

    def tasks(self, config, modality):
        """forward, and ``continue``: greedy generation after the text or the speech prompt (its audio tokens)."""
        return ("forward", "continue")

    def key_positions(self, model, space):
        """The audio encoder's maps have keys up to its window (Whisper's 1500 positions), the LM's its context."""
        if space == "audio_encoder":
            return model.config.audio_config.max_source_positions
        return super().key_positions(model, space)

    def probe_inputs(self, model, modality="text"):
        if modality == "text":  # the LM alone: the audio tower does not run on text
            ids = random_ids(model, 2, 11)
            return ModelInputs({"input_ids": ids, "attention_mask": ids.new_ones(ids.shape)}, {"input": ids > -1})
        mels = model.config.audio_config.num_mel_bins
        # Odd lengths, distinct per space and from any width (stack factor 8: 74 frames, 37 encoder positions,
        # 5 audio tokens, 11 LM tokens).
        frames = 2 * (4 * model.config.stack_factor + 5)
        features = torch.randn(2, mels, frames, generator=torch.Generator().manual_seed(0))
        return self._speech(model, None, features, torch.full((2,), frames), text=random_ids(model, 2, 6))

    def text_inputs(self, model, tokenizer, texts):
        ids, mask = token_batch(tokenizer, texts, max_length=model.config.text_config.max_position_embeddings)
        return ModelInputs({"input_ids": ids, "attention_mask": mask}, {"input": mask.bool()})

    def speech_inputs(self, model, processor, tokenizer, waveforms, *, frames=None, template=None):
        """Each utterance's own log-mel frames (not a whole window, as Ultravox's processor does), zero-padded.

        Features are extracted one utterance at a time: extracted as a padded batch, an utterance's last frame
        would be computed over padding instead of the reflection the extractor uses at a signal's end.
        """
        if frames is not None:
            raise UserError("--frames applies to SeamlessM4T; Ultravox reads each utterance's own frames")
        each = [
            processor(wave, sampling_rate=16_000, return_tensors="pt", padding="longest")["input_features"][0]
            for wave in waveforms
        ]  # [mels, frames_i]
        lengths = torch.tensor([feature.shape[-1] for feature in each])
        features = torch.zeros(len(each), each[0].shape[0], int(lengths.max()))
        for i, feature in enumerate(each):
            features[i, :, : feature.shape[-1]] = feature
        return self._speech(model, tokenizer, features, lengths, template=template)

    def _speech(self, model, tokenizer, features, lengths, *, text=None, template=None) -> ModelInputs:
        """A prompt of audio placeholders (after the tokenizer's BOS, if it adds one), then ``text`` if given;
        ``template``: text around them, the audio at ``{audio}`` (after the BOS)."""
        counts = audio_token_lengths(lengths, model.config.stack_factor)  # [batch]
        prefix = tokenizer("", add_special_tokens=True)["input_ids"] if tokenizer is not None else []
        before, after = template_ids(tokenizer, template)
        prefix = [*prefix, *before]
        placeholder = model.config.text_config.eos_token_id if tokenizer is None else tokenizer.eos_token_id
        placeholder = placeholder[0] if isinstance(placeholder, list) else placeholder
        rows = []
        for i, count in enumerate(counts.tolist()):
            extra = text[i].tolist() if text is not None else after
            rows.append([*prefix, *[placeholder] * count, *extra])
        width = max(map(len, rows))
        pad = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        frames = features.shape[-1]
        positions = encoder_lengths(torch.tensor(frames))
        tokens = audio_token_lengths(torch.tensor(frames), model.config.stack_factor)
        return ModelInputs(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "audio_values": features,
                "audio_lens": lengths,
                "audio_token_start_idx": torch.full((len(rows),), len(prefix)),
                "audio_token_len": counts,
            },
            {
                "input": mask.bool(),
                "audio": lengths_mask(lengths, frames),
                "audio_encoder": lengths_mask(encoder_lengths(lengths), int(positions)),
                "audio_tokens": lengths_mask(counts, int(tokens)),
            },
        )

    @contextmanager
    def batch_guard(self, model, inputs):
        """Zero what lies past each example's audio before the encoder's convolutions and the frame stacking.

        Alone, an utterance's last frames meet the convolutions' zero padding and the stacker's zero fill; in a
        batch padded to the longest utterance they meet the padding's features instead.
        """
        lengths = inputs.kwargs.get("audio_lens")
        if lengths is None or bool((lengths == inputs.kwargs["audio_values"].shape[-1]).all()):
            yield
            return
        frames = lengths_mask(lengths, inputs.kwargs["audio_values"].shape[-1]).to(lengths.device)
        positions = lengths_mask(encoder_lengths(lengths), (frames.shape[1] - 1) // 2 + 1).to(lengths.device)

        def channels_first(valid):
            return lambda module, args: (args[0] * valid[:, None, : args[0].shape[-1]].to(args[0].dtype),)

        def positions_first(module, args):
            return (args[0] * positions[:, : args[0].shape[1], None].to(args[0].dtype),)

        tower = model.audio_tower
        handles = [
            tower.conv1.register_forward_pre_hook(channels_first(frames)),
            tower.conv2.register_forward_pre_hook(channels_first(frames)),
            model.multi_modal_projector.register_forward_pre_hook(positions_first),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


ULTRAVOX = Ultravox(
    name="ultravox",
    model_types=("ultravox",),
    stacks=(
        Stack("audio_encoder", "audio_tower.layers", "audio_encoder.layers", ENCODER_LAYER, config="audio_config"),
        Stack("lm", "language_model.model.layers", "blocks", LLAMA_BLOCK, config="text_config"),
    ),
    singles=(
        Single("audio_encoder.conv1", "audio_tower.conv1", "audio_encoder", "conv1"),
        Single("audio_encoder.conv2", "audio_tower.conv2", "audio_encoder", "conv2"),
        Single("audio_encoder.layer_norm", "audio_tower.layer_norm", "audio_encoder", "layer_norm"),
        Single("audio_projector.ln_pre", "multi_modal_projector.ln_pre", "audio_projector", "ln_pre"),
        Single("audio_projector.linear_1", "multi_modal_projector.linear_1", "audio_projector", "linear_1"),
        Single("audio_projector.act", "multi_modal_projector.act", "audio_projector", "act"),
        Single("audio_projector.ln_mid", "multi_modal_projector.ln_mid", "audio_projector", "ln_mid"),
        Single("audio_projector.linear_2", "multi_modal_projector.linear_2", "audio_projector", "linear_2"),
        Single("audio_projector.ln_post", "multi_modal_projector.ln_post", "audio_projector", "ln_post"),
        Single("hook_embed", "language_model.model.embed_tokens", "lm", "hook_embed"),
        # TransformerLens' meaning, as for LLaMA: from the final norm's input, before its gain
        Single("ln_final.hook_scale", "language_model.model.norm", "lm", "ln_final.hook_scale", derived="scale"),
        Single(
            "ln_final.hook_normalized",
            "language_model.model.norm",
            "lm",
            "ln_final.hook_normalized",
            derived="normalized",
        ),
    ),
    components={
        "audio_tower": "audio_encoder",
        "multi_modal_projector": "audio_projector",
        "language_model": "lm",
    },
    # the audio's features and where its tokens go: left padding moves each example's first audio token
    per_example_kwargs=("audio_values", "audio_lens", "audio_token_start_idx", "audio_token_len"),
    per_example_positions=("audio_token_start_idx",),
)
