"""Checkpoints written in the background while training goes on, copy on write per tensor.

[Note: background checkpoints] A checkpoint used to be written inside the serve loop: every
worker waited for it (0.16 s for the 75 MB MLP with SGD, 0.45 s with Adam's two slots, at
~0.5 GB/s; seconds for a model of a few GB). Now ``--checkpoint-every`` hands the cut to a
:class:`Snapshot` that a :class:`BackgroundSaver` thread writes while the loop applies the
next steps. The snapshot holds θ's tensors and the optimizer's slots *by reference*; before
the optimizer writes a key in place (``ParameterStore.apply`` calls :meth:`Snapshot.protect`),
each of that key's tensors not yet written is cloned into the snapshot, so the file holds the
state of the cut exactly. A write that outruns the training clones nothing; the most it can
cost is one copy of θ and its slots, in RAM, at memcpy speed, never a wait for the disk.

The writer holds the snapshot's lock while it writes one tensor (a piece: ≤ ``--chunk-mb``),
so ``protect`` never sees a tensor half written. At most one checkpoint is in flight: asking
for the next one waits for the previous. A checkpoint counts (``saved_step``) once it is on
disk, fsynced and renamed; a failed write is logged and training goes on from the previous one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping, Sequence

import torch

from ps import stfile
from ps.checkpoint import checkpoint_contents

log = logging.getLogger(__name__)


class Snapshot:
    """Named tensors frozen at one moment, written later: entries still unwritten are cloned
    before their owner changes them in place."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                 owners: Mapping[str, Sequence[str]]) -> None:
        """``owners`` maps a θ key to the entry names that change when the key is updated."""
        self._tensors: dict[str, torch.Tensor | None] = dict(tensors)
        self._metadata = dict(metadata)
        self._owners = owners
        self._cond = threading.Condition()
        self._writing: str | None = None
        self._cloned: set[str] = set()
        self.cloned_bytes = 0

    def protect(self, keys: Iterable[str]) -> None:
        """θ's ``keys`` are about to change in place: keep a copy of what is not yet written.

        An entry being written right now is waited for (one piece's write).
        """
        with self._cond:
            for k in keys:
                for name in self._owners.get(k, ()):
                    while self._writing == name:
                        if not self._cond.wait(10.0):
                            log.warning("checkpoint writer still writing %s after 10 s; θ's update waits", name)
                    t = self._tensors.get(name)
                    if t is None or name in self._cloned:  # None: written already
                        continue
                    self._tensors[name] = t.clone()
                    self._cloned.add(name)
                    self.cloned_bytes += t.numel() * t.element_size()

    def write(self, f: BinaryIO) -> None:
        """The safetensors file of the snapshot, tensor by tensor; each is released once written."""
        with self._cond:
            head = stfile.header({k: [t] for k, t in self._tensors.items() if t is not None}, self._metadata)
        f.write(head)
        for name in list(self._tensors):
            with self._cond:
                t = self._tensors[name]
                self._writing = name
            try:
                if t is not None:
                    stfile.write_parts(f, [t])
            finally:
                with self._cond:
                    self._tensors[name] = None
                    self._writing = None
                    self._cond.notify_all()
            del t


def checkpoint_snapshot(step: int, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        meta: Mapping[str, object]) -> Snapshot:
    """A :class:`Snapshot` of ``ckpt-<step>``: θ (``params`` by key) and ``optimizer``'s state.

    Each key owns its ``param/KEY`` entry and its ``optim/INDEX/*`` slots.
    """
    tensors, metadata = checkpoint_contents(step, {k: p.detach() for k, p in params.items()},
                                            optimizer.state_dict(), meta)
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    owners: dict[str, list[str]] = {k: [f"param/{k}"] for k in params}
    by_index = {index[id(p)]: k for k, p in params.items() if id(p) in index}
    for name in tensors:
        if name.startswith("optim/"):
            owners[by_index[int(name.split("/")[1])]].append(name)
    return Snapshot(tensors, metadata, owners)


@dataclass
class Saved:
    """The end of one background checkpoint."""

    step: int
    path: Path | None
    error: BaseException | None
    cloned_bytes: int
    seconds: float  # from the start (the cut) to the file on disk, or to the failure


class BackgroundSaver:
    """At most one checkpoint being written, on its own thread; the loop collects its end."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._snapshot: Snapshot | None = None
        self._result: Saved | None = None

    @property
    def busy(self) -> bool:
        """A checkpoint was started and not yet collected."""
        return self._thread is not None

    def start(self, step: int, snapshot: Snapshot, write: Callable[[Snapshot], Path]) -> None:
        """Write ``snapshot`` (as ``ckpt-<step>``) with ``write`` on a new thread."""
        if self._thread is not None:
            raise RuntimeError("a checkpoint is already being written")

        t0 = time.monotonic()

        def run() -> None:
            try:
                path = write(snapshot)
                self._result = Saved(step, path, None, snapshot.cloned_bytes, time.monotonic() - t0)
            except BaseException as e:  # noqa: BLE001 - reported to the loop, which logs it
                self._result = Saved(step, None, e, snapshot.cloned_bytes, time.monotonic() - t0)

        self._snapshot = snapshot
        self._thread = threading.Thread(target=run, name=f"zmqps-ckpt-{step}", daemon=True)
        self._thread.start()

    def protect(self, keys: Iterable[str]) -> None:
        """Forward to the snapshot being written, if any (see :meth:`Snapshot.protect`)."""
        snap = self._snapshot
        if snap is not None:
            snap.protect(keys)

    def poll(self) -> Saved | None:
        """The finished checkpoint, once; None while it is being written or when there is none."""
        if self._thread is None or self._thread.is_alive():
            return None
        return self.wait()

    def wait(self) -> Saved | None:
        """Wait for the checkpoint being written (if any) and return its end."""
        if self._thread is None:
            return None
        waited = 0.0
        while self._thread.is_alive():  # a disk that hangs is named in the log, every 30 s
            self._thread.join(30.0)
            waited += 30.0
            if self._thread.is_alive():
                log.warning("%s: still writing after %.0f s; the server waits for it", self._thread.name, waited)
        result, self._result = self._result, None
        self._thread = self._snapshot = None
        return result
