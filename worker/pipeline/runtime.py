"""``ps-worker --mode pipeline``: one stage worker, from start to ``done``.

World rank k runs stage ``s = k mod P`` of replica ``r = k div P`` (so with R = 1 the rank
is the stage). Every stage builds the whole model (seeded, so every stage agrees on θ) and
keeps layers ``[a, b)`` of its partition; it registers only those layers' parameters under
their state_dict names (``2.weight``), so the server's ``final.safetensors`` loads into the
whole ``nn.Sequential``. The replicas of a stage are that stage's contributors on the
server: with R > 1 the server averages each stage's gradients over its replicas, weighted
by their rows (pipeline x data parallel on one server).

The stage's keys are its layers' parameters and persistent buffers (``worker.modelstate``); a
tensor tied across two stages is refused (:func:`check_ties`). [Note: BatchNorm in a pipeline]
A stage runs its layers on each microbatch separately, so with M > 1 a BatchNorm layer
normalises each microbatch by that microbatch's statistics and updates its running
statistics M times per step: the job equals single-process training that runs the batch's
microbatches one by one (the loss of microbatch i scaled by n_i / n), not the whole batch at
once. With M = 1, or a model without batch statistics, the two are the same.

Replica r reads shard r of the data, exactly as data-parallel worker r of R would (see
``worker/data.py``); every stage of a replica derives the same rows for each step, so only
stage 0 reads x and only the last stage reads y. Each step: split the rows into
``min(M, rows)`` microbatches, run the schedule's actions, push the stage's gradients and
pull its new θ in one round trip.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.config import JobFields, WorkerConfig
from common.errors import ConfigError, PSError, StageError
from common.transport import make_context
from worker.client import PSClient
from worker.data import ShardPlan, fetch
from worker.factories import build_data, build_model, default_pipeline_model
from worker.pipeline.links import Neighbour, PeerLinks, Place
from worker.pipeline.partition import Partition, choose
from worker.pipeline.schedule import Schedule, build, format_actions
from worker.pipeline.stage import StageExecutor, StageStats
from worker.pipeline.staging import PinnedStager
from worker.progress import Progress, ProgressView
from worker.modelstate import ModelState
from worker.losses import LOSSES
from worker.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What one stage worker did."""

    steps: int
    start_step: int
    final_loss: float | None
    seconds: float
    stats: StageStats
    partition: Partition


def place_of(cfg: WorkerConfig) -> Place:
    """This worker's stage and replica from its rank."""
    assert cfg.rank is not None and cfg.world_size is not None and cfg.stages is not None
    return Place(stage=cfg.rank % cfg.stages, stages=cfg.stages, replica=cfg.rank // cfg.stages, rank=cfg.rank)


def plan_text(cfg: WorkerConfig, part: Partition) -> str:
    """What every stage of the job must agree on."""
    return f"stages={cfg.stages} partition={part.text} microbatches={cfg.microbatches} schedule={cfg.schedule}"


def sample_batch(data: Any, rows: int) -> torch.Tensor:
    """The inputs of the first ``rows`` rows: the sample batch the layers are timed on."""
    x, _ = fetch(data, torch.arange(min(max(rows, 1), len(data))))
    return x


def neighbours(cfg: WorkerConfig, me: Place, peers: list[dict[str, Any]]) -> tuple[Neighbour | None, Neighbour | None]:
    """The previous and next stage of this replica, from the server's table or the explicit options."""
    by_rank = {int(p["rank"]): p for p in peers}

    def find(stage: int, explicit: str | None) -> Neighbour | None:
        if not 0 <= stage < me.stages:
            return None
        rank = me.replica * me.stages + stage
        entry = by_rank.get(rank, {})
        endpoint = explicit or entry.get("endpoint") or ""
        if not endpoint:
            raise ConfigError(f"stage {me.stage}: no peer endpoint for stage {stage} (rank {rank}); "
                              f"is it a pipeline stage worker?")
        if entry and entry.get("stage", stage) != stage:
            raise ConfigError(f"rank {rank} registered as stage {entry.get('stage')}, expected stage {stage}")
        return Neighbour(stage, rank, endpoint)

    return find(me.stage - 1, cfg.peer_prev), find(me.stage + 1, cfg.peer_next)


def check_plans(me: Place, mine: str, peers: list[dict[str, Any]]) -> None:
    """Every stage worker must run the same plan (ranges, microbatches, schedule)."""
    other = [(int(p["rank"]), p.get("plan", "")) for p in peers if p.get("plan", "") != mine]
    if other:
        rank, plan = other[0]
        raise ConfigError(f"stage {me.stage} (rank {me.rank}) plans '{mine}' but rank {rank} plans '{plan}': "
                          f"give every stage the same --partition (ranges), --microbatches and --schedule")


def build_pipeline_model(cfg: JobFields, device: torch.device) -> nn.Sequential:
    """The job's model (default: the seed's two-layer example) on ``device``; must be an nn.Sequential."""
    model = build_model(cfg.model, cfg.seed, default_pipeline_model)
    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"pipeline mode needs an nn.Sequential model, got {type(model).__name__}")
    return model.to(device)


