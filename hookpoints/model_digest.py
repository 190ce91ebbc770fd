"""Which model a run's rows come from: a digest of its weights, its config's values, and the weights' dtype.

A run's ``model`` column holds the path or hub id as given, which names files, not weights: a checkpoint saved
again under the same folder (another fine-tuning step) has the same name, and the same checkpoint copied
elsewhere another. The recorder keeps :func:`model_digests`, :func:`model_config` and :func:`weights_dtype` in
the run's config; a resumed run and another shard of it compare those instead (hookpoints.store.run_checks),
and so does an intervention sweep on a run's medians (:func:`check_weights`).

The digest reads, for every parameter, its name and shape and 4,096 of its values at positions drawn from its
name (splitmix64, so the same on every machine and every version of torch and numpy): a different checkpoint or
a fine-tune changes it; an edit of a few weights may not. It is kept in the weights' dtype and in each coarser one
(values cast down as ``from_pretrained(dtype=...)`` casts them), so float32 weights are also checked against the
same checkpoint loaded in bfloat16. Parameters a device map offloads are read from accelerate's weights map. A
model with a parameter on the meta device and no values anywhere (a remote model's stand-in) has no digest
(``{}``): its shapes are those of every checkpoint of the architecture, so it is compared by name instead.
Values are read where they live (GPU or CPU), 4,096 per parameter: 26 ms for 1 B parameters in 128 tensors on
the CPU. The config is kept as its values, not in the digest: the keys both sides have are compared, so a newer
transformers that writes more keys is not taken for another model, and a refusal names the key that differs.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter

import numpy as np
import torch
from torch import nn

from hookpoints.errors import UserError
from hookpoints.store.run_checks import config_differences

#: Values read per parameter (all of a smaller one).
SAMPLES = 4096
#: Config keys that name files or loading choices, not the model: other values change what it computes.
_LOADING_KEYS = (
    *("transformers_version", "dtype", "torch_dtype", "architectures", "use_cache"),
    *("output_attentions", "output_hidden_states", "return_dict", "torchscript"),
)
#: The dtypes a digest is kept in for weights in each dtype: their own, and those a cast down to gives
#: (a run recorded in float32 is checked against a sweep that loads the checkpoint in bfloat16).
DIGEST_DTYPES = {"float32": ("float32", "bfloat16", "float16"), "bfloat16": ("bfloat16",), "float16": ("float16",)}

__all__ = [
    "DIGEST_DTYPES",
    "SAMPLES",
    "check_weights",
    "model_config",
    "model_digests",
    "part_digests",
    "weights_dtype",
]


def model_digests(model: nn.Module) -> dict[str, str]:
    """``{dtype: hex digest}`` of ``model``'s weights (module docstring), for its weights' dtype
    and each coarser one: equal for the same checkpoint wherever it is loaded from, on whatever device; ``{}``
    where some weights are not here to read (a remote model: a digest of its shapes alone would be equal for
    every fine-tune of the architecture).

    >>> model_digests(model.model)  # doctest: +SKIP
    {'float32': '3f1c...', 'bfloat16': '9a0e...', 'float16': '52d7...'}
    """
    samples = _samples(model)
    if any(values is None for _, _, values in samples):
        return {}
    return {dtype: _digest(samples, dtype) for dtype in DIGEST_DTYPES.get(weights_dtype(model), ())}


def model_config(model: nn.Module) -> dict:
    """``model``'s config values (sub-configs nested) as JSON keeps them, less the keys that name files or
    loading choices: what a resume and a sweep compare key by key (hookpoints.store.run_checks.config_differences).

    >>> model_config(model.model)["n_layer"]  # doctest: +SKIP
    2
    """
    config = getattr(model, "config", None)
    if config is None:
        return {}
    return json.loads(json.dumps(_model_values(config.to_dict()), sort_keys=True, default=str))


def weights_dtype(model: nn.Module) -> str:
    """The dtype most of ``model``'s floating-point parameter values are in (``bfloat16``, ``float32``, ...)."""
    counts: Counter[str] = Counter()
    for param in model.parameters():
        if param.is_floating_point():
            counts[str(param.dtype).removeprefix("torch.")] += param.numel()
    return counts.most_common(1)[0][0] if counts else "none"


def part_digests(model: nn.Module) -> dict[str, dict[str, str]]:
    """``{dtype: {part: hex digest}}``: as :func:`model_digests`, one per top-level module of ``model``
    (``text_decoder``, ``lm_head``, ...), tied weights read under each of their names. Another class loaded
    from the same checkpoint (SeamlessM4T v2 for text or for speech) shares some parts: :func:`check_weights`
    compares those.
    """
    samples = _samples(model, every_name=True)
    if any(values is None for _, _, values in samples):
        return {}
    return {dtype: _part_digests(samples, dtype) for dtype in DIGEST_DTYPES.get(weights_dtype(model), ())}


