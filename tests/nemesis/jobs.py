"""A schedule's command lines and the checks of its result.

* :func:`server_args`, :func:`worker_args` - the ``ps-server`` / ``ps-worker`` arguments of a
  run (the same on every restart, as a supervisor would run them).
* :func:`compare_theta` - bsp, pipeline and diloco: ``final.safetensors`` (merged over shards)
  equals the single-process reference (:func:`tests.reference.replay`,
  :func:`tests.reference_pipeline.replay_pipeline`, :func:`tests.reference_diloco.replay_diloco`)
  in float64 within :data:`TOL`.
* :func:`check_exactly_once` - async, ssp and diloco-async: the newest checkpoint's ``zmqps``
  record says every update was applied once: each key's version is the number of non-empty
  pushes and each rank's clock is its steps (async, ssp: K x steps per worker pushes, a clock of
  the steps per worker) or its rounds (diloco-async: one push per (rank, round), so K x rounds
  pushes and a clock of the rounds; a push is applied only at its rank's clock, so these counts
  mean each (rank, round) was applied exactly once).
* :func:`check_round_files` - diloco, diloco-async: no worker lost its inner optimizer (every
  worker has a ``--state-dir``, so a restart must find its round files).
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.partition import merge_files
from tests.nemesis.models import SLOW_ENV
from tests.nemesis.schedule import SLOW_BACKWARD_S, SLOW_STAGE_S, Schedule, stall_of
from tests.reference import replay, steps_per_epoch, worker_rows
from tests.reference_diloco import replay_diloco
from tests.reference_pipeline import replay_pipeline

TOL = 1e-9
LEASE_S, HEARTBEAT_S, WORKER_TIMEOUT_S, REJOIN_DEADLINE_S = 1.5, 0.3, 60, 60
STAGE_TIMEOUT_S = 8
"""A stage's ``--timeout``: a neighbour that died is noticed this soon (a SIGSTOP is ≤ 3 s)."""
LOST_INNER_STATE = "starts afresh"
"""What a local-steps worker logs when a restart found no round file to continue from
(``worker.diloco.LocalSteps._restore``, ``worker.overlap.OverlappedSteps._begin``): its inner
optimizer was lost."""


def factory(spec: str) -> Callable[[], Any]:
    """``module:name`` -> the callable."""
    mod, name = spec.split(":")
    return getattr(importlib.import_module(mod), name)


def server_args(s: Schedule, bind: str, ckpt: Path, ready: Path, curve: tuple[Path, Path] | None) -> list[str]:
    """``ps-server`` arguments (``curve``: the server's secret key file and the authorized keys directory)."""
    job = s.job
    args = ["--bind", bind, "--workers", str(s.workers), "--ready-file", str(ready), "--checkpoint-dir", str(ckpt),
            "--lease", str(LEASE_S), "--rejoin-deadline", str(REJOIN_DEADLINE_S), "--sync", s.sync,
            "--optimizer", job.optimizer, "--lr", str(job.lr), "--weight-decay", str(job.weight_decay),
            "--checkpoint-every", str(job.checkpoint_every),
            "--shm", "off" if s.mode == "bsp-frames" else "auto", "--status-every", "5"]
    if s.sync == "ssp":
        args += ["--staleness", "1"]
    if s.local_steps:
        args += ["--inner-steps", str(job.inner_steps), "--outer-lr", str(job.outer_lr),
                 "--outer-momentum", str(job.outer_momentum), "--outer-delay", str(job.outer_delay)]
    if curve is not None:
        args += ["--curve-secret-key", str(curve[0]), "--curve-authorized-keys", str(curve[1])]
    return args


def worker_args(s: Schedule, rank: int, servers: str, curve: tuple[Path, Path] | None,
                state: Path | None = None) -> list[str]:
    """``ps-worker`` arguments of ``rank`` (``curve``: the server's public key and this worker's secret key;
    ``state``: its ``--state-dir``, which the local-steps modes need)."""
    job = s.job
    timeout = STAGE_TIMEOUT_S if s.pipeline else WORKER_TIMEOUT_S
    args = ["--server", servers, "--rank", str(rank), "--world-size", str(s.workers),
            "--timeout", str(timeout), "--heartbeat", str(HEARTBEAT_S), "--progress", "off",
            "--device", "cpu", "--model", job.model, "--data", job.data, "--loss", job.loss,
            "--batch-size", str(job.batch), "--epochs", str(job.epochs), "--seed", str(job.seed),
            "--shm", "off" if s.mode == "bsp-frames" else "auto"]
    if s.pipeline:
        args += ["--mode", "pipeline", "--stages", str(job.stages), "--partition", job.partition,
                 "--microbatches", str(job.microbatches), "--schedule", "gpipe" if s.mode == "gpipe" else "1f1b"]
    else:
        args += ["--bucket-mb", str(job.bucket_mb)]
        if job.stall > 0:
            args += ["--stall", f"1:{stall_of(s, rank):g}"]
    if s.local_steps:
        if state is None:
            raise ValueError(f"mode {s.mode} needs a --state-dir per worker")
        args += ["--state-dir", str(state)]
    if curve is not None:
        args += ["--curve-server-key", str(curve[0]), "--curve-secret-key", str(curve[1])]
    return args


def worker_env(s: Schedule) -> dict[str, str]:
    """Environment of the workers (the pause of the slow models, :mod:`tests.nemesis.models`)."""
    if s.job.model.endswith(":slow_mlp64"):
        return {SLOW_ENV: str(SLOW_BACKWARD_S)}
    if s.job.model.startswith("tests.nemesis.models:slow_"):
        return {SLOW_ENV: str(SLOW_STAGE_S)}
    return {}


