"""Layer ranges of the stages: given explicitly, or balanced automatically.

A partition splits the L layers of an ``nn.Sequential`` into P contiguous, non-empty ranges
``[a, b)``. ``--partition`` takes:

* explicit ranges, ``0:3,3:5,5:7``;
* ``auto``: each layer's forward + backward time is measured on a sample batch (the median
  of a few repetitions, after a warm-up) and the ranges minimise the largest stage time;
  if the layers cannot be run on the sample, parameter counts are used instead. On the CPU
  the time is the CPU time of one thread running the layers with torch's intra-op threads
  set to 1, so other processes sharing the cores (and idle OpenMP threads spinning) do not
  distort it; on CUDA it is wall time between device synchronisations;
* ``params``: the ranges minimise the largest stage parameter count (deterministic).

Every stage must own at least one parameter (the server keeps θ per stage). The balancing
is exact: a dynamic program over split points, ties going to the earliest split.

[Note: one measurement per job] Timings differ from run to run, so stages that measure on
their own may choose different ranges. ``ps-launch`` therefore measures once and passes the
explicit ranges to every stage; a stage started by hand with ``auto`` measures itself, and
the stages compare their plans at start-up (a mismatch is a ConfigError, never a silent
mix). Print ranges for a hand-started job with ``python -m worker.pipeline.partition``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from common.errors import ConfigError

log = logging.getLogger(__name__)

Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class Partition:
    """The chosen ranges, how they were chosen, and each stage's cost in that unit."""

    ranges: tuple[tuple[int, int], ...]
    method: str  # "explicit", "time" or "params"
    layer_costs: tuple[float, ...]  # seconds (time) or parameter counts (params, explicit)
    unit: str  # "ms" or "params"

    @property
    def text(self) -> str:
        """The ``--partition`` form, ``0:3,3:5``."""
        return ",".join(f"{a}:{b}" for a, b in self.ranges)

    def stage_costs(self) -> list[float]:
        """Each stage's summed cost."""
        return [sum(self.layer_costs[a:b]) for a, b in self.ranges]

    def describe(self) -> str:
        """One line per stage: its layers and its cost."""
        lines = [f"partition ({self.method}): {self.text}"]
        for s, ((a, b), c) in enumerate(zip(self.ranges, self.stage_costs())):
            cost = f"{c * 1e3:.3f} ms forward+backward" if self.unit == "ms" else f"{int(c)} parameters"
            lines.append(f"  stage {s}: layers [{a}, {b}) cost {cost}")
        return "\n".join(lines)


def parse_ranges(text: str, layers: int, stages: int | None = None) -> Ranges:
    """Explicit ranges ``a:b,b:c,...`` covering exactly ``layers`` layers (and ``stages`` of them)."""
    try:
        ranges = [(int(a), int(b)) for a, b in (r.split(":") for r in text.replace(" ", "").split(","))]
    except ValueError:
        raise ConfigError(f"--partition {text!r}: expected ranges like 0:3,3:5,5:7") from None
    expect = 0
    for a, b in ranges:
        if a != expect or b <= a:
            raise ConfigError(f"--partition {text!r}: ranges must be non-empty and contiguous from layer 0")
        expect = b
    if expect != layers:
        raise ConfigError(f"--partition {text!r} covers layers [0, {expect}) but the model has {layers} layers")
    if stages is not None and len(ranges) != stages:
        raise ConfigError(f"--partition {text!r} has {len(ranges)} ranges for {stages} stages")
    return ranges


def param_counts(model: nn.Sequential) -> list[int]:
    """Parameters per layer."""
    return [sum(p.numel() for p in layer.parameters()) for layer in model]


