"""``ps-ping``: a health probe. Sends one PING to the server and reports its status.

Exit status 0 when the server answered within ``--timeout`` (the status is printed as one
JSON line on stdout: version, workers registered and done, last loss), 1 when it did not
or answered with an error, 2 on a bad option. Used by the container healthchecks and the
Kubernetes probes in ``deploy/``; a PING never changes the server's state.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Sequence

from common.config import PingConfig, parse_config
from common.errors import ConfigError, PSError
from common.logs import setup_logging

log = logging.getLogger("ping")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ps-ping``; returns the exit status."""
    try:
        cfg = parse_config(PingConfig, argv, prog="ps-ping",
                           description="ask a zmqps server for its status (exit 0 when it answers)")
    except ConfigError as e:
        sys.stderr.write(f"ps-ping: error: {e}\n")
        return 2
    setup_logging(cfg.log_level, "ping")
    from worker.client import PSClient  # after parsing: importing torch is slow

    try:
        with PSClient(cfg.server, None, 1, timeout=cfg.timeout, worker_id="ps-ping") as client:
            status = client.ping()
    except PSError as e:
        log.error("%s: %s", type(e).__name__, e)
        return 1
    sys.stdout.write(json.dumps(status, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
