"""``python -m benchmarks NAME [options]``: run one benchmark (``--help`` after NAME for its options)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "ddp": "zmqps vs torch DDP/gloo on the same job (step time and whole-run time)",
    "transport": "push+pull throughput vs raw ZeroMQ moving the same bytes",
    "scaling": "zmqps step time over K = 1, 2, 4 workers and over server shards",
    "memory": "server peak RSS against |θ|",
    "hotpath": "one hot-path change at a time, A/B against its baseline",
    "frames": "raw ZeroMQ throughput by frame size (why --chunk-mb 1)",
    "consistency": "bsp vs ssp vs async under jitter (also: python -m benchmarks.consistency)",
    "pipeline": "pipeline schedules against torch's (also: python -m benchmarks.pipeline)",
    "wan": "zmqps modes vs DDP/gloo over rate-limited links (network namespaces + tc tbf; needs root)",
    "gpu_floor": "pinned host<->device copy rates and the GPU goal's floor (CUDA only)",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        sys.stderr.write("usage: python -m benchmarks NAME [options]\n\n")
        for name, text in BENCHMARKS.items():
            sys.stderr.write(f"  {name:10s} {text}\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