def check_weights(model: nn.Module, config: dict, run: str, source: str) -> None:
    """A UserError unless ``model`` (loaded from ``source``) has the weights run ``run`` was recorded with,
    by the digests in its ``config``; nothing to compare for a run recorded before they were kept. A model of
    another class than the run's (the other modality of SeamlessM4T v2) is compared by the parts both have."""
    recorded = config.get("model_digest")
    if not isinstance(recorded, dict) or not recorded:  # {}: recorded where its weights were not (a remote model)
        return
    common = [dtype for dtype in DIGEST_DTYPES.get(weights_dtype(model), ()) if dtype in recorded]
    if not common:
        raise UserError(
            f"cannot check that model {source} ({weights_dtype(model)} here) has the weights run {run!r} was "
            f"recorded with ({config.get('model_dtype')} there): load it with --model-dtype {config.get('model_dtype')}"
        )
    differ = config_differences(config.get("model_config") or {}, model_config(model))
    if differ:
        raise UserError(
            f"model {source} is not configured as the model run {run!r} was recorded with ({differ[0]}): give the "
            "checkpoint that run was recorded with"
        )
    dtype, recorded_class, here_class = common[0], config.get("model_class"), type(model).__name__
    if recorded_class in (None, here_class):
        here, there, what = _digest(_samples(model), dtype), recorded[dtype], "digest"
    else:  # the whole digests cover other parameters: compare the parts both classes have
        parts = (config.get("model_digest_parts") or {}).get(dtype) or {}
        mine = _part_digests(_samples(model, every_name=True), dtype)
        shared = sorted(set(parts) & set(mine))
        if not shared:
            raise UserError(
                f"cannot check that model {source} (loaded as {here_class}) has the weights run {run!r} was recorded "
                f"with (as {recorded_class}): they share no part to compare; use a run recorded in this modality"
            )
        differ = [part for part in shared if parts[part] != mine[part]]
        part = (differ or shared)[0]
        here, there, what = mine[part], parts[part], f"digest of {part}"
    if here != there:
        raise UserError(
            f"model {source} does not have the weights run {run!r} was recorded with ({what} {here[:12]} != "
            f"{there[:12]} in {dtype}): give the checkpoint that run was recorded with"
        )


def _samples(model: nn.Module, every_name: bool = False) -> list[tuple[str, tuple, torch.Tensor | None]]:
    """Each parameter's name, shape and SAMPLES of its values (all of a smaller one; None on the meta device);
    a tied one under its first name, or with ``every_name`` under each."""
    found = []
    modules = dict(model.named_modules())
    named = model.named_parameters(remove_duplicate=not every_name)
    for name, param in sorted(named, key=lambda item: item[0]):
        if param.device.type == "meta":
            param = _offloaded(modules, name)
        values = None
        if param is not None and param.device.type != "meta":
            flat = param.detach().reshape(-1)
            if flat.numel() > SAMPLES:
                flat = flat[_positions(name, flat.numel()).to(flat.device)]
            values = flat.cpu()
        found.append((name, tuple(param.shape) if param is not None else None, values))
    return found


def _offloaded(modules: dict[str, nn.Module], name: str) -> torch.Tensor | None:
    """The value of parameter ``name`` that accelerate offloaded (a device map's ``disk`` or ``cpu`` offload):
    the weights map of the hook on its module or a module above it; None where there is none (a remote model)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        hook = getattr(modules.get(".".join(parts[:cut])), "_hf_hook", None)
        for one in getattr(hook, "hooks", (hook,)):
            weights = getattr(one, "weights_map", None)
            if weights is not None:
                try:
                    return weights[".".join(parts[cut:])]
                except KeyError:
                    continue
    return None


def _digest(samples: list, dtype: str) -> str:
    """The digest of the samples with every floating-point value cast to ``dtype`` (exact for its own dtype)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, shape, values in samples:
        digest.update(f"\n{name}|{shape}|".encode())
        if values is not None:
            values = values.to(getattr(torch, dtype)) if values.is_floating_point() else values
            digest.update(values.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _part_digests(samples: list, dtype: str) -> dict[str, str]:
    """The digest of each top-level module's samples, in ``dtype``."""
    parts: dict[str, list] = {}
    for sample in samples:
        parts.setdefault(sample[0].split(".")[0], []).append(sample)
    return {part: _digest(found, dtype) for part, found in parts.items()}


def _positions(name: str, size: int) -> torch.Tensor:
    """SAMPLES positions in ``[0, size)`` drawn by splitmix64 from the parameter's name: written out here, so
    they are the same on every machine and with every version of torch and numpy."""
    state = np.uint64(zlib.crc32(name.encode())) + np.arange(1, SAMPLES + 1, dtype=np.uint64) * np.uint64(
        0x9E3779B97F4A7C15
    )
    state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # wraps modulo 2**64, as meant
    state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    state = state ^ (state >> np.uint64(31))
    return torch.from_numpy((state % np.uint64(size)).astype(np.int64))


def _model_values(values):
    """A config dict (and the sub-configs in it) without the keys that name files or loading choices."""
    if isinstance(values, dict):
        return {
            key: _model_values(value)
            for key, value in values.items()
            if not str(key).startswith("_") and key not in _LOADING_KEYS and not str(key).endswith("name_or_path")
        }
    return values
