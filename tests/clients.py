"""Several in-process clients at once: one thread per rank, each must finish in time."""

from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def run_ranks(fn: Callable[[int], T], ranks: int, timeout: float) -> dict[int, T]:
    """``fn(rank)`` for every rank in its own thread; their results by rank.

    Raises the first error a thread raised, or fails if a thread is still running after
    ``timeout`` seconds (shared deadline), so a hung client cannot hang the test.
    """
    out: dict[int, T] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            out[rank] = fn(rank)
        except BaseException as e:  # re-raised in the test's thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(ranks)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    alive = [r for r, t in enumerate(threads) if t.is_alive()]
    assert not alive, f"ranks {alive} still running after {timeout}s"
    return out
