"""One stage's work within a step: run its schedule's actions on its layers.

A forward (``sFi``) takes microbatch i's input (stage 0: the rows of x; otherwise the
activation received from stage s-1), runs the stage's layers, and either sends the output to
stage s+1 or, on the last stage, computes the loss. A backward (``sBi``) runs autograd from
the loss (last stage) or from the δ received from stage s+1, and sends δ for its own inputs
to stage s-1. Parameter gradients accumulate over the microbatches of the step.

[Note: exact batch gradients] Microbatch i of a batch of n rows has n_i rows; its loss is
scaled by n_i / n, so the accumulated gradient is the gradient of the mean loss over the
whole batch - exactly what one process would compute on the batch at once (for the mean
reductions of ``mse`` and ``cross_entropy``).

The stage keeps its own accounting: how many microbatches' activations it holds (peak per
step), and how long it computed, waited for neighbours, and spent per step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from common.errors import StageError
from common.protocol import Op
from worker.pipeline.links import PeerLinks, Place
from worker.pipeline.packing import PackError, describe, differentiable, flatten, unflatten
from worker.pipeline.schedule import FORWARD, Action
from worker.pipeline.staging import PinnedStager

log = logging.getLogger(__name__)


@dataclass
class StageStats:
    """A stage's own accounting, summed over the steps it ran."""

    steps: int = 0
    busy_s: float = 0.0  # forward and backward compute
    wait_s: float = 0.0  # blocked on a neighbour's activation or δ
    window_s: float = 0.0  # from the first action's start to the last action's end, per step
    sync_s: float = 0.0  # pushing gradients and pulling θ from the server
    loop_s: float = 0.0  # whole steps: data, actions, push and pull
    peak_held: int = 0  # most microbatches of activations held at once
    microbatches: int = 0
    first: dict[str, float] = field(default_factory=dict)  # busy/window/loop of the first step alone

    def end_step(self, loop_s: float) -> None:
        """Add one whole step's time; the first step's numbers are kept apart (warm-up)."""
        self.loop_s += loop_s
        if not self.first:
            self.first = {"busy_s": self.busy_s, "window_s": self.window_s, "loop_s": self.loop_s}

    def as_dict(self) -> dict[str, Any]:
        """The numbers, rounded, for the log; ``steady_*`` leave out the first step."""
        out = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "first"}
        for k, v in self.first.items():
            out[f"steady_{k}"] = round(getattr(self, k) - v, 6)
        return out


@dataclass
class _Held:
    """What a forward keeps for its backward."""

    inputs: dict[str, torch.Tensor]  # received float tensors (their .grad is the δ to send back)
    outputs: dict[str, torch.Tensor]  # sent float tensors (autograd roots), empty on the last stage
    pack: str = "tensor"
    loss: torch.Tensor | None = None


