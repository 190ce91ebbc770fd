"""How long analyses report progress: a ``progress(label)`` context manager yielding ``(on_start, on_advance)``.

``on_start(total)`` is called once the work is checked and sized, ``on_advance(n)`` as it goes. The CLI passes
a rich bar (``hookpoints.cli.console.counting``); a notebook may pass its own, or nothing (:func:`quiet`).

Example::

    with progress("AP ranking (neurons)") as (on_start, on_advance):
        on_start(1000)
        on_advance(10)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

Counter = tuple[Callable[[int], None], Callable[[int], None]]
Progress = Callable[[str], AbstractContextManager[Counter]]


@contextmanager
def quiet(label: str) -> Iterator[Counter]:
    """No progress shown."""
    yield (lambda total: None), (lambda n: None)
