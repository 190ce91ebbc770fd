"""An audio LLM loaded for text: its audio tower does not run, so its hook points are unavailable and the
default selection leaves them out. Before, the probe ran audio and text together and listed them, and
`run_with_cache(texts)` / `hp.record(model, texts, ...)` without naming hooks failed inside nnsight."""

from __future__ import annotations

import pytest
import torch

import hookpoints as hp
from hookpoints.errors import UserError

TEXTS = ["the cat sat on the mat", "hello"]


@pytest.mark.parametrize("family", ["qwen2_audio", "ultravox"])
def test_an_audio_llm_on_text_lists_only_what_runs_and_records_by_default(family, tiny_model_dir, tmp_path):
    model = hp.load(tiny_model_dir(family), modality="text")
    audio = [p for p in model.hook_points if p.name.startswith(("audio_encoder", "audio_projector"))]
    assert audio and all(p.unavailable and "does not run" in p.unavailable for p in audio)
    with pytest.raises(UserError, match="^hook point 'audio_encoder.layers.0.fc1' cannot be recorded: its module"):
        model.select(["audio_encoder.layers.0.fc1"])
    _, cache = model.run_with_cache(TEXTS)  # the default selection
    name = "blocks.1.hook_resid_post"
    assert name in cache and not any(key.startswith("audio") for key in cache)
    point = next(p for p in model.hook_points if p.name == name)
    seen = {}  # a plain torch hook on the same module, one text at a time, no padding
    module = model.model.get_submodule(point.module)
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    try:
        for row, text in enumerate(TEXTS):
            ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                model.model(input_ids=ids, attention_mask=torch.ones_like(ids))
            real = cache.mask[row]
            torch.testing.assert_close(cache[name][row][real], seen["out"][0], atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()
    summary = hp.record(
        model, [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)], tmp_path / "s", "r", progress=False
    )
    assert summary.recorded == 2 and summary.hooks == len(model.select())
    speech = hp.load(tiny_model_dir(family), modality="speech")
    assert all(p.unavailable is None for p in speech.hook_points if p.name == "audio_encoder.layers.0.fc1")
