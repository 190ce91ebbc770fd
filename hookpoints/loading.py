"""Loading a checkpoint (hub id or local folder) into a HookedModel, with clear errors."""

from __future__ import annotations

import re
from pathlib import Path

from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer
from transformers.utils import logging as hf_logging

from hookpoints.adapters import adapter_for
from hookpoints.adapters.base import Adapter
from hookpoints.errors import UserError
from hookpoints.model import HookedModel
from hookpoints.placement import DTYPES, DeviceMap, Placement

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
__all__ = ["DTYPES", "load", "model_modalities", "quiet_transformers"]


def load(
    source: str | Path,
    *,
    modality: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: DeviceMap | None = None,
    offload_folder: str | Path | None = None,
    prepend_bos: bool = False,
) -> HookedModel:
    """Load ``source`` (a folder written by ``save_pretrained``, or a hub id) for recording.

    ``modality`` picks the class for families with several (SeamlessM4T v2: ``text`` loads the text-to-text
    model, ``speech`` the speech-to-text one); the default is the family's first.
    ``device`` / ``dtype`` / ``device_map`` / ``offload_folder``: see :class:`hookpoints.placement.Placement`
    (auto: CUDA if present, bf16 where the GPU supports it, float32 on the CPU; a device map splits the
    model over devices or offloads part of it, via accelerate).

    >>> model = hp.load("path/to/seamless", modality="speech", dtype="float32", device="cpu")
    """
    source = str(source)
    _check_source(source)
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(source)
    except (ValueError, KeyError) as error:
        raise UserError(f"model {source}: unknown architecture ({_one_line(error)})") from None
    except OSError as error:
        raise UserError(
            f"cannot load model {source}: {_one_line(error)} (give a folder written by save_pretrained, "
            "or a hub id where the hub is reachable)"
        ) from None
    adapter = adapter_for(config.model_type)
    modalities = adapter.modalities(config)
    modality = modality or modalities[0]
    if modality not in modalities:
        raise UserError(f"model {source} ({config.model_type}) takes {' or '.join(modalities)} input, not {modality}")
    placement = Placement(device, dtype, device_map, None if offload_folder is None else str(offload_folder))
    options = placement.from_pretrained_kwargs()  # checks device, dtype and map before any weight is read
    if prepend_bos and adapter.with_bos.__func__ is Adapter.with_bos:
        raise UserError(f"prepend_bos applies to decoder-only LMs and BERT, not {config.model_type}: drop it")
    model_class = adapter.model_class(config, modality)
    try:
        model = placement.place(model_class.from_pretrained(source, **options))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load model weights from {source}: {_one_line(error)}") from None
    return HookedModel(
        model,
        adapter,
        tokenizer=_optional(AutoTokenizer, source),
        processor=_optional(AutoFeatureExtractor, source) if modality == "speech" else None,
        source=source,
        modality=modality,
        prepend_bos=prepend_bos,
    )


def model_modalities(source: str | Path) -> tuple[str, ...]:
    """The input modalities a checkpoint's family takes (its first is the default), from its config alone."""
    source = str(source)
    _check_source(source)
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(source)
    except (ValueError, KeyError, OSError) as error:
        raise UserError(f"cannot read the config of model {source}: {_one_line(error)}") from None
    return adapter_for(config.model_type).modalities(config)


def quiet_transformers() -> None:
    """Keep transformers' info messages and weight-loading bars out of hookpoints' own output."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _check_source(source: str) -> None:
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {source} has no config.json: give a folder written by save_pretrained")
        return
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local or not _HUB_ID.match(source):
        raise UserError(f"model path {source} does not exist")


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def _optional(loader, source: str):
    folder = Path(source).expanduser()
    if loader is AutoTokenizer and folder.is_dir() and not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer from the config alone
    try:
        return loader.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]
