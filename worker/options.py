"""A client's identity: the worker id a server keys an assigned rank by."""

from __future__ import annotations

import os
import socket


def default_worker_id() -> str:
    """``HOSTNAME-PID``: unique per process, and stable across restarts of a container
    (Docker and Kubernetes keep the hostname, and the entry process gets the same pid).
    Elsewhere set ``--worker-id`` for a rank that survives a restart."""
    return f"{socket.gethostname()}-{os.getpid()}"
