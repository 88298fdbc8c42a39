"""Pipeline jobs in real processes (a server and P x R stage workers over ZeroMQ) reproduce
plain single-process SGD on the same global batches: float64, max |Δθ| <= 1e-9.

Cases cover P in {2, 3}, M in {1, 4}, both schedules (for M = 1 GPipe and 1F1B are the same
action lists; ``test_pipeline_schedule`` asserts that) and R = 2 replicas. Batches of 60 over
246 rows leave a short last batch (and with R = 2 a last batch of 3 rows: 3 microbatches),
so boundary shapes change between batches; the three-stage model sends a tuple of two
tensors across its first boundary. Each stage's own accounting bounds the activations it
held: GPipe M microbatches, 1F1B min(P - s, M) <= P.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from tests import pipeline_jobs
from tests.pipeline_run import Job, stage_stats, start_server, start_stages
from tests.procs import Procs
from tests.reference_pipeline import replay_pipeline

TOL = 1e-9

# name: (P, M, schedule, R, model, partition, optimizer)
CASES = {
    "P2-M1-gpipe-R1": (2, 1, "gpipe", 1, "seed_pipe64", "0:1,1:2", "sgd"),
    "P2-M4-gpipe-R2": (2, 4, "gpipe", 2, "seed_pipe64", "0:1,1:2", "sgd"),
    "P2-M4-1f1b-R1": (2, 4, "1f1b", 1, "seed_pipe64", "0:1,1:2", "sgd"),
    "P3-M1-1f1b-R1": (3, 1, "1f1b", 1, "tuple_pipe64", "0:3,3:5,5:6", "sgd"),
    "P3-M4-gpipe-R1": (3, 4, "gpipe", 1, "tuple_pipe64", "0:3,3:5,5:6", "sgd"),
    "P3-M4-1f1b-R2-momentum": (3, 4, "1f1b", 2, "tuple_pipe64", "0:3,3:5,5:6", "momentum"),
}


@pytest.fixture(scope="module")
def jobs(forkserver, tmp_path_factory) -> Iterator[tuple[Procs, dict[str, Job]]]:
    """Every case's job, all started at once (they share the cores instead of queueing)."""
    procs = Procs(tmp_path_factory.mktemp("pipeline-exact"))
    try:
        started = {}
        for name, (P, M, schedule, R, model, partition, optimizer) in CASES.items():
            started[name] = start_server(forkserver, procs, name, P * R,
                                         ["--lr", "0.05", "--optimizer", optimizer])
        for name, (P, M, schedule, R, model, partition, optimizer) in CASES.items():
            start_stages(forkserver, procs, started[name], P * R, [
                "--stages", str(P), "--partition", partition, "--microbatches", str(M), "--schedule", schedule,
                "--model", f"tests.pipeline_jobs:{model}", "--data", "tests.pipeline_jobs:data246",
                "--batch-size", "60", "--epochs", "2", "--seed", "3"])
        yield procs, started
    finally:
        procs.cleanup()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_matches_single_process_sgd(jobs, name):
    P, M, schedule, R, model, partition, optimizer = CASES[name]
    procs, started = jobs
    job = started[name]
    procs.wait_ok(job.stages + [job.server], timeout=150)  # type: ignore[operator]

    got = load_file(str(job.ckpt / "final.safetensors"))
    want = replay_pipeline(getattr(pipeline_jobs, model), pipeline_jobs.data246, replicas=R, batch=60, epochs=2,
                           seed=3, optimizer=optimizer, lr=0.05)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float64
        err = (got[k] - want[k]).abs().max().item()
        assert err <= TOL, f"{name}: {k}: max |Δθ| = {err:.3g} > {TOL}"
    # The job must actually have trained: θ moved away from its initial value.
    torch.manual_seed(3)
    init = dict(getattr(pipeline_jobs, model)().named_parameters())
    assert any((got[k] - init[k]).abs().max() > 1e-3 for k in want)

    for k, child in enumerate(job.stages):
        stats = stage_stats(child.output(tail=100_000))
        s = k % P
        assert stats["stage"] == s and stats["replica"] == k // P
        assert stats["steps"] == 10
        if schedule == "gpipe":
            assert stats["peak_held"] == M, stats
        else:
            assert stats["peak_held"] == min(P - s, M) <= P, stats
