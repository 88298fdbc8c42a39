"""kill -9 at a chosen step, of a worker or of the server: the job ends with the uninterrupted θ.

Faults are injected by the test: the victim stops itself at the chosen point of the chosen step
(``PS_FAULT=stop:POINT:STEP``), the test sees it stopped and kills it with SIGKILL, then starts
it again with the same command line (the fault came from the environment, so the restart runs
without it). The processes are forked from the fork server (torch already imported), so a
restart takes milliseconds, not the seconds of an import.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
from safetensors.torch import load_file

from common.shm import _host, shm_dir
from tests.faultjob import SERVER, WORLD, assert_final, error_lines, expected, fork_server, fork_worker, wait_log, wait_stopped

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("point", ["after-push", "before-push"])
def test_worker_killed_mid_step_and_restarted(forkserver, procs, tmp_path, point):
    """The restarted worker rejoins, gets the current θ and step, and computes that step again.

    ``after-push``: worker 1 dies after its push of step 7 went out, while worker 0 holds back
    its own push of step 7, so the restarted worker's push of step 7 is a replay (acknowledged,
    not applied twice). ``before-push``: it dies with its gradient of step 7 computed, unsent.
    """
    server, ep = fork_server(forkserver, procs, *SERVER, "--log-level", "debug")
    w0 = fork_worker(forkserver, procs, ep, 0, env={"PS_FAULT": "stop:before-push:7"} if point == "after-push" else None)
    w1 = fork_worker(forkserver, procs, ep, 1, env={"PS_FAULT": f"stop:{point}:7"})
    wait_stopped(w1)
    w1.kill()
    assert w1.wait(30) == -9
    wait_log(server, r"rank 1 lost: nothing heard", timeout=30)  # its lease lapsed: the server knows
    again = fork_worker(forkserver, procs, ep, 1)
    wait_log(again, r"resuming at step 7 of 20", timeout=120)
    if point == "after-push":
        wait_stopped(w0)
        wait_log(server, r"rank 1 replayed step 7: acknowledged, not applied", timeout=60)
        w0.kill(signal.SIGCONT)
    procs.wait_ok([w0, again, server], timeout=200)
    assert_final(tmp_path / "ckpt", expected())
    assert "rank 1: a new connection takes over" in server.log.read_text()


def test_server_killed_between_apply_and_checkpoint(forkserver, procs, tmp_path):
    """The server dies having applied step 9 (version 10) with its newest checkpoint at step 8: the
    workers ride out the restart, rejoin, go back to step 8 and recompute steps 8 and 9.

    Checkpoints are written off the loop, and the fault stops every thread of the server: when
    step 8's write had not finished by then, the newest checkpoint is step 4's, and the workers
    go back there instead."""
    args = (*SERVER, "--checkpoint-every", "4")
    server, ep = fork_server(forkserver, procs, *args, env={"PS_FAULT": "stop:after-apply:9"})
    workers = [fork_worker(forkserver, procs, ep, r) for r in range(WORLD)]
    wait_stopped(server)
    server.kill()
    assert server.wait(30) == -9
    kept = sorted(int(p.name[len("ckpt-"):-len(".safetensors")])
                  for p in (tmp_path / "ckpt").glob("ckpt-*.safetensors"))
    back = kept[-1]
    assert back in (4, 8), kept
    again, ep2 = fork_server(forkserver, procs, *args, bind=ep)  # the same command, on the same endpoint
    assert ep2 == ep
    procs.wait_ok([*workers, again], timeout=200)
    assert_final(tmp_path / "ckpt", expected())
    assert "resumed from" in again.log.read_text() and f"ckpt-{back:09d}" in again.log.read_text()
    for w in workers:
        assert f"rejoined; the server is at step {back}" in w.log.read_text(), w.output()
    # the killed server's shared memory (θ and one gradient segment per worker) did not outlive it
    assert f"removed {WORLD + 1} shared-memory segment(s) left by a server that was killed" in again.log.read_text()
    assert not [n for n in os.listdir(shm_dir()) if n.startswith(f"zmqps-{_host()}-{server.pid}-")]


def test_lost_worker_past_the_deadline_fails_the_job_clearly(forkserver, procs, tmp_path):
    """--on-worker-loss wait: the step is held for the lost rank, then the job fails, with one line
    per process naming the peer, the operation and the step, and a checkpoint to resume from."""
    server, ep = fork_server(forkserver, procs, *SERVER, "--rejoin-deadline", "3")
    w0 = fork_worker(forkserver, procs, ep, 0)
    w1 = fork_worker(forkserver, procs, ep, 1, env={"PS_FAULT": "kill:before-push:5"})
    assert w1.wait(120) == -9
    assert server.wait(60) == 1, server.output()
    assert w0.wait(60) == 1, w0.output()
    (line,) = error_lines(server)
    assert "job failed at step 5" in line and "rank 1 was lost at step 5" in line and "within 3s" in line
    (line,) = error_lines(w0)
    assert "RemoteError" in line and f"push_pull to {ep} failed: WORKER_LOST" in line and "at step 5" in line
    assert (tmp_path / "ckpt" / "ckpt-000000005.safetensors").exists()


def test_shrink_continues_with_the_live_workers(forkserver, procs, tmp_path):
    """--on-worker-loss shrink: worker 1 dies before pushing step 5; from step 5 on, every step is
    rank 0's gradient alone, as the log says."""
    server, ep = fork_server(forkserver, procs, *SERVER, "--on-worker-loss", "shrink")
    w0 = fork_worker(forkserver, procs, ep, 0)
    w1 = fork_worker(forkserver, procs, ep, 1, env={"PS_FAULT": "kill:before-push:5"})
    assert w1.wait(120) == -9
    procs.wait_ok([w0, server], timeout=120)
    assert "rank 1 lost at step 5: continuing with rank(s) [0]" in server.log.read_text()
    assert_final(tmp_path / "ckpt", expected(ranks=lambda step: [0, 1] if step < 5 else [0]))



