"""zmqps over K = 1, 2, 4 workers and over 1, 2 server shards, with DDP/gloo at each K.

    python -m benchmarks scaling [--reps 2] [--steps 15] [--ks 1,2,4] [--shards 1,2]

Each K runs zmqps and DDP alternately (batch 32 per worker, so the global batch grows
with K) and reports both step times, the ratio, and samples/s. Shards run at K = 2, each
against one server. On 2 cores, K = 4 oversubscribes the machine: the numbers show how
each system degrades, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.harness import Pairing, machine, save
from benchmarks.runs import Job, run_peer, run_zmqps


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--shards", default="1,2")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    out = {"benchmark": "scaling", "machine": machine(), "args": vars(a), "workers": [], "shards": []}
    for k in [int(x) for x in a.ks.split(",") if x]:
        job = Job(workers=k, steps=a.steps, threads=a.threads)
        p = Pairing({"zmqps": lambda job=job: run_zmqps(job), "ddp": lambda job=job: run_peer(job, "ddp")}, a.reps)
        p.run()
        z, d = p.median("zmqps", "step_ms"), p.median("ddp", "step_ms")
        out["workers"].append({"K": k, "zmqps_step_ms": z, "ddp_step_ms": d,
                               "ratio": p.ratio("zmqps", "ddp", "step_ms"),
                               "zmqps_samples_s": 1000 * 32 * k / z, "ddp_samples_s": 1000 * 32 * k / d})
    shards = [int(x) for x in a.shards.split(",") if x]
    if len(shards) > 1:
        p = Pairing({f"S{s}": (lambda s=s: run_zmqps(Job(servers=s, steps=a.steps, threads=a.threads)))
                     for s in shards}, a.reps)
        p.run()
        for s in shards:
            out["shards"].append({"servers": s, "step_ms": p.median(f"S{s}", "step_ms"),
                                  "vs_1": p.ratio(f"S{s}", f"S{shards[0]}", "step_ms")})
    path = save("scaling", out)
    print(json.dumps({"workers": out["workers"], "shards": out["shards"]}, indent=2))
    print(f"saved {path}", file=sys.stderr)
    return 0
