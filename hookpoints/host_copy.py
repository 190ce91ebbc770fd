"""Pooled rows on their way from the GPU to the store: pinned memory, one non-blocking copy, one event.

Only pooled rows cross to the CPU. :class:`HostCopy` packs a batch's pooled tensors into one flat tensor on
the GPU (:func:`pack`: one ``cat``) and starts ONE copy of it into a pinned (page-locked) host buffer without
waiting, then records a CUDA event; the recorder starts the next batch's forward pass before it calls
:meth:`HostCopy.wait`, so the copy overlaps the GPU's next work, and the store writer only ever gets finished
numpy arrays (it never waits on the GPU). On the CPU nothing is copied.

>>> rows = HostCopy({"h": torch.ones(2, 3)}).wait()
>>> rows["h"].shape
(2, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

#: name -> (start, shape) of each tensor in a packed flat tensor
Layout = dict[str, tuple[int, tuple[int, ...]]]


def pack(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Layout]:
    """The tensors (one device, one dtype) as one flat tensor, and where each one lies in it.

    >>> flat, layout = pack({"a": torch.ones(2, 3), "b": torch.zeros(4)})
    >>> unpack(flat.numpy(), layout)["b"].shape
    (4,)
    """
    layout: Layout = {}
    start = 0
    for name, tensor in tensors.items():
        layout[name] = (start, tuple(tensor.shape))
        start += tensor.numel()
    flat = torch.cat([_plain(tensor).reshape(-1) for tensor in tensors.values()])  # [all values]
    return flat, layout


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without autograd history (no dispatcher call for the usual inference tensor)."""
    return tensor.detach() if tensor.requires_grad else tensor


def unpack(flat: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Each tensor of :func:`pack`'s ``layout`` as a contiguous view of ``flat``."""
    return {name: flat[start : start + int(np.prod(shape))].reshape(shape) for name, (start, shape) in layout.items()}


class HostCopy:
    """Copies of ``tensors`` (name -> tensor on any device) to the CPU, started now, awaited by :meth:`wait`.

    The tensors of one GPU and dtype (every pooled row of a batch: float32) cross in one copy into one pinned
    buffer, instead of a buffer and a copy per hook point (docs/benchmarks.md, "Per-hook cost of recording").
    ``dtype`` (e.g. float16 for a run stored in float16): cast to it before the copy, on the tensors' device.
    ``side_stream`` (the default): copy on a side stream of each GPU (:func:`copy_stream`), so the next batch's
    kernels on the compute stream do not wait behind the copy: 0.91x -> 0.94x the bare forward at batch 128 on an
    H200, its rows bit-equal to the compute-stream copy's over pipelined runs of both models (bench/gpu.py,
    docs/gpu.md). ``False``: copy on the compute stream, in order with its kernels.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None, side_stream: bool = True):
        self.order = list(tensors)
        self.host: dict[str, torch.Tensor] = {}
        self.packed: list[tuple[torch.Tensor, Layout]] = []  # (pinned buffer, layout)
        self.events: list[torch.cuda.Event] = []  # one per GPU, after its copy on its current stream
        groups: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if tensor.device.type == "cuda":
                groups.setdefault((tensor.device, tensor.dtype), {})[name] = tensor
            else:
                self.host[name] = _plain(tensor).to("cpu", dtype)
        for (device, _), group in groups.items():
            flat, layout = pack(group)
            if dtype is not None:
                flat = flat.to(dtype)  # on the GPU: float16 storage copies half the bytes, and the writer casts none
            buffer = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)  # torch caches pinned blocks
            stream = torch.cuda.current_stream(device)
            if side_stream:
                compute, stream = stream, copy_stream(device)
                stream.wait_stream(compute)  # the copy starts once the rows (and their cast) are computed
                flat.record_stream(stream)  # the allocator keeps flat's memory until the copy has read it
                with torch.cuda.stream(stream):
                    buffer.copy_(flat, non_blocking=True)  # (the pinned buffer's reuse waits on this stream)
            else:
                buffer.copy_(flat, non_blocking=True)
            self.packed.append((buffer, layout))
            event = torch.cuda.Event()
            event.record(stream)
            self.events.append(event)

    def wait(self) -> dict[str, np.ndarray]:
        """The copies as numpy arrays (each contiguous), once the GPU has finished them."""
        for event in self.events:
            event.synchronize()
        arrays = {name: tensor.numpy() for name, tensor in self.host.items()}
        for buffer, layout in self.packed:
            arrays.update(unpack(buffer.numpy(), layout))
        return {name: arrays[name] for name in self.order}


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream :class:`HostCopy` copies on, one per GPU, made once."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def one_behind(started: Iterable[T], finish: Callable[[T], object]) -> Iterator:
    """``finish`` each item of ``started`` only once the next one has been started (the last at the end):
    batch k's copies to the host complete while batch k + 1 runs. If starting an item fails, the item before
    it is still finished and yielded (its rows get written) before the error goes on."""
    items = iter(started)
    pending: list[T] = []
    while True:
        try:
            item = next(items)
        except StopIteration:
            break
        except BaseException:
            if pending:
                yield finish(pending.pop())
            raise
        pending.append(item)
        if len(pending) == 2:
            yield finish(pending.pop(0))
    if pending:
        yield finish(pending.pop())
