"""The outer optimizers of diloco ([Note: delayed Nesterov] in ``ps.outer``)."""

from __future__ import annotations

import copy

import pytest
import torch

from ps.outer import DelayedNesterov, nesterov


def _step(opt: torch.optim.Optimizer, p: torch.nn.Parameter, g: torch.Tensor, scale: float = 1.0) -> None:
    p.grad = g.clone()
    for group in opt.param_groups:
        group["lr_saved"], group["lr"] = group["lr"], group["lr"] * scale
    opt.step()
    for group in opt.param_groups:
        group["lr"] = group.pop("lr_saved")
    p.grad = None


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_arrivals_from_one_theta_are_one_synchronous_nesterov_step(k: int) -> None:
    torch.manual_seed(0)
    theta0 = torch.randn(7, dtype=torch.float64)
    sync = torch.nn.Parameter(theta0.clone())
    dn = torch.nn.Parameter(theta0.clone())
    outer = nesterov([sync], lr=0.7, momentum=0.9)
    delayed = DelayedNesterov([dn], lr=0.7, momentum=0.9, period=k)
    for _ in range(5):  # rounds
        deltas = [torch.randn(7, dtype=torch.float64) for _ in range(k)]
        _step(outer, sync, sum(deltas[1:], deltas[0]) / k)
        for d in deltas:  # on arrival: lr / K each (the on-arrival rules' scale)
            _step(delayed, dn, d, scale=1.0 / k)
        assert torch.allclose(sync.detach(), dn.detach(), rtol=0, atol=1e-12)


def test_the_counter_and_buffers_are_optimizer_state_and_survive_a_state_dict_round_trip() -> None:
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = DelayedNesterov([p], lr=0.5, momentum=0.9, period=3)
    _step(opt, p, torch.ones(3, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    again = DelayedNesterov([q], lr=0.5, momentum=0.9, period=3)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint file
    for o, t in ((opt, p), (again, q)):
        _step(o, t, torch.ones(3, dtype=torch.float64))
        _step(o, t, torch.ones(3, dtype=torch.float64))  # the third arrival: the momentum moves
    assert torch.equal(p.detach(), q.detach())
    assert int(again.state[q]["count"]) == 3 and again.state[q]["acc"].abs().sum() == 0


def test_a_period_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="period"):
        DelayedNesterov([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, period=0)
