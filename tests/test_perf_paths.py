"""The fast paths give the documented math: pieces, buckets, shards, shared memory, narrow wire.

Each case trains the float64 MLP job with real processes (a server, or two server shards,
and K = 2 workers) and compares the final θ with the single-process replay
(``tests.reference``) at 1e-9; gradients narrowed to float16/bfloat16 on the wire are
compared at the tolerance their rounding allows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.partition import merge_files
from tests import jobs
from tests.reference import replay

JOB = ["--model", "tests.jobs:mlp64", "--data", "tests.jobs:class_data64", "--loss", "cross_entropy",
       "--epochs", "1", "--batch-size", "60", "--progress", "off"]
# Small pieces (MLP weights are 1-2 KiB) and buckets, so every code path is exercised.
SMALL = ["--chunk-mb", "0.0005", "--bucket-mb", "0.001"]


def run_job(procs, tmp: Path, worker_args: list[str], shards: int = 1, server_args: list[str] = ()) -> dict:
    endpoints, servers, dirs = [], [], []
    for s in range(shards):
        d = tmp / f"ckpt{s}"
        child, ep = procs.server(2, "--optimizer", "momentum", "--lr", "0.05", *server_args, ckpt=d)
        servers.append(child)
        endpoints.append(ep)
        dirs.append(d)
    workers = [procs.worker(",".join(endpoints), r, 2, *JOB, *worker_args) for r in range(2)]
    procs.wait_ok(workers + servers, timeout=150)
    logs = "".join(c.output(100_000) for c in workers + servers)
    return {"theta": merge_files([d / "final.safetensors" for d in dirs]), "logs": logs}


def expected() -> dict:
    return replay(jobs.mlp64, jobs.class_data64, world=2, batch=60, epochs=1, loss="cross_entropy",
                  optimizer="momentum", lr=0.05)


def check(theta: dict, ref: dict, tol: float) -> None:
    assert set(theta) == set(ref)
    for k in ref:
        assert theta[k].dtype == ref[k].dtype
        torch.testing.assert_close(theta[k], ref[k], rtol=0, atol=tol, msg=lambda m: f"{k}: {m}")


@pytest.mark.timeout(200)
def test_shared_memory_buckets_and_pieces(procs, tmp_path):
    out = run_job(procs, tmp_path, SMALL)
    assert "views of the server's θ (shared memory)" in out["logs"]
    assert "gradients in shared memory" in out["logs"]
    check(out["theta"], expected(), 1e-9)


@pytest.mark.timeout(200)
def test_frames_two_shards_buckets_and_pieces(procs, tmp_path):
    out = run_job(procs, tmp_path, [*SMALL, "--shm", "off"], shards=2)
    assert "shared memory" not in out["logs"]
    # both shards hold part of θ, and a split tensor has pieces on both
    parts = [set(load_file(str(tmp_path / f"ckpt{s}" / "final.safetensors"))) for s in range(2)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    check(out["theta"], expected(), 1e-9)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("wire", ["bfloat16"])
def test_narrow_wire_gradients(procs, tmp_path, wire):
    """bfloat16 keeps 8 bits of mantissa: each gradient is off by ≤ 2^-8 relative, so after
    20 steps of lr 0.05 θ stays within 1e-2 of the exact run, and is not bitwise equal."""
    out = run_job(procs, tmp_path, ["--wire-dtype", wire, "--shm", "off"])
    ref = expected()
    check(out["theta"], ref, 1e-2)
    assert any(not torch.equal(out["theta"][k], ref[k]) for k in ref)
