# Sourced by the device scripts (gpu_check.sh, wan_check.sh): the repo root, $OUT, and pyzmq from
# the carried wheel in .whl (the device image has no pyzmq; gpu_check.sh's header says how to
# fetch it), with the repo importable.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
