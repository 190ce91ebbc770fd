"""Any other transformers model: every module path is a hook point; layers are found by their indices."""

from __future__ import annotations

import re

import torch
from transformers import AutoModel, AutoModelForCausalLM

from hookpoints.adapters.base import Adapter, random_ids, token_batch
from hookpoints.inputs import ModelInputs

_LAYER = re.compile(r"^(?:(.*)\.)?(?:layers?|h|blocks?)\.(\d+)(?:\.(.+))?$")


class Generic(Adapter):
    def model_class(self, config, modality):
        causal = any(name.endswith("ForCausalLM") for name in (config.architectures or []))
        return AutoModelForCausalLM if causal else AutoModel

    def tasks(self, config, modality):
        """forward; a causal LM (``...ForCausalLM``) also ``continue`` (greedy generation from the text)."""
        causal = self.model_class(config, modality) is AutoModelForCausalLM and not config.is_encoder_decoder
        return ("forward", "continue") if causal else ("forward",)

    def probe_inputs(self, model, modality="text"):
        ids = random_ids(model, 2, 11)
        mask = ids.new_ones(ids.shape)
        return self._with_decoder(model, {"input_ids": ids, "attention_mask": mask}, 3)

    def text_inputs(self, model, tokenizer, texts):
        ids, mask = token_batch(tokenizer, texts)
        return self._with_decoder(model, {"input_ids": ids, "attention_mask": mask}, 1)

    def _with_decoder(self, model, kwargs, length: int) -> ModelInputs:
        masks = {"input": kwargs["attention_mask"].bool()}
        if model.config.is_encoder_decoder:
            start = model.config.decoder_start_token_id or 0
            kwargs["decoder_input_ids"] = torch.full((kwargs["input_ids"].shape[0], length), start)
            masks["decoder"] = torch.ones(kwargs["decoder_input_ids"].shape, dtype=torch.bool)
        return ModelInputs(kwargs, masks)

    def locate(self, module):
        match = _LAYER.match(module)
        if match:
            prefix = match.group(1) or ""
            return prefix.rsplit(".", 1)[-1] or None, int(match.group(2)), match.group(3) or ""
        return None, None, None


GENERIC = Generic(name="generic", model_types=())
