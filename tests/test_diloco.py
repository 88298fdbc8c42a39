"""``--sync diloco``: K worker processes give the θ of the single-process DiLoCo math (float64 ≤ 1e-9),
also when a worker or the server is killed with -9 and restarted, with and without overlapped
rounds (``--outer-delay 1``); ``diloco-async`` applies each round exactly once."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.jobs import class_data64, mlp64
from tests.models import branchy64, branchy_data
from tests.procs import Procs
from tests.reference_diloco import replay_diloco
from tests.test_exactness import assert_close

pytestmark = pytest.mark.timeout(300)

MLP = ("--model", "tests.jobs:mlp64", "--data", "tests.jobs:class_data64", "--loss", "cross_entropy",
       "--epochs", "2", "--batch-size", "64")
INNER = ("--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.01")


def _final(procs: Procs) -> dict:
    return load_file(str(procs.tmp / "ckpt" / "final.safetensors"))


def _run(procs: Procs, world: int, server_args: tuple[str, ...], worker_args: tuple[str, ...]) -> dict:
    server, ep = procs.server(world, *server_args)
    workers = [procs.worker(ep, k, world, *worker_args, "--state-dir", str(procs.tmp / f"state{k}"))
               for k in range(world)]
    procs.wait_ok([*workers, server], timeout=240)
    return _final(procs)


@pytest.mark.parametrize("sync", ["diloco", "diloco-async"])
def test_diloco_equals_single_process_math(procs: Procs, sync: str) -> None:
    world = 2 if sync == "diloco" else 1  # on arrival, K = 1 is the only order-free case
    got = _run(procs, world, ("--sync", sync, "--inner-steps", "4", *INNER), MLP)
    want = replay_diloco(mlp64, class_data64, world, 4, batch=64, epochs=2, loss="cross_entropy",
                         optimizer="adamw", lr=0.01, weight_decay=0.01, asynchronous=sync != "diloco")
    assert_close(got, want)
    torch.manual_seed(0)
    assert (got["0.weight"] - mlp64()[0].weight.detach()).abs().max() > 1e-3  # training moved θ


def test_diloco_over_two_server_shards_equals_single_process_math(procs: Procs) -> None:
    """Each shard runs the outer step on its own keys (the outer SGD is per entry), and the workers'
    rounds go to both: the merged θ is the one-server math (the wan benchmark's ``/2 shards`` modes)."""
    from common.partition import merge_files

    args = ("--sync", "diloco", "--inner-steps", "4", *INNER, "--outer-momentum", "0.5")
    eps, servers = [], []
    for name in ("shard-a", "shard-b"):
        server, ep = procs.server(2, *args, ckpt=procs.tmp / name)
        servers.append(server)
        eps.append(ep)
    workers = [procs.worker(",".join(eps), k, 2, *MLP, "--state-dir", str(procs.tmp / f"state{k}")) for k in range(2)]
    procs.wait_ok([*workers, *servers], timeout=240)
    files = [procs.tmp / name / "final.safetensors" for name in ("shard-a", "shard-b")]
    assert all(load_file(str(f)) for f in files)  # each shard held some of θ
    got = merge_files(files)
    want = replay_diloco(mlp64, class_data64, 2, 4, batch=64, epochs=2, loss="cross_entropy",
                         optimizer="adamw", lr=0.01, weight_decay=0.01, outer_momentum=0.5)
    assert set(got) == set(want)
    assert_close(got, want)


def test_overlapped_rounds_equal_their_single_process_math_and_differ_from_plain_diloco(procs: Procs) -> None:
    """``--outer-delay 1`` ([Note: overlapped rounds] in ``worker.overlap``): each round starts
    from θ_global^r − Δ^r; the job is exactly its replay, and not plain diloco's θ."""
    got = _run(procs, 2, ("--sync", "diloco", "--inner-steps", "4", *INNER, "--outer-delay", "1"), MLP)
    want = replay_diloco(mlp64, class_data64, 2, 4, batch=64, epochs=2, loss="cross_entropy", optimizer="adamw",
                         lr=0.01, weight_decay=0.01, delay=1)
    assert_close(got, want)
    plain = replay_diloco(mlp64, class_data64, 2, 4, batch=64, epochs=2, loss="cross_entropy", optimizer="adamw",
                          lr=0.01, weight_decay=0.01)
    assert max((got[k] - plain[k]).abs().max().item() for k in plain) > 1e-4  # the rounds did start elsewhere
    for k in range(2):  # the newest two round files of 5 rounds (no server checkpoints to serve)
        assert len(list((procs.tmp / f"state{k}").glob("*.pt"))) == 2


@pytest.mark.parametrize("delay", [0, 1])
def test_diloco_on_a_real_model_frozen_unused_partly_used_layers_and_batchnorm(procs: Procs, delay: int) -> None:
    args = ("--model", "tests.models:branchy64", "--data", "tests.models:branchy_data", "--loss", "cross_entropy",
            "--epochs", "1", "--batch-size", "20", "--no-shuffle")
    got = _run(procs, 2, ("--sync", "diloco", "--inner-steps", "3", "--optimizer", "momentum", "--lr", "0.05",
                          "--weight-decay", "0.01", "--outer-lr", "0.5", "--outer-delay", str(delay)), args)
    want = replay_diloco(branchy64, branchy_data, 2, 3, batch=20, epochs=1, shuffle=False, loss="cross_entropy",
                         optimizer="momentum", lr=0.05, weight_decay=0.01, outer_lr=0.5, delay=delay)
    assert_close(got, want)
    torch.manual_seed(0)
    start = branchy64()
    assert torch.equal(got["frozen.weight"], start.frozen.weight.detach())
    assert torch.equal(got["unused.weight"], start.unused.weight.detach())


@pytest.mark.parametrize("delay", [0, 1])
@pytest.mark.parametrize("point", ["mid-round", "before-push", "after-push"])
def test_a_worker_killed_and_restarted_resumes_its_inner_optimizer_exactly(procs: Procs, point: str,
                                                                           delay: int) -> None:
    """Worker 1 kills itself at ``point`` of round 3 and is started again with the same command:
    its round file ([Note: round files]) gives it the inner optimizer (and, past the inner
    steps, the same push; overlapped: where its next round starts), so the job ends at the
    uninterrupted θ."""
    server, ep = procs.server(2, "--sync", "diloco", "--inner-steps", "4", *INNER, "--lease", "1",
                              "--outer-delay", str(delay))
    state = [("--state-dir", str(procs.tmp / f"state{k}")) for k in range(2)]
    w0 = procs.worker(ep, 0, 2, *MLP, *state[0])
    w1 = procs.worker(ep, 1, 2, *MLP, *state[1], env={"PS_FAULT": f"kill:{point}:3"})
    assert w1.proc.wait(120) == -9
    again = procs.worker(ep, 1, 2, *MLP, *state[1])
    procs.wait_ok([w0, again, server], timeout=240)
    want = replay_diloco(mlp64, class_data64, 2, 4, batch=64, epochs=2, loss="cross_entropy",
                         optimizer="adamw", lr=0.01, weight_decay=0.01, delay=delay)
    assert_close(_final(procs), want)
    assert "starts afresh" not in again.output(20000)


@pytest.mark.parametrize("delay", [0, 1])
def test_the_server_killed_resumes_from_its_checkpoint_and_the_workers_from_their_round_files(procs: Procs,
                                                                                              delay: int) -> None:
    ckpt = procs.tmp / "ckpt"
    args = ("--sync", "diloco", "--inner-steps", "4", *INNER, "--checkpoint-every", "2", "--outer-delay", str(delay))
    server, ep = procs.server(2, *args, env={"PS_FAULT": "kill:after-apply:4"})
    state = [("--state-dir", str(procs.tmp / f"state{k}")) for k in range(2)]
    workers = [procs.worker(ep, k, 2, *MLP, *state[k]) for k in range(2)]
    assert server.proc.wait(120) == -9
    server, ep2 = procs.server(2, *args, ckpt=ckpt, bind=ep)
    procs.wait_ok([*workers, server], timeout=240)
    want = replay_diloco(mlp64, class_data64, 2, 4, batch=64, epochs=2, loss="cross_entropy",
                         optimizer="adamw", lr=0.01, weight_decay=0.01, delay=delay)
    assert_close(_final(procs), want)
    for w in workers:
        assert "starts afresh" not in w.output(20000)


def test_diloco_async_applies_every_round_of_every_worker_exactly_once_across_a_kill(procs: Procs) -> None:
    """K = 2 on arrival: worker 1 dies right after its push of round 3 reached the server and is
    started again; the metrics log holds one applied push per (rank, round), and the restarted
    worker continued from its round file."""
    import json

    log = procs.tmp / "metrics.jsonl"
    server, ep = procs.server(2, "--sync", "diloco-async", "--inner-steps", "4", *INNER, "--lease", "1",
                              "--metrics-log", str(log))
    state = [("--state-dir", str(procs.tmp / f"state{k}")) for k in range(2)]
    w0 = procs.worker(ep, 0, 2, *MLP, *state[0])
    w1 = procs.worker(ep, 1, 2, *MLP, *state[1], env={"PS_FAULT": "kill:after-push:3"})
    assert w1.proc.wait(120) == -9
    again = procs.worker(ep, 1, 2, *MLP, *state[1])
    procs.wait_ok([w0, again, server], timeout=240)
    applied = [(r["rank"], r["step"]) for r in map(json.loads, log.read_text().splitlines()) if r["ev"] == "push"]
    rounds = 5  # 600 rows, 64 a step: 10 steps an epoch, 2 epochs, rounds of 4 steps
    assert sorted(applied) == [(k, r) for k in range(2) for r in range(rounds)]
    assert "starts afresh" not in again.output(20000)


def test_round_files_of_another_job_in_a_reused_state_dir_are_never_used(tmp_path) -> None:
    """[Note: round files]: the job's id is in every file; a later job with the same model, rank and
    H in the same folder starts its inner optimizer afresh instead of resending the old job's push."""
    from worker.roundstate import Round, RoundFiles

    old = RoundFiles(str(tmp_path), 0, 4, ["w"], 0, job="aaaa")
    old.save(Round(0, {"w": torch.ones(2)}, 1.0, {"state": {}, "param_groups": []}))
    assert old.load(0) is not None
    new = RoundFiles(str(tmp_path), 0, 4, ["w"], 0, job="bbbb")
    assert new.load(0) is None
    new.save(Round(0, {"w": torch.zeros(2)}, 2.0, {"state": {}, "param_groups": []}))
    new.save(Round(1, {"w": torch.zeros(2)}, 2.0, {"state": {}, "param_groups": []}))
    new.save(Round(2, {"w": torch.zeros(2)}, 2.0, {"state": {}, "param_groups": []}))
    assert new.rounds() == [1, 2] and old.rounds() == [0]  # each job prunes its own files only
    assert torch.equal(new.load(2).push["w"], torch.zeros(2))  # type: ignore[union-attr]


@pytest.mark.parametrize("every", [1, 2, 3, 5])
def test_round_files_keep_what_a_server_restart_needs_under_diloco_async(tmp_path, every: int) -> None:
    """[Note: round files]: under diloco-async the server's version counts every worker's pushes,
    so a checkpoint can end at any round of this worker. Simulated here with the others pushing
    0-3 times between two pushes of this worker (a slow peer, a fast one): at every moment, for
    each of the server's three newest checkpoints, the file a restart from it needs is on disk.
    (The rule kept the rounds r with (r + 1) % every == 0, right for diloco only: the nemesis
    found a restarted diloco-async server whose worker started a fresh inner optimizer.)"""
    import random

    from worker.roundstate import KEEP_AT_CHECKPOINTS, KEEP_NEWEST, Round, RoundFiles

    rng = random.Random(every)
    files = RoundFiles(str(tmp_path), 0, 2, ["w"], every, job="j")
    version, mine = 0, {}  # the server's version; this worker's round -> version after it

    def check(saved: int) -> None:
        have = set(files.rounds())
        newest = version // every * every
        for mark in range(newest, 0, -every)[:KEEP_AT_CHECKPOINTS]:
            clock = 1 + max((r for r, v in mine.items() if v <= mark), default=-1)
            if clock > 0:  # the restarted server's INIT says `clock`: round clock's or clock - 1's file
                assert {clock, clock - 1} & have, (mark, clock, sorted(have), mine)
        assert len(have) <= KEEP_NEWEST + KEEP_AT_CHECKPOINTS + 1 and saved in have

    for r in range(60):
        files.save(Round(r, {"w": torch.full((2,), float(r))}, None, {"state": {}, "param_groups": []}))
        version += rng.choice((0, 0, 1, 2, 3)) if r % 7 else 3 * every  # other workers' pushes
        check(r)
        version += 1
        mine[r] = version
        files.applied(r, version)
        check(r)


def test_a_restarted_worker_keeps_its_older_round_files_until_it_knows_their_checkpoints(tmp_path) -> None:
    """A new process knows no version of its older rounds: it keeps their files until the server's
    three newest checkpoints are past its first applied round's version."""
    from worker.roundstate import Round, RoundFiles

    def save(files: RoundFiles, r: int) -> None:
        files.save(Round(r, {"w": torch.zeros(2)}, None, {"state": {}, "param_groups": []}))

    old = RoundFiles(str(tmp_path), 0, 2, ["w"], 3, job="j")
    for r in range(4):
        save(old, r)  # killed before any reply: no version known, nothing dropped
    assert old.rounds() == [0, 1, 2, 3]
    new = RoundFiles(str(tmp_path), 0, 2, ["w"], 3, job="j")
    save(new, 4)
    new.applied(4, 14)  # checkpoints 12, 9, 6 may each hold a clock of 1-4: every file is kept
    assert new.rounds() == [0, 1, 2, 3, 4]
    for r, v in ((5, 16), (6, 19), (7, 22), (8, 25)):
        save(new, r)
        new.applied(r, v)
    assert new.rounds() == [5, 6, 7, 8]  # checkpoints 24, 21, 18 hold clocks 8, 7, 6: rounds 7, 6, 5