def test_a_restarted_worker_draws_the_same_dropout_masks(forkserver, procs, tmp_path):
    """A step's random state follows from (seed, rank, step), like its batch: with dropout, a run
    whose worker was killed and restarted ends with the same θ as one that was not."""
    model = ("--model", "tests.faultjob:dropout64")
    server, ep = fork_server(forkserver, procs, *SERVER)
    procs.wait_ok([server, *(fork_worker(forkserver, procs, ep, r, *model) for r in range(2))], timeout=120)
    uninterrupted = load_file(str(tmp_path / "ckpt" / "final.safetensors"))
    shutil.rmtree(tmp_path / "ckpt")
    server, ep = fork_server(forkserver, procs, *SERVER)
    w0 = fork_worker(forkserver, procs, ep, 0, *model)
    w1 = fork_worker(forkserver, procs, ep, 1, *model, env={"PS_FAULT": "kill:before-push:12"})
    assert w1.wait(120) == -9
    again = fork_worker(forkserver, procs, ep, 1, *model)
    procs.wait_ok([w0, again, server], timeout=120)
    assert "resuming at step 12 of 20" in again.output(tail=10**6)
    assert_final(tmp_path / "ckpt", uninterrupted, tol=0.0)


def test_server_stopped_with_sigterm_checkpoints_its_step_and_the_restart_recomputes_nothing(forkserver, procs, tmp_path):
    """systemd or Kubernetes stop the server (SIGTERM) after step 9 was applied, between periodic
    checkpoints (every 4): it writes ckpt-10 before it exits 143, and the restarted server resumes
    there, with no step recomputed."""
    args = (*SERVER, "--checkpoint-every", "4")
    server, ep = fork_server(forkserver, procs, *args, env={"PS_FAULT": "stop:after-apply:9"})
    workers = [fork_worker(forkserver, procs, ep, r) for r in range(WORLD)]
    wait_stopped(server)
    server.kill(signal.SIGTERM)
    server.kill(signal.SIGCONT)
    assert server.wait(60) == 128 + signal.SIGTERM, server.output()
    assert "stopping on signal 15: checkpoint of step 10 written" in server.log.read_text()
    assert (tmp_path / "ckpt" / "ckpt-000000010.safetensors").exists()
    again, _ = fork_server(forkserver, procs, *args, bind=ep)
    procs.wait_ok([*workers, again], timeout=200)
    assert_final(tmp_path / "ckpt", expected())
    assert "resumed from" in again.log.read_text() and "ckpt-000000010" in again.log.read_text()
    for w in workers:
        assert "rejoined; the server is at step 10" in w.log.read_text(), w.output()


