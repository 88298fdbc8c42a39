"""One way to build a client from a config: ``PSClient.from_config`` applies every client option
of a ``WorkerConfig`` (CURVE included) and reads no environment; the data runtime and a pipeline
stage both build their client with it, so a stage honours every option a data worker does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import zmq
from safetensors.torch import load_file

from common import security
from common.config import WorkerConfig
from common.security import Curve
from common.transport import USE_DEFAULT
from tests import pipeline_jobs
from tests.pipeline_run import endpoint, start_server
from tests.reference_pipeline import replay_pipeline
from worker.client import PSClient
from worker.optimizer import config_from_env

pytestmark = pytest.mark.timeout(300)


def keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A server's and a worker's certificates in one directory: (dir, server public, worker secret)."""
    d = tmp_path / "keys"
    server_pub, _ = security.keygen(d, "server")
    _, worker_sec = security.keygen(d, "worker")
    return d, server_pub, worker_sec


def test_from_config_applies_every_client_option(tmp_path: Path) -> None:
    d, server_pub, worker_sec = keys(tmp_path)
    cfg = WorkerConfig(server="tcp://127.0.0.1:1,tcp://127.0.0.1:2", rank=1, world_size=3, timeout=7.5,
                       worker_id="host-x", heartbeat=0.25, chunk_mb=0.5, shm="off", wire_dtype="bfloat16",
                       io_threads=2, curve_server_key=str(server_pub), curve_secret_key=str(worker_sec))
    with PSClient.from_config(cfg) as c:  # connecting never blocks: no server needed
        assert (c.server, c.rank, c.world_size, c.timeout, c.worker_id, c.role) == \
            (cfg.server, 1, 3, 7.5, "host-x", "data")
        assert c.ctx.get(zmq.IO_THREADS) == 2
        ch = c._ch
        assert ch is not None and [s.endpoint for s in ch.shards] == ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
        assert all(s.caller.policy.deadline_s == 7.5 for s in ch.shards)
        reg = ch._registrar
        assert (reg.chunk_bytes, reg.want_shm, reg.heartbeat_s) == (1 << 19, False, 0.25)
        assert ch._io.wire == torch.bfloat16
        want = Curve.for_worker(str(worker_sec), str(server_pub))
        assert reg.curve == want
        sock = ch.shards[0].req.sock  # the socket really is a CURVE client of that server
        assert sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
        assert want.server_key == security.load_public(server_pub)


def test_from_config_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"PS_SERVER": "tcp://10.9.9.9:1", "PS_HEARTBEAT": "9", "PS_CHUNK_MB": "3",
                        "PS_CURVE_SECRET_KEY": "/nonexistent/w.key_secret",
                        "PS_CURVE_SERVER_KEY": "/nonexistent/s.key"}.items():
        monkeypatch.setenv(name, value)
    with PSClient.from_config(WorkerConfig(world_size=1, rank=0)) as c:
        ch = c._ch
        assert ch is not None
        assert c.server == "tcp://127.0.0.1:5555" and ch._registrar.heartbeat_s == 1.0
        assert ch._registrar.chunk_bytes == 1 << 20
        assert ch._registrar.curve is USE_DEFAULT  # without keys in the config: the process's settings


