"""Work shared out over a few plain threads, for the parts of a flush that numpy and Arrow run without the GIL.

Plain threads, not a ``ThreadPoolExecutor``: a background flush still running when the main thread ends (a
script that never called ``finish``) runs after ``concurrent.futures``' exit hook, where an executor refuses
work ("cannot schedule new futures after interpreter shutdown") and the flush's rows were lost. Example::

    side_by_side(print, ["a", "b", "c"], 2, name="hookpoints-demo")   # a, b, c on two threads
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")


def side_by_side(work: Callable[[Item], None], items: Sequence[Item], threads: int, *, name: str) -> None:
    """``work`` each item, ``threads`` at a time (one: in the caller's thread); the first item's error is raised
    once every thread has ended, so nothing is left running and no failure is lost."""
    if len(items) <= 1 or threads <= 1:
        for item in items:
            work(item)
        return
    pending, lock, errors = iter(enumerate(items)), threading.Lock(), {}

    def run() -> None:
        while True:
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                work(item[1])
            except BaseException as error:  # noqa: BLE001 - raised in the caller's thread below
                errors[item[0]] = error

    started = [threading.Thread(target=run, name=name) for _ in range(min(threads, len(items)))]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    if errors:
        raise errors[min(errors)]
