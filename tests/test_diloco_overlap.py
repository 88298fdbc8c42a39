"""``--sync diloco --outer-delay 1`` ([Note: overlapped rounds] in ``worker.overlap``): K worker
processes give the θ of the single-process math with each round started from θ_global^r − Δ^r
(float64 ≤ 1e-9), also when a worker or the server is killed with -9 and restarted."""

from __future__ import annotations

import pytest
import torch

from tests.jobs import class_data64, mlp64
from tests.models import branchy64, branchy_data
from tests.procs import Procs
from tests.reference_diloco import replay_diloco
from tests.test_diloco import INNER, MLP, _final, _run
from tests.test_exactness import assert_close

pytestmark = pytest.mark.timeout(300)

OVERLAP = ("--sync", "diloco", "--inner-steps", "4", *INNER, "--outer-delay", "1")


def _want(**kw) -> dict:
    return replay_diloco(mlp64, class_data64, 2, 4, batch=64, epochs=2, loss="cross_entropy", optimizer="adamw",
                         lr=0.01, weight_decay=0.01, delay=1, **kw)


def test_overlapped_rounds_equal_their_single_process_math_and_differ_from_plain_diloco(procs: Procs) -> None:
    got = _run(procs, 2, OVERLAP, MLP)
    assert_close(got, _want())
    for k in range(2):  # the newest two round files of 5 rounds (no server checkpoints to serve)
        assert len(list((procs.tmp / f"state{k}").glob("*.pt"))) == 2
    plain = replay_diloco(mlp64, class_data64, 2, 4, batch=64, epochs=2, loss="cross_entropy", optimizer="adamw",
                          lr=0.01, weight_decay=0.01)
    assert max((got[k] - plain[k]).abs().max().item() for k in plain) > 1e-4  # the rounds did start elsewhere


def test_overlapped_rounds_on_a_real_model_frozen_unused_layers_and_batchnorm(procs: Procs) -> None:
    args = ("--model", "tests.models:branchy64", "--data", "tests.models:branchy_data", "--loss", "cross_entropy",
            "--epochs", "1", "--batch-size", "20", "--no-shuffle")
    got = _run(procs, 2, ("--sync", "diloco", "--inner-steps", "3", "--optimizer", "momentum", "--lr", "0.05",
                          "--weight-decay", "0.01", "--outer-lr", "0.5", "--outer-delay", "1"), args)
    want = replay_diloco(branchy64, branchy_data, 2, 3, batch=20, epochs=1, shuffle=False, loss="cross_entropy",
                         optimizer="momentum", lr=0.05, weight_decay=0.01, outer_lr=0.5, delay=1)
    assert_close(got, want)
    torch.manual_seed(0)
    start = branchy64()
    assert torch.equal(got["frozen.weight"], start.frozen.weight.detach())
    assert torch.equal(got["unused.weight"], start.unused.weight.detach())


@pytest.mark.parametrize("point", ["mid-round", "before-push", "after-push"])
def test_a_worker_killed_and_restarted_resumes_its_overlapped_rounds_exactly(procs: Procs, point: str) -> None:
    """Worker 1 kills itself at ``point`` of round 3: its round files hold its inner optimizer, its
    push and where the next round starts, so the job ends at the uninterrupted θ."""
    server, ep = procs.server(2, *OVERLAP, "--lease", "1")
    state = [("--state-dir", str(procs.tmp / f"state{k}")) for k in range(2)]
    w0 = procs.worker(ep, 0, 2, *MLP, *state[0])
    w1 = procs.worker(ep, 1, 2, *MLP, *state[1], env={"PS_FAULT": f"kill:{point}:3"})
    assert w1.proc.wait(120) == -9
    again = procs.worker(ep, 1, 2, *MLP, *state[1])
    procs.wait_ok([w0, again, server], timeout=240)
    assert_close(_final(procs), _want())
    out = again.output(20000)
    assert "starts afresh" not in out
    assert "sending the change saved before the restart again" in out or "starts from this worker's round" in out


def test_the_server_killed_resumes_from_its_checkpoint_and_overlapped_workers_from_their_round_files(
        procs: Procs) -> None:
    ckpt = procs.tmp / "ckpt"
    args = (*OVERLAP, "--checkpoint-every", "2")
    server, ep = procs.server(2, *args, env={"PS_FAULT": "kill:after-apply:4"})
    state = [("--state-dir", str(procs.tmp / f"state{k}")) for k in range(2)]
    workers = [procs.worker(ep, k, 2, *MLP, *state[k]) for k in range(2)]
    assert server.proc.wait(120) == -9
    server, _ = procs.server(2, *args, ckpt=ckpt, bind=ep)
    procs.wait_ok([*workers, server], timeout=240)
    assert_close(_final(procs), _want())
    for w in workers:
        assert "starts afresh" not in w.output(20000)