def resolve_partition(cfg: JobFields, replicas: int, model: nn.Sequential | None = None,
                      data: Any = None) -> Partition:
    """The job's partition: explicit ranges as given, else balanced on a sample microbatch.

    ``ps-launch`` calls this once and hands the explicit ranges to every stage.
    """
    device = resolve_device(cfg.device)
    model = model if model is not None else build_pipeline_model(cfg, device)
    data = data if data is not None else build_data(cfg.data, cfg.seed)
    sample = None
    if cfg.partition == "auto":
        rows = ShardPlan(len(data), replicas, cfg.batch_size, 0).local_batch(0) // cfg.microbatches
        sample = sample_batch(data, rows).to(device)
    return choose(model, cfg.partition, cfg.stages, sample)


REFORMS = ("another stage of the pipeline restarted or moved (the server's formation changed): stopping, so that "
           "every stage starts again together")


def _rewound(me: Place, step: int, server_step: int) -> PSError:
    """The server went back to an older step (it restarted from a checkpoint).

    [Note: stages restart together] A data-parallel worker just recomputes from the server's
    step; a stage cannot alone - its neighbours are at other points of their schedules, with
    activations and δ of the abandoned steps in flight. So the stage stops with this error (a
    non-zero exit), as its neighbours do when they next hear from the server or time out
    waiting for it, and its supervisor (systemd's Restart=on-failure, Kubernetes) starts it
    again: every stage then resumes at the server's step, and the job ends at the θ an
    uninterrupted run reaches, since a step's update is applied only when every stage pushed it.
    """
    return PSError(f"stage {me.stage} (rank {me.rank}): the server went back to step {server_step} (it restarted "
                   f"from a checkpoint) while this stage was at step {step}; the stages of a pipeline restart "
                   f"together: exiting so that this stage is started again")


def check_ties(model: nn.Sequential, part: Partition) -> None:
    """Tied tensors must stay within one stage: a tensor shared by layers of two stages would be
    two keys on the server, updated apart, and the tie would silently break."""
    stage_of = {i: s for s, (a, b) in enumerate(part.ranges) for i in range(a, b)}
    state = ModelState(model)
    for alias, key in state.aliases.items():
        sa, sk = stage_of.get(int(alias.split(".", 1)[0])), stage_of.get(int(key.split(".", 1)[0]))
        if sa != sk:
            raise ConfigError(f"{alias!r} is the same tensor as {key!r} (tied weights), but they fall in stages "
                              f"{sk} and {sa} of partition {part.text}: tied weights must stay in one stage "
                              f"(choose --partition ranges that keep both layers together)")


class _Schedules:
    """Built (and validated) schedules by microbatch count; a short last batch may use fewer."""

    def __init__(self, name: str, stages: int) -> None:
        self.name, self.stages = name, stages
        self._cache: dict[int, Schedule] = {}

    def get(self, micros: int) -> Schedule:
        if micros not in self._cache:
            self._cache[micros] = build(self.name, self.stages, micros)
        return self._cache[micros]


