"""The nemesis: seeded random fault schedules against real zmqps processes (:mod:`tests.nemesis`).

Each seed is one schedule (``Schedule.generate(seed)``: mode, K, start order, kill -9 /
SIGSTOP faults, the proxy's duplicate/delay/reorder rates), run with real processes over TCP
loopback and checked: bsp, pipeline and diloco runs end with the single-process reference θ
(float64, 1e-9), async, ssp and diloco-async runs applied every update (every (rank, round))
exactly once, no local-steps worker lost its round files, every process exited 0.

* short pass (default suite): seeds 0-10, one per mode (the mode is ``seed % len(MODES)``, 11);
* long pass: ``.venv/bin/python -m pytest tests/test_nemesis.py -m slow`` (seeds 0-299, each its
  own test id, e.g. ``-k "long and 117"``);
* replay one seed: ``NEMESIS_SEED=<N> .venv/bin/python -m pytest tests/test_nemesis.py -k replay``
  (every failure message prints this line, after ``NEMESIS seed=<N> <schedule>``);
* many seeds with a summary table: ``.venv/bin/python -m tests.nemesis --seeds 0-299``;
  ``--print`` shows the schedules without running them.

A failure's logs stay under pytest's tmp dir (``seed-<N>/``, one log file per process
incarnation, the checkpoints). The first tests here check the harness itself (no processes).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from tests.forkserver import ForkServer
from tests.nemesis.proxy import FaultProxy, ProxyRates
from tests.nemesis import jobs
from tests.nemesis.runner import NemesisFailure, run
from tests.nemesis.schedule import LOCAL_MODES, MODES, Schedule, parse_seeds
from tests.nemesis.triage import repeated_registers

log = logging.getLogger(__name__)

SHORT_SEEDS = range(len(MODES))
LONG_SEEDS = range(300)


def _run(seed: int, fs: ForkServer, tmp: Path) -> None:
    s = Schedule.generate(seed)
    result = run(s, fs, tmp / f"seed-{seed}")
    log.info("seed %d ok in %.1fs: %s; faults %s%s", seed, result.wall_s, s.text(), dict(result.faults),
             f"; max |Δθ| {result.max_delta:.2g}" if result.theta_compared else f"; {result.exactly_once}")


# ---------------------------------------------------------------------- the harness itself
def test_schedules_are_a_function_of_the_seed_and_cover_every_mode():
    texts = [Schedule.generate(seed).text() for seed in range(60)]
    assert texts == [Schedule.generate(seed).text() for seed in range(60)]
    assert {Schedule.generate(seed).mode for seed in SHORT_SEEDS} == set(MODES)
    assert len(set(texts)) == len(texts)


def test_schedules_draw_only_faults_that_are_claimed_survivable():
    for seed in range(2000):
        s = Schedule.generate(seed)
        kills = [f for f in s.faults if f.kind == "kill"]
        if any(f.target.startswith("server") for f in kills):  # a killed server resumes from a checkpoint
            assert s.job.checkpoint_every >= 1, s.text()
        assert (s.proxy is None) == (s.mode == "curve"), s.text()
        assert all(f.gap <= 3.0 for f in s.faults if f.kind == "stop"), s.text()
        for a in s.faults:  # never two faults on one process at once
            for b in s.faults:
                if a is not b and a.target == b.target and a.at <= b.at:
                    assert b.at >= a.at + a.gap, s.text()


def test_local_steps_schedules_keep_round_files_and_take_few_steps_a_round(tmp_path):
    """diloco and diloco-async: a --state-dir per worker (a restart must resume its inner
    optimizer), H of 2-4 and several rounds, the outer optimizer's options on the server."""
    seen = set()
    for seed in range(300):
        s = Schedule.generate(seed)
        if s.mode not in LOCAL_MODES:
            assert "--state-dir" not in jobs.worker_args(s, 0, "tcp://x:1", None, tmp_path / "state0")
            continue
        seen.add(s.mode)
        assert s.sync == s.mode and s.local_steps and s.exact == (s.mode == "diloco"), s.text()
        assert 2 <= s.job.inner_steps <= 4 and s.job.optimizer in ("sgd", "momentum", "adam", "adamw"), s.text()
        rounds, pushes = jobs.expected_counts(s)
        assert all(r >= 5 for r in rounds.values()) and pushes == s.workers * rounds[0], s.text()
        args = jobs.worker_args(s, 1, "tcp://x:1", None, tmp_path / "state1")
        assert args[args.index("--state-dir") + 1] == str(tmp_path / "state1")
        server = jobs.server_args(s, "tcp://x:1", tmp_path / "ckpt", tmp_path / "ready", None)
        assert server[server.index("--sync") + 1] == s.mode
        assert server[server.index("--inner-steps") + 1] == str(s.job.inner_steps)
    assert seen == set(LOCAL_MODES)
    with pytest.raises(AssertionError, match="lost the inner optimizer"):
        jobs.check_round_files(Schedule.generate(MODES.index("diloco-async")),
                               ["round 3: no round file of round 2 or 3 in x: this worker's inner optimizer "
                                "starts afresh (the run is no longer the uninterrupted run's math)"])


