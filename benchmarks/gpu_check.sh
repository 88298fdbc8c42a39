#!/usr/bin/env bash
# The GPU checks of issue 7 in one go, for a session that has the H100 machine.
#
# Prepare on the development machine, in the repo root (pyzmq is not in the device image):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pyzmq
# Then run it with the device tool: carry [".whl"], timeout_s 600, command
#   bash benchmarks/gpu_check.sh
# It writes everything under $OUT (or ./runs/gpu when OUT is unset):
#   gpu.txt      the GPU, /dev/shm's size, cores, and gpu_floor's stderr
#   floor.json   pinned H2D/D2H rates and the floor 2 x |θ| / rate for the 88.1M model
#   tests.log    the CUDA tests (tests/test_gpu.py, the CUDA exactness and pipeline-staging
#                tests), which skip on machines without CUDA
#   ddp.json     zmqps vs DDP/gloo on the 88.1M MLP, K = 2 on one GPU, batch 256 per worker;
#                8 torch threads for every process of both sides: the zmqps server sums and
#                applies 88.1M parameters on the CPU (355 ms on one thread of the 2-core VM)
#   transport.json  push+pull vs raw ZeroMQ over TCP on that host's 16 cores (the goal the
#                2-core machine cannot reach: there zmqps's own threads have no core to run on)
#   bench.tgz    every benchmark's raw JSON (runs/bench)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
if ! python3 -c 'import zmq' 2> "$OUT/gpu.txt"; then
    echo "pyzmq is missing: carry its wheel in .whl (see the header)" >> "$OUT/gpu.txt"
    cat "$OUT/gpu.txt"
    exit 1
fi
# At most 8 files come back from the device: gpu.txt floor.json tests.log ddp.json ddp.log
# transport.json transport.log bench.tgz. Timeouts send SIGINT first, so the harness and pytest
# stop their children (started in sessions of their own) before the next step starts.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/gpu.txt" 2>&1
df -h /dev/shm >> "$OUT/gpu.txt" 2>&1
nproc >> "$OUT/gpu.txt"
timeout -s INT -k 10 45 python3 -m benchmarks gpu_floor > "$OUT/floor.json" 2>> "$OUT/gpu.txt"
timeout -s INT -k 15 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    tests/test_exactness.py::test_cuda_workers_match_the_math \
    tests/test_pipeline_links.py::test_cuda_staging_goes_through_reused_pinned_buffers > "$OUT/tests.log" 2>&1
echo "tests exit $?" >> "$OUT/tests.log"
timeout -s INT -k 15 280 python3 -m benchmarks ddp --model benchmarks.jobs:mlp88m --data benchmarks.jobs:data88m \
    --batch 256 --steps 30 --reps 2 --device cuda --threads 8 --no-kept-peer > "$OUT/ddp.json" 2> "$OUT/ddp.log"
echo "ddp exit $?" >> "$OUT/ddp.log"
timeout -s INT -k 10 70 python3 -m benchmarks transport --reps 3 --iters 8 > "$OUT/transport.json" 2> "$OUT/transport.log"
echo "transport exit $?" >> "$OUT/transport.log"
tar -czf "$OUT/bench.tgz" runs/bench 2>/dev/null
tail -n 30 "$OUT"/gpu.txt "$OUT"/floor.json "$OUT"/tests.log "$OUT"/ddp.json "$OUT"/ddp.log "$OUT"/transport.json
