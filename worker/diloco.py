"""The local-steps loop of ``--sync diloco`` / ``diloco-async``: H inner steps, then one exchange.

A round r covers the job's inner steps [r·H, min((r+1)·H, T)), T = steps per epoch × epochs,
so ``--batch-size``, shards, seeds and ``--epochs`` mean what they mean under bsp: inner step s
uses the rows bsp's step s would use. Each worker starts round r from θ_global (the server's
version r under diloco), runs the inner optimizer (``--optimizer``, ``--lr``, ... as the server
tells them at REGISTER), then pushes Δ = θ_global − θ_local pre-scaled by 1/K, with its buffers'
values, and loads the new θ_global. A parameter that got no gradient in the whole round is
absent from the push (the outer optimizer leaves it alone, as every rule does). The inner
optimizer carries its state from round to round; it is written to ``--state-dir`` before each
push ([Note: round files] in ``worker.roundstate``), so kill -9 and a restart resume exactly.
``--stall`` is drawn and paid before each inner step, as bsp's loop pays it before each step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from common import faults
from common.config import WorkerConfig
from common.optimizers import make_optimizer
from worker.client import PSClient
from worker.data import ShardPlan, fetch, step_seed
from worker.jitter import Stall
from worker.modelstate import ModelState
from worker.roundstate import Round, RoundFiles, job_tag

log = logging.getLogger(__name__)

LOCAL_RULES = ("diloco", "diloco-async")


def local_steps(server_info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The server's ``inner`` settings when its rule has workers take local steps, else None."""
    if not server_info or server_info.get("sync") not in LOCAL_RULES:
        return None
    return server_info.get("inner")


@dataclass
class Rounds:
    """What one worker did: rounds run by this process, rows it trained on, the last loss."""

    rounds: int
    samples: int
    final_loss: float | None


