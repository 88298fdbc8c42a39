"""push+pull throughput of zmqps against raw ZeroMQ moving the same bytes, side by side.

    python -m benchmarks transport [--model benchmarks.jobs:mlp19m] [--reps 5] [--iters 10]
                                   [--chunk-mb 1] [--bucket-mb 16] [--io-threads 1]

zmqps: one worker (a :class:`worker.client.PSClient` in this process, ``--shm off`` by default
so the bytes cross the socket; ``--shm auto`` measures the same-host path) pushes the model's gradients and pulls θ back from a real
``ps-server`` (which also reduces and applies SGD). Raw: the same process sends the same
bytes, cut into the same frames, to a ZeroMQ ROUTER that echoes them (``benchmarks.rawecho``).
zmqps pushes bucket by bucket and pulls each bucket's θ as soon as the server applied it,
as the runtime does. Throughput = 2 × bytes / round-trip time. Goal (issue 7): zmqps ≥ 0.9 × raw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import zmq

from benchmarks.harness import Group, Pairing, child_env, machine, save, tmpdir, wait_file
from common.malloc import keep_freed_memory
from common.partition import buckets, pieces_of
from worker.client import PSClient
from worker.factories import build_model


def _grads(model: str) -> dict[str, torch.Tensor]:
    m = build_model(model, 0)
    return {k: torch.randn_like(p) * 1e-3 for k, p in m.named_parameters()}


def zmqps_rate(grads: dict, a: argparse.Namespace, iters: int) -> dict[str, float]:
    nbytes = sum(t.numel() * t.element_size() for t in grads.values())
    with tmpdir("transport") as tmp:
        d = Path(tmp)
        g = Group(d)
        try:
            g.spawn("server", [sys.executable, "-m", "ps", "--bind", "tcp://127.0.0.1:0", "--workers", "1",
                               "--ready-file", str(d / "ready"), "--checkpoint-dir", str(d / "ckpt"),
                               "--log-level", "warning", "--io-threads", str(a.io_threads), "--lr", "0"],
                    child_env(a.threads))
            ep = wait_file(d / "ready", g)
            with PSClient(ep, 0, 1, timeout=120, chunk_mb=a.chunk_mb, shm=a.shm, io_threads=a.io_threads) as c:
                params = {k: t.clone() for k, t in grads.items()}
                sizes = {k: t.numel() * t.element_size() for k, t in grads.items()}
                blist = buckets(list(grads), sizes, int(a.bucket_mb * (1 << 20)))
                c.init(params, buckets=blist)
                c.bind(params)  # as the runtime does (a no-op without shared memory)
                ts = []
                for _ in range(iters + 1):
                    t0 = time.perf_counter()
                    c.begin_step(None, 1, None)
                    for i in range(len(blist)):
                        c.push_bucket(i, grads)
                    c.end_step(params)
                    ts.append(time.perf_counter() - t0)
                c.done()
        finally:
            g.stop()
    t = statistics.median(ts[1:])
    return {"GBps": 2 * nbytes / t / 1e9, "ms": 1000 * t}


def raw_rate(grads: dict, a: argparse.Namespace, iters: int) -> dict[str, float]:
    pieces = pieces_of(grads, int(a.chunk_mb * (1 << 20)))
    frames = [memoryview(p.of(grads[p.base]).contiguous().view(torch.uint8).numpy()) for p in pieces]
    nbytes = sum(f.nbytes for f in frames)
    with tmpdir("raw") as tmp:
        d = Path(tmp)
        g = Group(d)
        ctx = zmq.Context(io_threads=a.io_threads)
        try:
            g.spawn("echo", [sys.executable, "-m", "benchmarks.rawecho", str(d / "ready"), str(a.io_threads)],
                    child_env(a.threads))
            ep = wait_file(d / "ready", g)
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            ts = []
            for _ in range(iters + 1):
                t0 = time.perf_counter()
                s.send_multipart([b"h", *frames], copy=False)
                if not s.poll(120_000):
                    raise RuntimeError("raw echo did not answer in 120s")
                s.recv_multipart(copy=False)
                ts.append(time.perf_counter() - t0)
            s.send_multipart([b""])
            s.poll(10_000)
            s.close(0)
        finally:
            ctx.destroy(0)
            g.stop()
    t = statistics.median(ts[1:])
    return {"GBps": 2 * nbytes / t / 1e9, "ms": 1000 * t}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks transport", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="benchmarks.jobs:mlp19m")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--chunk-mb", type=float, default=1.0)
    ap.add_argument("--io-threads", type=int, default=1)
    ap.add_argument("--bucket-mb", type=float, default=16.0, help="zmqps pushes (and pulls) bucket by bucket")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shm", default="off", choices=["off", "auto"],
                    help="off: the bytes cross the socket (the goal's comparison); auto: same-host shared memory")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)  # the client runs here: same threads as a worker
    keep_freed_memory()  # as ps-worker does; the raw side runs in this process too, and its echo likewise
    grads = _grads(a.model)
    p = Pairing({"zmqps": lambda: zmqps_rate(grads, a, a.iters), "raw": lambda: raw_rate(grads, a, a.iters)},
                a.reps)
    p.run()
    nbytes = sum(t.numel() * t.element_size() for t in grads.values())
    out = {"benchmark": "transport", "machine": machine(), "args": vars(a), "bytes_each_way": nbytes,
           "results": p.results, "throughput_ratio": p.ratio("zmqps", "raw", "GBps"),
           "median_GBps": {n: p.median(n, "GBps") for n in p.results}}
    path = save("transport", out)
    print(json.dumps({k: out[k] for k in ("bytes_each_way", "throughput_ratio", "median_GBps")}, indent=2))
    print(f"saved {path}", file=sys.stderr)
    return 0
