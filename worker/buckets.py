"""Gradient buckets pushed from backward hooks, so communication overlaps backward (like DDP).

The runtime groups the parameters into buckets of about ``--bucket-mb`` in reverse order
(``common.partition.buckets``: the order backward produces them). A post-accumulate-grad
hook on every parameter counts down its bucket; when the last gradient of a bucket is in,
the bucket is pushed at once while backward continues with the earlier layers. After
backward, :meth:`BucketHooks.finish` pushes the buckets whose hooks never fired (parameters
the loss did not reach) with zero gradients, so every step pushes every key exactly once.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

PushFn = Callable[[int, Mapping[str, torch.Tensor]], None]


class BucketHooks:
    """Hooks that push each bucket of gradients as soon as all of it is ready."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], buckets: Sequence[Sequence[str]],
                 push: PushFn) -> None:
        self.params = dict(params)
        self.buckets = [list(b) for b in buckets]
        self.push = push
        self._bucket_of = {name: i for i, b in enumerate(self.buckets) for name in b}
        self._left: list[int] = []
        self._pushed: set[int] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(name))
                         for name, p in self.params.items() if p.requires_grad]
        self.reset()

    def reset(self) -> None:
        """Start a new step."""
        self._left = [len(b) for b in self.buckets]
        self._pushed.clear()

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            i = self._bucket_of[name]
            self._left[i] -= 1
            if self._left[i] == 0:
                self._fire(i)
        return hook

    def _fire(self, i: int) -> None:
        grads = {}
        for name in self.buckets[i]:
            p = self.params[name]
            grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
        self._pushed.add(i)
        self.push(i, grads)

    def finish(self) -> None:
        """Push every bucket not pushed during backward (zeros where no gradient arrived)."""
        for i in range(len(self.buckets)):
            if i not in self._pushed:
                self._fire(i)

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
