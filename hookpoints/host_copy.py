"""Pooled rows on their way from the GPU to the store: pinned memory, non-blocking copies, one event.

Only pooled rows cross to the CPU. :class:`HostCopy` starts the copies into pinned (page-locked) host
buffers without waiting, and records a CUDA event after them; the recorder starts the next batch's forward
pass before it calls :meth:`HostCopy.wait`, so the copies overlap the GPU's next work, and the store writer
only ever gets finished numpy arrays (it never waits on the GPU). On the CPU nothing is copied.

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


class HostCopy:
    """Copies of ``tensors`` (name -> tensor on any device) to the CPU, started now, awaited by :meth:`wait`."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.host: dict[str, torch.Tensor] = {}
        self.event: torch.cuda.Event | None = None
        for name, tensor in tensors.items():
            tensor = tensor.detach()
            if tensor.device.type != "cuda":
                self.host[name] = tensor.cpu()
                continue
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)  # torch caches pinned blocks
            buffer.copy_(tensor, non_blocking=True)
            self.host[name] = buffer
            self.event = torch.cuda.Event()
        if self.event is not None:
            self.event.record()  # after every copy on the current stream

    def wait(self) -> dict[str, np.ndarray]:
        """The copies as numpy arrays, once the GPU has finished them."""
        if self.event is not None:
            self.event.synchronize()
        return {name: tensor.numpy() for name, tensor in self.host.items()}


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
