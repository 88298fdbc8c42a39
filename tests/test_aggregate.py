"""Rank-order reduction: the result is bitwise the same whatever order pushes arrive in."""

from __future__ import annotations

import itertools

import torch

from ps.aggregate import Contribution, KeyGroup


def _reduce(order, grads, weights):
    g = KeyGroup(keys=("w",), contributors=(0, 1, 2, 3))
    done = [g.add(r, Contribution({"w": grads[r]}, weights[r], float(r))) for r in order]
    assert done == [False, False, False, True]
    r = g.finish()
    acc, loss = r.grads, r.loss
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
        r = g.finish()
        acc, loss = r.grads, r.loss
        assert torch.equal(acc["w"], torch.full((2,), 2.0)) and loss is None and g.step == step + 1


def _prescaled(order, grads, weights, totals, contributors=(0, 1, 2, 3)):
    """Pushes of ranks ``order``: rank r pre-scaled by weights[r] / totals[r] (None: raw)."""
    g = KeyGroup(keys=("w",), contributors=contributors)
    for r in order:
        t = totals[r]
        sent = grads[r] if t is None else grads[r] * (weights[r] / t)
        g.add(r, Contribution({"w": sent}, weights[r], None, t))
    acc = g.finish().grads
    return acc["w"].clone()


def test_prescaled_pushes_give_the_average_in_any_arrival_order() -> None:
    """[Note: pre-scaled]: the same average as raw pushes (to rounding), bitwise the same in every order."""
    torch.manual_seed(1)
    grads = [torch.randn(500, dtype=torch.float64) for _ in range(4)]
    weights = [32.0, 32.0, 31.0, 5.0]
    want = sum(w * g for w, g in zip(weights, grads)) / sum(weights)
    cases = {
        "all pre-scaled": [100.0] * 4,
        "mixed with raw pushes": [100.0, None, 100.0, None],
        "raw first, pre-scaled later": [None, 100.0, 100.0, 100.0],
        "totals that do not add up": [120.0, 120.0, 120.0, 120.0],  # e.g. after a shrink
        "different totals": [100.0, 90.0, None, 100.0],
    }
    for name, totals in cases.items():
        ref = _prescaled((0, 1, 2, 3), grads, weights, totals)
        assert (ref - want).abs().max().item() <= 1e-15, name
        for order in itertools.permutations(range(4)):
            assert torch.equal(_prescaled(order, grads, weights, totals), ref), (name, order)


def test_two_prescaled_pushes_are_one_sum_and_a_lone_one_is_copied() -> None:
    a, b = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    got = _prescaled((1, 0), [a, b], [32.0, 32.0], [64.0, 64.0], contributors=(0, 1))
    assert torch.equal(got, a * 0.5 + b * 0.5)  # no rescaling pass when the weights add up to the total
    g = KeyGroup(keys=("w",), contributors=(0,))
    g.add(0, Contribution({"w": a * 0.25}, 16.0, None, 64.0))  # this rank's share only: rescaled to the mean
    acc = g.finish().grads
    assert torch.allclose(acc["w"], a, rtol=0, atol=1e-15)
    g.add(0, Contribution({"w": a}, 2.0, None))  # the next step starts raw again
    acc = g.finish().grads
    assert torch.equal(acc["w"], a)


def test_absent_keys_add_nothing_but_their_weight_counts_and_a_key_nobody_has_gets_no_gradient() -> None:
    """[Note: absent gradients]: DDP's rule (find_unused_parameters=True), in any arrival order."""
    a, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    pushes = {0: Contribution({"w": a}, 30.0, None, absent=frozenset({"u", "frozen"})),
              1: Contribution({"w": b, "u": b}, 10.0, None, absent=frozenset({"frozen"}))}
    results = []
    for order in ((0, 1), (1, 0)):
        g = KeyGroup(keys=("w", "u", "frozen"), contributors=(0, 1))
        for r in order:
            g.add(r, pushes[r])
        results.append(g.finish())
    for r in results:
        assert set(r.grads) == {"w", "u"} and r.keys == ("w", "u", "frozen")
        assert torch.allclose(r.grads["w"], (30 * a + 10 * b) / 40, rtol=0, atol=1e-15)
        assert torch.allclose(r.grads["u"], 10 * b / 40, rtol=0, atol=1e-15)  # rank 0 counts as a zero
    assert all(torch.equal(results[0].grads[k], results[1].grads[k]) for k in ("w", "u"))


def test_a_lone_first_push_without_a_key_and_prescaled_pushes_with_holes() -> None:
    a, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    g = KeyGroup(keys=("w", "u"), contributors=(0, 1))
    g.add(0, Contribution({"w": a * 0.5}, 5.0, None, 10.0, absent=frozenset({"u"})))
    g.add(1, Contribution({"u": b * 0.5}, 5.0, None, 10.0, absent=frozenset({"w"})))
    r = g.finish()
    assert torch.equal(r.grads["w"], a * 0.5) and torch.equal(r.grads["u"], b * 0.5)
    g = KeyGroup(keys=("w", "u"), contributors=(0,))
    g.add(0, Contribution({"w": a}, 1.0, None, absent=frozenset({"u"})))
    r = g.finish()
    assert set(r.grads) == {"w"} and torch.equal(r.grads["w"], a)


def test_buffer_values_are_the_lowest_ranks_and_unchanged_when_it_left_them() -> None:
    """[Note: buffer values]: rank 0's value wins whatever arrives first; rank 0 absent keeps θ's."""
    g = KeyGroup(keys=("w", "bn.running_mean"), contributors=(0, 1), values=frozenset({"bn.running_mean"}))
    g.add(1, Contribution({"w": torch.ones(2), "bn.running_mean": torch.full((2,), 7.0)}, 1.0, None))
    g.add(0, Contribution({"w": torch.ones(2), "bn.running_mean": torch.full((2,), 3.0)}, 1.0, None))
    r = g.finish()
    assert set(r.grads) == {"w"} and torch.equal(r.values["bn.running_mean"], torch.full((2,), 3.0))
    g.add(0, Contribution({"w": torch.ones(2)}, 1.0, None, absent=frozenset({"bn.running_mean"})))
    g.add(1, Contribution({"w": torch.ones(2), "bn.running_mean": torch.full((2,), 9.0)}, 1.0, None))
    assert g.finish().values == {}
