"""SeamlessM4T v2: the Conformer speech encoder, the NLLB-style text encoder and the shared text decoder.

Canonical names follow Table 1 of seeds/seamless-m4t-v2-neurons.txt:
``speech_encoder.layers.{l}.conv_module.depthwise_conv``, ``text_encoder.layers.{l}.ffn.fc1``,
``text_decoder.layers.{l}.cross_attention.k_proj`` ...; ``{stack}.layers.{l}.hook_resid_post`` is a layer's
output. The Conformer conv module is ``[batch, channels, time]``: its neurons are channels (axis 1); its
``pointwise_conv1`` has 2 x d_model channels (before the GLU). Speech loads
``SeamlessM4Tv2ForSpeechToText``, text ``SeamlessM4Tv2ForTextToText``; both share the text decoder's names.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import SeamlessM4Tv2ForSpeechToText, SeamlessM4Tv2ForTextToText

from hookpoints.adapters.base import Adapter, Point, Stack, random_ids, token_batch
from hookpoints.features import seamless_features
from hookpoints.inputs import ModelInputs, fixed_frames

SPEECH_ENCODER_SUBMODULES = (
    "ffn1_layer_norm",
    "ffn1.intermediate_dense",
    "ffn1.output_dense",
    "self_attn_layer_norm",
    "self_attn.linear_q",
    "self_attn.linear_k",
    "self_attn.linear_v",
    "self_attn.linear_out",
    "conv_module.layer_norm",
    "conv_module.pointwise_conv1",
    "conv_module.glu",
    "conv_module.depthwise_conv",
    "conv_module.depthwise_layer_norm",
    "conv_module.pointwise_conv2",
    "ffn2_layer_norm",
    "ffn2.intermediate_dense",
    "ffn2.output_dense",
)
TEXT_ENCODER_SUBMODULES = (
    "self_attn_layer_norm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "ffn_layer_norm",
    "ffn.fc1",
    "ffn.fc2",
)
TEXT_DECODER_SUBMODULES = (
    "self_attn_layer_norm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "cross_attention_layer_norm",
    "cross_attention.q_proj",
    "cross_attention.k_proj",
    "cross_attention.v_proj",
    "cross_attention.out_proj",
    "ffn_layer_norm",
    "ffn.fc1",
    "ffn.fc2",
)
#: Table 1's components, per module group (the paper's "modules").
TABLE1 = {
    "speech_encoder": SPEECH_ENCODER_SUBMODULES,
    "text_encoder": TEXT_ENCODER_SUBMODULES,
    "text_decoder": TEXT_DECODER_SUBMODULES,
}


#: Attention maps ([batch, head, query_pos, key_pos], hookpoints.attention) per stack: recorded only when named.
MAPS = {
    "speech_encoder": ("self_attn.hook_attn_scores", "self_attn.hook_pattern"),
    "text_encoder": ("self_attn.hook_attn_scores", "self_attn.hook_pattern"),
    "text_decoder": (
        "self_attn.hook_attn_scores",
        "self_attn.hook_pattern",
        "cross_attention.hook_attn_scores",
        "cross_attention.hook_pattern",
    ),
}


def _points(submodules: tuple[str, ...], maps: tuple[str, ...] = ()) -> tuple[Point, ...]:
    return (*(Point(name) for name in (*submodules, *maps)), Point("hook_resid_post", ""))


class Seamless(Adapter):
    def modalities(self, config):
        return ("text", "speech")

    def model_class(self, config, modality):
        return SeamlessM4Tv2ForSpeechToText if modality == "speech" else SeamlessM4Tv2ForTextToText

    def probe_inputs(self, model, modality="text"):
        decoder = torch.full((2, 3), model.config.decoder_start_token_id)
        if hasattr(model, "speech_encoder"):
            features = torch.randn(2, 70, model.config.feature_projection_input_dim, generator=_seeded())
            mask = torch.ones(2, 70, dtype=torch.long)
            return self._speech(model, features, mask, decoder)
        ids = random_ids(model, 2, 11)
        mask = ids.new_ones(ids.shape)
        return ModelInputs(
            {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder},
            {"input": mask.bool(), "decoder": torch.ones(decoder.shape, dtype=torch.bool)},
        )

    def text_inputs(self, model, tokenizer, texts):
        ids, mask = token_batch(tokenizer, texts, max_length=model.config.max_position_embeddings)
        decoder = torch.full((len(texts), 1), model.config.decoder_start_token_id)
        return ModelInputs(
            {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder},
            {"input": mask.bool(), "decoder": torch.ones(decoder.shape, dtype=torch.bool)},
        )

    def tasks(self, config, modality):
        return ("forward", "asr", "s2tt") if modality == "speech" else ("forward", "t2tt")

    def speech_inputs(self, model, processor, tokenizer, waveforms, *, frames=None):
        """160-dim stacked fbank frames (50 per second) from the checkpoint's SeamlessM4TFeatureExtractor."""
        batch = seamless_features(processor, waveforms)  # the extractor's output, computed faster
        features, mask = fixed_frames(batch["input_features"], batch["attention_mask"], frames, time_axis=1)
        decoder = torch.full((len(waveforms), 1), model.config.decoder_start_token_id)
        inputs = self._speech(model, features, mask, decoder)
        # The frames each utterance has alone: 25 ms fbank frames every 10 ms, stacked in pairs; an odd last
        # frame is stacked with padding and masked, but it is still there (and the length adaptor reads it).
        fbank = torch.tensor([1 + (len(wave) - 400) // 160 for wave in waveforms])
        present = (fbank + 1) // 2
        inputs.extras["frames"] = present if frames is None else present.clamp(max=frames)
        return inputs

    def source_inputs(self, model, tokenizer, texts, languages):
        """``__src__ text </s>``: the text encoder's input as SeamlessM4T's tokenizer builds it for src_lang."""
        rows = []
        for text, code in zip(texts, languages, strict=True):
            body = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append([self.language_token(model, tokenizer, code), *body, tokenizer.eos_token_id])
        rows = [row[: model.config.max_position_embeddings] for row in rows]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        decoder = torch.full((len(texts), 1), model.config.decoder_start_token_id)
        return ModelInputs(
            {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder},
            {"input": mask.bool(), "decoder": torch.ones(decoder.shape, dtype=torch.bool)},
        )

    def language_token(self, model, tokenizer, code):
        mapping = getattr(model.generation_config, "text_decoder_lang_to_code_id", None) or {}
        if code in mapping:
            return int(mapping[code])
        folded = {name.lower(): token for name, token in mapping.items()}  # labels are lower-cased: cmn_Hant
        if code.lower() in folded:
            return int(folded[code.lower()])
        if tokenizer is None:
            return None
        token = tokenizer.convert_tokens_to_ids(f"__{code}__")
        return None if token is None or token == tokenizer.unk_token_id else int(token)

    def languages(self, model, tokenizer):
        mapping = getattr(model.generation_config, "text_decoder_lang_to_code_id", None) or {}
        if mapping:
            return sorted(mapping)
        tokens = getattr(tokenizer, "additional_special_tokens", None) or []
        return sorted(t.strip("_") for t in tokens if len(t) > 4 and t.startswith("__") and t.endswith("__"))

    def generate_kwargs(self, kwargs):
        """SeamlessM4T's speech ``generate()`` also looks its input up under ``inputs``: set it to None."""
        return {**kwargs, "inputs": None}

    def decoder_prompt(self, model, tokenizer, targets, *, task="asr", sources=None):
        """``</s> __tgt__``: what ``generate(tgt_lang=...)`` starts the text decoder with."""
        start = model.config.decoder_start_token_id
        return torch.tensor([[start, self.language_token(model, tokenizer, code)] for code in targets])

    @contextmanager
    def batch_guard(self, model, inputs):
        """Zero padded frames before the length adaptor's strided convolutions.

        The adaptor's convolutions (kernel 8, stride 8) read past a short example's last frame: alone, they
        read zero padding; in a padded batch they read the encoder's outputs at padding frames, which changes
        the example's last encoder positions (by about 1e-2 in a tiny model). Zeroing the frames an example
        does not have alone (``extras["frames"]``) makes a padded batch give what each example gives alone.
        """
        adapter = getattr(getattr(model, "speech_encoder", None), "adapter", None)
        present = inputs.extras.get("frames")  # [batch]
        on_host = inputs.host_extras.get("frames", present)  # read on the CPU: a GPU batch waits for nothing
        width = inputs.kwargs["input_features"].shape[1] if "input_features" in inputs.kwargs else 0
        if adapter is None or present is None or bool((on_host == width).all()):
            yield
            return
        handles = []
        valid = torch.arange(width, device=present.device)[None, :] < present[:, None]  # [batch, frames]
        full = width
        for layer in adapter.layers:

            def zero_padding(module, args, valid=valid):
                x = args[0]  # [batch, channels, time]
                return (x * valid[:, None, : x.shape[-1]].to(x.dtype),)

            handles.append(layer.residual_conv.register_forward_pre_hook(zero_padding))
            handles.append(layer.self_attn_conv.register_forward_pre_hook(zero_padding))
            lengths = layer._compute_sub_sample_lengths_from_attention_mask(valid).long()
            full = int(layer._compute_sub_sample_lengths_from_attention_mask(torch.ones(1, full, dtype=torch.bool))[0])
            valid = torch.arange(full, device=valid.device)[None, :] < lengths[:, None]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _speech(self, model, features, mask, decoder) -> ModelInputs:
        """Speech inputs; the encoder space is the adaptor's subsampled frames."""
        lengths = model._compute_sub_sample_lengths_from_attention_mask(mask).long()  # [batch]
        full = int(model._compute_sub_sample_lengths_from_attention_mask(torch.ones_like(mask[:1]))[0])
        encoder = torch.arange(full)[None, :] < lengths[:, None]
        return ModelInputs(
            {"input_features": features, "attention_mask": mask, "decoder_input_ids": decoder},
            {
                "input": mask.bool(),
                "encoder": encoder,
                "decoder": torch.ones(decoder.shape, dtype=torch.bool),
            },
        )


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


SEAMLESS_M4T_V2 = Seamless(
    name="seamless_m4t_v2",
    model_types=("seamless_m4t_v2",),
    stacks=(
        Stack(
            "speech_encoder",
            "speech_encoder.encoder.layers",
            "speech_encoder.layers",
            _points(SPEECH_ENCODER_SUBMODULES, MAPS["speech_encoder"]),
        ),
        Stack(
            "text_encoder",
            "text_encoder.layers",
            "text_encoder.layers",
            _points(TEXT_ENCODER_SUBMODULES, MAPS["text_encoder"]),
        ),
        Stack(
            "text_decoder",
            "text_decoder.layers",
            "text_decoder.layers",
            _points(TEXT_DECODER_SUBMODULES, MAPS["text_decoder"]),
        ),
    ),
    components={
        "speech_encoder": "speech_encoder",
        "text_encoder": "text_encoder",
        "text_decoder": "text_decoder",
        "lm_head": "text_decoder",
    },
)
