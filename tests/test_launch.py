"""``ps-launch`` end to end: the default job, exactness, a failing child, and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.jobs import data64, linear64
from tests.procs import Procs, child_env
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


def _ignore_sigint() -> None:  # pragma: no cover - runs in the child before exec
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_every_child_even_when_started_in_the_background(procs: Procs, tmp_path: Path,
                                                                                  sig: int, code: int) -> None:
    """The launcher is started with SIGINT ignored, as a shell starts ``cmd &`` or ``nohup``: it
    must still stop on Ctrl-C, and on SIGTERM, whatever the test runner's own dispositions."""
    argv = [*LAUNCH, "--epochs", "100000", "--checkpoint-dir", str(tmp_path / "ck")]
    log = open(tmp_path / "launch.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                            env=child_env(), preexec_fn=_ignore_sigint)
    try:
        deadline = time.monotonic() + 120
        while "epoch 1/100000" not in (tmp_path / "launch.log").read_text(errors="replace"):
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "launch.log").read_text()
            time.sleep(0.2)
        os.kill(proc.pid, sig)
        assert proc.wait(60) == code, (tmp_path / "launch.log").read_text()[-4000:]
        _assert_group_gone(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _assert_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        left = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"processes left running: {left}"
