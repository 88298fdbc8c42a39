"""A wide MLP for the digits data: enough bytes a step that a 100 Mbit/s server link limits it.

``python -m benchmarks wan --shards-only --model benchmarks.wanwide:model`` trains it on
``worker.examples.digits``'s data. Digits' own 64-128-10 MLP sends 37 KB of gradients a step,
which a 100 Mbit/s link carries in 3 ms, so whether one server or two receive them hardly
matters; this 64-1024-1024-10 MLP (1.13 M parameters) sends 4.5 MB a step from every worker,
and one server's link then carries K of them each way: about 0.36 s per worker at 100 Mbit/s.
"""

from __future__ import annotations

from torch import nn

WIDTH = 1024
"""Units of each of the two hidden layers."""


def model() -> nn.Module:
    """A 64-WIDTH-WIDTH-10 MLP with ReLUs (digits' inputs and classes)."""
    return nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
