"""The data-parallel runtime: pull θ → forward/backward on this worker's batch → push.

Gradients of step t go out bucket by bucket from backward hooks (``worker.buckets``; one
push after backward with ``--bucket-mb 0``), and θ after step t comes back into the
parameters: through shared memory (CPU parameters are then views of the server's θ and
nothing is copied) or as frames. A step's loss shown on rank 0 is the server's weighted
mean over all workers.

A worker keeps nothing a restart could lose: θ comes from the server, and step t's batch and
random state (dropout) follow from t alone (:func:`worker.data.step_seed`), so a restarted
worker, or one the server sends back to an older step after its own restart, computes exactly
the gradients an uninterrupted run computes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from common import faults
from common.config import WorkerConfig
from common.errors import ConfigError
from common.logs import set_role
from common.partition import buckets
from worker.buckets import BucketHooks
from worker.client import PSClient
from worker.data import ShardPlan, fetch, step_seed
from worker.diloco import LocalSteps, local_steps
from worker.evaluation import HeldOut
from worker.factories import build_data, build_model
from worker.jitter import Stall
from worker.losses import LOSSES  # also worker.runtime.LOSSES, as before
from worker.modelstate import ModelState
from worker.overlap import OverlappedSteps
from worker.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What one worker did."""

    steps: int
    start_step: int
    final_loss: float | None
    seconds: float
    samples: int


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU.

    A CUDA device comes back with its index and is made the current one, so side streams
    and events (``worker.staging``) are created on the device the tensors live on.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def train(cfg: WorkerConfig, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Run this worker's part of a data-parallel job; returns when the job is done.

    Without ``cfg.rank`` the server assigns the rank at registration; the shard follows from it.

    Args:
        cfg: the worker's configuration.
        on_step: called with the step number after each step (benchmarks time steps with it).
    """
    assert cfg.world_size is not None
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, cfg.seed).to(device)
    data = build_data(cfg.data, cfg.seed)
    loss_fn = LOSSES[cfg.loss]
    t0 = time.monotonic()
    samples = 0
    with PSClient.from_config(cfg) as client:
        state = ModelState(model)
        params = state.params
        sizes = {k: p.numel() * p.element_size() for k, p in params.items()}
        blist = buckets(list(params), sizes, int(cfg.bucket_mb * (1 << 20)))
        if state.buffers:
            blist.append(list(state.buffers))  # pushed after backward ([Note: buffer values])
        sparse = state.sparse_names()
        if sparse:
            log.info("sparse gradients of %s are sent dense ([Note: sparse gradients])", ", ".join(sparse[:3]))
        steps = ShardPlan(len(data), cfg.world_size, cfg.batch_size, 0).steps_per_epoch * cfg.epochs
        theta = client.init(state.tensors(), buckets=blist, buffers=list(state.buffers), aliases=state.aliases,
                            steps=steps)
        if cfg.rank is None:
            assert client.rank is not None
            set_role(f"worker {client.rank}")
            cfg = dataclasses.replace(cfg, rank=client.rank)
        assert cfg.rank is not None
        stall = Stall.from_option(cfg.stall, cfg.seed, cfg.rank)
        state.load(theta)
        inner = local_steps(client.server_info)
        if inner is not None:  # --sync diloco: rounds of local steps (worker.diloco)
            return _train_rounds(cfg, client, state, data, loss_fn, device, inner, t0, on_step, stall)
        bound = client.bind(params)
        if bound:
            log.info("%d of %d parameters are views of the server's θ (shared memory)", bound, len(params))
        client.allow_sparse_pulls()  # this loop never writes the parameters: θ may come back sparse
        hooks = (BucketHooks(params, client.buckets, client.push_bucket, state.step_tensors)
                 if len(client.buckets) > 1 else None)
        targets = state.targets()  # θ goes into the parameters and buffers after each step
        plan = ShardPlan(len(data), cfg.world_size, cfg.batch_size, cfg.rank)
        uneven = plan.uneven()
        if uneven and cfg.rank == 0:  # one line per job
            log.warning("%s", uneven)
        total = plan.steps_per_epoch * cfg.epochs
        lo, hi = plan.bounds(cfg.rank)
        log.info("model %s on %s; shard rows [%d, %d) of %d, %d rows/step, %d steps/epoch x %d epochs = %d steps",
                 type(model).__name__, device, lo, hi, plan.n, plan.local_batch(cfg.rank),
                 plan.steps_per_epoch, cfg.epochs, total)
        start = client.step
        if start >= total > 0:
            log.warning("the server is at step %d, the end of this job's %d steps: nothing left to train "
                        "(more --epochs train it further)", start, total)
        elif start:
            log.info("resuming at step %d of %d", start, total)
        progress = Progress(cfg, total, start, plan.steps_per_epoch)
        heldout = HeldOut.from_config(cfg, loss_fn, device, cfg.rank)
        heldout.start(start, model)
        with progress:
            while True:
                while client.step < total:
                    step = client.step
                    if stall is not None:
                        stall.before(step)
                    rows = plan.rows(step, not cfg.no_shuffle, cfg.seed)
                    model.zero_grad(set_to_none=True)
                    if hooks is not None:
                        hooks.reset()
                    torch.manual_seed(step_seed(cfg.seed, cfg.rank, step))
                    if len(rows):
                        x, y = fetch(data, rows)
                        loss = loss_fn(model(x.to(device)), y.to(device))
                        faults.hit("before-push", step)
                        client.begin_step(step, samples=len(rows), loss=loss.item(), total=plan.total(step))
                        loss.backward()  # with hooks, buckets are pushed from here on
                    else:
                        faults.hit("before-push", step)
                        client.begin_step(step, samples=0, loss=None)
                    if hooks is not None:
                        hooks.finish()
                    else:
                        client.push_bucket(0, state.step_tensors())
                    client.end_step(targets)
                    state.loaded()
                    samples += len(rows)
                    if client.step == step + 1:
                        progress.update(step, client.last_loss, len(rows) * cfg.world_size)
                        heldout.after_step(client.step, model)
                        if on_step is not None:
                            on_step(step)
                    else:
                        log.warning("recomputing from step %d, where the server resumed", client.step)
                if client.done():
                    break
                log.warning("recomputing from step %d, where the server resumed", client.step)
                client.pull_into(targets)
                state.loaded()
        heldout.final(client.step, model)
        final_loss = client.last_loss
    seconds = time.monotonic() - t0
    log.info("done: %d steps (%d epochs) in %.2fs, final loss %s, %.0f samples/s on this worker",
             max(0, total - start), cfg.epochs, seconds, "-" if final_loss is None else f"{final_loss:.6g}",
             samples / seconds if seconds else 0.0)
    return TrainResult(max(0, total - start), start, final_loss, seconds, samples)


def _train_rounds(cfg: WorkerConfig, client: PSClient, state: ModelState, data: object,
                  loss_fn: Callable[..., torch.Tensor], device: torch.device, inner: dict, t0: float,
                  on_step: Callable[[int], None] | None, stall: Stall | None = None) -> TrainResult:
    """The rest of :func:`train` under a local-steps rule: rounds of ``inner["steps"]`` local steps."""
    assert cfg.rank is not None and cfg.world_size is not None
    plan = ShardPlan(len(data), cfg.world_size, cfg.batch_size, cfg.rank)  # type: ignore[arg-type]
    rounds = OverlappedSteps if inner.get("delay") else LocalSteps  # --outer-delay 1: [Note: overlapped rounds]
    loop = rounds(cfg, client, state, data, plan, loss_fn, device, inner, stall)
    start = client.step
    log.info("%s: %d rounds of %d local steps (%s, lr %g) = %d steps; starting at round %d",
             client.server_info.get("sync"), loop.rounds, loop.h, inner["optimizer"], inner["lr"], loop.total, start)
    spe = max(1, math.ceil(plan.steps_per_epoch / loop.h))
    progress = Progress(cfg, loop.rounds, start, spe)
    heldout = HeldOut.from_config(cfg, loss_fn, device, cfg.rank)
    heldout.start(min(start * loop.h, loop.total), state.module)  # θ_global after `start` rounds

    def on_round(r: int, loss: float | None) -> None:
        progress.update(r, loss, plan.batch * loop.h)
        heldout.after_step(min((r + 1) * loop.h, loop.total), state.module)
        if on_step is not None:
            on_step(r)

    with progress:
        done = loop.run(on_round)
    heldout.final(min(client.step * loop.h, loop.total), state.module)
    seconds = time.monotonic() - t0
    log.info("done: %d rounds in %.2fs, final loss %s, %.0f samples/s on this worker", done.rounds, seconds,
             "-" if done.final_loss is None else f"{done.final_loss:.6g}",
             done.samples / seconds if seconds else 0.0)
    return TrainResult(done.rounds, start, done.final_loss, seconds, done.samples)
