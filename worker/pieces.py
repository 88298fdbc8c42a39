"""Where each tensor of a worker lives: its pieces, and the server shard that owns each piece.

A tensor larger than ``--chunk-mb`` is split along dim 0 into pieces (``NAME#i/n``), each a
server key of its own; smaller tensors stay whole under their own name
(``common.partition.pieces_of``). With several shards, the pieces are spread over them by
size, deterministically (``common.partition.assign_shards``), so every worker that lists the
shards in the same order agrees on the owner of every key.

:class:`PieceMap` holds that layout and turns received pieces back into whole tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from common.dtypes import dtype_name
from common.partition import Piece, assign_shards, piece_nbytes, pieces_of

Tensors = Mapping[str, torch.Tensor]


@dataclass
class PieceMap:
    """The pieces of every registered tensor and their owners.

    Attributes:
        pieces: base name -> its pieces, in order.
        by_key: piece key -> (base name, piece).
        owner: piece key -> the index of the shard that owns it.
        specs: base name -> (dtype, shape) of the whole tensor.
        per_shard: shard index -> the pieces it owns.
    """

    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    by_key: dict[str, tuple[str, Piece]] = field(default_factory=dict)
    owner: dict[str, int] = field(default_factory=dict)
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)
    per_shard: list[list[Piece]] = field(default_factory=list)

    @classmethod
    def build(cls, tensors: Tensors, chunk_bytes: int, shards: int) -> "PieceMap":
        """Split ``tensors`` (meta tensors do: only dtypes and shapes are read) over ``shards``."""
        pieces = pieces_of(tensors, chunk_bytes)
        m = cls(specs={k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
        for p in pieces:
            m.pieces.setdefault(p.base, []).append(p)
        m.by_key = {p.key: (p.base, p) for p in pieces}
        sizes = {p.key: piece_nbytes(p, tensors[p.base]) for p in pieces}
        m.owner = assign_shards(sizes, shards) if shards > 1 else {p.key: 0 for p in pieces}
        m.per_shard = [[] for _ in range(shards)]
        for p in pieces:
            m.per_shard[m.owner[p.key]].append(p)
        return m

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of piece ``key``: what θ of it must be (the server keeps θ as registered)."""
        name, p = self.by_key[key]
        dtype, shape = self.specs[name]
        return dtype, (shape if p.whole else (p.hi - p.lo, *shape[1:]))

    def keys_of(self, shard: int) -> list[str]:
        """The keys shard ``shard`` owns, in registration order."""
        return [p.key for p in self.per_shard[shard]]

    def flat(self, pieces: list[Piece]) -> list[tuple[str, str, tuple[int, ...]]]:
        """(key, dtype name, shape) of each of ``pieces``: a segment's layout (``common.shm.layout``)."""
        out = []
        for p in pieces:
            dtype, shape = self.spec(p.key)
            out.append((p.key, dtype_name(dtype), shape))
        return out

    def empty(self) -> dict[str, torch.Tensor]:
        """Uninitialized whole CPU tensors of every registered name."""
        return {name: torch.empty(shape, dtype=dtype) for name, (dtype, shape) in self.specs.items()}

    def scatter(self, pieces: Tensors, out: dict[str, torch.Tensor]) -> None:
        """Copy every piece of ``pieces`` into its place in the whole tensors ``out``."""
        for name, plist in self.pieces.items():
            for q in plist:
                if q.key in pieces:
                    q.of(out[name]).copy_(pieces[q.key])

    def whole(self, pieces: Tensors) -> dict[str, torch.Tensor]:
        """Whole tensors from received pieces (a whole piece is returned as is, zero-copy).

        A name is left out unless every one of its pieces is in ``pieces``.
        """
        out: dict[str, torch.Tensor] = {}
        for name, plist in self.pieces.items():
            if len(plist) == 1 and plist[0].whole and plist[0].key in pieces:
                out[name] = pieces[plist[0].key]
            elif all(q.key in pieces for q in plist):
                dtype, shape = self.specs[name]
                t = torch.empty(shape, dtype=dtype)
                for q in plist:
                    q.of(t).copy_(pieces[q.key])
                out[name] = t
        return out

    def register_specs(self, s: int, tensors: Tensors) -> list[list[Any]]:
        """The ``params`` field of shard ``s``'s REGISTER: ``[key, dtype, shape]`` per piece it owns."""
        return [[p.key, dtype_name(tensors[p.base].dtype), list(p.of(tensors[p.base]).shape)]
                for p in self.per_shard[s]]


@dataclass
class Layout:
    """What a registration decided: the pieces, the buckets in use and which tensors are buffers.

    Attributes:
        pieces: every tensor's pieces and their shards.
        buckets: lists of names pushed together, in push order (one of everything when the
            server takes whole steps only, as under async/ssp).
        buffers: the names that are buffers (pushed as values: never scaled nor narrowed).
    """

    pieces: PieceMap = field(default_factory=PieceMap)
    buckets: list[list[str]] = field(default_factory=list)
    buffers: frozenset[str] = frozenset()
