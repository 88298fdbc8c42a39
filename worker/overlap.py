"""``--sync diloco --outer-delay 1``: each round's exchange runs behind the next round's compute.

[Note: overlapped rounds] Under plain diloco a worker ends round r by pushing Δ^r and waiting for
θ_global^{r+1}: K pushes and K pulls cross the server's one link while every worker idles (at
100 Mbit/s and K = 4, ~0.85 s a round for the 329k-parameter charlm). With ``--outer-delay 1``
it sends Δ^r as a PUSH_PULL (answered once the server applied round r) and starts round r + 1 at
once, from

    x^{r+1} = θ_global^r − Δ^r

(the newest θ_global it holds plus its own change of round r; a parameter with no change in
round r starts from θ_global^r; buffers carry on from its own round). The reply, long since
arrived in ZeroMQ's queue, is taken at the end of round r + 1: θ_global^{r+1} is the base of
x^{r+2}. Round r's Δ^r = x^r − y^r is its own change, as under plain diloco. The server is
unchanged: round r is the mean of the K changes of round r under the outer Nesterov step, and the
job ends at θ_global^R; only each round's starting point lags one outer step. When a round's
compute takes longer than one exchange, the link costs no wall time.

Restarts ([Note: round files] in :mod:`worker.roundstate`): round r's file also holds x^{r+1}.
A worker that (re)starts with the server at version v (rounds < v applied) reads

* round v's file: Δ^v is sent again (its reply is θ_global^{v+1}) and round v + 1 starts from the
  file's x^{v+1};
* else round v − 1's file: round v starts from its x^v, and θ_global^v is the server's θ now;
* round 0 needs no file (x^0 = θ_global^0); otherwise the state is lost: the worker says so and
  starts round v from θ_global^v with a fresh inner optimizer.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from common import faults
from worker.diloco import LocalSteps, Rounds
from worker.roundstate import Round

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class OverlappedSteps(LocalSteps):
    """One worker's rounds with the exchange behind the next round (see the module doc)."""

    def run(self, on_round: Callable[[int, float | None], None] | None = None) -> Rounds:
        """Train rounds until the server has them all; ``on_round(r, loss)`` once round r is applied
        (with θ_global^{r+1} in the model while it runs)."""
        c = self.client
        done = samples = 0
        shadow = self._now()  # where θ_global replies land
        while True:
            if c.step < self.rounds:
                t, x, pending = self._begin(c.step)
                base: Tensors | None = None if pending else self._now()
                while t < self.rounds:
                    self.state.load(x)
                    push, loss, n = self._train(t)
                    samples += n
                    if pending:
                        c.end_step(shadow)  # θ_global^t, the reply to round t − 1's push
                        if c.step != t:  # the server went back to a checkpoint: start over from there
                            break
                        self._files_applied(t - 1)
                        base = shadow
                        self._applied(t - 1, on_round, shadow)
                    assert base is not None
                    x = self._next_start(base, push)
                    if self.files is not None:
                        self.files.save(Round(t, push, loss, self.opt.state_dict(), x))
                    faults.hit("before-push", t)
                    c.begin_step(t, samples=1, loss=loss, total=self.cfg.world_size)
                    c.push_bucket(0, push)
                    pending, t, done = True, t + 1, done + 1
                else:
                    if pending:
                        c.end_step(self.targets)  # θ_global^R: the job's result, into the model
                        self.state.loaded()
                        if c.step == self.rounds:
                            self._files_applied(self.rounds - 1)
                            self._applied(self.rounds - 1, on_round)
            if c.step >= self.rounds and c.done():
                return Rounds(done, samples, c.last_loss)
            log.warning("recomputing from round %d, where the server resumed", c.step)
            c.pull_into(self.targets)
            self.state.loaded()

    # ------------------------------------------------------------------ pieces of a round
    def _now(self) -> Tensors:
        """The model's θ now (θ_global just loaded), copied."""
        return {k: t.detach().clone() for k, t in self.targets.items()}

    def _next_start(self, base: Tensors, push: dict[str, torch.Tensor | None]) -> Tensors:
        """x^{t+1} = θ_global^t − Δ^t; buffers as this worker's round left them."""
        with torch.no_grad():
            out = {k: (base[k] - d) if (d := push.get(k)) is not None else base[k].clone() for k in self.state.params}
            out.update({k: b.detach().clone() for k, b in self.state.buffers.items()})
        return out

    def _applied(self, r: int, on_round: Callable[[int, float | None], None] | None,
                 theta: Tensors | None = None) -> None:
        """Round ``r`` is applied: ``on_round`` sees θ_global^{r+1} (``theta``; None: in the model
        already) in the model, and the model gets its own θ back afterwards."""
        if on_round is None:
            return
        if theta is None:
            on_round(r, self.client.last_loss)
            return
        mine = self._now()
        self.state.load(theta)
        try:
            on_round(r, self.client.last_loss)
        finally:
            self.state.load(mine)

    def _begin(self, v: int) -> tuple[int, Tensors, bool]:
        """Where to go on with the server at version ``v``: (round to train, its start, a push in flight)."""
        self._check_job()
        mine = self.files.load(v, self.device) if self.files else None
        if mine is not None and mine.start is not None:  # Δ^v may not have been applied: send it again
            self.opt.load_state_dict(mine.optimizer)
            log.info("round %d: sending the change saved before the restart again", v)
            self.client.begin_step(v, samples=1, loss=mine.loss, total=self.cfg.world_size)
            self.client.push_bucket(0, mine.push)
            return v + 1, mine.start, True
        before = self.files.load(v - 1, self.device) if self.files and v > 0 else None
        if before is not None and before.start is not None:
            self.opt.load_state_dict(before.optimizer)
            log.info("round %d: starts from this worker's round %d file", v, v - 1)
            return v, before.start, False
        self.opt.load_state_dict(self.fresh)
        if v > 0:
            log.warning("round %d: no round file of round %d or %d in %s: this worker's inner optimizer starts "
                        "afresh, and the round from θ_global (the run is no longer the uninterrupted run's math)",
                        v, v - 1, v, self.cfg.state_dir or "(no --state-dir)")
        return v, self._now(), False
