"""Give freed heap memory back to the operating system.

The server frees large transients once: every worker's offer of θ at INIT (K × |θ|, received as
frames), and θ's private copy when it moves into shared memory. glibc keeps such freed heap
memory for reuse, so the server's resident size would stay that much higher for the whole job;
``malloc_trim`` returns it. Elsewhere (no glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)


def release_free_memory() -> bool:
    """Return free heap pages to the OS (glibc ``malloc_trim``); False where that is not available."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
