"""Where a model's weights go and in which precision: device, dtype and device map, resolved in one place.

``device="auto"`` is CUDA when torch sees a GPU, else the CPU. ``dtype="auto"`` is float32 on the CPU and,
on a GPU, bfloat16 where the GPU supports it (Ampere and later) and float16 otherwise (as the SeamlessM4T
paper loads its models). ``device_map`` splits a model over devices or offloads part of it, through
accelerate exactly as ``transformers``' ``from_pretrained(device_map=...)`` does: ``"auto"`` (fill the
GPUs, then the CPU, then disk), ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, or an explicit map
``{module path: device}`` whose devices are ``"cpu"``, ``"disk"`` (needs ``offload_folder``), a GPU index or
``"cuda:N"``.

>>> Placement(device="cpu", dtype="auto").torch_dtype()
torch.float32
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hookpoints.errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
#: Where a module of an explicit device map may go, besides a GPU index or "cuda:N".
MAP_PLACES = ("cpu", "disk")

DeviceMap = str | dict[str, str | int]


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (a function, so tests can pretend one is there)."""
    return torch.cuda.is_available()


def bf16_supported() -> bool:
    """Whether the current CUDA GPU computes in bfloat16 natively (Ampere and later)."""
    return torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class Placement:
    """How to load a model: ``device`` (auto, cpu, cuda, cuda:N), ``dtype`` (auto, float32, float16,
    bfloat16), ``device_map`` (None: the whole model on ``device``) and ``offload_folder`` (for "disk").

    >>> Placement(device="cpu").from_pretrained_kwargs()
    {'dtype': torch.float32}
    """

    device: str = "auto"
    dtype: str = "auto"
    device_map: DeviceMap | None = None
    offload_folder: str | None = None

    def torch_device(self) -> torch.device:
        """The device the model (or, with a device map, its inputs) goes to."""
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        """The precision the weights are loaded in."""
        return resolve_dtype(self.dtype, self.torch_device())

    def from_pretrained_kwargs(self) -> dict:
        """Arguments for ``from_pretrained``: the dtype, and the device map with its offload folder if any."""
        kwargs: dict = {"dtype": self.torch_dtype()}
        if self.device_map is not None:
            kwargs["device_map"] = check_device_map(self.device_map, self.offload_folder)
            if self.offload_folder:
                kwargs["offload_folder"] = str(self.offload_folder)
        return kwargs

    def place(self, model: nn.Module) -> nn.Module:
        """Move a model loaded with :meth:`from_pretrained_kwargs` to its device (accelerate placed a mapped one;
        an explicit map's module paths are checked: transformers ignores a map that sends all to one device)."""
        if self.device_map is None:
            return model.to(self.torch_device())
        if isinstance(self.device_map, dict):
            modules = {name for name, _ in model.named_modules()}
            unknown = [key for key in self.device_map if key not in modules]
            if unknown:
                raise UserError(f"device map names {unknown[0]!r}, which is no module of this model")
        return model


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda if present else cpu; any other name checked (a missing GPU is a UserError)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta: a torch RuntimeError at the first .to()
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if device.type == "cuda" and not cuda_available():
        raise UserError(
            f"device {name} asked for, but there is no such device here: torch sees no CUDA GPU (devices: cpu); "
            "use --device cpu or auto"
        )
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        have = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count))])
        raise UserError(f"--device {name}: there is no such device here; devices: {have}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float32 on the CPU, bfloat16 on a GPU that supports it, else float16; other names checked."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and bf16_supported():
            return torch.bfloat16
        return torch.float16
    if name not in DTYPES:
        raise UserError(f"model dtype must be one of auto, {', '.join(DTYPES)}, not {name!r}")
    return DTYPES[name]


def check_device_map(device_map: DeviceMap, offload_folder: str | Path | None) -> DeviceMap:
    """The device map, checked: a named strategy, or module -> cpu / disk / GPU index / cuda:N."""
    if isinstance(device_map, str):
        if device_map not in NAMED_MAPS:
            raise UserError(f"device map must be one of {', '.join(NAMED_MAPS)} or a module -> device map")
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise UserError('device map must name at least one module, e.g. {"model.layers.0": "cpu"}')
    for module, place in device_map.items():
        if not isinstance(module, str):
            raise UserError(f"device map keys are module paths, not {module!r}")
        if place in MAP_PLACES:
            continue
        if isinstance(place, int) and not isinstance(place, bool):
            place = f"cuda:{place}"  # a GPU index: checked like cuda:N (transformers raised a RuntimeError)
        elif not (isinstance(place, str) and place.startswith("cuda")):
            raise UserError(f"device map: module {module} goes to {place!r}; use cpu, disk, a GPU index or cuda:N")
        try:
            resolve_device(place)
        except UserError as error:
            raise UserError(f"device map: module {module} goes to {device_map[module]!r}: {error}") from None
    if "disk" in device_map.values() and not offload_folder:
        raise UserError("device map offloads modules to disk: give an offload folder (--offload-folder)")
    return device_map


def parse_device_map(text: str | None) -> DeviceMap | None:
    """A CLI ``--device-map``: a strategy name, a JSON object, or the path of a JSON file holding one."""
    if text is None:
        return None
    text = text.strip()
    if text in NAMED_MAPS:
        return text
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(f"--device-map {text!r}: give {', '.join(NAMED_MAPS)}, a JSON object or a JSON file")
        text = path.read_text(encoding="utf-8")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"--device-map is not valid JSON: {error.msg} (line {error.lineno})") from None
    if not isinstance(parsed, dict):
        raise UserError("--device-map JSON must be an object: module path -> device")
    return parsed


def execution_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its weights' device, or for a model dispatched by accelerate its main
    device (the first GPU of its device map; the CPU when the map holds only cpu and disk), as accelerate
    chooses it. A remote model's local stand-in answers ``meta``."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map and len(set(device_map.values())) > 1 or device_map and "disk" in device_map.values():
        gpus = [place for place in device_map.values() if place not in MAP_PLACES]
        if not gpus:
            return torch.device("cpu")
        return torch.device(f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else gpus[0])
    return next(model.parameters()).device
