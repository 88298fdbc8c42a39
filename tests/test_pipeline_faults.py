"""Faults in real stage processes surface as typed errors on their neighbours, never as hangs.

The faults are objects in the model (``tests.pipeline_jobs``): a layer that SIGKILLs its own
stage on its n-th forward, and a layer that sends a wrong shape on its n-th forward.
"""

from __future__ import annotations

import time

import pytest

from tests.pipeline_run import start_server, start_stages
from tests.procs import Procs

JOB = ["--stages", "2", "--microbatches", "4", "--schedule", "1f1b", "--data", "tests.pipeline_jobs:data246",
       "--batch-size", "60", "--epochs", "1"]


def _exit_time(child, timeout: float) -> tuple[int, float]:
    code = child.wait(timeout)
    return code, time.monotonic()


@pytest.mark.timeout(120)
def test_a_stage_killed_mid_batch_is_a_timeout_naming_it_on_its_neighbour(forkserver, procs: Procs):
    job = start_server(forkserver, procs, "kill", 2)
    s0, s1 = start_stages(forkserver, procs, job, 2, [*JOB, "--model", "tests.pipeline_jobs:kill_pipe64",
                                                      "--partition", "0:1,1:3"], timeout=4)
    code1, died = _exit_time(s1, 90)
    assert code1 == -9, s1.output()  # killed by its own KillAt layer in 1F2
    code0, failed = _exit_time(s0, 60)
    assert code0 == 1, s0.output()
    assert failed - died < 4 + 15, "the neighbour took far longer than its timeout to fail"
    out = s0.output()
    assert ("StageTimeoutError: stage 0 (rank 0), step 0, microbatch 2, action 0B2: "
            "no δ from stage 1 (rank 1, tcp://127.0.0.1:") in out, out
    assert "within 4s" in out


@pytest.mark.timeout(120)
def test_a_wrong_shape_is_a_clear_error_on_the_receiver_and_stops_the_sender_at_once(forkserver, procs: Procs):
    job = start_server(forkserver, procs, "narrow", 2)
    s0, s1 = start_stages(forkserver, procs, job, 2, [*JOB, "--model", "tests.pipeline_jobs:narrow_pipe64",
                                                      "--partition", "0:2,2:3"], timeout=60)
    code1, t1 = _exit_time(s1, 90)
    assert code1 == 1, s1.output()
    out1 = s1.output()
    assert ("StageError: stage 1 (rank 1), step 0, microbatch 2, action 1F2: forward failed on the input "
            "from stage 0 ('0': float64[15, 4])") in out1, out1
    code0, t0 = _exit_time(s0, 60)
    assert code0 == 1, s0.output()
    assert t0 - t1 < 30, "stage 0 waited out its timeout instead of stopping on the abort"
    out0 = s0.output()
    assert ("StageError: stage 0 (rank 0), step 0, microbatch 2, action 0B2: stage 1 (rank 1) failed at step 0 "
            "action 1F2: StageError:") in out0, out0
