"""Pieces, shards and buckets: how a model's tensors map onto keys, servers and pushes.

Both sides compute the same layout from the same inputs, deterministically, so no table
ever travels:

* **Pieces.** A tensor larger than ``chunk_bytes`` is split along dim 0 into row ranges of
  at most ``chunk_bytes`` each (at least one row), named ``NAME#0``, ``NAME#1``, ... in row
  order (``NAME#i/n``: piece i of n); a smaller one is one piece named ``NAME``. State-dict names never contain ``#``.
  Each piece is a server key, so frames stay near the size where ZeroMQ is fastest and a big
  tensor can be spread over several server shards. Every optimizer zmqps offers (SGD,
  momentum, Adam) is element-wise, so splitting does not change the math.
* **Shards.** With ``S`` servers, pieces are assigned greedily, largest first (ties by
  name), each to the least-loaded shard (ties to the lower index).
* **Buckets.** Consecutive pieces in *reverse* registration order (the order backward
  produces gradients) are grouped into buckets of about ``bucket_bytes``; a bucket never
  splits a tensor, so a bucket is ready once its tensors' gradients are.

[Note: piece names] ``merge_pieces`` rebuilds a tensor from ``NAME#i`` pieces by
concatenating along dim 0 in index order; it is the exact inverse of :func:`split`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

SEP = "#"
_PIECE = re.compile(r"^(.*)#(\d+)/(\d+)$")


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` (along dim 0) of tensor ``base``, known to servers as ``key``."""

    key: str
    base: str
    lo: int
    hi: int
    whole: bool  # the piece is the entire tensor (also for 0-d tensors)

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """This piece of ``t`` (a view; contiguous when ``t`` is)."""
        return t if self.whole else t[self.lo:self.hi]


def split(name: str, shape: Sequence[int], itemsize: int, chunk_bytes: int) -> list[Piece]:
    """The pieces of one tensor of ``shape`` (see the module docstring)."""
    if SEP in name:
        raise ValueError(f"tensor name {name!r} must not contain {SEP!r}")
    nbytes = math.prod(shape) * itemsize
    if not shape or chunk_bytes <= 0 or nbytes <= chunk_bytes or shape[0] <= 1:
        return [Piece(name, name, 0, shape[0] if shape else 0, True)]
    row = nbytes // shape[0]
    rows = max(1, chunk_bytes // max(row, 1))
    n = math.ceil(shape[0] / rows)
    if n == 1:
        return [Piece(name, name, 0, shape[0], True)]
    return [Piece(f"{name}{SEP}{i}/{n}", name, i * rows, min((i + 1) * rows, shape[0]), False) for i in range(n)]


def pieces_of(tensors: Mapping[str, torch.Tensor], chunk_bytes: int) -> list[Piece]:
    """Pieces of every tensor, in the mapping's order."""
    out: list[Piece] = []
    for name, t in tensors.items():
        out += split(name, tuple(t.shape), t.element_size(), chunk_bytes)
    return out


def piece_nbytes(p: Piece, t: torch.Tensor) -> int:
    """Bytes of piece ``p`` of tensor ``t``."""
    return t.numel() * t.element_size() if p.whole else (p.hi - p.lo) * (t[0].numel() * t.element_size())


def assign_shards(sizes: Mapping[str, int], shards: int) -> dict[str, int]:
    """Key → shard index: largest first (ties by key), each to the least-loaded shard."""
    load = [0] * shards
    out: dict[str, int] = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        s = min(range(shards), key=lambda i: (load[i], i))
        out[key] = s
        load[s] += sizes[key]
    return out


def buckets(bases: Sequence[str], sizes: Mapping[str, int], bucket_bytes: int) -> list[list[str]]:
    """Tensor names grouped into buckets, in reverse order, each about ``bucket_bytes``.

    ``bucket_bytes <= 0`` gives one bucket of everything (one push per step).
    """
    if bucket_bytes <= 0:
        return [list(reversed(bases))] if bases else []
    out: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for name in reversed(bases):
        cur.append(name)
        size += sizes[name]
        if size >= bucket_bytes:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def base_of(key: str) -> tuple[str, int | None, int]:
    """``("NAME", i, n)`` for a piece key ``NAME#i/n``; ``(key, None, 1)`` for a whole tensor."""
    m = _PIECE.match(key)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else (key, None, 1)


def piece_groups(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Whole tensors as their pieces in row order, where every piece ``#0/n..#n-1/n`` is present.

    A key without pieces maps to ``[tensor]``; an incomplete set of pieces (another shard
    holds the rest) is kept as the pieces themselves, each under its own key. Nothing is copied.
    """
    groups: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    out: dict[str, list[torch.Tensor]] = {}
    for key, t in tensors.items():
        base, idx, n = base_of(key)
        if idx is None:
            out[key] = [t]
        else:
            groups.setdefault((base, n), {})[idx] = t
    for (base, n), parts in groups.items():
        if sorted(parts) == list(range(n)):
            out[base] = [parts[i] for i in range(n)]
        else:
            out.update({f"{base}{SEP}{i}/{n}": [t] for i, t in parts.items()})
    return out


def merge_pieces(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rebuild whole tensors from pieces where every piece ``#0/n..#n-1/n`` is present.

    Keys without pieces pass through; an incomplete set of pieces (another shard holds the
    rest) is returned as the pieces themselves.
    """
    return {k: parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            for k, parts in piece_groups(tensors).items()}


def merge_files(paths: Iterable[str]) -> dict[str, torch.Tensor]:
    """θ by state-dict name from the ``final.safetensors`` of every server shard."""
    from safetensors.torch import load_file

    allt: dict[str, torch.Tensor] = {}
    for p in paths:
        allt.update(load_file(str(p)))
    return merge_pieces(allt)
