"""What a diloco worker alone knows, kept on its disk: its inner optimizer and its push, per round.

[Note: round files] Under ``--sync diloco`` the server holds θ_global, but each worker's inner
optimizer (AdamW's moments, momentum) lives only on the worker. Before it pushes round r, a
worker writes ``rank<k>-<job>-round<r>.pt`` into ``--state-dir``: the push (its change Δ and buffer
values, its loss) and its inner optimizer's state after round r. A restarted worker finds the
server at round v and reads

* round v's file: its push may not have been applied; it is sent again, the same bytes (a
  replay is acknowledged and not applied twice), and the inner optimizer continues from it;
* else round v − 1's file: round v starts from it, as in the uninterrupted run;
* round 0 needs no file (a fresh optimizer); otherwise the state is lost: the worker says so
  and starts a fresh inner optimizer (the run is no longer the single-process math).

A server that restarts from a checkpoint in which this worker's clock is c needs the file of
round c − 1 (or c), so a worker keeps, besides its newest two, the file of the last round it had
applied at each of the server's three newest checkpoints (the server keeps three). The server
checkpoints every ``--checkpoint-every`` versions, and a worker learns the version just after
each of its pushes (:meth:`RoundFiles.applied`, from the push's reply): under ``diloco`` the
version is the round (round r gives r + 1), but under ``diloco-async`` it counts every worker's
pushes, so which round of a worker a checkpoint ends at depends on the others' pace. (Keeping
the rounds r with (r + 1) a multiple of ``--checkpoint-every``, right for diloco, lost the
needed file under diloco-async whenever a worker pushed twice or more between two
checkpoints, e.g. while another was slow: the server restarted from such a checkpoint and the
worker went on with a fresh inner optimizer. Found while adding diloco-async to the nemesis,
``tests/nemesis/``.) Until it knows a version (a new process), a worker keeps its older files.
Writes are atomic (a temp file, fsync, rename). ``<job>`` is the job's id (the server makes it when θ
starts fresh and keeps it in its checkpoints), so a folder reused by a later job never hands
that job another's files; the file also names its rank, H and keys, which must match.
The files are ``torch.save`` archives of tensors and numbers, read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

KEEP_NEWEST = 2
KEEP_AT_CHECKPOINTS = 3


def job_tag(job: str) -> str:
    """The job's id as it stands in file names (letters and digits only)."""
    return re.sub(r"[^0-9a-zA-Z]", "", job) or "job"


@dataclass
class Round:
    """One round's file: the push, the loss, the inner optimizer's state after the round.

    ``start``: under ``--outer-delay 1``, where the next round starts (every parameter and
    buffer; [Note: overlapped rounds] in ``worker.overlap``); None otherwise.
    """

    round: int
    push: dict[str, torch.Tensor | None]
    loss: float | None
    optimizer: dict[str, Any]
    start: dict[str, torch.Tensor] | None = None


