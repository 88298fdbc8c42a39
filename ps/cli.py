"""``ps-server``: run the parameter server from the command line."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from typing import TYPE_CHECKING, Sequence

import zmq

from common import faults
from common.config import ServerConfig, parse_config
from common.errors import ConfigError
from common.gcpolicy import frozen_startup
from common.logs import setup_logging
from common.malloc import keep_frame_memory

if TYPE_CHECKING:
    from ps.server import Server

log = logging.getLogger("ps")


_server: Server | None = None  # set once built, for the signal handler


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM: a built server checkpoints at its next safe point and exits; before that, or
    at a second SIGTERM, exit at once."""
    if _server is not None and _server.stop_signal is None:
        _server.request_stop(signum)
        return
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ps-server``; returns the exit status."""
    try:
        cfg = parse_config(ServerConfig, argv, prog="ps-server",
                           description="zmqps parameter server: holds θ and applies the workers' averaged gradients")
    except ConfigError as e:
        print(f"ps-server: error: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, "server")
    keep_frame_memory()  # [Note: the server's frames]
    signal.signal(signal.SIGTERM, _terminate)
    try:
        faults.arm(cfg.fault)
        with frozen_startup():  # [Note: frozen start-up]
            from ps.server import Server  # after logging: importing torch is slow

            server = Server(cfg)
            server.bind()
        global _server
        while True:
            _server = server
            code = server.serve()
            if server.rewind_to is None:
                return code
            # [Note: shards rewind together]: a new server, at that step, where this one listened
            cfg = dataclasses.replace(cfg, bind=server.bound, resume="auto")
            server = Server(cfg, rewind_to=server.rewind_to)
            server.bind()
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except (OSError, zmq.ZMQError) as e:
        log.error("cannot serve on %s: %s", cfg.bind, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
