#!/usr/bin/env bash
# The GPU checks of issue 7 in one go, for a session that has the H100 machine.
#
# Prepare on the development machine, in the repo root (pyzmq is not in the device image):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pyzmq
# Then run it with the device tool: carry [".whl"], timeout_s ~540, command
#   bash benchmarks/gpu_check.sh
# It writes everything under $OUT (or ./runs/gpu when OUT is unset):
#   floor.json   pinned H2D/D2H rates and the floor 2 x |θ| / rate for the 88.1M model
#   tests.log    the CUDA tests (tests/test_gpu.py), which skip on machines without CUDA
#   ddp.json     zmqps vs DDP/gloo on the 88.1M MLP, K = 2 on one GPU, batch 256 per worker
#   transport.json  push+pull vs raw ZeroMQ over TCP on that host's 16 cores (the goal the
#                2-core machine cannot reach: there zmqps's own threads have no core to run on)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m benchmarks gpu_floor > "$OUT/floor.json" 2> "$OUT/floor.err"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/tests.log" 2>&1
echo "tests exit $?" >> "$OUT/tests.log"
timeout 330 python3 -m benchmarks ddp --model benchmarks.jobs:mlp88m --data benchmarks.jobs:data88m \
    --batch 256 --steps 30 --reps 2 --device cuda --threads 4 --no-kept-peer > "$OUT/ddp.json" 2> "$OUT/ddp.log"
echo "ddp exit $?" >> "$OUT/ddp.log"
timeout 75 python3 -m benchmarks transport --reps 3 --iters 8 > "$OUT/transport.json" 2> "$OUT/transport.log"
echo "transport exit $?" >> "$OUT/transport.log"
cp runs/bench/*.json "$OUT/" 2>/dev/null
tail -n 30 "$OUT"/floor.json "$OUT"/tests.log "$OUT"/ddp.json "$OUT"/ddp.log "$OUT"/transport.json
