# Two commands for a fresh machine (each sets up .venv itself):
#   make run    - the default job: ps-launch starts a server and 2 workers as separate processes
#   make test   - the test suite
#   make bench NAME=ddp|transport|hotpath|memory|scaling|frames|pipeline|consistency|wan - a side-by-side benchmark
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.zmqps-installed
# The CPU build of torch where there is no NVIDIA GPU (pip would otherwise pick a multi-GB CUDA build);
# the default CUDA build where there is one.
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: run test setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ps-launch $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(or $(NAME),ddp) $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
