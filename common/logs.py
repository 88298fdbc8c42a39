"""Logging set-up shared by every process: one line per record, with a role prefix."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, role: str) -> None:
    """Log to stderr as ``HH:MM:SS LEVEL [role] message`` (e.g. ``[worker 3]``, ``[server]``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{role}] %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def set_role(role: str) -> None:
    """Change the role prefix of the lines :func:`setup_logging` writes (e.g. once a rank is assigned)."""
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter
        if fmt is not None and fmt._fmt is not None and "[" in fmt._fmt:
            head, _, _ = fmt._fmt.partition("[")
            handler.setFormatter(logging.Formatter(f"{head}[{role}] %(message)s", fmt.datefmt))
