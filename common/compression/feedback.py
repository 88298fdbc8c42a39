"""Error feedback: the sender's residual of what compression left out, per key.

[Note: error feedback] For each key, ``e = residual + g`` is encoded, and what was not sent
stays behind: ``residual ← e − decompress(encoded)``. Over any number of steps, everything
sent plus the final residual is exactly the sum of what was pushed (in the residual's dtype),
so nothing is lost, only delayed. The residual is kept in the tensor's dtype (float32 for
float16/bfloat16 tensors, whose own precision would lose the small entries it exists to keep).

A key is compressed once per step: :meth:`Compressor.compress` called again for a step it has
already encoded returns the same encoding and leaves the residual alone, so a push resent after
a reconnect or rejoin carries the same bytes and the residual advances once. The residual lives
in the worker's memory only: a restarted worker starts from a zero residual (what the dead one
held back is lost), and a step recomputed after the server went back to an older checkpoint is
encoded with the residual as it is then, so compressed runs are exact only without such faults.
"""

from __future__ import annotations

import torch

from common.compression import lowrank
from common.compression.codecs import POWERSGD, TOPK, Encoded, Spec, encode_topk, parse

HALF = (torch.float16, torch.bfloat16)


class Compressor:
    """Encodes pushed tensors with error feedback, one residual per key.

    Args:
        spec: the codec (a ``--compress`` value or a parsed :class:`Spec`).

    Attributes:
        dense_bytes: bytes the encoded tensors would have taken dense.
        sent_bytes: bytes of their encodings (each step's once).
    """

    def __init__(self, spec: str | Spec) -> None:
        self.spec = parse(spec) if isinstance(spec, str) else spec
        if not self.spec.enabled:
            raise ValueError("a Compressor needs a compressing codec, not none")
        self._residual: dict[str, torch.Tensor] = {}
        self._last: dict[str, tuple[int, Encoded]] = {}  # key -> (step, its encoding)
        self._q: dict[str, torch.Tensor] = {}  # powersgd: key -> the Q to start the next step from
        self.dense_bytes = 0
        self.sent_bytes = 0

    def applies(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` travels encoded: floating and not empty; for ``powersgd`` also 2-D+
        with factors smaller than itself (a vector travels dense and exact, with no residual)."""
        if not tensor.is_floating_point() or not tensor.numel():
            return False
        return self.spec.codec != POWERSGD or lowrank.applies(tensor.shape, self.spec.rank)

    def compress(self, name: str, tensor: torch.Tensor, step: int | None = None) -> Encoded:
        """Encode ``tensor`` (any shape, CPU) plus ``name``'s residual; keep what was not sent.

        With ``step``, a second call for the same (``name``, ``step``) returns the first one's
        encoding unchanged (a resent push must not advance the residual twice).
        """
        if step is not None and (last := self._last.get(name)) is not None and last[0] == step:
            return last[1]
        flat = tensor.detach().reshape(-1)
        wide = torch.float32 if flat.dtype in HALF else flat.dtype
        r = self._residual.get(name)
        if r is None or r.numel() != flat.numel() or r.dtype != wide:
            e = flat.to(wide, copy=True)
        else:
            e = r + flat.to(wide)
        if self.spec.codec == TOPK:
            enc = encode_topk(e, self.spec.ratio)
            idx = enc.parts["indices"].long()
            values = enc.parts["values"]
            if values.dtype != flat.dtype:
                enc = Encoded(enc.codec, {"values": values.to(flat.dtype), "indices": enc.parts["indices"]})
            e[idx] -= enc.parts["values"].to(wide)  # the residual: e − what was sent
        else:
            enc = self._powersgd(name, e, tensor.shape, flat.dtype)
            e -= lowrank.decompress(enc.parts, tensor.shape, flat.dtype).reshape(-1).to(wide)
        self._residual[name] = e
        self.dense_bytes += flat.numel() * flat.element_size()
        self.sent_bytes += enc.nbytes
        if step is not None:
            self._last[name] = (step, enc)
        return enc

    def _powersgd(self, name: str, e: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> Encoded:
        """``e`` as rank-r factors, warm-started from ``name``'s previous Q."""
        if not lowrank.applies(shape, self.spec.rank):
            raise ValueError(f"{name!r} of shape {list(shape)} travels dense under powersgd:{self.spec.rank}")
        _, m = lowrank.matrix_shape(shape)
        q = self._q.get(name)
        if q is None or q.shape != (m, self.spec.rank) or q.dtype != e.dtype:
            q = lowrank.start_q(name, m, self.spec.rank, e.dtype)
        parts, self._q[name] = lowrank.encode(e, shape, q, dtype)
        return Encoded(POWERSGD, parts)

    def residual(self, name: str) -> torch.Tensor | None:
        """``name``'s residual (flat, the residual dtype), or None before its first step."""
        return self._residual.get(name)

    def reset(self) -> None:
        """Forget every residual, warm start and cached encoding (a new job; a restart starts here too)."""
        self._residual.clear()
        self._last.clear()
        self._q.clear()

    @property
    def ratio(self) -> float:
        """Bytes sent over the dense bytes (1.0 before anything was sent)."""
        return self.sent_bytes / self.dense_bytes if self.dense_bytes else 1.0

