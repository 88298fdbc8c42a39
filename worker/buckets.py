"""Gradient buckets pushed from backward hooks, so communication overlaps backward (like DDP).

The runtime groups the parameters into buckets of about ``--bucket-mb`` in reverse order
(``common.partition.buckets``: the order backward produces them), and the buffers into a
bucket of their own. A post-accumulate-grad hook on every trainable parameter counts down
its bucket; when the last gradient of a bucket is in, the bucket is pushed at once while
backward continues with the earlier layers. After backward, :meth:`BucketHooks.finish`
pushes the buckets whose hooks did not all fire: parameters the loss did not reach, frozen
ones, buffers. What a bucket carries comes from ``collect`` (``worker.modelstate``): a
parameter without a gradient is sent as absent, never as zeros, so every step pushes every
key exactly once and the server skips what nobody had.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

PushFn = Callable[[int, Mapping[str, "torch.Tensor | None"]], None]
CollectFn = Callable[[list[str]], Mapping[str, "torch.Tensor | None"]]


class BucketHooks:
    """Hooks that push each bucket as soon as all of its trainable parameters have gradients.

    Args:
        params: the parameters by name (only those with ``requires_grad`` get a hook).
        buckets: lists of names (parameters and buffers) covering every registered key once.
        push: sends bucket ``i`` with its tensors.
        collect: what a bucket's names carry this step (a gradient, a value, or None).
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], buckets: Sequence[Sequence[str]],
                 push: PushFn, collect: CollectFn) -> None:
        self.buckets = [list(b) for b in buckets]
        self.push = push
        self.collect = collect
        self._bucket_of = {name: i for i, b in enumerate(self.buckets) for name in b}
        hooked = {name: p for name, p in params.items() if p.requires_grad and name in self._bucket_of}
        self._hooked = [sum(name in hooked for name in b) for b in self.buckets]
        self._left: list[int] = []
        self._pushed: set[int] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(name)) for name, p in hooked.items()]
        self.reset()

    def reset(self) -> None:
        """Start a new step."""
        self._left = list(self._hooked)
        self._pushed.clear()

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            i = self._bucket_of[name]
            self._left[i] -= 1
            if self._left[i] == 0:
                self._fire(i)
        return hook

    def _fire(self, i: int) -> None:
        self._pushed.add(i)
        self.push(i, self.collect(self.buckets[i]))

    def finish(self) -> None:
        """Push every bucket not pushed during backward (absent where no gradient arrived)."""
        for i in range(len(self.buckets)):
            if i not in self._pushed:
                self._fire(i)

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
