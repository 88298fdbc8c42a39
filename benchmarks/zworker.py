"""Child entry point: a real zmqps worker (``worker.runtime.train``) that records step times.

``python -m benchmarks.zworker --bench-out FILE [ps-worker options]``.
"""

from __future__ import annotations

import json
import sys
import time

from common.config import WorkerConfig, parse_config
from common.gcpolicy import frozen_startup
from common.logs import setup_logging
from common.malloc import keep_freed_memory


def main(argv: list[str]) -> None:
    i = argv.index("--bench-out")
    out = argv[i + 1]
    rest = argv[:i] + argv[i + 2:]
    cfg = parse_config(WorkerConfig, rest, prog="bench-worker")
    setup_logging(cfg.log_level, f"worker {cfg.rank}")
    keep_freed_memory()  # [Note: kept heap]
    with frozen_startup():  # as ps-worker does
        from worker.runtime import train
    times = [time.perf_counter()]
    train(cfg, on_step=lambda step: times.append(time.perf_counter()))
    with open(out, "w") as f:
        json.dump({"times": times}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
