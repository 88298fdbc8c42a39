"""Raw ZeroMQ throughput by frame size: where ZeroMQ over tcp loopback is fastest.

    python -m benchmarks frames [--mb 64] [--reps 5] [--io-threads 1]

Sends ``--mb`` MiB as one multipart message cut into frames of 64, 16, 4, 1 and 0.25 MiB
to a ROUTER in another thread that echoes them, alternating the sizes each repetition;
reports the median GB/s (both directions) per size and its ratio to the one-frame case.
This is the measurement behind ``--chunk-mb 1`` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import numpy as np
import zmq

from benchmarks.harness import machine, save

SIZES_KIB = [65536, 16384, 4096, 1024, 256]


def _round_trip(ctx: zmq.Context, frames: list[memoryview], iters: int) -> float:
    r = ctx.socket(zmq.ROUTER)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    d = ctx.socket(zmq.DEALER)
    d.connect(f"tcp://127.0.0.1:{port}")

    def echo() -> None:
        for _ in range(iters):
            if not r.poll(120_000):
                return
            r.send_multipart(r.recv_multipart(copy=False), copy=False)

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    ts = []
    try:
        for _ in range(iters):
            t0 = time.perf_counter()
            d.send_multipart(frames, copy=False)
            if not d.poll(120_000):
                raise RuntimeError("no echo within 120s")
            d.recv_multipart(copy=False)
            ts.append(time.perf_counter() - t0)
    finally:
        th.join(130)
        r.close(0)
        d.close(0)
    return statistics.median(ts[1:])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks frames", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--io-threads", type=int, default=1)
    a = ap.parse_args(argv)
    n = a.mb << 20
    buf = np.ones(n, np.uint8)
    ctx = zmq.Context(io_threads=a.io_threads)
    rates: dict[int, list[float]] = {k: [] for k in SIZES_KIB}
    try:
        for rep in range(a.reps):
            order = SIZES_KIB[rep % len(SIZES_KIB):] + SIZES_KIB[:rep % len(SIZES_KIB)]
            for kib in order:
                c = min(kib << 10, n)
                frames = [memoryview(buf)[i:i + c] for i in range(0, n, c)]
                rates[kib].append(2 * n / _round_trip(ctx, frames, a.iters) / 1e9)
            print(f"rep {rep + 1}/{a.reps}: " + ", ".join(f"{k}KiB={rates[k][-1]:.2f}" for k in SIZES_KIB),
                  file=sys.stderr)
    finally:
        ctx.destroy(0)
    base = SIZES_KIB[0]
    summary = {f"{k} KiB": {"GBps": statistics.median(rates[k]),
                            "vs_one_frame": statistics.median(x / y for x, y in zip(rates[k], rates[base]))}
               for k in SIZES_KIB}
    path = save("frames", {"benchmark": "frames", "machine": machine(), "args": vars(a), "rates": rates,
                           "summary": summary})
    print(json.dumps(summary, indent=2))
    print(f"saved {path}", file=sys.stderr)
    return 0
