"""glibc's allocator policy for zmqps's processes: keep freed memory, give it back on purpose.

[Note: kept heap] A training step allocates and frees the same large tensors every time
(activations, and gradients that ``zero_grad(set_to_none=True)`` frees). glibc's defaults
serve blocks above a *dynamic* threshold (128 KiB, rising to at most 32 MiB) with ``mmap``
and trim the top of the heap once more than twice that is free, so each step hands tens of
megabytes back to the kernel and the next step faults them in again, page by page, each page
zeroed by the kernel. Measured on the 18.9M-parameter MLP (one thread, batch 32): 18,400 page
faults and 200 ms per forward+backward by default; with the heap kept, 15-70 faults and
116-136 ms, at the same peak RSS (386 MB). :func:`keep_freed_memory` sets
``M_MMAP_THRESHOLD`` to 256 MiB and ``M_TRIM_THRESHOLD`` to 1 GiB, so blocks up to 256 MiB come
from the heap and freed memory stays there for the next step. The price is fragmentation on
models with very large tensors (88M MLP: peak RSS 530 → 576-579 MB, step 413 → 270-315 ms).
Memory freed once and not needed again is returned explicitly with
:func:`release_free_memory` (the server does so after INIT, when the offers of θ are freed).

``ps-worker`` applies this; library code does not, so a user's own process keeps its allocator
as it is unless it calls :func:`keep_freed_memory` itself. ``ps-server`` does not: there it
kept about one |θ| more resident (4.1 → 5.0 θ with shared memory, 3.1 → 3.7 θ with frames).

[Note: the server's frames] The server receives a step's gradients as frames of
``--chunk-mb`` (1 MiB) that ZeroMQ's I/O thread allocates and the reduction frees. Under
glibc's dynamic thresholds, whether those came from the heap or from fresh zeroed pages
depended on the largest block the process had happened to free before: the same code faulted
2,000 pages per step in one run of the transport benchmark and 10,000 in the next (58 against
70 ms a step, 35 against 52 ms of server CPU). :func:`keep_frame_memory` fixes the thresholds
instead: blocks below 4 MiB (frames) from the heap, freed memory trimmed only past 128 MiB (a
bound, whatever |θ|), larger blocks (θ-sized tensors) mapped as before. Measured: 130-320
faults and 53-56 ms a step, and the same steady RSS as glibc's defaults (4.05 / 3.07 θ). It
returns memory freed once with :func:`release_free_memory`. A
user who sets glibc's own knobs (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES``) keeps them: we then change nothing. Without glibc both functions do nothing
and return False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30
SERVER_MMAP_THRESHOLD = 4 << 20
SERVER_TRIM_THRESHOLD = 128 << 20
USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it; see [Note: kept heap].

    Returns True when both thresholds were set; False without glibc, or when the user set the
    allocator's knobs through the environment (those win).
    """
    user = [k for k in USER_KNOBS if os.environ.get(k)]
    if user:
        log.debug("allocator left as configured by %s", ", ".join(user))
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok


def keep_frame_memory() -> bool:
    """The server's allocator policy ([Note: the server's frames]): frames from a kept heap,
    large tensors mapped as before."""
    return keep_freed_memory(SERVER_MMAP_THRESHOLD, SERVER_TRIM_THRESHOLD)


def release_free_memory() -> bool:
    """Return free heap pages to the OS (glibc ``malloc_trim``); False where that is not available.

    The server frees large transients once: the offers of θ at INIT (received as frames), and
    θ's private copy when it moves into shared memory. glibc keeps such freed heap memory for
    reuse, so the server's resident size would stay that much higher for the whole job; this
    returns it.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
