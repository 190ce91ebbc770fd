"""``model(inputs, return_type=...)`` against TransformerLens 3.9 (``HookedTransformer.forward``) on the tiny GPT-2
whose every parameter is random, and against the HF model's own logits and loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_transformerlens_names import TEXT

from hookpoints.errors import UserError
from hookpoints.loading import load

TEXTS = [TEXT, "a calm river", "The weather"]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # HookedTransformer is deprecated in 3.x


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=5e-5, rtol=5e-5)


def test_one_text_equals_transformerlens(pair):
    model, peer = pair
    with torch.no_grad():
        logits, loss = peer(TEXT, return_type="both")
        per_token = peer(TEXT, return_type="loss", loss_per_token=True)
    close(model(TEXT), logits)
    close(model(TEXT, return_type="loss"), loss)
    got = model(TEXT, return_type="both")
    close(got.logits, logits)
    close(got[1], loss)
    close(model(TEXT, "loss", loss_per_token=True), per_token)
    assert model(TEXT, return_type=None) is None


def test_padded_batch_equals_transformerlens_given_its_attention_mask(pair):
    """Right-padded unequal texts: logits at real positions, and the loss over real positions only, equal
    TransformerLens given the same tokens and attention mask (its documented way to leave padding out)."""
    model, peer = pair
    tokens, mask = model.to_tokens(TEXTS), model.inputs(TEXTS).masks["input"]
    assert torch.equal(tokens, peer.to_tokens(TEXTS)) and not mask.all()
    with torch.no_grad():
        logits, loss = peer(tokens, return_type="both", attention_mask=mask.long())
        per_token = peer(tokens, return_type="loss", attention_mask=mask.long(), loss_per_token=True)
        strings_logits, strings_loss = peer(TEXTS, return_type="both")  # its text path: no attention mask
    ours, our_loss = model(TEXTS, return_type="both")
    close(ours[mask], logits[mask])
    close(our_loss, loss)
    close(model(TEXTS, "loss", loss_per_token=True), per_token)  # [batch, pos - 1], 0 past each text
    # the same tokens and mask as a tensor, TransformerLens' way
    close(model(tokens, return_type="loss", attention_mask=mask.long()), loss)
    # TransformerLens' string path predicts the padding too (docs/gotchas.md): the mean over every position
    every = -strings_logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].mean()
    close(strings_loss, every)
    assert abs(float(strings_loss) - float(our_loss)) > 1e-3


def test_loss_equals_the_hf_models_own(pair):
    """The HF model's loss with labels (-100 at padding: ignored), and a plain cross-entropy of its logits."""
    model, _ = pair
    inputs = model.inputs(TEXTS)
    ids, mask = inputs.kwargs["input_ids"], inputs.masks["input"]
    with torch.no_grad():
        hf = model.model(**inputs.kwargs, labels=ids.masked_fill(~mask, -100))
    close(model(TEXTS), hf.logits)
    close(model(TEXTS, "loss"), hf.loss)
    per_token = model(TEXTS, "loss", loss_per_token=True)
    for i in range(len(TEXTS)):
        n = int(mask[i].sum())
        plain = F.cross_entropy(hf.logits[i, : n - 1], ids[i, 1:n], reduction="none")  # this text alone
        close(per_token[i, : n - 1], plain)
        assert not per_token[i, n - 1 :].any()
        alone = load(model.source, prepend_bos=True)(TEXTS[i], "loss")
        close(alone, plain.mean())


def test_left_padded_tokens_give_the_right_padded_loss(pair):
    model, _ = pair
    inputs = model.inputs(TEXTS)
    ids, mask = inputs.kwargs["input_ids"], inputs.masks["input"]
    order = torch.argsort((~mask).int(), dim=1, descending=True, stable=True)  # padding first, tokens in order
    left_ids, left_mask = ids.gather(1, order), mask.gather(1, order)
    assert not left_mask[:, 0].all()
    expected = model(TEXTS, "loss")
    close(model(left_ids, "loss", attention_mask=left_mask.long()), expected)


def test_bad_return_types_and_models(pair, tiny_model_dir):
    model, _ = pair
    for bad in ("logit", "LOSS", 1):
        with pytest.raises(UserError, match="return_type must be 'logits', 'loss', 'both' or None"):
            model(TEXT, return_type=bad)
    with pytest.raises(UserError, match="attention_mask goes with"):
        model(TEXT, attention_mask=torch.ones(1, 3))
    ids = model.to_tokens(TEXT)
    with pytest.raises(UserError, match=r"attention_mask must be a \[batch, pos\] tensor"):
        model(ids, attention_mask=[[1] * ids.shape[1]])
    embeds = model.model.get_input_embeddings()(ids).detach()
    assert model({"inputs_embeds": embeds}).shape[:2] == ids.shape  # logits need no ids
    model.add_hook("blocks.0.hook_resid_post", lambda x, hook: None)  # run_with_cache reads through torch hooks
    try:
        with pytest.raises(UserError, match=r"hook point\(s\) hook_embed did not run in this forward pass"):
            model.run_with_cache({"inputs_embeds": embeds}, "hook_embed")
    finally:
        model.reset_hooks()
    audio_llm = load(tiny_model_dir("qwen2_audio"))  # for text: its audio encoder does not run
    with pytest.raises(UserError, match=r"^hook point 'audio_encoder.conv1' cannot be recorded: its module does not"):
        audio_llm.run_with_cache(TEXT, ["audio_encoder.conv1", "blocks.0.*"], return_type="loss", incl_bwd=True)
    for call in (
        lambda: model({"inputs_embeds": embeds}, return_type="loss"),
        lambda: model.run_with_cache({"inputs_embeds": embeds}, "blocks.0.*", return_type="both"),
        lambda: model.run_with_cache({"inputs_embeds": embeds}, "blocks.0.*", return_type="loss", incl_bwd=True),
    ):
        with pytest.raises(UserError, match="next-token loss needs the token ids"):
            call()
    whisper = load(tiny_model_dir("whisper"))
    wave = np.random.default_rng(0).normal(0, 0.1, 16_000).astype(np.float32)
    for return_type in ("loss", "both"):
        with pytest.raises(
            UserError, match=r"is not a decoder-only LM \(.*\): model\(...\) supports return_type 'logits' and None$"
        ):
            whisper([wave], return_type=return_type)
    assert whisper([wave]).dim() == 3  # its decoder prompt's logits
    bert = load(tiny_model_dir("bert"))  # BertModel: hidden states only
    for return_type in ("logits", "loss", "both"):
        with pytest.raises(UserError, match="has no LM head .*: model\\(...\\) supports return_type None$"):
            bert(TEXT, return_type=return_type)
    assert bert(TEXT, return_type=None) is None


def test_loss_of_an_audio_llm_loaded_for_speech_is_refused(tiny_model_dir):
    """Its positions hold audio placeholder tokens: next-token loss is for text (load it for text)."""
    qwen = load(tiny_model_dir("qwen2_audio"), modality="speech")
    wave = np.random.default_rng(0).normal(0, 0.1, 16_000).astype(np.float32)
    with pytest.raises(UserError, match="was loaded for speech input: next-token loss is for text"):
        qwen([wave], return_type="loss")
    assert qwen([wave]).dim() == 3
    text = load(tiny_model_dir("qwen2_audio"))
    logits, loss = text(TEXT, return_type="both")
    ids = text.to_tokens(TEXT)
    plain = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    close(loss, plain)
