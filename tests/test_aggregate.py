"""Rank-order reduction: the result is bitwise the same whatever order pushes arrive in."""

from __future__ import annotations

import itertools

import torch

from ps.aggregate import Contribution, KeyGroup


def _reduce(order, grads, weights):
    g = KeyGroup(keys=("w",), contributors=(0, 1, 2, 3))
    done = [g.add(r, Contribution({"w": grads[r]}, weights[r], float(r))) for r in order]
    assert done == [False, False, False, True]
    acc, loss = g.finish()
    return acc["w"].clone(), loss, g.step


def test_every_arrival_order_gives_the_same_bits() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(1000, dtype=torch.float32) * 10 ** (3 * r) for r in range(4)]
    weights = [1.0, 1.0, 1.0, 1.0]
    ref, loss, step = _reduce((0, 1, 2, 3), grads, weights)
    assert step == 1 and loss == 1.5
    assert torch.equal(ref, (((grads[0] + grads[1]) + grads[2]) + grads[3]) / 4)
    for order in itertools.permutations(range(4)):
        got, _, _ = _reduce(order, grads, weights)
        assert torch.equal(got, ref), order


def test_weights_give_the_mean_over_rows() -> None:
    grads = [torch.full((3,), float(r), dtype=torch.float64) for r in range(4)]
    got, loss, _ = _reduce((3, 1, 0, 2), grads, [34.0, 33.0, 33.0, 0.0])
    assert torch.allclose(got, torch.full((3,), (0 * 34 + 1 * 33 + 2 * 33) / 100, dtype=torch.float64))
    assert abs(loss - (0 * 34 + 1 * 33 + 2 * 33) / 100) < 1e-12


def test_group_resets_between_steps() -> None:
    g = KeyGroup(keys=("w",), contributors=(0, 1))
    for step in range(3):
        assert not g.add(1, Contribution({"w": torch.ones(2)}, 1.0, None))
        assert g.has_pushed(1) and g.missing() == [0]
        assert g.add(0, Contribution({"w": torch.full((2,), 3.0)}, 1.0, None))
        acc, loss = g.finish()
        assert torch.equal(acc["w"], torch.full((2,), 2.0)) and loss is None and g.step == step + 1
