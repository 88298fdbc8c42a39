"""``ps-worker``: run one worker (data parallel, or one pipeline stage)."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Sequence

from common import faults, security
from common.config import WorkerConfig, parse_config
from common.errors import ConfigError, PSError
from common.gcpolicy import frozen_startup
from common.logs import setup_logging
from common.malloc import keep_freed_memory

log = logging.getLogger("worker")


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ps-worker``; returns the exit status."""
    try:
        cfg = parse_config(WorkerConfig, argv, prog="ps-worker",
                           description="zmqps worker: trains on its shard and exchanges θ with the server")
    except ConfigError as e:
        sys.stderr.write(f"ps-worker: error: {e}\n")
        return 2
    role = "worker ?" if cfg.rank is None else f"worker {cfg.rank}"
    if cfg.mode == "pipeline" and cfg.stages and cfg.rank is not None:
        role += f" stage {cfg.rank % cfg.stages}"
    setup_logging(cfg.log_level, role)
    keep_freed_memory()  # [Note: kept heap]
    signal.signal(signal.SIGTERM, _terminate)
    try:
        faults.arm(cfg.fault)
        if cfg.curve_secret_key:
            assert cfg.curve_server_key is not None
            security.configure(security.Curve.for_worker(cfg.curve_secret_key, cfg.curve_server_key,
                                                         cfg.curve_authorized_keys))
        with frozen_startup():  # [Note: frozen start-up]
            if cfg.mode == "pipeline":
                from worker.pipeline.runtime import train_stage as run
            else:
                from worker.runtime import train as run
        run(cfg)
        return 0
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except PSError as e:
        log.error("%s: %s", type(e).__name__, e)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