def balance(costs: Sequence[float], stages: int, allowed: Callable[[int, int], bool] | None = None) -> Ranges:
    """Contiguous ranges minimising the largest range cost (exact; earliest split on ties).

    ``allowed(a, b)`` may forbid a range (e.g. one without parameters).
    """
    L = len(costs)
    if not 1 <= stages <= L:
        raise ConfigError(f"cannot split {L} layers into {stages} stages (each stage needs a layer)")
    ok = allowed or (lambda a, b: True)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    INF = float("inf")
    # best[p][b]: the smallest possible largest cost splitting layers [0, b) into p ranges.
    best = [[INF] * (L + 1) for _ in range(stages + 1)]
    cut = [[-1] * (L + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for p in range(1, stages + 1):
        for b in range(p, L + 1):
            for a in range(p - 1, b):
                if best[p - 1][a] == INF or not ok(a, b):
                    continue
                v = max(best[p - 1][a], prefix[b] - prefix[a])
                if v < best[p][b]:
                    best[p][b], cut[p][b] = v, a
    if best[stages][L] == INF:
        raise ConfigError(f"no split of {L} layers into {stages} stages gives every stage a parameter")
    ranges, b = [], L
    for p in range(stages, 0, -1):
        a = cut[p][b]
        ranges.append((a, b))
        b = a
    return ranges[::-1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _float_leaves(value: Any) -> list[torch.Tensor]:
    items = value if isinstance(value, (tuple, list)) else list(value.values()) if isinstance(value, dict) else [value]
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _detach(value: Any) -> Any:
    def one(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            t = t.detach()
            return t.requires_grad_(True) if t.is_floating_point() else t
        return t
    if isinstance(value, tuple):
        return tuple(one(t) for t in value)
    if isinstance(value, list):
        return [one(t) for t in value]
    if isinstance(value, dict):
        return {k: one(t) for k, t in value.items()}
    return one(value)


def measure_layers(model: nn.Sequential, sample: torch.Tensor, repeats: int = 5) -> list[float]:
    """Median forward + backward seconds of each layer on ``sample`` (one warm-up pass first).

    Each layer's input is the previous layer's output, detached; its backward is driven by
    a gradient of ones. Parameter gradients are cleared afterwards. CPU: this thread's CPU
    time with one intra-op thread; CUDA: wall time, synchronised.
    """
    device = sample.device
    if device.type == "cuda":
        return _measure(model, sample, repeats, time.perf_counter)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(model, sample, repeats, time.thread_time)
    finally:
        torch.set_num_threads(threads)


def _measure(model: nn.Sequential, sample: torch.Tensor, repeats: int, clock: Callable[[], float]) -> list[float]:
    device = sample.device
    times: list[list[float]] = [[] for _ in model]
    for rep in range(repeats + 1):
        x: Any = sample
        for i, layer in enumerate(model):
            x = _detach(x)
            _sync(device)
            t0 = clock()
            out = layer(x)
            outs = [t for t in _float_leaves(out) if t.requires_grad]
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
            _sync(device)
            if rep:
                times[i].append(clock() - t0)
            x = out
    model.zero_grad(set_to_none=True)
    return [statistics.median(t) for t in times]


def choose(model: nn.Sequential, spec: str, stages: int, sample: torch.Tensor | None) -> Partition:
    """The partition ``spec`` asks for (explicit ranges, ``auto`` or ``params``)."""
    counts = param_counts(model)
    has_params = [c > 0 for c in counts]

    def allowed(a: int, b: int) -> bool:
        return any(has_params[a:b])

    if spec not in ("auto", "params"):
        ranges = parse_ranges(spec, len(model), stages)
        return Partition(tuple(ranges), "explicit", tuple(float(c) for c in counts), "params")
    if spec == "auto" and sample is not None:
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        try:
            with torch.enable_grad(), torch.random.fork_rng(devices=[]):
                secs = measure_layers(model, sample)
            return Partition(tuple(balance(secs, stages, allowed)), "time", tuple(secs), "ms")
        except (RuntimeError, TypeError, ValueError) as e:
            log.warning("could not time the layers on a sample batch (%s: %s); balancing parameter counts",
                        type(e).__name__, e)
        finally:  # timing must leave no trace: running statistics as they were, gradients cleared
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
            model.zero_grad(set_to_none=True)
    return Partition(tuple(balance([float(c) for c in counts], stages, allowed)), "params",
                     tuple(float(c) for c in counts), "params")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m worker.pipeline.partition``: print balanced ranges for a model."""
    from worker.factories import build_data, build_model, default_pipeline_model

    ap = argparse.ArgumentParser(prog="python -m worker.pipeline.partition",
                                 description="print the layer ranges --partition auto would choose")
    ap.add_argument("--model", default=None, help="MODULE:FACTORY (default: the seed's two-layer model)")
    ap.add_argument("--data", default=None, help="MODULE:FACTORY of the data set (for the sample batch)")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--sample-rows", type=int, default=25, help="rows of the sample batch")
    ap.add_argument("--method", choices=("auto", "params"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        model = build_model(args.model, args.seed, default_pipeline_model)
        if not isinstance(model, nn.Sequential):
            raise ConfigError("the pipeline model must be an nn.Sequential")
        data = build_data(args.data, args.seed)
        sample = torch.stack([data[i][0] for i in range(min(args.sample_rows, len(data)))])
        part = choose(model, args.method, args.stages, sample)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    sys.stdout.write(part.describe() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
