"""A rich progress bar as ``(on_start, on_batch)`` callbacks: what the recorder and the sweeps report to.

Light on purpose (rich only): the CLI's console and the notebook API both drive their bars through it.

>>> from rich.progress import Progress
>>> with bar_callbacks(Progress(), "recording") as (on_start, on_batch):
...     on_start(10)
...     on_batch(4)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import Progress


@contextmanager
def bar_callbacks(bar: Progress, label: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """``(on_start(total), on_batch(n))`` for one task of ``bar``, which appears only once work starts."""
    task = bar.add_task(label, start=False)
    started = False

    def on_start(total: int) -> None:
        nonlocal started
        bar.update(task, total=total)
        bar.start()
        bar.start_task(task)
        started = True

    try:
        yield on_start, lambda n: bar.advance(task, n)
    finally:
        if started:  # a bar never shown prints nothing (rich's stop writes a blank line where output is piped)
            bar.stop()