def test_proxy_duplicates_delays_and_reorders_but_never_drops(zctx):
    server = zctx.socket(zmq.ROUTER)
    server.linger = 0
    port = server.bind_to_random_port("tcp://127.0.0.1")
    rates = ProxyRates(duplicate=0.3, delay=0.5, reorder=0.5, delay_ms=(1.0, 30.0))
    n = 200
    with FaultProxy(f"tcp://127.0.0.1:{port}", rates, seed=7) as proxy:
        client = zctx.socket(zmq.DEALER)
        client.linger = 0
        client.identity = b"w0-test"
        client.connect(proxy.endpoint)
        for i in range(n):
            client.send_multipart([msgpack.packb({"op": "push", "i": i}), b"x" * (i % 7)])
        seen_up: list[int] = []
        deadline = time.monotonic() + 20
        while len(set(seen_up)) < n and time.monotonic() < deadline:
            if server.poll(100):
                ident, header, body = server.recv_multipart()
                assert ident == b"w0-test"  # the server sees the worker's own identity
                i = msgpack.unpackb(header)["i"]
                assert body == b"x" * (i % 7)  # frames are forwarded unchanged
                seen_up.append(i)
                server.send_multipart([ident, msgpack.packb({"op": "reply", "i": i})])
        time.sleep(0.2)
        while server.poll(50):
            seen_up.append(msgpack.unpackb(server.recv_multipart()[1])["i"])
        seen_down: list[int] = []
        deadline = time.monotonic() + 20
        while set(seen_down) != set(seen_up) and time.monotonic() < deadline:
            if client.poll(100):
                seen_down.append(msgpack.unpackb(client.recv_multipart()[0])["i"])
    assert sorted(set(seen_up)) == list(range(n))
    faults = proxy.counts()
    assert len(seen_up) == n + faults.get("duplicate:push", 0)
    assert len(seen_down) >= len(seen_up) and set(seen_down) == set(seen_up)
    assert faults.get("delay:push", 0) > 0 and faults.get("reorder:push", 0) > 0
    assert faults.get("duplicate:reply", 0) > 0
    assert seen_up != sorted(seen_up)  # something was overtaken


def test_seed_ranges_and_the_repeated_register_hint():
    assert parse_seeds("0-3,7, 9-10") == [0, 1, 2, 3, 7, 9, 10]
    log_text = "\n".join([
        "rank 0: gradients in shared memory /dev/shm/a-g0", "rank 0 re-registered",
        "rank 0: gradients in shared memory /dev/shm/b-g0",  # the same connection again: a new segment
        "rank 1: gradients in shared memory /dev/shm/c-g1", "rank 1: a new connection takes over",
        "rank 1: gradients in shared memory /dev/shm/d-g1"])  # a restarted worker: expected
    assert repeated_registers(log_text) == {0: 1}


def test_a_failure_names_the_seed_the_schedule_and_the_replay():
    s = Schedule.generate(3)
    e = NemesisFailure(s, "final θ differs", "logs")
    first, *rest = str(e).splitlines()
    assert first == f"NEMESIS seed=3 {s.text()}"
    assert "NEMESIS_SEED=3 .venv/bin/python -m pytest tests/test_nemesis.py -k replay" in str(e)


# ---------------------------------------------------------------------- the runs
@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", SHORT_SEEDS)
def test_nemesis_short(seed, forkserver, tmp_path):
    _run(seed, forkserver, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("seed", LONG_SEEDS)
def test_nemesis_long(seed, forkserver, tmp_path):
    _run(seed, forkserver, tmp_path)


@pytest.mark.timeout(200)
def test_nemesis_replay(forkserver, tmp_path):
    """``NEMESIS_SEED=<N>``: run that seed's schedule (skipped without it)."""
    seed = os.environ.get("NEMESIS_SEED")
    if not seed:
        pytest.skip("set NEMESIS_SEED=<N> to replay a seed")
    _run(int(seed), forkserver, tmp_path)
