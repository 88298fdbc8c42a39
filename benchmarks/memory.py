"""Server peak RSS against |θ| on the benchmark job.

    python -m benchmarks memory [--reps 2] [--steps 15] [--optimizer sgd|momentum|adam] [--workers 2]

Reports the server's peak resident set (``VmHWM``, sampled by ``Group.wait``), its median resident set sampled
while the steps ran (steady state: from the end of the warm-up to the last step), its resident set when idle
before any worker came (Python, torch, ZeroMQ), and (peak − idle) / |θ|, (steady − idle) / |θ|.
The peak is set by transients outside the step loop: INIT (the server keeps one offered
tensor per key, the lowest rank's, plus the offer being received: ≤ 2 θ whatever K is,
``ps/offers.py``) and θ's move into shared memory. The design bound, for
``--shm auto`` with K workers on the same host: θ + optimizer slots (0 for sgd, 1 for
momentum, 2 for adam) + one accumulator + K gradient segments (shared pages the server
reads count in its RSS). With frames (``--shm off``): θ + slots + accumulator + the frames
in flight (≤ K × θ at a step's peak).
Both sides are run, alternately.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.harness import Pairing, machine, save
from benchmarks.jobs import mlp19m, n_params
from benchmarks.runs import Job, run_zmqps


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    theta = 4 * n_params(mlp19m())

    def job(shm: str) -> Job:
        return Job(steps=a.steps, measure_rss=True, workers=a.workers, worker_args=["--shm", shm],
                   server_args=["--shm", shm, "--optimizer", a.optimizer])

    p = Pairing({"shm": lambda: run_zmqps(job("auto")), "frames": lambda: run_zmqps(job("off"))}, a.reps)
    p.run()
    out = {"benchmark": "memory", "machine": machine(), "args": vars(a), "theta_bytes": theta,
           "results": p.results, "summary": {}}
    for n in p.results:
        peak, idle = p.median(n, "server_peak_rss"), p.median(n, "server_idle_rss")
        steady = p.median(n, "server_median_rss")
        out["summary"][n] = {"peak_MiB": peak / 2**20, "idle_MiB": idle / 2**20,
                             "steady_MiB": steady / 2**20, "theta_MiB": theta / 2**20,
                             "peak_over_idle_in_theta": (peak - idle) / theta,
                             "steady_over_idle_in_theta": (steady - idle) / theta}
    path = save("memory", out)
    print(json.dumps(out["summary"], indent=2))
    print(f"saved {path}", file=sys.stderr)
    return 0
