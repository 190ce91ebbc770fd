"""Recording a model too large for any machine you have, through nnsight's remote execution (NDIF).

NDIF (https://ndif.us) hosts large open models. nnsight sends each trace there (``remote=True``): the code
that pools a hook point's tensor runs next to the model, and only the pooled vectors (``.save()``) come back.
The local side needs no weights: the architecture is built on the meta device from the hub config, and the
hook points are measured on it (a shape-only forward pass). The activations land in the store exactly as
with a local model. See docs/team-store.md ("Remote models on NDIF").

``simulate_remote`` runs the same path through nnsight's local simulation of the server (the trace is
serialized and deserialized with this package's modules hidden, as on NDIF), which is how it is tested here.
"""

from __future__ import annotations

import os
from pathlib import Path

import nnsight
import torch
from transformers import AutoConfig, AutoTokenizer

from hookpoints.adapters import adapter_for
from hookpoints.errors import UserError
from hookpoints.loading import DTYPES, quiet_transformers
from hookpoints.model import HookedModel


def load_remote(source: str, *, modality: str | None = None, dtype: str = "bfloat16") -> HookedModel:
    """A HookedModel whose traces run on NDIF: ``source`` is a hub id NDIF serves (e.g. a LLaMA model)."""
    if Path(source).expanduser().exists():
        raise UserError(
            f"--remote runs the model on NDIF, which serves hub models: give the hub id of {source}, not a folder"
        )
    if not (os.environ.get("NDIF_API_KEY") or nnsight.CONFIG.API.APIKEY):
        raise UserError("--remote needs an NDIF API key: set NDIF_API_KEY (sign up at https://login.ndif.us)")
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the config of {source} from the hub: {_one_line(error)}") from None
    adapter = adapter_for(config.model_type)
    modality = modality or adapter.modalities(config)[0]
    if modality != "text":
        raise UserError(f"remote recording takes text input for now, not {modality}")
    with torch.device("meta"):
        module = adapter.model_class(config, modality).from_config(config, dtype=DTYPES[dtype])
    return _measured(HookedModel(module, adapter, tokenizer=tokenizer, source=source, modality=modality, remote=True))


def simulate_remote(model: HookedModel) -> HookedModel:
    """The same (locally loaded) model, traced through nnsight's local simulation of a remote server."""
    traced = nnsight.TransformersModel(model.model, tokenizer=model.tokenizer)
    hooked = HookedModel(
        model.model,
        model.adapter,
        tokenizer=model.tokenizer,
        processor=model.processor,
        source=model.source,
        modality=model.modality,
        traced=traced,
        remote="local",
    )
    hooked._points = model._points
    return _measured(hooked)


def _measured(model: HookedModel) -> HookedModel:
    """Measure the hook points now, so an architecture the meta-device probe cannot run fails clearly."""
    try:
        model.hook_points  # noqa: B018 - the probe runs on first access
    except (RuntimeError, NotImplementedError) as error:
        raise UserError(
            f"cannot measure the hook points of {model.source} without its weights ({_one_line(error)}): remote "
            "recording supports models whose forward pass runs on the meta device (LLaMA, Qwen2 families)"
        ) from None
    return model


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]
