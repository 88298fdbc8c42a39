"""Held-out loss during training: the eval records both sides of the wan benchmark write.

A record is one JSON line ``{"ev": "eval", "t": unix_time, "step": s, "heldout_loss": x,
"seconds": evaluation_time, "rank": 0}`` (``t``: when the evaluation began), the format ``ps-worker --eval-every N --eval-log PATH`` writes. Where the
workers cannot log it yet, the DDP ranks (:mod:`benchmarks.wan_ddp`) and the zmqps eval
worker (:mod:`benchmarks.evalworker`) write it with :class:`EvalLog`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from worker.data import fetch
from worker.factories import build_data
from worker.losses import LOSSES


def due(step: int, every: int, total: int) -> bool:
    """Whether the model after ``step`` steps (1-based count) is evaluated: every N-th, and the last."""
    return step == total or (every > 0 and step % every == 0)


class EvalLog:
    """Held-out loss of a model on a data factory, appended to a JSONL file.

    Args:
        path: the JSONL file (appended to).
        data: ``MODULE:FACTORY`` of the held-out data set.
        loss: a name of :data:`worker.losses.LOSSES`.
        seed: the seed the data factory is built under (as a worker builds its data).
        batch: rows evaluated at a time.
    """

    def __init__(self, path: str | Path, data: str, loss: str, seed: int = 0, batch: int = 1024) -> None:
        self.path = Path(path)
        self.data = build_data(data, seed)
        self.loss_fn = LOSSES[loss]
        self.batch = batch

    def loss(self, model: torch.nn.Module) -> float:
        """Mean loss of ``model`` over the held-out rows (eval mode, no gradients)."""
        was = model.training
        model.eval()
        total, n = 0.0, len(self.data)
        try:
            with torch.no_grad():
                for lo in range(0, n, self.batch):
                    x, y = fetch(self.data, torch.arange(lo, min(n, lo + self.batch)))
                    total += float(self.loss_fn(model(x), y)) * len(x)
        finally:
            model.train(was)
        return total / max(n, 1)

    def write(self, step: int, model: torch.nn.Module, rank: int = 0) -> dict[str, Any]:
        """Evaluate ``model`` after ``step`` steps and append the record; return it."""
        t, began = time.time(), time.monotonic()  # when θ of this step existed, before the evaluation's own time
        loss = self.loss(model)
        rec = {"ev": "eval", "t": t, "step": step, "heldout_loss": loss, "seconds": round(time.monotonic() - began, 6),
               "rank": rank}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        return rec


def read_evals(path: str | Path) -> list[dict[str, Any]]:
    """The ``eval`` records of a JSONL file, in step order (none if the file is missing)."""
    p = Path(path)
    if not p.exists():
        return []
    recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return sorted((r for r in recs if r.get("ev") == "eval"), key=lambda r: r["step"])
