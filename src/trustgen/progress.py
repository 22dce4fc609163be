"""What long work shows on the terminal: a progress bar, or a status line for work with no steps
to count. Shared by data preparation, training and evaluation."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


def progress_bar(total: float, desc: str, **kwargs: Any) -> Any:
    """A tqdm bar that leaves no trace when done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, **kwargs)


def counted(items: Iterable[T], total: int, desc: str, show: bool, **kwargs: Any) -> Iterator[T]:
    """The items, counted on a progress bar of `total` while `show`."""
    if not show:
        yield from items
        return
    bar = progress_bar(total, desc, **kwargs)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


@contextmanager
def status(what: str, show: bool, every: float = 1.0) -> Iterator[None]:
    """A line saying what the trainer is busy with and for how long, for work that has no steps
    to count. A bar redraws only when updated, so a thread redraws it every `every` seconds
    (without it the timer showed [00:00] throughout)."""
    if not show:
        yield
        return
    bar = progress_bar(1, what, bar_format="{desc} [{elapsed}]")
    done = threading.Event()

    def redraw() -> None:
        while not done.wait(every):
            bar.refresh()

    ticker = threading.Thread(target=redraw, name="trustgen-status", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()
