"""Held-out loss during training (``--eval-every``, ``--eval-data``, ``--eval-rows``, ``--eval-log``).

Rank 0 evaluates the job's loss on a held-out data set at the start (before its first step),
every N steps, and at the end, so a curve of held-out loss against wall time starts and ends
at known points. A training loop makes three calls::

    heldout = HeldOut.from_config(cfg, loss_fn, device, rank)  # a no-op unless rank 0 and --eval-every N
    heldout.start(step, model)                            # before the first step
    ...  heldout.after_step(step, model)                  # after each step: θ has had `step` updates
    heldout.final(step, model)                            # after the last one

A loop of local steps (``--sync diloco``, :mod:`worker.diloco`) calls ``after_step`` once a
round, with the inner steps done so far ((r+1)·H after round r): it evaluates θ_global when the
round crossed a multiple of N, so every round when N ≤ H.

Each evaluation logs one INFO line and, with ``--eval-log PATH``, appends one JSON line::

    {"ev": "eval", "t": <time.time() when it began>, "step": 100, "heldout_loss": 1.52,
     "rows": 1024, "seconds": 0.41, "rank": 0}

``seconds`` is what the evaluation itself took: training waits for it (in bsp the other
workers wait too), so a benchmark can take it out of the wall time. ``ps-plot`` draws the
records against seconds since the first one.

[Note: held-out rows] The rows are the first ``--eval-rows`` of the data set, in order, so
every evaluation of a job, and every job, sees the same rows. The model is put in eval mode
(no dropout; batch norm uses its running statistics) under ``torch.no_grad()`` and then back
in the mode it was in; building the data set does not disturb the caller's random state.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from common.config import JobFields
from worker.data import fetch
from worker.factories import build_data

log = logging.getLogger(__name__)

EVAL_BATCH = 256
"""Rows per forward pass of an evaluation (bounds its memory)."""


class HeldOut:
    """The held-out loss of a model, every ``every`` steps; inactive when ``data`` is None.

    Args:
        data: the held-out map-style dataset of (x, y); None makes every call a no-op.
        loss_fn: the job's loss, ``(output, target) -> mean loss``.
        every: evaluate when the step is a multiple of it (0: only at start and end).
        rows: evaluate on the first ``rows`` rows (0: all).
        device: where the model is; batches are moved there.
        log_path: append one JSON line per evaluation to this file (None: none).
        rank: the rank written into the records.
    """

    def __init__(self, data: Dataset | None, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 every: int = 0, rows: int = 0, device: torch.device | str = "cpu", log_path: str | None = None,
                 rank: int = 0) -> None:
        self.data = data
        self.loss_fn = loss_fn
        self.every = every
        n = len(data) if data is not None else 0  # type: ignore[arg-type]
        self.rows = torch.arange(min(rows, n) if rows else n)
        self.device = torch.device(device)
        self.log_path = log_path
        self.rank = rank
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self._prev: int | None = None  # the step of the previous call

    @classmethod
    def from_config(cls, cfg: JobFields, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    device: torch.device | str, rank: int) -> HeldOut:
        """The evaluator ``cfg`` asks for: active on rank 0 with ``--eval-every`` > 0, else a no-op."""
        if not cfg.eval_every or rank != 0 or cfg.eval_data is None:
            return cls(None, loss_fn)
        with torch.random.fork_rng(devices=[]):
            data = build_data(cfg.eval_data, cfg.seed)
        held = cls(data, loss_fn, cfg.eval_every, cfg.eval_rows, device, cfg.eval_log, rank)
        log.info("held-out loss on %d rows of %s every %d steps%s", len(held.rows), cfg.eval_data, cfg.eval_every,
                 f", logged to {cfg.eval_log}" if cfg.eval_log else "")
        return held

    @property
    def active(self) -> bool:
        """Whether this evaluator evaluates at all."""
        return self.data is not None

    def start(self, step: int, model: nn.Module) -> None:
        """Evaluate before training (θ of ``step`` updates: 0, or where a resumed job starts)."""
        self._prev = step
        if self.active:
            self.evaluate(step, model)

    def after_step(self, step: int, model: nn.Module) -> None:
        """Evaluate if a multiple of ``every`` lies in (the previous call's step, ``step``].

        ``step`` counts the steps θ has had; one after another, that is: ``step`` is a multiple of ``every``.
        """
        prev = step - 1 if self._prev is None else self._prev
        self._prev = step
        if self.active and self.every and step // self.every > prev // self.every and step != self.last_step:
            self.evaluate(step, model)

    def final(self, step: int, model: nn.Module) -> None:
        """Evaluate the final θ, unless this step was just evaluated."""
        if self.active and step != self.last_step:
            self.evaluate(step, model)

    def evaluate(self, step: int, model: nn.Module) -> float:
        """The loss of ``model`` on the held-out rows (logged, and recorded with ``--eval-log``)."""
        assert self.data is not None
        t, began = time.time(), time.monotonic()
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for chunk in self.rows.split(EVAL_BATCH):
                    x, y = fetch(self.data, chunk)
                    total += float(self.loss_fn(model(x.to(self.device)), y.to(self.device))) * len(chunk)
        finally:
            model.train(was_training)
        loss = total / max(1, len(self.rows))
        seconds = time.monotonic() - began
        self.last_step, self.last_loss = step, loss
        log.info("held-out loss %.4f at step %d (%d rows, %.2fs)", loss, step, len(self.rows), seconds)
        if self.log_path:
            record = {"ev": "eval", "t": t, "step": step, "heldout_loss": loss, "rows": len(self.rows),
                      "seconds": round(seconds, 6), "rank": self.rank}
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        return loss