class RoundFiles:
    """The round files of one worker in ``folder`` ([Note: round files]).

    Args:
        folder: ``--state-dir`` (created if missing).
        rank: this worker's rank.
        inner_steps: H, recorded in each file and checked on reading.
        keys: the model's keys, recorded and checked likewise.
        checkpoint_every: the server's ``--checkpoint-every`` (0: it only checkpoints θ_0).
        job: the job's id (the server's, told at REGISTER).
        delay: the server's ``--outer-delay`` (recorded and checked when not 0).
    """

    def __init__(self, folder: str, rank: int, inner_steps: int, keys: list[str], checkpoint_every: int,
                 job: str = "", delay: int = 0) -> None:
        self.folder = folder
        self.rank = rank
        self.job = job_tag(job)
        self.delay = delay
        self.ident = {"rank": rank, "inner_steps": inner_steps, "keys": list(keys), "job": self.job}
        if delay:  # a file of the other kind holds no start (and its job's math differs)
            self.ident["delay"] = delay
        self.every = checkpoint_every
        self.versions: dict[int, int] = {}  # round -> the server's version just after it was applied
        os.makedirs(folder, exist_ok=True)
        others = [n for n in os.listdir(folder) if n.startswith(f"rank{rank}-") and f"-{self.job}-" not in n]
        if others:
            log.warning("%s holds %d round file(s) of another job (%s...): not used; give each job its own "
                        "--state-dir", folder, len(others), others[0])

    def path(self, r: int) -> str:
        """The file of round ``r``."""
        return os.path.join(self.folder, f"rank{self.rank}-{self.job}-round{r:08d}.pt")

    def save(self, rnd: Round) -> None:
        """Write round ``rnd`` atomically, then drop the files no restart can need."""
        path = self.path(rnd.round)
        tmp = f"{path}.tmp"
        blob = {"ident": self.ident, "round": rnd.round, "loss": rnd.loss, "optimizer": rnd.optimizer,
                "push": {k: v for k, v in rnd.push.items() if v is not None},
                "absent": [k for k, v in rnd.push.items() if v is None]}
        if rnd.start is not None:
            blob["start"] = rnd.start
        with open(tmp, "wb") as fh:
            torch.save(blob, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._prune(rnd.round)

    def applied(self, r: int, version: int) -> None:
        """Round ``r``'s push was applied; the server's version right after it was ``version``.

        Later rounds known from before a server went back to an older checkpoint are forgotten
        (they are pushed again, at new versions); then the files no restart can need are dropped.
        """
        self.versions = {q: v for q, v in self.versions.items() if q < r}
        self.versions[r] = version
        self._prune(r)

    def load(self, r: int, device: torch.device | str = "cpu") -> Round | None:
        """Round ``r``'s file, or None when there is none (or it is another job's)."""
        path = self.path(r)
        if r < 0 or not os.path.exists(path):
            return None
        blob = torch.load(path, map_location=device, weights_only=True)
        if blob.get("ident") != self.ident:
            log.warning("%s belongs to another job (rank, --inner-steps or model differ): not used", path)
            return None
        push: dict[str, torch.Tensor | None] = dict(blob["push"])
        push.update({k: None for k in blob["absent"]})
        return Round(blob["round"], push, blob["loss"], blob["optimizer"], blob.get("start"))

    def rounds(self) -> list[int]:
        """The rounds this worker has files of, oldest first."""
        pat = re.compile(rf"rank{self.rank}-{self.job}-round(\d+)\.pt$")
        return sorted(int(m.group(1)) for name in os.listdir(self.folder) if (m := pat.match(name)))

    def at_checkpoints(self, have: list[int]) -> set[int]:
        """Of the rounds in ``have``, those a restart from one of the server's three newest
        checkpoints may need ([Note: round files]).

        A checkpoint at version V holds this worker's clock c = 1 + the last round applied at a
        version ≤ V: its file (or round c's) is kept. Rounds whose version is unknown (applied
        by an earlier process of this worker) are kept while they may be that round.
        """
        if self.every <= 0:
            return set()  # the server checkpoints only θ_0: a restart resumes at round 0, which needs no file
        if not self.versions:
            return set(have)
        newest = max(self.versions.values()) // self.every * self.every
        keep: set[int] = set()
        for mark in range(newest, 0, -self.every)[:KEEP_AT_CHECKPOINTS]:
            lo = max((r for r, v in self.versions.items() if v <= mark), default=-1)
            hi = min((r for r, v in self.versions.items() if v > mark), default=max(have, default=0) + 1)
            keep |= {r for r in have if lo <= r < hi}
        return keep

    def _prune(self, newest: int) -> None:
        have = self.rounds()
        keep = set(have[-KEEP_NEWEST:]) | self.at_checkpoints(have)
        for r in have:
            if r not in keep and r <= newest:
                try:
                    os.unlink(self.path(r))
                except FileNotFoundError:
                    pass
        if have:
            oldest = min(keep | {newest})
            self.versions = {q: v for q, v in self.versions.items() if q >= oldest}