class LocalSteps:
    """One worker's rounds (see the module doc).

    Args:
        cfg: the worker's configuration (rank set).
        client: registered and initialized; θ is loaded into ``state``.
        state: the model's keys.
        data: the training set; ``plan``: this worker's shard of it.
        loss_fn: the job's loss; ``device``: where the model is.
        inner: the REGISTER reply's ``inner`` ([Note: local steps] in ``common.protocol``).
        stall: ``--stall``'s injector (None without it), consulted before each inner step.
    """

    def __init__(self, cfg: WorkerConfig, client: PSClient, state: ModelState, data: Any, plan: ShardPlan,
                 loss_fn: Callable[..., torch.Tensor], device: torch.device, inner: dict[str, Any],
                 stall: Stall | None = None) -> None:
        assert cfg.rank is not None and cfg.world_size is not None
        self.cfg, self.client, self.state, self.data, self.plan = cfg, client, state, data, plan
        self.stall = stall
        self.loss_fn, self.device = loss_fn, device
        self.model: nn.Module = state.module
        self.h = int(inner["steps"])
        self.total = plan.steps_per_epoch * cfg.epochs
        self.rounds = math.ceil(self.total / self.h) if self.total else 0
        self.trainable = {k: p for k, p in state.params.items() if p.requires_grad}
        self.opt = make_optimizer(inner["optimizer"], list(self.trainable.values()), inner["lr"],
                                  inner.get("momentum"), inner.get("weight_decay", 0.0))
        self.fresh = self.opt.state_dict()  # a new optimizer's state, to start over from
        self.delay = int(inner.get("delay", 0) or 0)
        self.files = (RoundFiles(cfg.state_dir, cfg.rank, self.h, state.keys, int(inner.get("checkpoint_every", 0)),
                                 str(inner.get("job", "")), self.delay)
                      if cfg.state_dir else None)
        if self.files is None:
            log.warning("no --state-dir: this worker's inner optimizer lives only in memory, so a restart of "
                        "it starts a fresh one (no longer the uninterrupted run's math)")
        self.targets = state.targets()
        self._resend: Round | None = None

    def run(self, on_round: Callable[[int, float | None], None] | None = None) -> Rounds:
        """Train rounds until the server has them all; ``on_round(r, loss)`` after each applied one."""
        c = self.client
        done, samples, expected = 0, 0, None
        while True:
            while c.step < self.rounds:
                r = c.step
                if r != expected:  # a start, a restart, or a server that went back to a checkpoint
                    self._restore(r)
                push, loss, n = self._resend_or_train(r)
                samples += n
                c.begin_step(r, samples=1, loss=loss, total=self.cfg.world_size)
                c.push_bucket(0, push)
                c.end_step(self.targets)
                if c.step == r + 1:
                    self._files_applied(r)
                self.state.loaded()
                done += 1
                expected = r + 1
                if c.step == r + 1 and on_round is not None:
                    on_round(r, c.last_loss)
            if c.done():
                return Rounds(done, samples, c.last_loss)
            log.warning("recomputing from round %d, where the server resumed", c.step)
            c.pull_into(self.targets)
            self.state.loaded()
            expected = None

    # ------------------------------------------------------------------ round files
    def _check_job(self) -> None:
        """A server that started afresh runs another job: this worker's round files are not its."""
        job = str((local_steps(self.client.server_info) or {}).get("job", ""))
        if self.files is not None and job and job_tag(job) != self.files.job:
            log.warning("the server runs another job now (%s): this worker's round files are not its", job)
            self.files = RoundFiles(self.files.folder, self.files.rank, self.h, self.state.keys, self.files.every, job,
                                    self.delay)

    def _files_applied(self, r: int) -> None:
        """Round ``r``'s push was applied: tell the round files the server's version after it."""
        if self.files is not None and self.client.last_version is not None:
            self.files.applied(r, self.client.last_version)  # which files a server restart may need

    # ------------------------------------------------------------------ one round
    def _resend_or_train(self, r: int) -> tuple[dict[str, torch.Tensor | None], float | None, int]:
        if self._resend is not None and self._resend.round == r:
            saved, self._resend = self._resend, None
            log.info("round %d: sending the change saved before the restart again", r)
            return saved.push, saved.loss, 0
        self._resend = None
        push, mean, samples = self._train(r)
        if self.files is not None:
            self.files.save(Round(r, push, mean, self.opt.state_dict()))
        faults.hit("before-push", r)
        return push, mean, samples

    def _train(self, r: int) -> tuple[dict[str, torch.Tensor | None], float | None, int]:
        """Round ``r``'s inner steps from the model's θ: the push (Δ, buffer values), mean loss, rows."""
        start = {k: p.detach().clone() for k, p in self.trainable.items()}
        got: set[str] = set()
        losses: list[float] = []
        samples = 0
        cfg = self.cfg
        assert cfg.rank is not None
        first, stop = r * self.h, min((r + 1) * self.h, self.total)
        for s in range(first, stop):
            if s == (first + stop) // 2:
                faults.hit("mid-round", r)
            if self.stall is not None:
                self.stall.before(s)
            rows = self.plan.rows(s, not cfg.no_shuffle, cfg.seed)
            self.opt.zero_grad(set_to_none=True)
            torch.manual_seed(step_seed(cfg.seed, cfg.rank, s))
            if len(rows):
                x, y = fetch(self.data, rows)
                loss = self.loss_fn(self.model(x.to(self.device)), y.to(self.device))
                loss.backward()
                losses.append(loss.item())
                got |= {k for k, p in self.trainable.items() if p.grad is not None}
                self.opt.step()
            samples += len(rows)
        with torch.no_grad():
            push: dict[str, torch.Tensor | None] = {
                k: (start[k] - p.detach()) if k in got else None for k, p in self.state.params.items()}
        push.update(self.state.step_tensors(list(self.state.buffers)))
        mean = sum(losses) / len(losses) if losses else None
        return push, mean, samples

    def _restore(self, r: int) -> None:
        """Put the inner optimizer where the uninterrupted run has it at the start of round ``r``."""
        self._resend = None
        self._check_job()
        mine = self.files.load(r, self.device) if self.files else None
        if mine is not None:  # its push may not have been applied: send it again
            self.opt.load_state_dict(mine.optimizer)
            self._resend = mine
            return
        before = self.files.load(r - 1, self.device) if self.files else None
        if before is not None:
            self.opt.load_state_dict(before.optimizer)
            log.info("round %d: the inner optimizer continues from this worker's round %d file", r, r - 1)
            return
        self.opt.load_state_dict(self.fresh)  # round 0 starts afresh; a later round has lost its state
        if r > 0:
            log.warning("round %d: no round file of round %d or %d in %s: this worker's inner optimizer starts "
                        "afresh (the run is no longer the uninterrupted run's math)", r, r - 1, r,
                        self.cfg.state_dir or "(no --state-dir)")
