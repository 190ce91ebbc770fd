"""Counting the aten operations a piece of code dispatches: on a GPU, each one that computes is a kernel launch.

A recording on a GPU is launch-bound when it pools hundreds of small tensors per batch: every operation costs
the host a few microseconds of Python and dispatcher time and (unless it is a view) a kernel launch of
5-10 us. :class:`OpCount` counts them on any device, deterministically, so a test can bound the operations
per hook point (tests/test_pooling_cost.py) and bench/hook_cost.py can report them.

>>> with OpCount() as ops:
...     torch.ones(2, 3).sum(0)
>>> ops.kernels, ops.views
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: operations that launch no kernel: memory is only reserved
ALLOCATIONS = ("aten.empty", "aten.empty_strided", "aten.empty_like")
#: operations that wait for the device (a GPU sync each)
SYNCS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero")


class OpCount(TorchDispatchMode):
    """Counts every aten operation run while held, split into kernels, views (metadata only, or an op that
    returns its input), allocations and host syncs; ``by_name`` counts each operation."""

    def __init__(self):
        super().__init__()
        self.by_name: Counter[str] = Counter()
        self.kernels = self.views = self.allocations = self.syncs = 0

    @property
    def total(self) -> int:
        return self.kernels + self.views + self.allocations + self.syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.by_name[name] += 1
        if name in SYNCS:
            self.syncs += 1
        elif name in ALLOCATIONS:
            self.allocations += 1
        elif func.is_view or not func._schema.is_mutable and _returns_an_input(out, args):
            self.views += 1
        else:
            self.kernels += 1
        return out


def _returns_an_input(out, args) -> bool:
    if not isinstance(out, torch.Tensor):
        return False
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    return any(out is a for a in inputs)
