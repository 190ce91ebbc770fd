"""Transformers' attention-mask skip questions answered from the CPU masks (hookpoints/mask_skips.py).

On a GPU each ``padding_mask.all()`` in transformers' masking_utils is a host sync. The CPU runs the same path
here with ``ANSWER_CPU_MASKS`` on: no sync left in a recorded forward pass, the same values, and a wrong
"all true" claim caught before anything is written.
"""

from __future__ import annotations

import threading
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hookpoints.mask_skips as mask_skips
from hookpoints.loading import load
from hookpoints.mask_skips import MASK_CHECK, MaskSkips, check_claims

TEXTS = ["Hello there.", "Das Wetter ist heute wirklich sehr schön, finde ich.", "Hoy hace sol."]
SYNCS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero")


class TransformersSyncs(TorchDispatchMode):
    """Counts the operations that read a tensor's value on the host, called from transformers' masking_utils,
    but for those on the CPU stand-in :class:`MaskSkips` asks transformers about (a CPU tensor on a GPU too)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in SYNCS:
            stack = traceback.extract_stack()
            stand_in = any("stand_in" in (frame.line or "") for frame in stack)
            self.count += any("masking_utils" in frame.filename for frame in stack) and not stand_in
        return func(*args, **(kwargs or {}))


SPEECH = ("whisper", "qwen2_audio", "ultravox", "seamless_m4t_v2")


def batches(model, family: str) -> dict:
    """A padded batch and one without padding (speech: equal lengths; Seamless: 100 frames of which the last
    is padding in every example, as ``--frames``)."""
    if family in SPEECH:
        rng = np.random.default_rng(0)
        waves = [rng.standard_normal(int(16_000 * s)).astype("float32") * 0.1 for s in (1.0, 2.5, 1.7)]
        same = [rng.standard_normal(32_000).astype("float32") * 0.1 for _ in range(3)]
        frames = {"frames": 100} if family == "seamless_m4t_v2" else {}
        return {"padded": model.speech_inputs(waves), "same length": model.speech_inputs(same, **frames)}
    ids = torch.randint(4, model.model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    unpadded = model.text_inputs(TEXTS)
    unpadded.kwargs["input_ids"] = ids
    unpadded.kwargs["attention_mask"] = torch.ones_like(ids)
    unpadded.masks["input"] = torch.ones_like(ids, dtype=torch.bool)
    unpadded.host_masks["input"] = unpadded.masks["input"]
    return {"padded": model.text_inputs(TEXTS), "unpadded": unpadded}


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "bert", *SPEECH])
def test_a_recorded_forward_pass_asks_transformers_nothing_that_syncs(tiny_model_dir, family, monkeypatch):
    model = load(tiny_model_dir(family), device="cpu", **({"modality": "speech"} if family in SPEECH else {}))
    points = model.select(None)
    for name, inputs in batches(model, family).items():
        with TransformersSyncs() as before:
            expected = model.pooled(inputs, points, "mean")
        monkeypatch.setattr(mask_skips, "ANSWER_CPU_MASKS", True)
        with TransformersSyncs() as after:
            got = model.pooled(inputs, points, "mean", defer_check=True)
        monkeypatch.setattr(mask_skips, "ANSWER_CPU_MASKS", False)
        assert before.count >= (family != "whisper"), (family, name)  # asked (Whisper's encoder asks nothing)
        assert after.count == 0, (family, name)
        verdict = got.pop(MASK_CHECK, None)
        padded = not all(bool(mask.all()) for mask in inputs.host_masks.values())
        if padded or before.count == 0:
            assert verdict is None, (family, name)  # claims only where no mask has padding
        else:
            assert verdict.tolist() == [1.0], (family, name)
        assert got.keys() == expected.keys()
        for hook, value in expected.items():  # a built all-true mask attends as no mask
            torch.testing.assert_close(got[hook], value, rtol=1e-5, atol=1e-6, msg=f"{family} {name} {hook}")


def test_a_wrong_all_true_claim_raises(tiny_model_dir, monkeypatch):
    model = load(tiny_model_dir("gpt2"), device="cpu")
    inputs = model.text_inputs(TEXTS)  # padded
    monkeypatch.setattr(mask_skips, "ANSWER_CPU_MASKS", True)
    monkeypatch.setattr(MaskSkips, "for_batch", classmethod(lambda cls, inputs: cls(padded=False)))  # a lie
    with pytest.raises(RuntimeError, match="was not: its attention skipped the mask"):
        model.pooled(inputs, model.select(["blocks.1.*"]), "mean")
    deferred = model.pooled(inputs, model.select(["blocks.1.*"]), "mean", defer_check=True)
    assert deferred[MASK_CHECK].tolist() == [0.0]


def test_a_wrong_claim_in_a_recording_writes_nothing_of_that_batch(tiny_model_dir, texts_manifest, store, monkeypatch):
    from hookpoints.manifest import read_manifest
    from hookpoints.recorder import record

    model = load(tiny_model_dir("gpt2"), device="cpu")
    manifest = read_manifest(texts_manifest(6))  # 3-8 words: both batches of 3 are padded
    monkeypatch.setattr(mask_skips, "ANSWER_CPU_MASKS", True)
    monkeypatch.setattr(MaskSkips, "for_batch", classmethod(lambda cls, inputs: cls(padded=False)))  # a lie
    with pytest.raises(RuntimeError, match="were not written"):
        record(model, manifest, store, "r", hooks=["blocks.0.hook_resid_post"], batch_size=3)
    with store.query() as session:
        assert session.sql("SELECT count(*) AS n FROM activations").to_pylist() == [{"n": 0}]
        assert session.sql("SELECT status FROM runs").to_pylist() == [{"status": "failed"}]


def test_the_patch_is_undone_after_an_error():
    from transformers import masking_utils

    originals = {name: getattr(masking_utils, name) for name in mask_skips._QUESTIONS}
    with pytest.raises(ValueError), MaskSkips(padded=True):
        assert masking_utils._ignore_causal_mask_sdpa is not originals["_ignore_causal_mask_sdpa"]
        raise ValueError
    assert {name: getattr(masking_utils, name) for name in originals} == originals


def test_only_the_holding_thread_gets_the_answers(tiny_model_dir, monkeypatch):
    model = load(tiny_model_dir("bert"), device="cpu")
    inputs = model.text_inputs(TEXTS)  # padded, and BERT attends both ways: the mask matters
    monkeypatch.setattr(mask_skips, "ANSWER_CPU_MASKS", True)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model.model(**inputs.kwargs)[0]  # [batch, pos, d_model]

    expected = forward()
    other: list[torch.Tensor] = []
    with MaskSkips(padded=False):  # a lie, held by this thread only
        lied = forward()
        thread = threading.Thread(target=lambda: other.append(forward()))
        thread.start()
        thread.join()
    assert not torch.allclose(lied, expected)  # the lie reaches this thread's attention (the test can fail)
    torch.testing.assert_close(other[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(forward(), expected, rtol=0, atol=0)  # and nothing after


def test_check_claims_passes_held_claims_and_strips_the_key():
    values = {"h": np.ones((2, 3), np.float32), MASK_CHECK: np.array([1.0], np.float16)}
    assert check_claims(values).keys() == {"h"}
    assert check_claims({"h": values["h"]}).keys() == {"h"}  # no claim made
