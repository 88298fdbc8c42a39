"""The hot path, one change at a time: each rung of a ladder against the rung below it.

    python -m benchmarks hotpath [--reps 3] [--steps 25] [--rungs NAME,NAME,...]
    python -m benchmarks hotpath --a "WORKER ARGS" --b "WORKER ARGS"   (one A/B pair)

Every rung is the zmqps job of ``benchmarks ddp`` (18.9M MLP, K = 2) with some options;
consecutive rungs run alternately in the same invocation and the reported number is the
median of per-repetition step-time ratios (rung / previous rung; < 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from benchmarks.harness import Pairing, machine, save
from benchmarks.runs import Job, run_zmqps

# name -> (worker options, server options); each differs from the previous by one change
RUNGS: dict[str, tuple[str, str]] = {
    "whole": ("--shm off --bucket-mb 0 --chunk-mb 0", "--shm off"),  # one message of whole tensors
    "chunked": ("--shm off --bucket-mb 0 --chunk-mb 1", "--shm off"),  # 1 MiB pieces: frames near the fast size
    "buckets": ("--shm off --bucket-mb 16 --chunk-mb 1", "--shm off"),  # pushed from backward hooks, θ per bucket
    "io2": ("--shm off --bucket-mb 16 --chunk-mb 1 --io-threads 2", "--shm off --io-threads 2"),  # 2 I/O threads
    "shm": ("--bucket-mb 16 --chunk-mb 1", ""),  # same-host shared memory (the default)
    "shm-nobucket": ("--bucket-mb 0 --chunk-mb 1", ""),  # shared memory, one push after backward
}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks hotpath", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rungs", default="whole,chunked,buckets,shm")
    ap.add_argument("--a", default=None, help="worker options of A (with --b: one pair)")
    ap.add_argument("--b", default=None)
    ap.add_argument("--a-server", default="")
    ap.add_argument("--b-server", default="")
    a = ap.parse_args(argv)
    if a.a is not None and a.b is not None:
        rungs = {"A": (a.a, a.a_server), "B": (a.b, a.b_server)}
    else:
        rungs = {n: RUNGS[n] for n in a.rungs.split(",")}
    names = list(rungs)

    def job(n: str) -> Job:
        w, s = rungs[n]
        return Job(steps=a.steps, threads=a.threads, worker_args=shlex.split(w), server_args=shlex.split(s))

    p = Pairing({n: (lambda n=n: run_zmqps(job(n))) for n in names}, a.reps)
    p.run()
    ladder = [{"rung": n, "options": rungs[n][0], "server": rungs[n][1],
               "step_ms": p.median(n, "step_ms"),
               "vs_previous": None if i == 0 else p.ratio(n, names[i - 1], "step_ms"),
               "vs_first": None if i == 0 else p.ratio(n, names[0], "step_ms")}
              for i, n in enumerate(names)]
    out = {"benchmark": "hotpath", "machine": machine(), "args": vars(a), "results": p.results, "ladder": ladder}
    path = save("hotpath", out)
    print(json.dumps(ladder, indent=2))
    print(f"saved {path}", file=sys.stderr)
    return 0
