"""PowerSGD's rank-r codec (``powersgd:RANK``): a tensor as the product of two thin matrices.

A tensor of shape (n, ...) is read as the matrix M (n × m, m = numel / n). One power iteration,
warm-started from the previous step's Q (Vogels et al., 2019): P = orth(M Q_prev), Q = Mᵀ P, and
P Qᵀ stands for M. P (n × r) and Q (m × r) travel in the tensor's dtype. Each worker encodes on
its own (the server decodes each push, nothing is averaged before orthogonalizing), so this is
the per-worker rank-r approximation, made whole over the steps by error feedback
(:mod:`common.compression.feedback`). Vectors, and matrices whose factors would not be smaller
than M, travel dense and exact (:func:`applies`).
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping

import torch

POWERSGD = "powersgd"
MAX_RANK = 64
"""The largest rank accepted: bounds the receiver's work (n·m·r) for a push it must decode."""


def matrix_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """(n, m): the rows and columns a tensor of ``shape`` is read as."""
    n = int(shape[0]) if len(shape) else 1
    return n, (math.prod(shape) // n if n else 0)


def applies(shape: tuple[int, ...] | torch.Size, rank: int) -> bool:
    """Whether a tensor of ``shape`` is sent as rank-``rank`` factors (2-D or more, factors smaller)."""
    n, m = matrix_shape(shape)
    return len(shape) >= 2 and 0 < rank < min(n, m) and rank * (n + m) < n * m


def start_q(key: str, m: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """The first Q of ``key``: seeded by the key's name, so every run starts alike."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(m, rank, generator=gen, dtype=torch.float64).to(dtype)


def encode(e: torch.Tensor, shape: tuple[int, ...] | torch.Size, q_prev: torch.Tensor,
           dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Parts ``p`` and ``q`` (in ``dtype``) for the flat ``e`` of ``shape``, and the Q to start from next."""
    n, m = matrix_shape(shape)
    mat = e.reshape(n, m)
    p = mat @ q_prev
    if bool(torch.isfinite(p).all()):  # NaN or inf travel as they are, to the server's --nonfinite
        p = torch.linalg.qr(p, mode="reduced").Q
    q = mat.T @ p
    return {"p": p.to(dtype), "q": q.to(dtype)}, q


def decompress(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...] | torch.Size,
               dtype: torch.dtype) -> torch.Tensor:
    """P Qᵀ, shaped like the tensor."""
    return (parts["p"].to(dtype) @ parts["q"].to(dtype).T).reshape(tuple(shape))


def check(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """Why ``parts`` are no rank-r factors of a tensor of ``shape`` and ``dtype`` (None: they are)."""
    p, q = parts["p"], parts["q"]
    n, m = matrix_shape(shape)
    if len(shape) < 2 or p.dim() != 2 or q.dim() != 2:
        return f"{POWERSGD}: needs a tensor of 2 or more dimensions and 2-D factors, got {list(shape)}, " \
               f"{list(p.shape)} and {list(q.shape)}"
    r = p.shape[1]
    if p.dtype != dtype or q.dtype != dtype:
        return f"{POWERSGD}: factors are {p.dtype} and {q.dtype}, the tensor is {dtype}"
    if tuple(p.shape) != (n, r) or tuple(q.shape) != (m, r) or not 1 <= r <= min(n, m, MAX_RANK):
        return f"{POWERSGD}: factors {list(p.shape)} and {list(q.shape)} do not fit {list(shape)} " \
               f"(want [{n}, r] and [{m}, r], 1 <= r <= {min(n, m, MAX_RANK)})"
    return None
