"""Log lines that a peer can cause, at a rate the log can take.

A peer sending garbage in a loop must not turn the server's log into a flood (a line, or a
traceback, per message). :class:`Throttle` lets the first occurrence of each kind through,
then at most one per interval, which says how many were held back meanwhile.
"""

from __future__ import annotations

import time
from typing import Hashable


class Throttle:
    """Decides whether a line of kind ``key`` may be logged now.

    Args:
        every_s: the least time between two lines of one kind.
    """

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, key: Hashable, now: float | None = None) -> int | None:
        """None to stay quiet; else how many lines of this kind were held back since the last one."""
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) > 4096:  # many peers, many kinds: forget the old ones rather than grow
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        return self._held.pop(key, 0)
