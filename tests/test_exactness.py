"""Exactness: K separate worker processes give the θ of the single-process math (float64 ≤ 1e-9)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.jobs import class_data64, data64, linear64, mlp64
from tests.procs import Procs
from tests.reference import replay

TOL = 1e-9  # float64: only summation order differs from the reference


def run_job(procs: Procs, world: int, server_args: tuple[str, ...] = (), worker_args: tuple[str, ...] = ()) -> dict:
    server, endpoint = procs.server(world, *server_args)
    workers = [procs.worker(endpoint, k, world, *worker_args) for k in range(world)]
    procs.wait_ok([*workers, server], timeout=180)
    return load_file(str(procs.tmp / "ckpt" / "final.safetensors"))


def assert_close(got: dict, want: dict, tol: float = TOL) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        err = (got[k] - want[k]).abs().max().item()
        assert err <= tol, f"{k}: max |Δ| = {err:.3g} > {tol}"


JOB = ("--model", "tests.jobs:linear64", "--data", "tests.jobs:data64", "--epochs", "3")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_k_workers_equal_single_process_math(procs: Procs, world: int) -> None:
    got = run_job(procs, world, worker_args=JOB)
    want = replay(linear64, data64, world, batch=100, epochs=3)
    assert_close(got, want)
    start = linear64  # and training moved θ: the comparison is not between two untouched models
    torch.manual_seed(0)
    assert (got["weight"] - start().weight.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_optimizers_and_cross_entropy_no_shuffle(procs: Procs, opt: str) -> None:
    args = ("--model", "tests.jobs:mlp64", "--data", "tests.jobs:class_data64", "--loss", "cross_entropy",
            "--epochs", "2", "--batch-size", "64", "--no-shuffle")
    got = run_job(procs, 2, ("--optimizer", opt, "--lr", "0.05", "--weight-decay", "0.01"), args)
    want = replay(mlp64, class_data64, 2, batch=64, epochs=2, shuffle=False, loss="cross_entropy",
                  optimizer=opt, lr=0.05, weight_decay=0.01)
    assert_close(got, want)


def test_equals_torch_ddp_gloo(procs: Procs, tmp_path) -> None:
    """The same job under torch DDP (gloo) ends at the same θ as zmqps."""
    from tests.ddp_job import run_ddp

    world = 2
    got = run_job(procs, world, worker_args=(*JOB, "--no-shuffle"))
    want = run_ddp(world, epochs=3, tmp=tmp_path)
    assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_workers_match_the_math(procs: Procs) -> None:
    """Gradients computed on the GPU, staged through pinned buffers, give the same θ."""
    got = run_job(procs, 2, worker_args=(*JOB, "--device", "cuda"))
    assert_close(got, replay(linear64, data64, 2, batch=100, epochs=3))
