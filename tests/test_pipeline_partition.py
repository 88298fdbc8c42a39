"""Layer ranges: explicit parsing, exact balancing, timing, and the parameter-count fallback."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from common.config import LaunchConfig, WorkerConfig
from common.errors import ConfigError
from worker.pipeline.partition import balance, choose, measure_layers, param_counts, parse_ranges


def brute_force(costs, stages, allowed=lambda a, b: True):
    """The smallest largest-range cost over every split (the definition balance() must meet)."""
    L, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, L), stages - 1):
        bounds = (0, *cuts, L)
        ranges = list(zip(bounds, bounds[1:]))
        if all(allowed(a, b) for a, b in ranges):
            best = min(best, max(sum(costs[a:b]) for a, b in ranges))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_balance_is_optimal(seed):
    rng = random.Random(seed)
    L = rng.randint(1, 9)
    P = rng.randint(1, L)
    costs = [rng.choice([0, 1, 2, 5, 10, 30]) + rng.random() for _ in range(L)]
    ranges = balance(costs, P)
    assert len(ranges) == P and ranges[0][0] == 0 and ranges[-1][1] == L
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    assert max(sum(costs[a:b]) for a, b in ranges) == pytest.approx(brute_force(costs, P))


def test_balance_gives_every_stage_a_parameter():
    has = [True, False, False, True]  # Linear, Tanh, Tanh, Linear
    costs = [1.0, 50.0, 50.0, 1.0]  # time alone would isolate the costly parameter-free layers
    ranges = balance(costs, 2, lambda a, b: any(has[a:b]))
    assert all(any(has[a:b]) for a, b in ranges)
    with pytest.raises(ConfigError, match="every stage a parameter"):
        balance(costs, 3, lambda a, b: any(has[a:b]))
    with pytest.raises(ConfigError, match="cannot split 4 layers into 5"):
        balance(costs, 5)


def test_parse_ranges():
    assert parse_ranges("0:3,3:5,5:7", 7, 3) == [(0, 3), (3, 5), (5, 7)]
    for text, message in [("0:3,3:5", "has 7 layers"), ("0:3,4:7", "contiguous"), ("1:7", "contiguous"),
                          ("0:3,3:3,3:7", "contiguous"), ("0-3", "expected ranges")]:
        with pytest.raises(ConfigError, match=message):
            parse_ranges(text, 7)
    with pytest.raises(ConfigError, match="2 ranges for 3 stages"):
        parse_ranges("0:3,3:7", 7, 3)


class Heavy(nn.Module):
    """A layer with few parameters and a lot of arithmetic (60 products of 128 x 128 matrices)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.a = torch.randn(128, 128)

    def forward(self, x):
        acc = self.a
        for _ in range(60):
            acc = torch.tanh(acc @ self.a)
        return self.lin(x) + acc.mean() * 0


def test_auto_balances_measured_time_not_parameters():
    # Layer 0 has the fewest parameters but by far the most arithmetic: timing must isolate it.
    # (CPU time, not wall time: processes sharing the cores cannot make the light layers look heavy.)
    model = nn.Sequential(Heavy(), nn.Linear(4, 64), nn.Linear(64, 64), nn.Linear(64, 4))
    secs = measure_layers(model, torch.randn(8, 4), repeats=2)
    assert secs[0] > 3 * sum(secs[1:]), secs
    assert all(p.grad is None for p in model.parameters())
    part = choose(model, "auto", 2, torch.randn(8, 4))
    assert part.method == "time" and part.ranges == ((0, 1), (1, 4))
    assert "stage 0: layers [0, 1) cost" in part.describe() and "ms forward+backward" in part.describe()
    by_params = choose(model, "params", 2, None)
    assert by_params.method == "params" and by_params.ranges == ((0, 2), (2, 4))
    assert by_params.stage_costs() == [20 + 320, 4160 + 260]
    assert param_counts(model) == [20, 320, 4160, 260]


def test_auto_falls_back_to_parameter_counts_when_the_sample_does_not_fit():
    model = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 1))
    part = choose(model, "auto", 2, torch.randn(3, 7))  # 7 features: the first layer cannot run it
    assert part.method == "params" and part.ranges == ((0, 1), (1, 2))


def test_timing_leaves_running_statistics_and_rng_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample = torch.randn(8, 4)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    choose(model, "auto", 2, sample)
    assert torch.equal(torch.rand(3), expected_next)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pipeline_options_in_the_config():
    cfg = WorkerConfig(mode="pipeline", rank=3, world_size=4, partition="0:1,1:2")
    assert cfg.stages == 2
    assert WorkerConfig(mode="pipeline", rank=0, world_size=3).stages == 3  # default: every rank a stage
    launch = LaunchConfig(mode="pipeline", stages=3, replicas=2)
    assert launch.workers == 6
    assert LaunchConfig(mode="pipeline").stages == 2 and LaunchConfig(mode="pipeline").workers == 2
    assert LaunchConfig().workers == 2
    for kwargs, message in [
        (dict(mode="pipeline", rank=0, world_size=3, stages=2), "not a multiple of --stages"),
        (dict(mode="pipeline", rank=0, world_size=2, stages=3, partition="0:1,1:2"), "gives 2 ranges"),
        (dict(mode="pipeline", rank=0, world_size=2, partition="0:1,2:3"), "contiguous"),
        (dict(mode="pipeline", rank=0, world_size=2, partition="zero"), "auto, params or ranges"),
        (dict(mode="pipeline", rank=0, world_size=2, microbatches=0), "--microbatches must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message):
            WorkerConfig(**kwargs)
    with pytest.raises(ConfigError, match="leave --workers out"):
        LaunchConfig(mode="pipeline", stages=2, replicas=2, workers=3)
