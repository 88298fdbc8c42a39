"""A failing disk loses nothing and is never reported as success ([Note: the final write]).

The checkpoint directory is a real tmpfs of a few hundred KiB that the test fills up (or mounts
read-only): the server must refuse to start on a directory it cannot write, keep θ in memory
and retry when the final files cannot be written (so freeing the disk completes the job with
the exact θ), fail the job with WRITE_FAILED - every process exiting non-zero, naming the file
and the error - when the disk stays full, never leave ``.tmp`` files, and log a failing
periodic checkpoint once a minute rather than once a step. Needs root (mount); skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.faultjob import SERVER, assert_final, error_lines, expected, fork_server, fork_worker, wait_log

pytestmark = pytest.mark.timeout(180)


def _mount(path: Path, *opts: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=512k", *opts)), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs for checkpoints; unmounted afterwards."""
    d = tmp_path / "ckpt"
    _mount(d)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(d: Path) -> Path:
    """Fill ``d`` to the last byte; return the filler file."""
    filler = d / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


def _no_temporaries(d: Path) -> None:
    left = [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
    assert not left, f"temporary files left behind: {left}"


def test_a_read_only_checkpoint_directory_stops_the_server_at_start(forkserver, procs, tmp_path):
    d = tmp_path / "ro"
    _mount(d, "ro")
    try:
        n = len(procs.children) + 1
        child = forkserver.spawn("server", "ps", ["--bind", "tcp://127.0.0.1:0", "--workers", "2",
                                                  "--checkpoint-dir", str(d)], procs.tmp / f"{n:02d}-server.log")
        procs.children.append(child)
        assert child.wait(60) == 2, child.output()
        assert f"--checkpoint-dir {d} is not writable: Read-only file system" in child.output()
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_disk_at_the_end_keeps_theta_and_the_job_completes_once_space_is_freed(forkserver, procs, disk):
    server, ep = fork_server(forkserver, procs, *SERVER)
    workers = [fork_worker(forkserver, procs, ep, r, "--stall", "1:0.1") for r in range(2)]
    wait_log(server, r"checkpoint .*ckpt-000000000\.safetensors", timeout=60)
    filler = _fill(disk)
    wait_log(server, r"cannot write the final checkpoint and final\.safetensors .*No space left on device"
                     r".*θ of step 20 is kept in memory", timeout=90)
    assert all(w.poll() is None for w in workers)  # they wait for the files DONE promises
    _no_temporaries(disk)
    filler.unlink()
    procs.wait_ok([*workers, server], timeout=90)
    assert_final(disk, expected())
    assert "the final files were written after" in server.output(tail=10**6)
    _no_temporaries(disk)


def test_a_disk_that_stays_full_fails_the_job_and_a_restart_after_the_fix_finishes_exactly(forkserver, procs, disk):
    """The disk fills from a periodic checkpoint on and is not freed: the job fails, every process
    exiting non-zero and naming the error and the newest good checkpoint. Started again once the
    disk is fixed (as systemd's Restart=on-failure would), it resumes there and ends exactly."""
    args = (*SERVER, "--rejoin-deadline", "4", "--checkpoint-every", "5")
    server, ep = fork_server(forkserver, procs, *args)
    workers = [fork_worker(forkserver, procs, ep, r, "--stall", "1:0.1") for r in range(2)]
    wait_log(server, r"checkpoint .*ckpt-000000005\.safetensors", timeout=60)
    filler = _fill(disk)
    assert server.wait(90) == 1, server.output()
    log = server.output(tail=10**6)
    assert "job failed at step 20: cannot write the final checkpoint" in log
    assert "the newest good checkpoint is" in log and "ckpt-0000000" in log
    for w in workers:
        assert w.wait(60) != 0, w.output()
        assert "WRITE_FAILED" in w.output(tail=10**6) and "No space left on device" in w.output(tail=10**6)
    assert not (disk / "final.safetensors").exists()
    _no_temporaries(disk)
    filler.unlink()
    server, ep = fork_server(forkserver, procs, *args, bind=ep)
    workers = [fork_worker(forkserver, procs, ep, r) for r in range(2)]
    procs.wait_ok([*workers, server], timeout=120)
    assert "resumed from" in server.output(tail=10**6)
    assert_final(disk, expected())


def test_failing_periodic_checkpoints_are_logged_once_a_minute_and_training_goes_on(forkserver, procs, disk):
    server, ep = fork_server(forkserver, procs, *SERVER, "--checkpoint-every", "1")
    workers = [fork_worker(forkserver, procs, ep, r, "--stall", "1:0.05") for r in range(2)]
    wait_log(server, r"checkpoint .*ckpt-000000000\.safetensors", timeout=60)
    filler = _fill(disk)
    wait_log(server, r"checkpoint of step \d+ failed", timeout=60)
    wait_log(server, r"cannot write the final checkpoint", timeout=90)  # all 20 steps ran meanwhile
    lines = [line for line in error_lines(server) if "checkpoint of step" in line]
    assert len(lines) == 1, lines
    os.unlink(filler)
    procs.wait_ok([*workers, server], timeout=90)
    assert_final(disk, expected())
    _no_temporaries(disk)
