"""Key groups: the keys that share the same contributors, reduced and stepped together."""

from __future__ import annotations

from typing import Mapping

from ps.aggregate import KeyGroup
from ps.membership import WorkerInfo


def form_groups(workers: Mapping[int, WorkerInfo], versions: Mapping[str, int],
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
