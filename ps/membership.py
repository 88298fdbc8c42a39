"""Who the server is training with: registered workers, their keys, and key groups."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ps.aggregate import KeyGroup


@dataclass
class WorkerInfo:
    """One registered worker as the server sees it."""

    rank: int
    identity: bytes
    keys: tuple[str, ...]
    role: str = "data"
    endpoint: str = ""
    stage: int = -1  # pipeline stage index; -1 for a data-parallel worker
    plan: str = ""  # pipeline: the stage's layer ranges and schedule, compared by its peers
    done: bool = False
    clock: int = 0  # the next step this worker will push
    last_seen: float = field(default_factory=time.monotonic)


def form_groups(workers: dict[int, WorkerInfo], versions: dict[str, int]) -> list[KeyGroup]:
    """Group keys by the exact set of ranks that contribute them (sorted, for rank order).

    Data-parallel: one group of every key, contributed by every rank. Pipeline: one group per
    stage, contributed by that stage's replicas.
    """
    contributors: dict[str, list[int]] = {}
    for rank in sorted(workers):
        for key in workers[rank].keys:
            contributors.setdefault(key, []).append(rank)
    by_set: dict[tuple[int, ...], list[str]] = {}
    for key, ranks in contributors.items():
        by_set.setdefault(tuple(ranks), []).append(key)
    groups = []
    for ranks, keys in by_set.items():
        steps = {versions.get(k, 0) for k in keys}
        groups.append(KeyGroup(keys=tuple(keys), contributors=ranks, step=min(steps)))
    return groups