def reference(s: Schedule) -> dict[str, torch.Tensor]:
    """θ of the uninterrupted job, computed in this process."""
    job = s.job
    model, data = factory(job.model), factory(job.data)
    if s.pipeline:
        return replay_pipeline(model, data, replicas=job.replicas, batch=job.batch, epochs=job.epochs,
                               seed=job.seed, loss=job.loss, optimizer=job.optimizer, lr=job.lr,
                               weight_decay=job.weight_decay)
    if s.local_steps:
        return replay_diloco(model, data, s.workers, job.inner_steps, batch=job.batch, epochs=job.epochs,
                             seed=job.seed, loss=job.loss, optimizer=job.optimizer, lr=job.lr,
                             weight_decay=job.weight_decay, outer_lr=job.outer_lr,
                             outer_momentum=job.outer_momentum, asynchronous=s.sync == "diloco-async",
                             delay=job.outer_delay)
    return replay(model, data, s.workers, batch=job.batch, epochs=job.epochs, seed=job.seed,
                  loss=job.loss, optimizer=job.optimizer, lr=job.lr, weight_decay=job.weight_decay)


def final_theta(ckpts: list[Path]) -> dict[str, torch.Tensor]:
    """``final.safetensors`` of the run (merged by state_dict name over shards)."""
    files = [str(d / "final.safetensors") for d in ckpts]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise AssertionError(f"no final θ: {missing} missing")
    return load_file(files[0]) if len(files) == 1 else merge_files(files)


def compare_theta(s: Schedule, ckpts: list[Path]) -> tuple[float, str]:
    """(max |θ - reference| over every tensor, the key where it is); NaN counts as the worst.

    Raises AssertionError when the final θ is missing or has other keys, dtypes or shapes.
    """
    got, want = final_theta(ckpts), reference(s)
    if set(got) != set(want):
        raise AssertionError(f"final θ has keys {sorted(got)}, the reference {sorted(want)}")
    worst, where = 0.0, ""
    for k, w in want.items():
        if got[k].dtype != torch.float64 or got[k].shape != w.shape:
            raise AssertionError(f"{k}: final θ is {got[k].dtype}{list(got[k].shape)}, want float64{list(w.shape)}")
        d = (got[k] - w).abs().max().item()
        if not d <= worst:
            worst, where = d, k
    return worst, where


def expected_counts(s: Schedule) -> tuple[dict[int, int], int]:
    """(clock per rank, non-empty pushes over all ranks) of a data-parallel job: steps, or under
    diloco-async rounds (every round is one push, of weight 1 whatever its rows)."""
    job = s.job
    data = factory(job.data)()
    n = len(data)
    per_epoch = steps_per_epoch(n, s.workers, job.batch)
    if s.local_steps:
        rounds = math.ceil(per_epoch * job.epochs / job.inner_steps)
        return {k: rounds for k in range(s.workers)}, rounds * s.workers
    pushes = sum(len(worker_rows(n, s.workers, job.batch, e, t, k, False, job.seed)) > 0
                 for e in range(job.epochs) for t in range(per_epoch) for k in range(s.workers))
    return {k: per_epoch * job.epochs for k in range(s.workers)}, pushes


def newest_record(ckpt: Path) -> tuple[Path, dict]:
    """The newest ``ckpt-*.safetensors`` of ``ckpt`` and its ``zmqps`` metadata record."""
    found = sorted(ckpt.glob("ckpt-*.safetensors"))
    if not found:
        raise AssertionError(f"no checkpoint in {ckpt}")
    with safe_open(str(found[-1]), "pt") as f:
        meta = f.metadata() or {}
    if "zmqps" not in meta:
        raise AssertionError(f"{found[-1].name} has no zmqps record")
    return found[-1], json.loads(meta["zmqps"])


def check_exactly_once(s: Schedule, ckpt: Path) -> str:
    """Every update applied once (see the module doc); returns a one-line summary."""
    clocks_want, pushes = expected_counts(s)
    path, rec = newest_record(ckpt)
    versions = rec.get("versions") or {}
    clocks = {int(r): int(c) for r, c in ((rec.get("consistency") or {}).get("clocks") or {}).items()}
    bad = {k: v for k, v in versions.items() if v != pushes}
    if not versions or bad:
        raise AssertionError(f"{path.name}: every key's version should be {pushes} (one per non-empty push), "
                             f"got {bad or versions}")
    if clocks != clocks_want:
        raise AssertionError(f"{path.name}: every rank's clock should be {clocks_want[0]}, got {clocks}")
    if int(rec.get("step", -1)) != pushes:
        raise AssertionError(f"{path.name}: step {rec.get('step')}, want {pushes}")
    return f"{path.name}: {len(versions)} key(s) at version {pushes}, clocks {clocks}"


def check_round_files(s: Schedule, worker_logs: list[str]) -> None:
    """Local-steps modes: raise AssertionError when a worker's log says its inner optimizer was
    lost (a restart found no round file to continue from, :data:`LOST_INNER_STATE`).

    Every worker has a ``--state-dir``, so a restart after any fault the schedule draws must
    continue from its round files ([Note: round files] in ``worker.roundstate``). Under diloco a
    lost optimizer also shows in θ; under diloco-async this is the only sign of it.
    """
    if not s.local_steps:
        return
    lost = [line.strip() for text in worker_logs for line in text.splitlines() if LOST_INNER_STATE in line]
    if lost:
        raise AssertionError(f"{len(lost)} worker restart(s) lost the inner optimizer (round files missing): "
                             + lost[0][:300])
