"""First guesses at why a run failed, from its schedule, its verdict and its logs.

The hints only help a person group failures (the summary table lists each failure with its
first hint); they never decide whether a run passed. Each names a pattern seen before:

* ``repeated-register-shm`` - a server incarnation registered a rank again on the *same*
  connection (no takeover) and gave it a new shared-memory gradient segment each time, or a
  worker found the segment it was told about gone: the worker writes one segment, the server
  reads another (REGISTER resent before the first reply, or duplicated on the network);
* ``killed-between-buckets`` - θ is wrong after a worker kill in a run that pushes several
  buckets per step: a restarted worker may recompute a step from a θ whose first buckets were
  already updated;
* ``no-gradient-moved`` - θ differs only in parameters no loss reaches (pushed as zeros and
  moved by weight decay, momentum or Adam instead of being skipped);
* ``shards-at-different-steps`` - a worker found the server shards at different versions;
* ``timeout`` - a process gave up waiting (``PSTimeoutError``) or the run hit its deadline.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from tests.nemesis.schedule import Schedule

_SEGMENT = re.compile(r"rank (\d+): gradients in shared memory")
_TAKEOVER = re.compile(r"rank (\d+): a new connection takes over")


def repeated_registers(server_log: str) -> dict[int, int]:
    """Per rank, how many gradient segments one server incarnation made beyond one per connection."""
    segments: dict[int, int] = {}
    takeovers: dict[int, int] = {}
    for line in server_log.splitlines():
        if m := _SEGMENT.search(line):
            segments[int(m.group(1))] = segments.get(int(m.group(1)), 0) + 1
        elif m := _TAKEOVER.search(line):
            takeovers[int(m.group(1))] = takeovers.get(int(m.group(1)), 0) + 1
    return {r: n - 1 - takeovers.get(r, 0) for r, n in segments.items() if n - 1 - takeovers.get(r, 0) > 0}


def hints(s: Schedule, what: str, logs: Mapping[str, Sequence[str]]) -> list[str]:
    """Hints for a failure ``what`` of ``s``; ``logs`` maps each process to its incarnations' logs."""
    out: list[str] = []
    servers = [text for name, texts in logs.items() if name.startswith("server") for text in texts]
    workers = [text for name, texts in logs.items() if name.startswith("worker") for text in texts]
    extra = {r: n for text in servers for r, n in repeated_registers(text).items()}
    gone = any("not usable here" in text for text in workers)
    if extra or gone:
        detail = ", ".join(f"rank {r}: {n} extra segment(s)" for r, n in sorted(extra.items()))
        out.append("repeated-register-shm" + (f" ({detail})" if detail else " (a worker's segment was gone)"))
    theta_wrong = "differs from the single-process reference" in what
    key = re.search(r"\(key '([^']+)'\)", what)
    if theta_wrong and key and key.group(1).startswith("spare."):
        out.append("no-gradient-moved")
    worker_killed = any(f.kind == "kill" and f.target.startswith("worker") for f in s.faults)
    if theta_wrong and worker_killed and 0 < s.job.bucket_mb < 0.001:
        out.append("killed-between-buckets")
    if any("the server shards are at different steps" in text for text in workers):
        out.append("shards-at-different-steps")
    if "hard deadline" in what or any("PSTimeoutError" in text for text in workers + servers):
        out.append("timeout")
    return out
