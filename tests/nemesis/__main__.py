"""``python -m tests.nemesis --seeds 0-299``: run many seeds one after another, then a summary table.

Each seed's line is logged as it ends (``ok`` or ``FAIL``); failures are written in full to
``<dir>/seed-<N>/FAILURE.txt`` (the logs of a failing run are kept, a passing run's are
removed unless ``--keep``). The table totals: schedules run, faults injected per kind, θ
comparisons, exactly-once checks, failures (with their seeds, product vs harness).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from tests.forkserver import ForkServer
from tests.nemesis.runner import NemesisFailure, Result, run
from tests.nemesis.schedule import MODES, Schedule, parse_seeds
from tests.nemesis.summary import Summary

log = logging.getLogger("tests.nemesis")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the seeds; exit status 1 when any failed."""
    ap = argparse.ArgumentParser(prog="python -m tests.nemesis", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default=f"0-{len(MODES) - 1}",
                    help=f"seeds: 0-299, 7, or 1,4,9-12 (default 0-{len(MODES) - 1}: every mode once)")
    ap.add_argument("--dir", type=Path, default=None, help="where runs keep their logs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the logs of passing runs too")
    ap.add_argument("--print", dest="show", action="store_true", help="only print each seed's schedule")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    seeds = parse_seeds(args.seeds)
    if args.show:
        for seed in seeds:
            log.info("seed %d: %s", seed, Schedule.generate(seed).text())
        return 0
    base = args.dir or Path(tempfile.mkdtemp(prefix="nemesis-"))
    base.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    fs = ForkServer()
    t0 = time.monotonic()
    try:
        for seed in seeds:
            s = Schedule.generate(seed)
            tmp = base / f"seed-{seed}"
            try:
                result: Result = run(s, fs, tmp, keep=args.keep)
            except NemesisFailure as e:
                summary.add_failure(e)
                (tmp / "FAILURE.txt").write_text(str(e) + "\n")
                log.error("seed %d FAIL (%s) in %.1fs: %s - %s", seed, e.kind,
                          e.result.wall_s if e.result else 0.0, e.what.splitlines()[0][:300], tmp / "FAILURE.txt")
                continue
            summary.add(result)
            log.info("seed %d ok in %.1fs: %s%s%s", seed, result.wall_s, s.text(),
                     f" max|Δθ|={result.max_delta:.2g}" if result.theta_compared else "",
                     f" ({'; '.join(result.notes)})" if result.notes else "")
    finally:
        fs.close()
    log.info("nemesis: %d seed(s) in %.0fs, logs under %s\n%s", len(seeds), time.monotonic() - t0, base,
             summary.table())
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
