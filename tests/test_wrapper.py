"""DistributedOptimizer in a plain loop (examples/custom_loop.py) gives the runtime's θ."""

from __future__ import annotations

import sys

import torch

from tests import reference
from tests.consistency_jobs import final_theta, linear64, teacher64
from tests.procs import ROOT

JOB = ["--model", "tests.consistency_jobs:linear64", "--data", "tests.consistency_jobs:teacher64",
       "--loss", "mse", "--epochs", "2", "--batch-size", "80"]


def test_the_wrapped_custom_loop_gives_the_same_theta_as_the_runtime(procs, tmp_path):
    runtime_ckpt, loop_ckpt = tmp_path / "runtime", tmp_path / "loop"
    s1, ep1 = procs.server(2, "--lr", "0.05", ckpt=runtime_ckpt)
    s2, ep2 = procs.server(2, "--lr", "0.05", ckpt=loop_ckpt)
    runtime = [procs.worker(ep1, k, 2, *JOB, "--progress", "off") for k in range(2)]
    loop = [procs.spawn(f"loop {k}", [sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--server", ep2,
                                      "--rank", str(k), "--world-size", "2", *JOB]) for k in range(2)]
    procs.wait_ok([*runtime, *loop, s1, s2], timeout=110)
    want = reference.replay(linear64, teacher64, world=2, batch=80, epochs=2, lr=0.05)
    a, b = final_theta(runtime_ckpt), final_theta(loop_ckpt)
    for k, v in want.items():
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-9)
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-9)
    assert not torch.equal(a["weight"], linear64().double().weight.detach())  # θ really moved
