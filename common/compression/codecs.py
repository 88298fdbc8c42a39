"""The codecs a pushed tensor may travel in: their names, how they encode, decode and are checked.

A codec turns one flat tensor ``e`` (a gradient, or whatever a rule pushes, plus the sender's
error-feedback residual: :mod:`common.compression.feedback`) into a few named *parts*, plain
tensors that travel as frames (:mod:`common.compression.framing`). Decoding is pure: the parts,
θ's shape and dtype give a dense tensor. The receiver checks every part before decoding
(:func:`check`), so a hostile peer's parts are refused, never half applied.

Codecs (``--compress``):

* ``none``: dense frames, as without compression.
* ``topk:RATIO``: the k = max(1, ceil(RATIO·numel)) entries of largest magnitude, as ``values``
  (the tensor's dtype) and ``indices`` (flat, int32; int64 from 2**31 entries on), indices
  strictly increasing. Ties in magnitude go to the lower index, so a replay is bitwise equal;
  NaN counts as the largest magnitude, so a NaN gradient reaches the server's ``--nonfinite``.
* ``powersgd:RANK``: 2-D+ tensors as rank-RANK factors ``p`` and ``q``
  (:mod:`common.compression.lowrank`); vectors travel dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from common.compression import lowrank
from common.compression.lowrank import MAX_RANK, POWERSGD

NONE, TOPK = "none", "topk"
CODECS = {NONE: "none (the default)",
          TOPK: "topk:RATIO sends the RATIO share of each tensor's entries of largest magnitude (values + "
                "int32 indices, e.g. topk:0.01) with error feedback",
          POWERSGD: f"powersgd:RANK sends tensors of 2+ dimensions as rank-RANK factors (RANK <= {MAX_RANK}) "
                    f"with error feedback, vectors dense"}
"""Every codec by name, with its description (``--compress`` help)."""

PARTS = {TOPK: ("values", "indices"), POWERSGD: ("p", "q")}
"""The parts each compressing codec sends, in the order they travel."""

INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Spec:
    """A parsed ``--compress`` value: the codec and its parameter."""

    codec: str = NONE
    ratio: float = 1.0  # topk: the share of entries sent
    rank: int = 0  # powersgd: the rank of the factors

    @property
    def enabled(self) -> bool:
        """Whether pushes are compressed at all."""
        return self.codec != NONE


@dataclass(frozen=True)
class Encoded:
    """One tensor encoded by a codec: its parts, as they travel (see :data:`PARTS`)."""

    codec: str
    parts: Mapping[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes of the parts on the wire."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())


def parse(text: str) -> Spec:
    """Read a ``--compress`` value: ``none``, ``topk:RATIO`` with 0 < RATIO <= 1, or
    ``powersgd:RANK`` with 1 <= RANK <= :data:`MAX_RANK`.

    Raises:
        ValueError: anything else, with the accepted forms in the message.
    """
    name, _, arg = text.strip().partition(":")
    if name == NONE and not arg:
        return Spec()
    if name == TOPK:
        try:
            ratio = float(arg)
        except ValueError:
            ratio = math.nan
        if 0 < ratio <= 1:
            return Spec(TOPK, ratio)
    if name == POWERSGD and arg.isdigit() and 1 <= int(arg) <= MAX_RANK:
        return Spec(POWERSGD, rank=int(arg))
    raise ValueError(f"--compress must be none, topk:RATIO with 0 < RATIO <= 1 (e.g. topk:0.01) or powersgd:RANK "
                     f"with 1 <= RANK <= {MAX_RANK}, got {text!r}")


def index_dtype(numel: int) -> torch.dtype:
    """The dtype of flat indices into ``numel`` entries: int32, int64 from 2**31 entries on."""
    return torch.int32 if numel < 2**31 else torch.int64


def topk_count(ratio: float, numel: int) -> int:
    """k = max(1, ceil(ratio·numel)), at most numel."""
    return min(numel, max(1, math.ceil(ratio * numel)))


def topk_indices(e: torch.Tensor, k: int) -> torch.Tensor:
    """The flat indices (ascending, int64) of the ``k`` entries of ``e`` of largest magnitude.

    Deterministic: the k-th largest magnitude is a value, whatever order ``torch.topk`` finds it
    in; everything above it is taken, and of the entries equal to it the lowest indices. NaN
    ranks above every number.
    """
    mag = e.abs()
    if mag.is_floating_point():
        mag = torch.where(torch.isnan(mag), torch.full_like(mag, math.inf), mag)
    if k >= mag.numel():
        return torch.arange(mag.numel())
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    kth = torch.topk(mag, k, sorted=False).values.min()
    above = torch.nonzero(mag > kth).flatten()
    ties = torch.nonzero(mag == kth).flatten()[:k - above.numel()]
    return torch.cat([above, ties]).sort().values


def encode_topk(e: torch.Tensor, ratio: float) -> Encoded:
    """``e`` (flat) as its top-k entries: values in ``e``'s dtype, indices ascending."""
    idx = topk_indices(e, topk_count(ratio, e.numel()))
    return Encoded(TOPK, {"values": e[idx], "indices": idx.to(index_dtype(e.numel()))})


def decompress(encoded: Encoded, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The dense tensor of ``shape`` and ``dtype`` that ``encoded`` stands for (pure; no check:
    see :func:`check` for parts from the network)."""
    numel = math.prod(shape)
    if encoded.codec == POWERSGD:
        return lowrank.decompress(encoded.parts, shape, dtype)
    if encoded.codec != TOPK:
        raise ValueError(f"unknown codec {encoded.codec!r}")
    dense = torch.zeros(numel, dtype=dtype)
    idx = encoded.parts["indices"]
    if idx.numel():
        dense[idx.long()] = encoded.parts["values"].to(dtype)
    return dense.reshape(tuple(shape))


def check(codec: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """Why ``parts`` of ``codec`` are no valid encoding of a tensor of ``shape`` and ``dtype``,
    or None when they are. Checks everything :func:`decompress` relies on."""
    if codec not in PARTS:
        return f"unknown codec {codec!r} (known: {sorted(PARTS)})"
    want = PARTS[codec]
    if set(parts) != set(want):
        return f"{codec} carries the parts {list(want)}, got {sorted(parts)}"
    if codec == POWERSGD:
        return lowrank.check(parts, tuple(shape), dtype)
    numel = math.prod(shape)
    values, idx = parts["values"], parts["indices"]
    if values.dim() != 1 or idx.dim() != 1:
        return f"{codec}: values and indices must be 1-D, got {list(values.shape)} and {list(idx.shape)}"
    if values.dtype != dtype:
        return f"{codec}: values are {values.dtype}, the tensor is {dtype}"
    if idx.dtype not in INDEX_DTYPES:
        return f"{codec}: indices must be int32 or int64, got {idx.dtype}"
    if values.numel() != idx.numel() or idx.numel() > numel:
        return f"{codec}: {values.numel()} values and {idx.numel()} indices for a tensor of {numel} entries"
    if idx.numel():
        i = idx.long()
        if int(i[0]) < 0 or int(i[-1]) >= numel:
            return f"{codec}: indices must lie in [0, {numel})"
        if idx.numel() > 1 and not bool((i[1:] > i[:-1]).all()):
            return f"{codec}: indices must be strictly increasing (no duplicates)"
    return None
