"""Who the server is training with: registered workers, their keys, and key groups."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

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
    buckets: tuple[tuple[str, ...], ...] = ()  # keys pushed together (empty: all at once)
    last_seen: float = field(default_factory=time.monotonic)
    request: dict[str, Any] = field(default_factory=dict)  # the REGISTER fields it registered with
    reply: dict[str, Any] = field(default_factory=dict)  # and the answer it got ([Note: idempotent register])


def form_groups(workers: dict[int, WorkerInfo], versions: dict[str, int],
                buffers: frozenset[str] = frozenset()) -> list[KeyGroup]:
    """Group keys by the exact set of ranks that contribute them (sorted, for rank order).

    Data-parallel: one group of every key, contributed by every rank. Pipeline: one group per
    stage, contributed by that stage's replicas. Buckets split groups further: keys share a
    group only if every contributor pushes them in the same bucket. ``buffers`` are the keys
    whose pushes carry values, not gradients (``ps.aggregate``, [Note: buffer values]).
    """
    contributors: dict[str, list[tuple[int, int]]] = {}
    for rank in sorted(workers):
        bucket_of = {k: i for i, b in enumerate(workers[rank].buckets) for k in b}
        for key in workers[rank].keys:
            contributors.setdefault(key, []).append((rank, bucket_of.get(key, -1)))
    by_set: dict[tuple[tuple[int, int], ...], list[str]] = {}
    for key, sig in contributors.items():
        by_set.setdefault(tuple(sig), []).append(key)
    groups = []
    for sig, keys in by_set.items():
        ranks = tuple(r for r, _b in sig)
        steps = {versions.get(k, 0) for k in keys}
        groups.append(KeyGroup(keys=tuple(keys), contributors=ranks, step=min(steps),
                               values=frozenset(keys) & buffers))
    return groups
