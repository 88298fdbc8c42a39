"""A client's options from a worker's configuration: one mapping, used by every entry point.

``ps-worker`` (data parallel and pipeline stages alike) and :class:`worker.DistributedOptimizer`
build their :class:`worker.client.PSClient` with :meth:`PSClient.from_config
<worker.client.PSClient.from_config>`, which takes its keyword arguments from
:func:`client_options`. So every client option of :class:`common.config.WorkerConfig` reaches
every client, and none is read from the environment here: that is ``common.config``'s job,
at the edge (``parse_config``).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from common.config import WorkerConfig
from common.security import Curve
from common.transport import USE_DEFAULT

def curve_of(cfg: WorkerConfig) -> Any:
    """The CURVE settings of ``cfg``'s keys (:meth:`common.security.Curve.for_worker`), or, when
    it names none, ``USE_DEFAULT``: the process's settings (``common.security.configure``).

    Raises:
        ConfigError: a key file cannot be read.
    """
    if cfg.curve_secret_key is None or cfg.curve_server_key is None:
        return USE_DEFAULT
    return Curve.for_worker(cfg.curve_secret_key, cfg.curve_server_key, cfg.curve_authorized_keys)


def client_options(cfg: WorkerConfig) -> dict[str, Any]:
    """The keyword arguments of :class:`worker.client.PSClient` that ``cfg`` sets, beside the
    server, rank and world size: timeout, worker id, heartbeat, chunk size, shared memory,
    wire dtype, compression, I/O threads and CURVE."""
    return {"timeout": cfg.timeout, "worker_id": cfg.worker_id, "heartbeat": cfg.heartbeat,
            "curve": curve_of(cfg), "chunk_mb": cfg.chunk_mb, "shm": cfg.shm, "wire_dtype": cfg.wire_dtype,
            "io_threads": cfg.io_threads, "compress": cfg.compress}


def default_worker_id() -> str:
    """``HOSTNAME-PID``: unique per process, and stable across restarts of a container
    (Docker and Kubernetes keep the hostname, and the entry process gets the same pid).
    Elsewhere set ``--worker-id`` for a rank that survives a restart."""
    return f"{socket.gethostname()}-{os.getpid()}"
