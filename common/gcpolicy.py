"""The cyclic garbage collector's policy for zmqps's long-running processes.

[Note: frozen start-up] Importing torch creates several hundred thousand Python objects that
live as long as the process. CPython's cyclic collector traverses all of them on every full
collection, and once more when the interpreter exits: measured here, ``import torch`` plus
building an optimizer and exiting took 4.9 s, of which 1.1 s was the collector (0.5 s of it
while importing, ~0.6 s at exit). The entry points (``ps-server``, ``ps-worker``) therefore
import and build with the collector paused and then *freeze* what exists
(:func:`gc.freeze`): those objects move to a permanent generation that no collection (nor
the one at exit) walks. Garbage made later is collected as usual. The cost is that cyclic
garbage made during start-up is never reclaimed; start-up makes little (a few modules' worth).

Library code never calls this: a user's process that imports :mod:`worker.client` keeps its
own collector settings.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def frozen_startup() -> Iterator[None]:
    """Run the block with the cyclic collector paused, then freeze every object alive at its end.

    The collector's previous on/off state is restored afterwards, also when the block raises.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
