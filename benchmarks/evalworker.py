"""Child entry point: ``ps-worker`` plus held-out loss records, for workers that cannot log them yet.

``python -m benchmarks.evalworker --eval-every N --eval-log PATH --eval-data MODULE:FACTORY
[--eval-round-steps H] [ps-worker options]`` runs the worker's own training loop
(:func:`worker.runtime.train`, as ``ps-worker`` does, with its allocator and collector
settings); rank 0 evaluates the model it holds (θ as the server returned it) at step 0, every
N steps and after the last, and appends :mod:`benchmarks.heldout` records. Under ``--sync
diloco`` (``--eval-round-steps H``, the server's ``--inner-steps``) it evaluates θ_global after
every round of H local steps. The wan benchmark uses it only when ``ps-worker --help`` has no
``--eval-every`` (or with ``--bench-eval``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from benchmarks.heldout import EvalLog, due
from common.config import WorkerConfig, parse_config
from common.gcpolicy import frozen_startup
from common.logs import setup_logging
from common.malloc import keep_freed_memory

OWN = ("--eval-every", "--eval-log", "--eval-data", "--eval-round-steps")


def split(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(this wrapper's options, the ps-worker options)."""
    own, rest, i = {}, [], 0
    while i < len(argv):
        if argv[i] in OWN:
            own[argv[i]] = argv[i + 1]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return own, rest


def main(argv: list[str]) -> int:
    own, rest = split(argv)
    cfg = parse_config(WorkerConfig, rest, prog="ps-worker")
    setup_logging(cfg.log_level, f"worker {cfg.rank}")
    keep_freed_memory()  # [Note: kept heap]
    with frozen_startup():  # as ps-worker does
        from worker import runtime
        from worker.data import ShardPlan
    built: dict[str, Any] = {}
    build_model, build_data = runtime.build_model, runtime.build_data

    def keep_model(spec: str | None, seed: int) -> torch.nn.Module:
        built["model"] = build_model(spec, seed)
        return built["model"]

    def keep_data(spec: str | None, seed: int) -> Any:
        built["data"] = build_data(spec, seed)
        return built["data"]

    runtime.build_model, runtime.build_data = keep_model, keep_data  # this process only: see the model
    evals = EvalLog(own["--eval-log"], own["--eval-data"], cfg.loss, cfg.seed) if cfg.rank == 0 else None
    every = int(own.get("--eval-every", "0"))
    h = int(own.get("--eval-round-steps", "0"))  # --sync diloco: train calls on_step once a round
    state: dict[str, int] = {}

    def on_step(step: int) -> None:
        assert evals is not None and cfg.world_size is not None
        if "total" not in state:
            state["total"] = ShardPlan(len(built["data"]), cfg.world_size, cfg.batch_size, 0).steps_per_epoch \
                * cfg.epochs
        if h:  # after round r the model holds θ_global of step (r + 1)·H: every round is a new θ
            evals.write(min((step + 1) * h, state["total"]), built["model"])
        elif due(step + 1, every, state["total"]):
            evals.write(step + 1, built["model"])

    if evals is not None:
        evals.write(0, build_model(cfg.model, cfg.seed))  # θ_0, which every worker starts from
    runtime.train(cfg, on_step=on_step if evals is not None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