def test_a_stopped_server_does_not_drop_healthy_workers_under_shrink(forkserver, procs, tmp_path):
    """[Note: the server's own stalls]: SIGSTOP the server for 4 s (its lease is 1 s). Nobody could
    renew a lease meanwhile, so nobody is lost: the job ends at the uninterrupted θ with both
    workers. (Before, the stall made both ranks lapse and a step was applied with one.)"""
    server, ep = fork_server(forkserver, procs, "--lease", "1", "--on-worker-loss", "shrink", "--log-level", "debug")
    workers = [fork_worker(forkserver, procs, ep, r, "--stall", "1:0.05") for r in range(WORLD)]
    wait_log(server, r"step 5 applied", timeout=60)
    server.kill(signal.SIGSTOP)
    time.sleep(4.0)
    server.kill(signal.SIGCONT)
    procs.wait_ok([*workers, server], timeout=120)
    log = server.output(tail=10**6)
    assert "lost" not in log, [line for line in log.splitlines() if "lost" in line]
    assert "did not run for" in log
    assert_final(tmp_path / "ckpt", expected())


def test_a_killed_shard_restarts_and_the_other_goes_back_to_its_step(forkserver, procs, tmp_path):
    """Two server shards checkpoint on their own. Shard A dies right after applying step 9 and
    comes back from its newest checkpoint, a step or two behind shard B. The rejoining workers
    find the shards at different steps and ask B back to A's step ([Note: shards rewind
    together]); B starts over from its own checkpoint of that step, and the job ends at the
    uninterrupted θ (the files of both shards merged)."""
    from common.partition import merge_files

    def shard(name: str, env: dict | None = None, bind: str = "tcp://127.0.0.1:0"):
        n = len(procs.children) + 1
        ready = procs.tmp / f"ready-{n}"
        argv = ["--bind", bind, "--workers", str(WORLD), "--ready-file", str(ready), "--checkpoint-dir",
                str(tmp_path / name), "--checkpoint-every", "1", *SERVER]
        child = forkserver.spawn(name, "ps", argv, procs.tmp / f"{n:02d}-{name}.log", env=env)
        procs.children.append(child)
        wait_log(child, r"listening on", timeout=60)
        return child, ready.read_text().strip()

    a, ep_a = shard("shard-a", env={"PS_FAULT": "stop:after-apply:9"})
    b, ep_b = shard("shard-b")
    workers = [fork_worker(forkserver, procs, f"{ep_a},{ep_b}", r) for r in range(WORLD)]
    wait_stopped(a)
    a.kill()
    assert a.wait(30) == -9
    a2, _ = shard("shard-a", bind=ep_a)
    procs.wait_ok([*workers, a2, b], timeout=180)
    assert "asks this shard to go back from step" in b.output(tail=10**6)
    got = merge_files([tmp_path / "shard-a" / "final.safetensors", tmp_path / "shard-b" / "final.safetensors"])
    want = expected()
    assert set(got) == set(want)
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= 1e-9, k
