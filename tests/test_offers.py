"""ps/offers.py: the server keeps one offered tensor per key at INIT, the lowest rank's."""

from __future__ import annotations

import itertools
import time

import torch

from ps.offers import Offers
from tests.clients import run_ranks
from worker.client import PSClient


def _offer(rank: int, keys=("a", "b")) -> dict[str, torch.Tensor]:
    return {k: torch.full((3,), float(rank)) for k in keys}


def test_lowest_rank_wins_in_every_arrival_order_and_one_tensor_per_key_is_held():
    owner = {"a": 0, "b": 0}
    for order in itertools.permutations(range(4)):
        o = Offers()
        for n, r in enumerate(order):
            o.add(r, _offer(r))
            assert len(o) == 2  # never K copies of θ
            assert o.complete(owner) == (0 in order[: n + 1])
        theta = o.take(["a", "b"])
        assert all(torch.equal(t, torch.zeros(3)) for t in theta.values())
        assert len(o) == 0


def test_keys_come_from_their_own_lowest_rank():
    # pipeline-like: ranks 0 and 2 hold "a", ranks 1 and 3 hold "b"
    o = Offers()
    assert o.add(3, _offer(3, ["b"])) == 1
    assert o.add(2, _offer(2, ["a"])) == 1
    assert not o.complete({"a": 0, "b": 1})
    assert o.add(1, _offer(1, ["b"])) == 1
    assert o.add(3, _offer(3, ["b"])) == 0  # a higher rank's late offer is dropped
    assert o.add(0, _offer(0, ["a"])) == 1
    assert o.complete({"a": 0, "b": 1}) and o.ranks() == [0, 1]
    theta = o.take(["a", "b"])
    assert theta["a"][0] == 0 and theta["b"][0] == 1


def test_repeated_offer_replaces_and_a_departed_lower_rank_still_counts():
    o = Offers()
    o.add(1, _offer(1))
    o.add(1, {k: t + 10 for k, t in _offer(1).items()})  # a retried INIT
    assert o.take(["a"])["a"][0] == 11
    o.add(0, _offer(0))
    o.add(1, _offer(1))
    assert o.complete({"a": 1, "b": 1})  # rank 0 offered, then left: its offer is used, no wait


def test_real_server_takes_theta_from_rank_0_whatever_order_the_offers_arrive(procs):
    """Three clients offer different θ, highest rank first; every one gets rank 0's back."""
    server, endpoint = procs.server(3)

    def client(rank: int) -> dict[str, torch.Tensor]:
        time.sleep(0.3 * (2 - rank))  # rank 2 offers first, rank 0 last
        params = {"w": torch.full((4, 3), float(rank + 1)), "b": torch.full((3,), -float(rank + 1))}
        with PSClient(endpoint, rank, 3, timeout=60) as ps:
            theta = {k: v.clone() for k, v in ps.init(params).items()}
            ps.done()
        return theta

    out = run_ranks(client, 3, timeout=120)
    assert server.wait(60) == 0, server.output()
    for r in range(3):
        assert torch.equal(out[r]["w"], torch.full((4, 3), 1.0))
        assert torch.equal(out[r]["b"], torch.full((3,), -1.0))
    assert "θ initialized from rank(s) [0]" in server.output()
