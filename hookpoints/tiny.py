"""Tiny, seeded checkpoints of every supported family, for the demo and the tests.

Nothing can be downloaded here, so each family is built from a transformers config with tiny sizes,
saved with ``save_pretrained`` (with a byte-level BPE tokenizer trained on the spot, and a feature extractor
for speech models) and then loaded back by path, through the same code a user runs with a hub id.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hookpoints.errors import UserError

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
#: SeamlessM4T-style language tokens, so translation models can be told a target language.
LANGUAGE_TOKENS = ["__eng__", "__deu__", "__spa__", "__fra__", "__cmn__", "__jpn__"]
DEFAULT_TEXTS = [
    "The weather is nice today.",
    "Das Wetter ist heute schön.",
    "El tiempo es agradable hoy.",
    "Il fait beau aujourd'hui.",
    "今天天气很好。",
    "今日はいい天気です。",
]


#: Whisper-style encoders take fixed windows: 2 x AUDIO_POSITIONS mel frames at 100 per second (5 s here).
AUDIO_POSITIONS = 250


def tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (works offline, any script)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + LANGUAGE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts or DEFAULT_TEXTS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=LANGUAGE_TOKENS,
    )


def _config(family: str, vocab: int):
    import transformers as tf

    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    small = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **ids,
    }
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids)
    if family == "llama":
        return tf.LlamaConfig(**small)
    if family == "qwen2":
        return tf.Qwen2Config(**small)
    if family == "qwen3":  # per-head q/k norms
        return tf.Qwen3Config(**small, head_dim=16)
    if family == "bert":
        return tf.BertConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
            pad_token_id=0,
        )
    if family == "whisper":
        return tf.WhisperConfig(
            vocab_size=vocab,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            num_mel_bins=80,
            max_source_positions=AUDIO_POSITIONS,
            max_target_positions=64,
            decoder_start_token_id=2,
            **ids,
        )
    if family == "qwen2_audio":
        audio = {
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "num_mel_bins": 80,
            "max_source_positions": AUDIO_POSITIONS,
        }
        return tf.Qwen2AudioConfig(
            audio_config=audio, text_config={"model_type": "qwen2", **small}, audio_token_id=vocab - 1
        )
    if family == "ultravox":
        from hookpoints.models.ultravox import UltravoxConfig

        whisper = _config("whisper", vocab).to_dict()
        return UltravoxConfig(audio_config=whisper, text_config=_config("llama", vocab).to_dict(), hidden_size=128)
    if family == "seamless_m4t_v2":
        return tf.SeamlessM4Tv2Config(
            vocab_size=vocab,
            t2u_vocab_size=64,
            char_vocab_size=64,
            hidden_size=64,
            max_position_embeddings=256,
            encoder_layers=2,
            decoder_layers=2,
            speech_encoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            speech_encoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            speech_encoder_intermediate_size=128,
            conv_depthwise_kernel_size=7,
            adaptor_stride=8,
            t2u_encoder_layers=1,
            t2u_decoder_layers=1,
            t2u_encoder_ffn_dim=64,
            t2u_decoder_ffn_dim=64,
            t2u_encoder_attention_heads=2,
            t2u_decoder_attention_heads=2,
            unit_hifi_gan_vocab_size=50,
            upsample_initial_channel=64,
            unit_embed_dim=16,
            lang_embed_dim=8,
            spkr_embed_dim=8,
            vocoder_num_langs=4,
            vocoder_num_spkrs=2,
            variance_predictor_kernel_size=3,
            t2u_variance_predictor_embed_dim=16,
            t2u_variance_predictor_hidden_dim=16,
            decoder_start_token_id=3,
            # Larger than the default 0.02, so that greedy output differs between inputs (with the default,
            # every input generates the same token): generation-time recording is then tested on real variety.
            initializer_range=0.3,
            **ids,
        )
    raise UserError(f"build_tiny knows the families {', '.join(FAMILIES)}, not {family!r}")


def randomise_norms_and_biases(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every norm gain and every bias a random value (HF initialises them to exactly 1 and 0).

    With gain 1 and bias 0, definitions that differ by them coincide (TransformerLens' ``hook_normalized`` is
    the value before the gain and bias): fixtures that check values must not hide such differences.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            norm = type(module).__name__.endswith("Norm") or isinstance(module, torch.nn.LayerNorm)
            for name, parameter in module.named_parameters(recurse=False):
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                if norm and name == "weight":
                    parameter.copy_(1 + 0.3 * noise)
                elif name.endswith("bias"):
                    parameter.copy_(0.1 * noise)


FAMILIES = ("gpt2", "llama", "qwen2", "bert", "whisper", "qwen2_audio", "ultravox", "seamless_m4t_v2")


def build_tiny(
    family: str,
    directory: str | Path,
    *,
    seed: int = 0,
    texts: list[str] | None = None,
    vocab_size: int = 300,
    sizes: dict | None = None,
) -> Path:
    """Build a seeded tiny ``family`` model and save it (with tokenizer / feature extractor) to ``directory``.

    The tokenizer is trained on ``texts`` (a few default sentences) up to ``vocab_size`` tokens; ``sizes``
    overrides config attributes (e.g. ``hidden_size`` for benchmark-sized models).

    >>> model = hp.load(hp.build_tiny("gpt2", "/tmp/tiny-gpt2"))
    """
    import transformers as tf

    from hookpoints.loading import quiet_transformers
    from hookpoints.models.ultravox import UltravoxModel

    quiet_transformers()
    directory = Path(directory)
    if directory.is_file():  # save_pretrained only logged it, and the file's path came back as a model folder
        raise UserError(f"{directory} is a file: give build_tiny a folder to write the model to")
    tokenizer = tiny_tokenizer(texts, vocab_size=vocab_size)
    config = _config(family, len(tokenizer))
    for name, value in (sizes or {}).items():
        setattr(config, name, value)
    classes = {
        "gpt2": tf.GPT2LMHeadModel,
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "qwen3": tf.Qwen3ForCausalLM,
        "bert": tf.BertModel,
        "whisper": tf.WhisperForConditionalGeneration,
        "qwen2_audio": tf.Qwen2AudioForConditionalGeneration,
        "ultravox": UltravoxModel,
        "seamless_m4t_v2": tf.SeamlessM4Tv2Model,
    }
    torch.manual_seed(seed)
    model = classes[family](config).eval()
    randomise_norms_and_biases(model, seed)
    if family == "seamless_m4t_v2":  # as in the real checkpoint's generation_config.json
        model.generation_config.text_decoder_lang_to_code_id = {
            token.strip("_"): tokenizer.convert_tokens_to_ids(token) for token in LANGUAGE_TOKENS
        }
        model.generation_config._from_model_config = False  # else loading rebuilds it from the model config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if family in ("whisper", "qwen2_audio", "ultravox"):
        window = 2 * AUDIO_POSITIONS // 100  # seconds
        tf.WhisperFeatureExtractor(feature_size=80, chunk_length=window).save_pretrained(directory)
    if family == "seamless_m4t_v2":
        tf.SeamlessM4TFeatureExtractor().save_pretrained(directory)
    return directory
