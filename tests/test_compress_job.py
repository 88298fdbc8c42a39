"""Compressed pushes in real processes: a bsp job with ``--compress topk:R`` ends at the θ of the
single-process math with each worker's gradient put through EF-topk (float64, 1e-9), and
``topk:1.0`` at plain bsp's; the server's metrics show the compressed bytes."""

from __future__ import annotations

import json

from typing import Callable

import torch
from safetensors.torch import load_file

from common.compression.lowrank import start_q

from tests.jobs import class_data64, mlp64
from tests.procs import Procs
from tests.reference import replay, setup, steps_per_epoch, worker_rows
from tests.test_compress import ref_topk
from tests.test_exactness import assert_close

Encoder = Callable[[int, str, torch.Tensor, torch.Size], torch.Tensor]
"""(worker, key, residual + gradient flat, the tensor's shape) -> what the server decodes, flat."""

ARGS = ("--model", "tests.jobs:mlp64", "--data", "tests.jobs:class_data64", "--loss", "cross_entropy",
        "--epochs", "2", "--batch-size", "64")
WORLD = 2


def topk(ratio: float) -> Encoder:
    """EF-topk's sending rule (the reference's own selection)."""
    def send(k: int, name: str, e: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        values, idx = ref_topk(e, ratio)
        sent = torch.zeros_like(e)
        sent[idx] = values
        return sent
    return send


def powersgd(rank: int) -> Encoder:
    """PowerSGD's sending rule for matrices (one warm-started power iteration), vectors dense."""
    qs: dict[tuple[int, str], torch.Tensor] = {}

    def send(k: int, name: str, e: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if len(shape) < 2:
            return e.clone()
        m = e.reshape(shape[0], -1)
        q = qs.get((k, name), start_q(name, m.shape[1], rank, e.dtype))
        p, _ = torch.linalg.qr(m @ q)
        qs[(k, name)] = q = m.T @ p
        return (p @ q.T).reshape(-1)
    return send


def ef_replay(send: Encoder, world: int = WORLD, epochs: int = 2, batch: int = 64, lr: float = 0.01,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """The job in one process: worker k's gradient of each tensor goes through ``send`` with error
    feedback (k's own residual), the server averages what it decodes (weighted by rows) and SGD
    applies it."""
    model, x_all, y_all, loss_fn, opt = setup(mlp64, class_data64, seed, "cross_entropy", "sgd", lr, None, 0.0)
    n = len(x_all)
    residual: dict[tuple[int, str], torch.Tensor] = {}
    for epoch in range(epochs):
        for t in range(steps_per_epoch(n, world, batch)):
            sums: dict[str, torch.Tensor] = {}
            weight = 0.0
            for k in range(world):
                rows = worker_rows(n, world, batch, epoch, t, k, True, seed)
                model.zero_grad(set_to_none=True)
                loss_fn(model(x_all[rows]), y_all[rows]).backward()
                weight += len(rows)
                for name, p in model.named_parameters():
                    e = residual.get((k, name), torch.zeros(p.numel(), dtype=p.dtype)) + p.grad.reshape(-1)
                    sent = send(k, name, e, p.shape)
                    residual[(k, name)] = e - sent
                    sums[name] = sums.get(name, 0) + len(rows) * sent.reshape(p.shape)
            for name, p in model.named_parameters():
                p.grad = sums[name] / weight
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(procs: Procs, compress: str) -> tuple[dict, list[dict]]:
    log = procs.tmp / f"metrics-{compress}.jsonl"
    server, endpoint = procs.server(WORLD, "--metrics-log", str(log))
    # rank 0 takes the flag, rank 1 the environment (PS_COMPRESS)
    workers = [procs.worker(endpoint, 0, WORLD, *ARGS, "--compress", compress),
               procs.worker(endpoint, 1, WORLD, *ARGS, env={"PS_COMPRESS": compress})]
    procs.wait_ok([*workers, server], timeout=120)
    assert "compressed tensors (" in workers[0].output() and "compressed tensors (" in workers[1].output()
    return load_file(str(procs.tmp / "ckpt" / "final.safetensors")), \
        [json.loads(line) for line in log.read_text().splitlines()]


def test_topk_job_equals_the_ef_topk_math(procs: Procs) -> None:
    got, recs = run(procs, "topk:0.1")
    assert_close(got, ef_replay(topk(0.1)))
    plain = replay(mlp64, class_data64, WORLD, batch=64, epochs=2, loss="cross_entropy")
    assert max((got[k] - plain[k]).abs().max().item() for k in plain) > 1e-6  # compression changed the math
    pushes = [r for r in recs if r["ev"] == "push"]
    assert pushes and all(r["bytes"] < r["dense_bytes"] for r in pushes)
    end = recs[-1]
    # 10% of the entries as float64 values and int32 indices (each tensor at least one entry)
    assert end["ev"] == "end" and 0.1 < end["push_bytes"] / end["push_dense_bytes"] < 0.2, end


def test_topk_one_equals_plain_bsp(procs: Procs) -> None:
    got, recs = run(procs, "topk:1.0")
    assert_close(got, replay(mlp64, class_data64, WORLD, batch=64, epochs=2, loss="cross_entropy"))
    end = recs[-1]
    assert end["push_bytes"] == end["push_dense_bytes"] * 3 // 2  # every value + an int32 index each


def test_powersgd_job_equals_its_math(procs: Procs) -> None:
    got, recs = run(procs, "powersgd:2")
    assert_close(got, ef_replay(powersgd(2)))
    end = recs[-1]
    assert end["push_bytes"] < end["push_dense_bytes"], end  # 16x10 and 3x16 as rank-2 factors
