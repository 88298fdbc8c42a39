"""BatchNorm in a pipeline ([Note: BatchNorm in a pipeline] in ``worker/pipeline/runtime.py``):
with M > 1 microbatches a stage normalises each microbatch by its own statistics, so the job
equals single-process training that runs the microbatches one by one; with M = 1 it equals the
whole batch at once. Running statistics are replica 0's. Real processes, float64, ≤ 1e-9.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests import models
from tests.pipeline_run import start_server, start_stages
from tests.procs import Procs
from tests.reference_pipeline import replay_pipeline

TOL = 1e-9
CASES = {"M2-R1": (2, 1), "M1-R1": (1, 1), "M2-R2": (2, 2)}


@pytest.mark.timeout(240)
def test_batchnorm_stages_follow_the_microbatch_rule(forkserver, tmp_path):
    procs = Procs(tmp_path)
    try:
        jobs = {name: start_server(forkserver, procs, name, 2 * R, ["--lr", "0.05", "--optimizer", "momentum"])
                for name, (M, R) in CASES.items()}
        for name, (M, R) in CASES.items():
            start_stages(forkserver, procs, jobs[name], 2 * R, [
                "--stages", "2", "--partition", "0:2,2:4", "--microbatches", str(M), "--schedule", "1f1b",
                "--model", "tests.models:bn_pipe", "--data", "tests.models:pipe_data", "--batch-size", "60",
                "--epochs", "2"])
        for name, (M, R) in CASES.items():
            job = jobs[name]
            procs.wait_ok(job.stages + [job.server], timeout=180)  # type: ignore[operator]
            got = load_file(str(job.ckpt / "final.safetensors"))
            want = replay_pipeline(models.bn_pipe, models.pipe_data, replicas=R, batch=60, epochs=2,
                                   optimizer="momentum", lr=0.05, microbatches=M)
            assert set(got) == set(want), name
            for k in want:
                err = (got[k].double() - want[k].double()).abs().max().item()
                assert err <= TOL, f"{name}: {k}: max |Δ| = {err:.3g}"
            assert int(got["1.num_batches_tracked"]) == 8 * M  # M updates per step, replica 0's
            if M > 1:  # the rule is not a no-op: the whole batch at once gives another θ
                whole = replay_pipeline(models.bn_pipe, models.pipe_data, replicas=R, batch=60, epochs=2,
                                        optimizer="momentum", lr=0.05)
                assert max((whole[k].double() - got[k].double()).abs().max().item() for k in want) > 1e-6
            elif R == 1:
                whole = replay_pipeline(models.bn_pipe, models.pipe_data, batch=60, epochs=2, optimizer="momentum",
                                        lr=0.05)
                assert all(torch.allclose(whole[k].double(), got[k].double(), rtol=0, atol=TOL) for k in want)
    finally:
        procs.cleanup()