def test_the_wrappers_environment_is_read_at_the_edge(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    d, server_pub, worker_sec = keys(tmp_path)
    monkeypatch.setenv("PS_SERVER", "tcp://127.0.0.1:7")
    monkeypatch.setenv("PS_WORLD_SIZE", "2")
    monkeypatch.setenv("PS_CURVE_SERVER_KEY", str(server_pub))
    monkeypatch.setenv("PS_CURVE_SECRET_KEY", str(worker_sec))
    cfg = config_from_env()
    assert (cfg.server, cfg.world_size, cfg.rank) == ("tcp://127.0.0.1:7", 2, None)
    assert (cfg.curve_server_key, cfg.curve_secret_key) == (str(server_pub), str(worker_sec))
    given = config_from_env(server="tcp://127.0.0.1:8", rank=1, timeout=3)  # arguments win over PS_*
    assert (given.server, given.rank, given.world_size, given.timeout) == ("tcp://127.0.0.1:8", 1, 2, 3.0)


class _Stop(Exception):
    """Raised by the fake ``from_config``: the runtime got as far as building its client."""


def test_the_wrapper_given_a_config_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.optimizer as wrapper

    def no_env(*_a: object, **_k: object) -> WorkerConfig:
        raise AssertionError("the environment was read")

    seen: list[WorkerConfig] = []

    def fake(cfg: WorkerConfig, **_k: object) -> PSClient:
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(wrapper, "config_from_env", no_env)
    monkeypatch.setattr(PSClient, "from_config", staticmethod(fake))
    cfg = WorkerConfig(world_size=2, heartbeat=0.5, wire_dtype="float16")
    with pytest.raises(_Stop):
        wrapper.DistributedOptimizer(None, torch.nn.Linear(2, 1), config=cfg)
    with pytest.raises(_Stop):
        wrapper.DistributedOptimizer(None, torch.nn.Linear(2, 1), server="tcp://127.0.0.1:9", rank=1, config=cfg)
    assert seen[0] is cfg
    assert (seen[1].server, seen[1].rank, seen[1].heartbeat, seen[1].wire_dtype) == \
        ("tcp://127.0.0.1:9", 1, 0.5, "float16")


@pytest.mark.parametrize("mode", ["data", "pipeline"])
def test_both_runtimes_build_their_client_from_their_config(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both entry points hand their whole config to ``from_config`` (the pipeline its shared context)."""
    import worker.pipeline.runtime as pipeline_runtime
    import worker.runtime as data_runtime

    seen: list[tuple[WorkerConfig, str, zmq.Context | None]] = []

    def fake(cfg: WorkerConfig, *, role: str = "data", ctx: zmq.Context | None = None) -> PSClient:
        seen.append((cfg, role, ctx))
        if ctx is not None:
            assert ctx.get(zmq.IO_THREADS) == cfg.io_threads
        raise _Stop

    job = dict(model="tests.pipeline_jobs:seed_pipe64", data="tests.pipeline_jobs:data246", batch_size=60,
               device="cpu", heartbeat=0.3, chunk_mb=0.5, shm="off", wire_dtype="float16", io_threads=2,
               worker_id="w-1", server="tcp://127.0.0.1:1", world_size=2, rank=0)
    if mode == "pipeline":
        cfg = WorkerConfig(mode="pipeline", stages=2, partition="0:1,1:2", **job)  # type: ignore[arg-type]
        monkeypatch.setattr(PSClient, "from_config", staticmethod(fake))
        with pytest.raises(_Stop):
            pipeline_runtime.train_stage(cfg)
        assert seen and seen[0][0] is cfg and seen[0][1] == "stage" and seen[0][2] is not None
    else:
        cfg = WorkerConfig(**job)  # type: ignore[arg-type]
        monkeypatch.setattr(PSClient, "from_config", staticmethod(fake))
        with pytest.raises(_Stop):
            data_runtime.train(cfg)
        assert seen and seen[0][0] is cfg and seen[0][1] == "data"


def test_a_pipeline_stage_honours_the_client_options(forkserver, procs, tmp_path: Path) -> None:
    """Two stages with --wire-dtype, --chunk-mb, --shm off, --worker-id, --heartbeat, --io-threads:
    the server sees each stage's pieces and worker id and no shared memory, and θ carries the
    narrowed gradients' rounding (a stage used to ignore every one of these options)."""
    job = start_server(forkserver, procs, "opts", 2, ["--lr", "0.05"])
    ep = endpoint(job)
    for k in range(2):
        argv = ["--server", ep, "--rank", str(k), "--world-size", "2", "--timeout", "60", "--mode", "pipeline",
                "--progress", "off", "--device", "cpu", "--stages", "2", "--partition", "0:1,1:2",
                "--microbatches", "4", "--model", "tests.pipeline_jobs:seed_pipe64",
                "--data", "tests.pipeline_jobs:data246", "--batch-size", "60", "--epochs", "1", "--seed", "3",
                "--wire-dtype", "bfloat16", "--chunk-mb", "0.0001", "--shm", "off", "--heartbeat", "0.2",
                "--io-threads", "2", "--worker-id", f"stage-host-{k}"]
        child = forkserver.spawn(f"opts {k}", "worker", argv, procs.tmp / f"opts-{k}.log")
        procs.children.append(child)  # type: ignore[arg-type]
        job.stages.append(child)
    procs.wait_ok([*job.stages, job.server], timeout=150)  # type: ignore[list-item]
    server_log = job.server.output(tail=10**6)
    # Linear(10, 5) in float64: 104-byte pieces hold one row of the weight each, so 5 + 1 keys
    assert re.search(r"rank 0 registered 6 key\(s\) \(\d/2\) as worker id 'stage-host-0'", server_log), server_log
    assert "as worker id 'stage-host-1'" in server_log, server_log
    assert "gradients in shared memory" not in server_log
    want = replay_pipeline(pipeline_jobs.seed_pipe64, pipeline_jobs.data246, batch=60, epochs=1, seed=3, lr=0.05)
    got = load_file(str(job.ckpt / "final.safetensors"))
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert 1e-9 < worst <= 1e-2, worst  # bfloat16 gradients: close to the exact θ, not equal
