"""zmqps vs torch DDP/gloo on the same job: step time and whole-run time, side by side.

    python -m benchmarks ddp [--workers 2] [--batch 32] [--steps 40] [--reps 5]
                             [--model benchmarks.jobs:mlp19m] [--device cpu] [--zmqps-args "..."]

Goal (issue 7): zmqps/DDP ≤ 0.8 for both step and run time (must be ≤ 1.0).

zmqps's processes keep freed heap memory ([Note: kept heap] in common/malloc.py), which a
plain torch process does not. To show how much of the difference that is, the peers also run
a second time with glibc set the same way through the environment (``ddp_kept``; the
compute-only floor ``compute`` always runs so), and the ratio against that is reported too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys

from benchmarks.harness import Pairing, machine, save
from benchmarks.runs import Job, run_peer, run_zmqps
from common.malloc import MMAP_THRESHOLD, TRIM_THRESHOLD

# glibc's environment knobs with the values common.malloc.keep_freed_memory sets with mallopt
KEPT_HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks ddp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="rows per worker per step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / workers)")
    ap.add_argument("--model", default="benchmarks.jobs:mlp19m")
    ap.add_argument("--data", default="benchmarks.jobs:data19m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--servers", type=int, default=1, help="zmqps server shards")
    ap.add_argument("--zmqps-args", default="", help="extra ps-worker options for the zmqps side")
    ap.add_argument("--server-args", default="", help="extra ps-server options for the zmqps side")
    ap.add_argument("--no-compute", action="store_true", help="skip the compute-only floor")
    ap.add_argument("--no-kept-peer", action="store_true", help="skip DDP with zmqps's allocator settings")
    return ap.parse_args(argv)


def job_of(a: argparse.Namespace) -> Job:
    import os

    threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
    return Job(model=a.model, data=a.data, workers=a.workers, batch=a.batch, steps=a.steps, threads=threads,
               device=a.device, servers=a.servers, worker_args=shlex.split(a.zmqps_args),
               server_args=shlex.split(a.server_args))


def main(argv: list[str]) -> int:
    a = parse(argv)
    job = job_of(a)
    kept = dataclasses.replace(job, env={**job.env, **KEPT_HEAP_ENV})
    contenders = {"zmqps": lambda: run_zmqps(job), "ddp": lambda: run_peer(job, "ddp")}
    if not a.no_kept_peer:
        contenders["ddp_kept"] = lambda: run_peer(kept, "ddp")
    if not a.no_compute:
        contenders["compute"] = lambda: run_peer(kept, "compute")
    p = Pairing(contenders, a.reps)
    p.run()
    out = {"benchmark": "ddp", "machine": machine(), "job": vars(a), "threads": job.threads,
           "results": p.results,
           "step_ratio": p.ratio("zmqps", "ddp", "step_ms"), "run_ratio": p.ratio("zmqps", "ddp", "run_s"),
           "median": {n: {m: p.median(n, m) for m in ("step_ms", "run_s")} for n in contenders}}
    if "ddp_kept" in contenders:
        out["step_ratio_kept"] = p.ratio("zmqps", "ddp_kept", "step_ms")
        out["run_ratio_kept"] = p.ratio("zmqps", "ddp_kept", "run_s")
    cpu = [r["server_cpu_ms_per_step"] for r in p.results["zmqps"] if "server_cpu_ms_per_step" in r]
    if cpu:
        out["zmqps_server_cpu_ms_per_step"] = statistics.median(cpu)
    if "compute" in contenders:
        out["zmqps_over_compute"] = p.ratio("zmqps", "compute", "step_ms")
        out["ddp_over_compute"] = p.ratio("ddp", "compute", "step_ms")
    path = save("ddp", out)
    print(json.dumps({k: out[k] for k in out if k not in ("results", "machine", "job")}, indent=2))
    print(f"saved {path}", file=sys.stderr)
    return 0
