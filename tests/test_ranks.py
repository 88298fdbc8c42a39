"""Server-assigned ranks: the rule (unit), and real servers and workers started without --rank."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import WorkerConfig, parse_config
from common.errors import ConfigError, ErrorCode, ProtocolError, RemoteError
from ps.ranks import RankTable
from tests import jobs
from tests.reference import replay
from worker.client import PSClient

JOB = ["--model", "tests.jobs:linear64", "--data", "tests.jobs:data64", "--epochs", "2", "--timeout", "60"]


# ---------------------------------------------------------------- the rule
def test_lowest_free_rank_then_stable_per_id() -> None:
    t = RankTable()
    assert t.choose("a", None, 3, held=set()) == 0
    t.bind("a", 0)
    assert t.choose("b", None, 3, held={0}) == 1
    t.bind("b", 1)
    assert t.choose("a", None, 3, held={0, 1}) == 0  # a reconnect keeps its rank
    assert t.choose("b", None, 3, held={0, 1}) == 1
    assert t.choose("c", None, 3, held={0, 1}) == 2


def test_claims_of_absent_ids_are_skipped_then_reused() -> None:
    t = RankTable()
    t.bind("a", 0)
    t.bind("b", 1)
    # neither is registered now (e.g. a restarted server): a new id avoids their claims ...
    assert t.choose("c", None, 3, held=set()) == 2
    t.bind("c", 2)
    # ... and when every free rank is claimed by someone absent, it takes the lowest one
    assert t.choose("d", None, 3, held={2}) == 0
    t.bind("d", 0)
    assert t.rank_of("a") is None and t.rank_of("d") == 0


def test_explicit_rank_wins_and_moves_the_claim() -> None:
    t = RankTable()
    t.bind("a", 0)
    assert t.choose("x", 0, 2, held={0}) == 0  # range and conflicts are the server's checks
    t.bind("x", 0)
    assert t.rank_of("a") is None and t.rank_of("x") == 0


def test_no_free_rank_is_refused_and_changes_nothing() -> None:
    t = RankTable()
    t.bind("a", 0)
    t.bind("b", 1)
    with pytest.raises(ProtocolError) as e:
        t.choose("c", None, 2, held={0, 1})
    assert e.value.code is ErrorCode.BAD_RANK and "no free rank" in str(e.value)
    assert t.to_meta() == {"a": 0, "b": 1}
    with pytest.raises(ProtocolError) as e:
        t.choose(None, None, 2, held=set())
    assert e.value.code is ErrorCode.BAD_RANK
    with pytest.raises(ProtocolError) as e:
        t.choose("x" * 300, None, 2, held=set())
    assert e.value.code is ErrorCode.BAD_MESSAGE


def test_table_survives_a_checkpoint_round_trip() -> None:
    t = RankTable()
    t.bind("host-a", 1)
    u = RankTable()
    u.load({**t.to_meta(), "junk": "x", 3: 1})  # malformed entries are ignored
    assert u.to_meta() == {"host-a": 1}
    assert u.choose("host-a", None, 2, held=set()) == 1


def test_worker_config_rank_is_optional_in_data_mode_only() -> None:
    cfg = parse_config(WorkerConfig, ["--world-size", "2"], "ps-worker", environ={"PS_WORKER_ID": "h-0"})
    assert cfg.rank is None and cfg.worker_id == "h-0"
    with pytest.raises(ConfigError, match="pipeline"):
        parse_config(WorkerConfig, ["--world-size", "2", "--mode", "pipeline"], "ps-worker", environ={})
    with pytest.raises(ConfigError, match="rank"):
        parse_config(WorkerConfig, ["--world-size", "2", "--rank", "2"], "ps-worker", environ={})


# ---------------------------------------------------------------- real processes
def test_workers_without_rank_train_exactly(procs, tmp_path: Path) -> None:
    """Two workers with no --rank (default ids) get ranks 0 and 1; θ equals the single-process math."""
    server, endpoint = procs.server(2, ckpt=tmp_path / "ckpt")
    workers = [procs.spawn(f"worker {i}", [sys.executable, "-m", "worker", "--server", endpoint,
                                           "--world-size", "2", *JOB]) for i in range(2)]
    procs.wait_ok([*workers, server], timeout=120)
    theta = load_file(str(tmp_path / "ckpt" / "final.safetensors"))
    ref = replay(jobs.linear64, jobs.data64, world=2, epochs=2)
    for k, v in ref.items():
        torch.testing.assert_close(theta[k], v, rtol=0, atol=1e-9)
    logs = "".join(w.output() for w in workers)
    assert "assigned rank 0" in logs and "assigned rank 1" in logs
    assert "[worker 0]" in logs and "[worker 1]" in logs  # the log prefix follows the assigned rank


def test_ranks_by_id_across_reconnects_refusals_and_a_server_restart(procs, tmp_path: Path) -> None:
    """Against a real server: re-registering an id keeps its rank; with every rank taken a new id
    gets BAD_RANK and nothing changes (the two workers still agree on θ and train). The table is
    saved with each checkpoint: after the server is killed and restarted on its directory, an id
    gets its old rank even when it registers first."""
    ckpt = tmp_path / "ckpt"
    server, endpoint = procs.server(2, "--checkpoint-every", "1", "--lease", "1", ckpt=ckpt)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    with PSClient(endpoint, None, 2, timeout=30, worker_id="host-a") as a:
        with PSClient(endpoint, None, 2, timeout=30, worker_id="host-b") as b_old:
            assert b_old.register(params) == 0
            assert a.register(params) == 1
        # host-b's process is gone; a new one with the same id gets rank 0 back (once the old
        # connection's lease lapses: RANK_HELD is retried by the client meanwhile)
        with PSClient(endpoint, None, 2, timeout=30, worker_id="host-b") as b:
            assert b.register(params) == 0
            with PSClient(endpoint, None, 2, timeout=30, worker_id="host-c") as c:
                with pytest.raises(RemoteError) as e:
                    c.register(params)
                assert e.value.code is ErrorCode.BAD_RANK and "no free rank" in str(e.value)
                assert c.rank is None
            assert a.ping()["registered"] == 2
            out: dict[str, dict] = {}

            def step(name: str, client: PSClient, init: torch.Tensor) -> None:
                out[name] = client.init({"w": init})
                client.push_pull({"w": torch.ones(3, dtype=torch.float64)}, 0)

            t = threading.Thread(target=step, args=("b", b, torch.zeros(3, dtype=torch.float64)))
            t.start()
            step("a", a, torch.ones(3, dtype=torch.float64))
            t.join(30)
            assert torch.equal(out["a"]["w"], torch.zeros(3, dtype=torch.float64))  # rank 0 (host-b) won
            assert torch.equal(out["b"]["w"], torch.zeros(3, dtype=torch.float64))
            assert a.step == b.step == 1
    deadline = time.monotonic() + 30
    while not list(ckpt.glob("ckpt-*.safetensors")):
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    server.kill()
    server.proc.wait(10)
    _, endpoint = procs.server(2, "--lease", "1", ckpt=ckpt)
    with PSClient(endpoint, None, 2, timeout=30, worker_id="host-a") as a, \
            PSClient(endpoint, None, 2, timeout=30, worker_id="host-new") as n:
        assert a.register(params) == 1  # first to register, still rank 1
        assert n.register(params) == 0  # a new id takes the lowest free rank (host-b's claim yields)


def test_a_dead_workers_automatic_rank_goes_to_a_new_worker_id(forkserver, procs, tmp_path: Path) -> None:
    """A worker with an automatic rank dies (kill -9); its container comes back under a new
    hostname (a new worker id). Once the dead one's lease lapsed, the new id takes its rank and
    the job ends at the single-process θ; before, it got BAD_RANK and the job failed."""
    from tests.faultjob import assert_final, expected, fork_server, wait_log, wait_stopped

    server, ep = fork_server(forkserver, procs, "--lease", "1")

    def worker(wid: str, env: dict | None = None):
        n = len(procs.children) + 1
        argv = ["--server", ep, "--world-size", "2", "--worker-id", wid, "--timeout", "60", "--heartbeat", "0.3",
                "--model", "tests.jobs:linear64", "--data", "tests.jobs:data64", "--epochs", "2", "--progress", "off"]
        child = forkserver.spawn(wid, "worker", argv, procs.tmp / f"{n:02d}-{wid}.log", env=env)
        procs.children.append(child)
        return child

    a = worker("host-a")
    b = worker("host-b", env={"PS_FAULT": "stop:before-push:5"})
    wait_stopped(b)
    b.kill()
    assert b.wait(30) == -9
    wait_log(server, r"rank \d lost: nothing heard", timeout=30)
    c = worker("host-c-recreated")
    procs.wait_ok([a, c, server], timeout=120)
    assert "moves from worker id 'host-b' to 'host-c-recreated'" in server.output(tail=10**6)
    assert_final(tmp_path / "ckpt", expected())
