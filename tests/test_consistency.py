"""Consistency models with real processes: SSP's bound, async and SSP convergence, exactness.

Every assertion about waiting is made from the server's own record (its JSONL metrics log:
one ``push`` line per applied gradient, with the lead over the slowest other live worker).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests import reference
from tests.consistency_jobs import final_theta, full_loss, initial_theta, linear64, teacher64

pytestmark = pytest.mark.timeout(300)  # real processes on a shared, loaded machine

JOB = ["--model", "tests.consistency_jobs:linear64", "--data", "tests.consistency_jobs:teacher64",
       "--progress", "off"]


def pushes(log: Path) -> list[dict]:
    """The server's ``push`` records."""
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["ev"] == "push"]


def run_job(procs, tmp: Path, world: int, sync: list[str], worker_args: dict[int, list[str]] | None = None,
            job: list[str] | None = None) -> tuple[Path, Path]:
    """Run one job to the end; return (checkpoint dir, metrics log)."""
    ckpt, log = tmp / "ckpt", tmp / "metrics.jsonl"
    server, ep = procs.server(world, "--lr", "0.05", "--metrics-log", str(log), *sync, ckpt=ckpt)
    workers = [procs.worker(ep, k, world, *(job or JOB), *(worker_args or {}).get(k, []))
               for k in range(world)]
    procs.wait_ok([*workers, server], timeout=240)
    return ckpt, log


def test_ssp_with_zero_staleness_reproduces_the_bsp_math(procs, tmp_path):
    """S = 0: every worker computes step c from θ after all of step c-1; applied one push at a
    time with lr/K, plain SGD gives exactly the averaged step (float64, 1e-9)."""
    job = [*JOB, "--epochs", "2", "--batch-size", "80"]
    ckpt, log = run_job(procs, tmp_path, 2, ["--sync", "ssp", "--staleness", "0"], job=job)
    want = reference.replay(linear64, teacher64, world=2, batch=80, epochs=2, lr=0.05)
    got = final_theta(ckpt)
    recs = pushes(log)
    # the server's record first: if θ is off, it says which push was applied out of turn
    trail = "\n".join(json.dumps(r) for r in recs)
    assert len(recs) == 2 * 2 * 10 and max(r["lead"] for r in recs) == 0, trail
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-9, msg=lambda m: f"{m}\n{trail}")


def test_ssp_never_runs_more_than_s_ahead_of_a_slow_worker(procs, tmp_path):
    """K = 3, S = 2, rank 2 stalls 40 ms before every step: the fast ranks run ahead, by S at
    most, and the job still converges."""
    s = 2
    job = [*JOB, "--epochs", "3", "--batch-size", "120"]
    ckpt, log = run_job(procs, tmp_path, 3, ["--sync", "ssp", "--staleness", str(s)],
                        {2: ["--stall", "1:0.04"]}, job=job)
    recs = pushes(log)
    steps = 3 * 7  # ⌈(800/3) / 40⌉ = 7 steps per epoch
    assert sorted((r["rank"], r["step"]) for r in recs) == [(k, t) for k in range(3) for t in range(steps)]
    leads = [r["lead"] for r in recs]
    assert max(leads) == s, f"lead must reach S = {s} (fast workers ahead) and never pass it: {leads}"
    assert max(r["staleness"] for r in recs) > 0
    start, end = full_loss(initial_theta()), full_loss(final_theta(ckpt))
    assert end < 0.1 * start, (start, end)


def test_async_never_waits_and_converges_like_bsp(procs, tmp_path):
    """Async with a slow rank: the fast rank finishes far ahead (it never waits), staleness is
    recorded, and the final loss is close to the BSP reference's."""
    job = [*JOB, "--epochs", "3", "--batch-size", "80"]
    ckpt, log = run_job(procs, tmp_path, 2, ["--sync", "async"], {1: ["--stall", "1:0.04"]}, job=job)
    recs = pushes(log)
    assert len(recs) == 2 * 3 * 10
    assert max(r["lead"] for r in recs) >= 10, "the fast worker should run far ahead of the slow one"
    assert any(r["staleness"] > 0 for r in recs)
    bsp = full_loss(reference.replay(linear64, teacher64, world=2, batch=80, epochs=3, lr=0.05))
    start, end = full_loss(initial_theta()), full_loss(final_theta(ckpt))
    assert end < 0.1 * start and abs(end - bsp) < 0.25 * (start - bsp), (start, bsp, end)


def test_an_out_of_order_async_push_is_refused_and_changes_nothing(procs, tmp_path):
    """A live async server answers a push ahead of the worker's clock with BAD_STEP, acknowledges
    a replay without applying it, and goes on serving."""
    from common.errors import ErrorCode, RemoteError
    from worker.client import PSClient

    server, ep = procs.server(1, "--sync", "async", "--lr", "0.5")
    g = {"w": torch.ones(2, dtype=torch.float64)}
    with PSClient(ep, 0, 1, timeout=30) as c:
        theta = c.init({"w": torch.zeros(2, dtype=torch.float64)})
        with pytest.raises(RemoteError) as e:
            c.push(g, step=3)
        assert e.value.code is ErrorCode.BAD_STEP and "clock is 0" in str(e.value)
        assert torch.equal(c.pull(step=0)["w"], theta["w"])  # nothing applied
        assert c.push(g, step=0) is True
        assert c.push(g, step=0) is False  # a replay: acknowledged, not applied
        torch.testing.assert_close(c.pull(step=1)["w"], torch.full((2,), -0.5, dtype=torch.float64))
        c.done()
    procs.wait_ok([server], timeout=60)


@pytest.mark.parametrize("sync", ["async", "ssp"])
def test_on_arrival_workers_start_from_one_theta_whatever_the_order_of_their_inits(procs, sync):
    """[Note: one start] Rank 1 has registered but sends its INIT a second after rank 0: rank 0
    must not get θ (and push step 0) before rank 1 can read θ_0 too."""
    import threading

    from worker.client import PSClient

    server, ep = procs.server(2, "--sync", sync, "--staleness", "0", "--lr", "0.5")
    zeros = {"w": torch.zeros(2, dtype=torch.float64)}
    early, late = PSClient(ep, 0, 2, timeout=30), PSClient(ep, 1, 2, timeout=30)
    got: dict[str, torch.Tensor] = {}

    def rank0() -> None:
        got.update(early.init(dict(zeros)))
        early.push({"w": torch.ones(2, dtype=torch.float64)}, step=0)

    try:
        late.register(dict(zeros))
        t = threading.Thread(target=rank0)
        t.start()
        time.sleep(1.0)  # time for rank 0 to read θ and push step 0, were its INIT answered alone
        theta = late.init(dict(zeros))
        t.join(30)
        assert torch.equal(theta["w"], zeros["w"]) and torch.equal(got["w"], zeros["w"]), (theta, got)
    finally:
        early.close()
        late.close()
