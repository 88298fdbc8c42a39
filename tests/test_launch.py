"""``ps-launch`` end to end: the default job, exactness, a failing child, and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.jobs import data64, linear64
from tests.procs import Procs
from tests.reference import replay
from worker.factories import default_data, default_model

LAUNCH = [sys.executable, "-m", "worker.launch"]


def test_default_job_trains_the_seed_example(procs: Procs, tmp_path: Path) -> None:
    child = procs.spawn("launch", LAUNCH, cwd=tmp_path)
    assert child.wait(240) == 0, child.output()
    out = child.output(20000)
    for part in ("[server] listening on tcp://127.0.0.1:", "[worker 0]", "[worker 1]", "epoch 10/10",
                 "all 2 workers done after 100 steps", "job finished"):
        assert part in out, part
    finals = list(tmp_path.glob("runs/launch-*/final.safetensors"))
    assert len(finals) == 1
    got = load_file(str(finals[0]))
    want = replay(default_model, default_data, 2, batch=100, epochs=10)
    for k in want:  # float32: the reference sums in another order
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=4e-5)


def test_launch_equals_separate_processes_and_the_math(procs: Procs, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    child = procs.spawn("launch", [*LAUNCH, "--workers", "3", "--model", "tests.jobs:linear64",
                                   "--data", "tests.jobs:data64", "--epochs", "2", "--checkpoint-dir", str(ck)])
    assert child.wait(240) == 0, child.output()
    got = load_file(str(ck / "final.safetensors"))
    want = replay(linear64, data64, 3, batch=100, epochs=2)
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= 1e-9


def test_a_failing_child_stops_everything_and_fails(procs: Procs, tmp_path: Path) -> None:
    t0 = time.monotonic()
    child = procs.spawn("launch", [*LAUNCH, "--model", "no_such_module:factory", "--checkpoint-dir",
                                   str(tmp_path / "ck")])
    code = child.wait(120)
    out = child.output(20000)
    assert code != 0, out
    assert "cannot import 'no_such_module'" in out
    assert "stopping the others" in out
    assert time.monotonic() - t0 < 100
    _assert_group_gone(child.pid)


def test_ctrl_c_stops_every_child(procs: Procs, tmp_path: Path) -> None:
    child = procs.spawn("launch", [*LAUNCH, "--epochs", "100000", "--checkpoint-dir", str(tmp_path / "ck")])
    deadline = time.monotonic() + 120
    while "epoch 1/100000" not in child.output(20000):
        assert time.monotonic() < deadline and child.proc.poll() is None, child.output()
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGINT)
    assert child.wait(60) == 130, child.output()
    _assert_group_gone(child.pid)


def _assert_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        left = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"processes left running: {left}"
