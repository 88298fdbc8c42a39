"""Sizes a Linux process reports about itself in ``/proc/PID/status``."""

from __future__ import annotations


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A size field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``: the peak, ...) in bytes.

    None where it cannot be read: no /proc, a process that is gone, or a zombie (no memory).
    ``VmHWM``, not ``ru_maxrss``, is a child's own peak: Linux carries ``ru_maxrss`` over
    ``exec``, so a child's starts at its parent's size.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
