"""Moving boundary tensors between a stage's device and the wire, through pinned host buffers.

On the CPU nothing is copied: a sent tensor's own memory goes to ZeroMQ (zero copy) and a
received tensor is a view of its frame. On CUDA:

* **send**: each tensor is copied device → a pinned host buffer with ``non_blocking=True``,
  one stream synchronisation covers them all, and the pinned buffers go to ZeroMQ without a
  further copy. A buffer returns to the pool only once ZeroMQ has released it (its send's
  ``MessageTracker`` is done), so a queued send never sees its bytes overwritten.
* **receive**: each frame is copied into a pinned buffer (a host memcpy), then to the device
  with ``non_blocking=True``; a CUDA event recorded after that copy guards the buffer, which
  is reused only once the event has completed.

Buffers are pooled by (dtype, number of elements), so microbatches of a steady shape reuse
the same few buffers; shapes may still change from batch to batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import zmq

log = logging.getLogger(__name__)

MAX_FREE_PER_SIZE = 8


@dataclass
class _Buffer:
    host: torch.Tensor  # pinned, 1-D
    tracker: zmq.MessageTracker | None = None
    event: Any = None  # torch.cuda.Event guarding an in-flight host→device copy

    def busy(self) -> bool:
        if self.tracker is not None and not self.tracker.done:
            return True
        return self.event is not None and not self.event.query()


@dataclass
class PinnedStager:
    """Stages boundary tensors for one device (a no-op on the CPU)."""

    device: torch.device
    _pool: dict[tuple[torch.dtype, int], list[_Buffer]] = field(default_factory=dict)
    _pending: list[_Buffer] = field(default_factory=list)  # handed out by to_host, awaiting track()
    allocated: int = 0

    @property
    def on_cuda(self) -> bool:
        """True when tensors must be staged through host memory."""
        return self.device.type == "cuda"

    def _acquire(self, dtype: torch.dtype, numel: int) -> _Buffer:
        lst = self._pool.setdefault((dtype, numel), [])
        for buf in lst:
            if not buf.busy():
                lst.remove(buf)
                buf.tracker = buf.event = None
                return buf
        self.allocated += 1
        return _Buffer(torch.empty(numel, dtype=dtype, pin_memory=True))

    def _release(self, buf: _Buffer) -> None:
        lst = self._pool.setdefault((buf.host.dtype, buf.host.numel()), [])
        if len(lst) < MAX_FREE_PER_SIZE:
            lst.append(buf)

    def to_host(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host tensors ready to send; call :meth:`track` with the send's tracker afterwards."""
        if not self.on_cuda:
            return {k: t.detach() for k, t in tensors.items()}
        out = {}
        for k, t in tensors.items():
            t = t.detach()
            if t.device.type == "cpu":
                out[k] = t
                continue
            buf = self._acquire(t.dtype, t.numel())
            view = buf.host.view(t.shape)
            view.copy_(t, non_blocking=True)
            self._pending.append(buf)
            out[k] = view
        if self._pending:
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def track(self, tracker: zmq.MessageTracker | None) -> None:
        """The send of the last :meth:`to_host` result is queued; its buffers return after it."""
        for buf in self._pending:
            buf.tracker = tracker
            self._release(buf)
        self._pending.clear()

    def to_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Received host tensors on this stage's device."""
        if not self.on_cuda:
            return dict(tensors)
        out = {}
        for k, t in tensors.items():
            buf = self._acquire(t.dtype, t.numel())
            view = buf.host.view(t.shape)
            view.copy_(t)
            out[k] = view.to(self.device, non_blocking=True)
            buf.event = torch.cuda.Event()
            buf.event.record(torch.cuda.current_stream(self.device))
            self._release(buf)
        return out
