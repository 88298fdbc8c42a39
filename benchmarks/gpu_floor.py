"""The pinned-copy floor on a CUDA machine: host↔device bandwidth and 2 × |θ| / bandwidth.

``python -m benchmarks gpu_floor`` is not a side-by-side benchmark; ``gpu_check.sh`` runs it
next to ``benchmarks ddp`` so the GPU goal (step ≤ 3 × floor) can be checked in one go.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from benchmarks.jobs import mlp88m, n_params


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA"}))
        return 0
    nbytes = 4 * n_params(mlp88m())
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates = {}
    for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        rates[name] = nbytes / sorted(ts)[2] / 1e9
    floor_ms = 1000 * (nbytes / (rates["d2h"] * 1e9) + nbytes / (rates["h2d"] * 1e9))
    out = {"theta_bytes": nbytes, "GBps": rates, "floor_ms": floor_ms, "goal_ms": 3 * floor_ms,
           "gpu": torch.cuda.get_device_name(0)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
