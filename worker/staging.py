"""Moving gradients and θ between the device and host memory the wire can read.

On the CPU there is nothing to do: host tensors are sent (or copied into shared memory) as
they are. On CUDA, gradients are copied device → host on a side stream as soon as a bucket
is ready, so the copy overlaps the rest of backward; the destination is either the shared
gradient segment or a pinned buffer allocated once per tensor and reused every step. Host
memory shared with the server (the segments) is page-locked with ``cudaHostRegister`` so
both directions run at pinned-copy speed.

[Note: reuse] A pinned buffer is written again only in the next step, after :meth:`ready`
returned and the push that read it has been answered (``Channel.finish`` waits for every
reply before the step ends), so no send ever reads a buffer being overwritten.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly (CUDA 11.1+)


class Stager:
    """Device ↔ host staging with one side stream and reused pinned buffers."""

    def __init__(self) -> None:
        self._stream: Any = None
        self._events: dict[int, Any] = {}
        self._staged: dict[int, dict[str, torch.Tensor]] = {}
        self._pinned: dict[str, torch.Tensor] = {}
        self._hosts: list[tuple[torch.Tensor, bool]] = []
        self._registered: set[int] = set()
        self.cuda_used = False

    def register_host(self, t: torch.Tensor, read_only: bool = False) -> None:
        """Host memory that device copies will use (page-locked once CUDA is in use).

        ``read_only``: this process maps it read-only (θ's segment), which CUDA registers only
        with ``cudaHostRegisterReadOnly``.
        """
        self._hosts.append((t, read_only))
        if self.cuda_used:
            self._pin_hosts()

    def _pin_hosts(self) -> None:
        todo = [(t, ro) for t, ro in self._hosts if t.numel() and t.data_ptr() not in self._registered]
        if not todo:
            return
        device = torch.cuda.current_device()

        def register() -> None:
            # CUDA keeps its last error per host thread, and torch's next kernel-launch check
            # on that thread would raise it: a refused registration stays in this thread.
            torch.cuda.set_device(device)
            for t, ro in todo:
                err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(),
                                                               _HOST_REGISTER_READ_ONLY if ro else 0))
                if err == 0:
                    self._registered.add(t.data_ptr())
                else:
                    log.warning("cudaHostRegister failed (error %d): copies to shared memory are pageable", err)

        th = threading.Thread(target=register, name="zmqps-host-register")
        th.start()
        th.join()

    def _side(self, device: torch.device) -> Any:
        if self._stream is None:
            self.cuda_used = True
            self._stream = torch.cuda.Stream(device=device)
            self._pin_hosts()
        return self._stream

    def copy_to(self, dst: torch.Tensor, src: torch.Tensor, scale: float | None = None) -> None:
        """``dst`` (host) ← ``src`` (times ``scale``, in the same pass on the CPU); asynchronous
        on the side stream when ``src`` is on CUDA."""
        if src.device.type == "cpu":
            if scale is None:
                dst.copy_(src.detach())
            else:
                torch.mul(src.detach(), scale, out=dst)
            return
        stream = self._side(src.device)
        stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(stream):
            g = src if scale is None else src.detach() * scale
            dst.copy_(g.detach(), non_blocking=True)
            src.record_stream(stream)
            if g is not src:
                g.record_stream(stream)  # the scaled temporary, freed only once the copy is done

    def record(self, bucket: int, grads: Mapping[str, torch.Tensor]) -> None:
        """Stage bucket ``bucket``'s gradients for sending as frames (D2H into pinned buffers)."""
        staged: dict[str, torch.Tensor] = {}
        for name, g in grads.items():
            g = g.detach()
            if g.device.type == "cpu":
                staged[name] = g
                continue
            buf = self._pinned.get(name)
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype:
                buf = self._pinned[name] = torch.empty(g.shape, dtype=g.dtype, pin_memory=True)
            self.copy_to(buf, g)
            staged[name] = buf
        self._staged[bucket] = staged
        if self._stream is not None:
            ev = torch.cuda.Event()
            ev.record(self._stream)
            self._events[bucket] = ev

    def ready(self, bucket: int) -> dict[str, torch.Tensor]:
        """Bucket ``bucket``'s host gradients, once their copies are done."""
        ev = self._events.pop(bucket, None)
        if ev is not None:
            ev.synchronize()
        return self._staged.pop(bucket)

    def to_host(self, tensors: Mapping[str, torch.Tensor], tag: str) -> dict[str, torch.Tensor]:
        """Host copies (or the tensors themselves when on the CPU), synchronously."""
        out = {k: (t.detach() if t.device.type == "cpu" else t.detach().cpu()) for k, t in tensors.items()}
        return out

    def sync_h2d(self) -> None:
        """Wait for host → device copies issued with ``non_blocking``."""
        if self.cuda_used or (torch.cuda.is_available() and torch.cuda.is_initialized()):
            torch.cuda.current_stream().synchronize()
