"""The CTranslate2 -> transformers Whisper converter: a round trip through CTranslate2's own converter, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration
from whisper_helpers import ct2_folder

from hookpoints.convert_ct2 import convert_ct2_whisper, read_model_bin, whisper_tokenizer
from hookpoints.errors import UserError

ctranslate2 = pytest.importorskip("ctranslate2")


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A random tiny Whisper with the real tokenizer, every parameter (norm gains, biases) randomised."""
    folder = tmp_path_factory.mktemp("tiny-whisper")
    tokenizer = whisper_tokenizer(ct2_folder() / "tokenizer.json")
    config = WhisperConfig(
        vocab_size=len(tokenizer.get_vocab()),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=40,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed_positions" not in name:
                parameter.copy_(torch.randn_like(parameter) * (0.3 if parameter.dim() > 1 else 0.5))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("quantization", ["float32", "float16", "int8"])
def test_round_trip_through_ctranslate2(tiny_whisper, tmp_path, quantization):
    folder, original = tiny_whisper
    ct2 = tmp_path / "ct2"
    ctranslate2.converters.TransformersConverter(str(folder), copy_files=["tokenizer.json"]).convert(
        str(ct2), quantization=quantization
    )
    back = WhisperForConditionalGeneration.from_pretrained(convert_ct2_whisper(ct2, tmp_path / "hf")).eval()
    reference = original.state_dict()
    for name, value in back.state_dict().items():
        want = reference[name]
        if quantization == "float32" or (quantization == "int8" and value.dim() == 1):
            assert torch.equal(value, want), name  # int8 quantises weight matrices only, the rest stays float32
        elif quantization == "float16":
            assert torch.equal(value, want.half().float()), name
        elif not torch.equal(value, want):  # per-row int8: error at most half a step of the row's scale 127 / amax
            step = want.abs().flatten(1).amax(1).reshape(-1, *[1] * (want.dim() - 1)) / 127
            assert ((value - want).abs() <= step / 2 + 1e-6).all(), name
    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(1))
    decoder = torch.tensor([[original.config.decoder_start_token_id, 5, 9, 220]] * 2)
    with torch.inference_mode():
        want = original(input_features=features, decoder_input_ids=decoder).logits
        got = back(input_features=features, decoder_input_ids=decoder).logits
    tolerance = {"float32": 1e-5, "float16": 5e-2, "int8": 0.5}[quantization]
    assert (got - want).abs().max() <= tolerance * want.abs().max()
    if quantization == "float32":  # CTranslate2 running its own file agrees with the converted model
        ct2_model = ctranslate2.models.Whisper(str(ct2), device="cpu", compute_type="float32")
        prompt = [original.config.decoder_start_token_id, tokenizer_id(folder, "<|notimestamps|>")]
        with torch.inference_mode():
            mine = back(input_features=features, decoder_input_ids=torch.tensor([prompt] * 2)).logits[:, -1]
        result = ct2_model.generate(
            ctranslate2.StorageView.from_array(features.numpy()),
            [prompt] * 2,
            max_length=3,
            beam_size=1,
            suppress_blank=False,
            suppress_tokens=[],
            return_logits_vocab=True,
        )
        theirs = torch.tensor(np.array([np.asarray(r.logits[0][0]) for r in result]))  # [batch, vocab]
        assert theirs.shape == mine.shape
        assert torch.allclose(theirs, mine, atol=1e-3 * float(mine.abs().max()))
        assert [r.sequences_ids[0][0] for r in result] == mine.argmax(-1).tolist()


def tokenizer_id(folder, token: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(token)


def test_reader_resolves_the_tied_projection():
    variables = read_model_bin(ct2_folder() / "model.bin")
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    assert variables["encoder/conv1/weight"].shape == (384, 80, 3)
    assert variables["decoder/embeddings/weight"].dtype == np.float16


def test_bad_input(tmp_path, run_cli):
    with pytest.raises(UserError, match="no model.bin"):
        convert_ct2_whisper(tmp_path, tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((ct2_folder() / name).read_bytes())
    (broken / "model.bin").write_bytes((ct2_folder() / "model.bin").read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated"):
        convert_ct2_whisper(broken, tmp_path / "out")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    code, _, err = run_cli("convert", "ct2-whisper", str(ct2_folder()), str(full))
    assert code == 2 and "not empty" in err
    assert (full / "x").read_text() == "keep me"


def test_the_command_prints_one_line_and_no_progress_bar_of_transformers(tmp_path, run_cli):
    """`convert ct2-whisper` left transformers' "Writing model shards" tqdm bar on stderr (carriage returns in a
    log) before its own line."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process
    code, out, err = run_cli("convert", "ct2-whisper", str(ct2_folder()), str(tmp_path / "whisper"))
    assert code == 0, err
    assert out == "" and err.strip() == f"wrote {tmp_path / 'whisper'}" and "\r" not in err


def test_a_destination_under_a_file_is_refused_before_converting(tmp_path, run_cli):
    """``DST`` inside a path whose parent is a file failed after the whole conversion with a bare
    NotADirectoryError (exit 1); it is a one-line error (exit 2) before anything is read."""
    (tmp_path / "afile").write_text("keep me")
    code, _, err = run_cli("convert", "ct2-whisper", str(ct2_folder()), str(tmp_path / "afile" / "whisper"))
    assert code == 2 and "is a file, not a folder" in err and "NotADirectoryError" not in err, err
    assert (tmp_path / "afile").read_text() == "keep me"
