"""DistributedOptimizer in a plain loop (examples/custom_loop.py) gives the runtime's θ."""

from __future__ import annotations

import pytest
import sys

import torch

from tests import reference
from tests.consistency_jobs import final_theta, linear64, teacher64
from tests.procs import ROOT

pytestmark = pytest.mark.timeout(300)  # real processes on a shared, loaded machine

JOB = ["--model", "tests.consistency_jobs:linear64", "--data", "tests.consistency_jobs:teacher64",
       "--loss", "mse", "--epochs", "2", "--batch-size", "80"]


def test_the_wrapped_custom_loop_gives_the_same_theta_as_the_runtime(procs, tmp_path):
    runtime_ckpt, loop_ckpt = tmp_path / "runtime", tmp_path / "loop"
    s1, ep1 = procs.server(2, "--lr", "0.05", ckpt=runtime_ckpt)
    s2, ep2 = procs.server(2, "--lr", "0.05", ckpt=loop_ckpt)
    runtime = [procs.worker(ep1, k, 2, *JOB, "--progress", "off") for k in range(2)]
    loop = [procs.spawn(f"loop {k}", [sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--server", ep2,
                                      "--rank", str(k), "--world-size", "2", *JOB]) for k in range(2)]
    procs.wait_ok([*runtime, *loop, s1, s2], timeout=240)
    want = reference.replay(linear64, teacher64, world=2, batch=80, epochs=2, lr=0.05)
    a, b = final_theta(runtime_ckpt), final_theta(loop_ckpt)
    for k, v in want.items():
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-9)
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-9)
    assert not torch.equal(a["weight"], linear64().double().weight.detach())  # θ really moved


CURVE_LOOP = """
import torch, torch.nn.functional as F
from worker import DistributedOptimizer

torch.manual_seed(0)
model = torch.nn.Linear(4, 1).double()
x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model)  # everything from PS_*
for _ in range(5):
    opt.zero_grad(); F.mse_loss(model(x), y).backward(); opt.step()
opt.finish()
"""


def test_the_wrapper_trains_against_a_curve_server_with_only_the_environment(procs, tmp_path):
    """``PS_CURVE_*`` reach the wrapper's client: with only ``PS_SERVER``, ``PS_WORLD_SIZE`` and the
    CURVE keys set, ``DistributedOptimizer(opt, model)`` trains against a CURVE server, exactly."""
    from common.security import keygen, split_endpoint
    from safetensors.torch import load_file

    keys = tmp_path / "keys"
    server_pub, server_sec = keygen(keys, "server")
    _, worker_sec = keygen(keys, "worker")
    server, ep = procs.server(1, "--lr", "0.05", "--curve-secret-key", str(server_sec),
                              "--curve-authorized-keys", str(keys))
    plain, _ = split_endpoint(ep)  # the server's key comes from PS_CURVE_SERVER_KEY, not the endpoint
    script = tmp_path / "loop.py"
    script.write_text(CURVE_LOOP)
    env = {"PS_SERVER": plain, "PS_WORLD_SIZE": "1", "PS_CURVE_SERVER_KEY": str(server_pub),
           "PS_CURVE_SECRET_KEY": str(worker_sec)}
    loop = procs.spawn("curve loop", [sys.executable, str(script)], env=env)
    procs.wait_ok([loop, server], timeout=150)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    final = load_file(str(tmp_path / "ckpt" / "final.safetensors"))
    for name, p in model.state_dict().items():
        torch.testing.assert_close(final[name], p, rtol=0, atol=1e-12)
    assert "refused" not in server.output(tail=10**6)
