"""Loading a checkpoint (hub id or local folder) into a HookedModel, with clear errors."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer
from transformers.utils import logging as hf_logging

from hookpoints.adapters import ADAPTERS, adapter_for
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
    _check_supported(source, config, adapter)
    modalities = adapter.modalities(config)
    modality = modality or modalities[0]
    if modality not in modalities:
        raise UserError(f"model {source} ({config.model_type}) takes {' or '.join(modalities)} input, not {modality}")
    placement = Placement(device, dtype, device_map, None if offload_folder is None else str(offload_folder))
    options = placement.from_pretrained_kwargs()  # checks device, dtype and map before any weight is read
    if prepend_bos and adapter.with_bos.__func__ is Adapter.with_bos:
        raise UserError(f"prepend_bos applies to decoder-only LMs and BERT, not {config.model_type}: drop it")
    model_class = adapter.model_class(config, modality)
    model = placement.place(_load_weights(model_class, source, options))
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
    if not _in_hub_cache(source) and not _hub_reachable():
        raise UserError(
            f"model {source}: there is no such folder here, and the hub is not reachable (nor is it cached) to "
            "fetch it as a hub id: check the path"
        )


def _in_hub_cache(source: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(source, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all (offline mode, no DNS or no route: False at once, not after retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_supported(source: str, config, adapter) -> None:
    """A family without its own adapter is recorded generically only if it is a decoder-only or encoder text model."""
    if adapter.name != "generic":
        return
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    text = (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    if text and not getattr(config, "is_encoder_decoder", False):
        return
    families = sorted({kind for each in ADAPTERS for kind in each.model_types})
    raise UserError(
        f"model {source} is a {config.model_type} model, which hookpoints does not support: supported are "
        f"{', '.join(families)}, and other decoder-only or encoder-only text models"
    )


def _load_weights(model_class, source: str, options: dict):
    """The model's weights (``options``: the placement's from_pretrained arguments), with the known ways a
    checkpoint folder is broken said in one line."""
    from safetensors import SafetensorError

    try:
        return model_class.from_pretrained(source, **options)
    except SafetensorError as error:
        raise UserError(
            f"the weights file of {source} is damaged or truncated ({_one_line(error)}): save or download it again"
        ) from None
    except RuntimeError as error:
        if "size mismatch" in str(error) or "ignore_mismatched_sizes" in str(error):
            raise UserError(
                f"the weights of {source} do not match its config.json (tensor sizes differ): use the config "
                "the weights were saved with"
            ) from None
        raise
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load model weights from {source}: {_one_line(error)}") from None


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