def train_stage(cfg: WorkerConfig) -> StageResult:
    """Run this worker's stage of a pipeline job; returns when the job is done."""
    me = place_of(cfg)
    assert cfg.world_size is not None
    replicas = cfg.world_size // me.stages
    device = resolve_device(cfg.device)
    model = build_pipeline_model(cfg, device)
    data = build_data(cfg.data, cfg.seed)
    shards = ShardPlan(len(data), replicas, cfg.batch_size, me.replica)
    part = resolve_partition(cfg, replicas, model, data)
    if me.rank == 0 or part.method != "explicit":
        log.info("%s", part.describe())
    check_ties(model, part)
    a, b = part.ranges[me.stage]
    module = model[a:b]
    state = ModelState(module)
    if not state.params:
        raise ConfigError(f"stage {me.stage} owns layers [{a}, {b}), which have no parameters")
    schedules = _Schedules(cfg.schedule, me.stages)
    sched = schedules.get(cfg.microbatches)
    total = shards.steps_per_epoch * cfg.epochs
    log.info("stage %d of %d, replica %d of %d: layers [%d, %d) (%s) on %s; %d rows/step in %d microbatch(es), "
             "%d steps; schedule %s: %s", me.stage, me.stages, me.replica, replicas, a, b,
             ", ".join(state.keys), device, shards.local_batch(me.replica), cfg.microbatches, total, cfg.schedule,
             format_actions(sched.for_stage(me.stage)))
    plan = plan_text(cfg, part)
    loss_fn = LOSSES[cfg.loss]
    ctx = make_context(cfg.io_threads)  # shared by the client and the peer links
    links = PeerLinks(ctx, me, cfg.peer_bind, cfg.peer_advertise, cfg.timeout, cfg.microbatches)
    try:
        client = PSClient.from_config(cfg, role="stage", ctx=ctx)  # every client option, as the data runtime's
    except BaseException:
        links.close()
        ctx.term()
        raise
    executor = StageExecutor(module, me, links, PinnedStager(device), loss_fn, device)
    t0 = time.monotonic()
    start = 0
    linger = 0.0
    try:
        theta = client.init(state.tensors(), buffers=list(state.buffers), aliases=state.aliases,
                            stage=me.stage, endpoint=links.endpoint, plan=plan, steps=total)
        state.load(theta)
        check_plans(me, plan, [p for p in client.peers if p.get("role") == "stage"])
        links.connect(*neighbours(cfg, me, client.peers))
        links.interrupted = lambda: (REFORMS if client.formation_moved() else None)  # [Note: pipeline formations]
        start = client.step
        # the last stage of replica 0 has the loss: it shows the progress as rank 0 would
        shows = ProgressView(rank=0 if (me.last and me.replica == 0) else me.rank + 1, epochs=cfg.epochs,
                             progress=cfg.progress)
        with Progress(shows, total, start, shards.steps_per_epoch) as progress:
            for step in range(start, total):
                t_step = time.perf_counter()
                rows = shards.rows(step, not cfg.no_shuffle, cfg.seed)
                module.zero_grad(set_to_none=True)
                loss = None
                if len(rows):
                    parts = torch.tensor_split(rows, min(cfg.microbatches, len(rows)))
                    xs = [fetch(data, p)[0] for p in parts] if me.first else None
                    ys = [fetch(data, p)[1] for p in parts] if me.last else None
                    actions = schedules.get(len(parts)).for_stage(me.stage)
                    loss = executor.run(step, actions, xs, ys, [len(p) for p in parts])
                ts = time.perf_counter()
                theta = client.push_pull(state.step_tensors(), step, samples=len(rows), loss=loss)
                if client.step != step + 1:
                    raise _rewound(me, step, client.step)
                state.load(theta)
                executor.stats.sync_s += time.perf_counter() - ts
                executor.stats.end_step(time.perf_counter() - t_step)
                progress.update(step, client.last_loss, len(rows) * replicas)
        if not client.done():
            raise _rewound(me, total, client.step)
        linger = cfg.timeout
    except (PSError, RuntimeError) as e:
        if isinstance(e, StageError):
            links.abort(f"{type(e).__name__}: {e}", e.step, e.micro, e.action)
        else:
            links.abort(f"{type(e).__name__}: {e}")
        linger = 1.0
        raise
    finally:
        links.close(linger_s=linger)
        client.close()
        ctx.term()
    seconds = time.monotonic() - t0
    stats = executor.stats
    log.info("done: %d steps in %.2fs, final loss %s; peak activations held: %d microbatch(es) (%s, P=%d, M=%d)",
             total - start, seconds, "-" if client.last_loss is None else f"{client.last_loss:.6g}",
             stats.peak_held, cfg.schedule, me.stages, cfg.microbatches)
    log.info("stage stats %s", json.dumps({"stage": me.stage, "replica": me.replica, **stats.as_dict()}))
    return StageResult(total - start, start, client.last_loss, seconds, stats, part)
