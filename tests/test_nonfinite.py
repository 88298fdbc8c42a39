"""``--nonfinite``: a gradient with NaN or infinity is refused (fail), left out (skip) or applied.

Real server processes and PSClients; θ is float64 and compared with the plain SGD step on the
gradients that should count (tolerance 1e-12).
"""

from __future__ import annotations

import pytest
import torch

from common.config import ServerConfig, parse_config
from common.errors import ConfigError, ErrorCode, RemoteError
from ps.finite import nonfinite_keys
from tests.clients import run_ranks
from tests.procs import Procs
from worker.client import PSClient

LR = 0.5
THETA = {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3), "b": torch.tensor([0.5], dtype=torch.float64)}
NAN = float("nan")


def _grads(v: float, bad: float | None = None) -> dict[str, torch.Tensor]:
    g = {"w": torch.full((2, 3), v, dtype=torch.float64), "b": torch.tensor([v], dtype=torch.float64)}
    if bad is not None:
        g["w"][1, 2] = bad
    return g


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all((a[k] - b[k]).abs().max().item() <= 1e-12 for k in b)


def test_fail_refuses_the_push_naming_rank_and_step_and_changes_nothing(procs: Procs) -> None:
    server, ep = procs.server(1, "--nonfinite", "fail", "--lr", str(LR))
    with PSClient(ep, 0, 1, timeout=30) as ps:
        ps.init({k: v.clone() for k, v in THETA.items()})
        for bad in (NAN, float("inf"), float("-inf")):
            with pytest.raises(RemoteError) as e:
                ps.push(_grads(1.0, bad), 0, samples=4)
            assert e.value.code == ErrorCode.NONFINITE
            assert "rank 0" in str(e.value) and "step 0" in str(e.value) and "'w'" in str(e.value)
        assert ps.push(_grads(1.0), 0, samples=4) is True  # the step is still open: a good push counts
        theta = ps.pull()
        ps.done()
    assert _close(theta, {k: v - LR * _grads(1.0)[k] for k, v in THETA.items()})
    assert server.wait(30) == 0, server.output()


def test_skip_averages_over_the_other_workers_samples(procs: Procs) -> None:
    server, ep = procs.server(3, "--nonfinite", "skip", "--lr", str(LR))
    pushed = {0: (_grads(1.0, NAN), 10.0), 1: (_grads(2.0), 1.0), 2: (_grads(5.0), 3.0)}

    def client(rank: int) -> dict[str, torch.Tensor]:
        with PSClient(ep, rank, 3, timeout=30) as ps:
            ps.init({k: v.clone() for k, v in THETA.items()})
            g, n = pushed[rank]
            theta = ps.push_pull(g, 0, samples=n)
            ps.done()
        return theta

    out = run_ranks(client, 3, timeout=90)
    assert server.wait(30) == 0, server.output()
    mean = {k: (1.0 * pushed[1][0][k] + 3.0 * pushed[2][0][k]) / 4.0 for k in THETA}  # rank 0 left out
    want = {k: v - LR * mean[k] for k, v in THETA.items()}
    for r in range(3):
        assert _close(out[r], want), (r, out[r], want)
    assert "rank 0 pushed a gradient with NaN or infinity for step 0" in server.output()


def test_apply_is_torchs_behaviour(procs: Procs) -> None:
    server, ep = procs.server(1, "--lr", str(LR))  # the default
    with PSClient(ep, 0, 1, timeout=30) as ps:
        ps.init({k: v.clone() for k, v in THETA.items()})
        theta = ps.push_pull(_grads(1.0, NAN), 0, samples=1)
        ps.done()
    assert torch.isnan(theta["w"][1, 2]) and not torch.isnan(theta["w"][0, 0])
    assert server.wait(30) == 0, server.output()


def test_skip_needs_bsp() -> None:
    with pytest.raises(ConfigError, match="--nonfinite skip"):
        parse_config(ServerConfig, ["--workers", "2", "--sync", "async", "--nonfinite", "skip"], prog="ps-server")
    parse_config(ServerConfig, ["--workers", "2", "--sync", "async", "--nonfinite", "fail"], prog="ps-server")


def test_nonfinite_keys_finds_nan_and_infinities_but_not_large_finite_values() -> None:
    t = {"ok": torch.ones(3), "nan": torch.tensor([1.0, NAN]), "big": torch.tensor([3e38, 3e38]),
         "inf": torch.tensor([-float("inf")]), "ints": torch.arange(3), "half": torch.tensor([6e4, 6e4]).half(),
         "empty": torch.empty(0)}
    assert nonfinite_keys(t) == ["nan", "inf"]