@dataclass
class StageExecutor:
    """Runs one stage's actions; one instance per stage worker."""

    module: nn.Module
    place: Place
    links: PeerLinks
    stager: PinnedStager
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    stats: StageStats = field(default_factory=StageStats)
    _held: dict[int, _Held] = field(default_factory=dict)

    def run(self, step: int, actions: Sequence[Action], xs: Sequence[torch.Tensor] | None,
            ys: Sequence[torch.Tensor] | None, sizes: Sequence[int]) -> float | None:
        """Run ``actions`` for ``step``; returns the batch's mean loss on the last stage.

        Args:
            step: the global step.
            actions: this stage's actions for the step.
            xs: stage 0: the inputs of each microbatch.
            ys: last stage: the targets of each microbatch.
            sizes: the rows of each microbatch (they sum to the batch's rows).
        """
        self.links.begin_step(step, len(sizes))
        self._held.clear()
        rows = sum(sizes)
        loss_sum = 0.0
        t_start = time.perf_counter()
        for a in actions:
            if a.kind == FORWARD:
                loss = self._forward(step, a, xs, ys, sizes[a.micro] / rows)
                if loss is not None:
                    loss_sum += loss
                self.stats.peak_held = max(self.stats.peak_held, len(self._held))
            else:
                self._backward(step, a)
        self.stats.window_s += time.perf_counter() - t_start
        self.stats.steps += 1
        self.stats.microbatches += len(sizes)
        if self._held:
            raise self._err(step, min(self._held), "-", f"the schedule left {len(self._held)} microbatch(es) "
                                                         f"without a backward")
        return loss_sum if self.place.last else None

    # ------------------------------------------------------------------ actions
    def _forward(self, step: int, a: Action, xs: Sequence[torch.Tensor] | None,
                 ys: Sequence[torch.Tensor] | None, weight: float) -> float | None:
        i = a.micro
        inputs: dict[str, torch.Tensor] = {}
        pack = "tensor"
        if self.place.first:
            assert xs is not None
            value: Any = xs[i].to(self.device, non_blocking=True)
            origin = "the data set"
        else:
            msg = self._recv(Op.ACTIVATION, step, a)
            received = self.stager.to_device(msg.tensors)
            for k, t in received.items():
                if t.is_floating_point():
                    t.requires_grad_(True)
                    inputs[k] = t
            pack = msg.pack
            try:
                value = unflatten(msg.pack, received)
            except PackError as e:
                raise self._err(step, i, str(a), f"activation from stage {self.place.stage - 1}: {e}") from e
            origin = f"stage {self.place.stage - 1} ({describe(received)})"
        t0 = time.perf_counter()
        try:
            out = self.module(value)
        except Exception as e:  # a shape or dtype the layers cannot take: name the action and the input
            raise self._err(step, i, str(a), f"forward failed on the input from {origin}: "
                                             f"{type(e).__name__}: {e}") from e
        if self.place.last:
            assert ys is not None
            y = ys[i].to(self.device, non_blocking=True)
            if not isinstance(out, torch.Tensor) or out.shape[:1] != y.shape[:1]:
                got = describe(flatten(out)[1]) if not isinstance(out, torch.Tensor) else list(out.shape)
                raise self._err(step, i, str(a), f"the last stage's output {got} does not match the "
                                                 f"{y.shape[0]} target rows")
            loss = self.loss_fn(out, y) * weight
            self.stats.busy_s += time.perf_counter() - t0
            self._held[i] = _Held(inputs, {}, pack, loss)
            return float(loss.detach())
        try:
            out_pack, outs = flatten(out)
        except PackError as e:
            raise self._err(step, i, str(a), str(e)) from e
        self.stats.busy_s += time.perf_counter() - t0
        host = self.stager.to_host(outs)
        self.stager.track(self.links.send(Op.ACTIVATION, step, i, out_pack, host, track=self.stager.on_cuda))
        self._held[i] = _Held(inputs, differentiable(outs), out_pack)
        return None

    def _backward(self, step: int, a: Action) -> None:
        i = a.micro
        held = self._held.pop(i)
        if self.place.last:
            assert held.loss is not None
            t0 = time.perf_counter()
            self._autograd(step, a, [held.loss], [None])
        else:
            msg = self._recv(Op.GRADIENT, step, a)
            self._check_delta(step, a, held, msg.tensors)
            deltas = self.stager.to_device(msg.tensors)
            t0 = time.perf_counter()
            roots = [(t, deltas[k]) for k, t in held.outputs.items() if t.requires_grad]
            if roots:
                self._autograd(step, a, [r for r, _ in roots], [d for _, d in roots])
        if not self.place.first:
            grads = {k: (t.grad if t.grad is not None else torch.zeros_like(t)) for k, t in held.inputs.items()}
            self.stats.busy_s += time.perf_counter() - t0
            host = self.stager.to_host(grads)
            self.stager.track(self.links.send(Op.GRADIENT, step, i, held.pack, host, track=self.stager.on_cuda))
        else:
            self.stats.busy_s += time.perf_counter() - t0

    def _autograd(self, step: int, a: Action, roots: list[torch.Tensor], grads: list[Any]) -> None:
        try:
            torch.autograd.backward(roots, grads)
        except Exception as e:
            raise self._err(step, a.micro, str(a), f"backward failed: {type(e).__name__}: {e}") from e

    def _check_delta(self, step: int, a: Action, held: _Held, got: dict[str, torch.Tensor]) -> None:
        """δ must have exactly the names, dtypes and shapes of the float tensors this stage sent."""
        want = held.outputs
        ok = list(got) == list(want) and all(
            got[k].dtype == want[k].dtype and got[k].shape == want[k].shape for k in want)
        if not ok:
            raise self._err(step, a.micro, str(a),
                            f"δ from stage {self.place.stage + 1} does not match the activation this stage sent: "
                            f"expected {describe(want) or 'nothing'}, got {describe(got) or 'nothing'}")

    def _recv(self, op: Op, step: int, a: Action) -> Any:
        t0 = time.perf_counter()
        try:
            return self.links.recv(op, step, a.micro, str(a))
        finally:
            self.stats.wait_s += time.perf_counter() - t0

    def _err(self, step: int, micro: int, action: str, message: str) -> StageError:
        return StageError(self.place.stage, self.place.rank, step, micro, action, message)
