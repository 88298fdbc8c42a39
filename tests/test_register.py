"""Registration as confused or careless peers meet it: a real server process, raw requests."""

from __future__ import annotations

import re
import time

import pytest
import torch
import zmq

from common.errors import ErrorCode, RemoteError
from common.protocol import Op
from common.transport import Requester
from tests.clients import run_ranks
from worker.client import PSClient

SPECS = [["w", "float64", [3]], ["b", "float64", [1]]]


@pytest.mark.timeout(120)
def test_data_workers_with_other_parameter_names_are_refused_naming_the_difference(procs) -> None:
    """An nn.Sequential beside a named module, or a model without a bias, would train apart."""
    _server, ep = procs.server(2)
    ctx = zmq.Context()
    a, b = Requester(ctx, ep, who="a"), Requester(ctx, ep, who="b")
    try:
        a.request(Op.REGISTER, {"rank": 0, "world_size": 2, "params": SPECS}, timeout_s=30)
        other = [["0.weight", "float64", [3]], ["b", "float64", [1]]]
        with pytest.raises(RemoteError) as e:
            b.request(Op.REGISTER, {"rank": 1, "world_size": 2, "params": other}, timeout_s=30)
        assert e.value.code == ErrorCode.SCHEMA_MISMATCH
        assert "'0.weight'" in str(e.value) and "'w'" in str(e.value) and "rank 1" in str(e.value)
        with pytest.raises(RemoteError):  # a subset is refused too
            b.request(Op.REGISTER, {"rank": 1, "world_size": 2, "params": SPECS[:1]}, timeout_s=30)
        b.request(Op.REGISTER, {"rank": 1, "world_size": 2, "params": SPECS}, timeout_s=30)  # the same keys: fine
        stages = {"role": "stage", "world_size": 2}
        with pytest.raises(RemoteError):  # a key registered as a buffer by one and a parameter by another
            Requester(ctx, ep).request(Op.REGISTER, {**stages, "rank": 1, "params": SPECS, "buffers": ["b"]},
                                       timeout_s=30)
    finally:
        ctx.destroy(0)


@pytest.mark.timeout(120)
def test_a_bogus_registration_does_not_brick_the_rank(procs) -> None:
    """Before θ exists, a REGISTER naming rank 0 with made-up parameters (a wrong --model, or a
    stranger) holds rank 0 only for its lease; the real rank 0 then takes over with its own keys
    and the job trains."""
    _server, ep = procs.server(2, "--lease", "0.5", "--lr", "0.1")
    ctx = zmq.Context()
    stranger = Requester(ctx, ep, who="stranger")
    stranger.request(Op.REGISTER, {"rank": 0, "world_size": 2, "params": [["made.up", "float32", [7]]]},
                     timeout_s=30)
    stranger.close()
    time.sleep(1.0)  # its lease (0.5 s) lapses: while it runs, the stranger is the reference

    def train(rank: int) -> torch.Tensor:
        model = torch.nn.Linear(3, 1).double()
        with PSClient(ep, rank=rank, world_size=2, timeout=30, heartbeat=0.1) as ps:
            theta = ps.init(model)
            for step in range(ps.step, 3):
                model.load_state_dict(theta)
                model.zero_grad()
                model(torch.ones(4, 3, dtype=torch.float64)).sum().backward()
                theta = ps.push_pull(model, step)
            ps.done()
        return theta["weight"]

    t0 = time.monotonic()
    out = run_ranks(train, 2, timeout=90)
    assert torch.equal(out[0], out[1])
    assert time.monotonic() - t0 < 60
    ctx.destroy(0)


@pytest.mark.timeout(120)
def test_workers_planning_different_epochs_are_refused_at_once_naming_both(procs) -> None:
    """Workers with different --epochs used to hang for the rejoin deadline plus their timeout
    (360 s by default) and then blame the rank that was still training."""
    server, ep = procs.server(2)
    job = ("--model", "tests.jobs:linear64", "--data", "tests.jobs:data64", "--progress", "off")
    w0 = procs.worker(ep, 0, 2, *job, "--epochs", "2")
    w1 = procs.worker(ep, 1, 2, *job, "--epochs", "3")
    deadline = time.monotonic() + 60  # the one that registers second is refused at once
    while w0.proc.poll() is None and w1.proc.poll() is None:
        assert time.monotonic() < deadline, (w0.output(), w1.output())
        time.sleep(0.1)
    refused = w0 if w0.proc.poll() is not None else w1
    assert refused.proc.returncode == 1, refused.output()
    out = refused.output()
    assert re.search(r"rank \d plans (20|30) steps but rank \d plans (20|30)", out), out
    assert "give every worker the same --epochs" in out


@pytest.mark.timeout(120)
def test_an_init_must_match_its_registration_and_absurd_sample_counts_are_refused(procs) -> None:
    """Before θ exists an INIT's shapes were not checked against its REGISTER (θ could take a
    wrong shape and the honest rank was refused); ``samples=1e308`` overflowed the sum into NaN."""
    _server, ep = procs.server(1, "--nonfinite", "fail")
    ctx = zmq.Context()
    try:
        req = Requester(ctx, ep, who="w")
        req.request(Op.REGISTER, {"rank": 0, "world_size": 1, "params": SPECS}, timeout_s=30)
        wrong = {"w": torch.zeros(4, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
        with pytest.raises(RemoteError) as e:
            req.request(Op.INIT, {"rank": 0}, wrong, timeout_s=30)
        assert e.value.code == ErrorCode.SCHEMA_MISMATCH and "it was registered as float64[3]" in str(e.value)
        good = {"w": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
        req.request(Op.INIT, {"rank": 0}, good, timeout_s=30)
        grads = {"w": torch.ones(3, dtype=torch.float64), "b": torch.ones(1, dtype=torch.float64)}
        for samples in (1e308, 2.0**31 + 1):
            with pytest.raises(RemoteError) as e:
                req.request(Op.PUSH, {"rank": 0, "step": 0, "samples": samples}, grads, timeout_s=30)
            assert e.value.code == ErrorCode.BAD_MESSAGE and "samples must be a count" in str(e.value)
        req.request(Op.PUSH, {"rank": 0, "step": 0, "samples": 7.0}, grads, timeout_s=30)
        theta = req.request(Op.PULL, {"rank": 0, "step": 1}, timeout_s=30).tensors
        assert torch.isfinite(theta["w"]).all()
    finally:
        ctx.destroy(0)
