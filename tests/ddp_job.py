"""The core job under torch DistributedDataParallel with gloo, for comparison with zmqps.

Each DDP rank takes the same shard and rows as a zmqps worker (no shuffling); DDP averages
gradients over ranks, which equals the server's 1/K Σ g_k when the batches are equal.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.reference import make_optimizer, steps_per_epoch, worker_rows
from worker.factories import load_factory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, epochs: int, out: str, job: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(load_factory(job["model"])(),
                                                          find_unused_parameters=job["find_unused"])
        torch.manual_seed(0)
        x, y = load_factory(job["data"])().tensors
        loss_fn = F.cross_entropy if job["loss"] == "cross_entropy" else F.mse_loss
        opt = make_optimizer(model.parameters(), job["optimizer"], job["lr"], None, job["weight_decay"])
        n, batch = len(x), job["batch"]
        for epoch in range(epochs):
            for t in range(steps_per_epoch(n, world, batch)):
                rows = worker_rows(n, world, batch, epoch, t, rank, False, 0)
                opt.zero_grad()
                loss_fn(model(x[rows]), y[rows]).backward()
                if job["clip"] is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), job["clip"])
                opt.step()
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.module.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


def run_ddp(world: int, epochs: int, tmp: Path, model: str = "tests.jobs:linear64", data: str = "tests.jobs:data64",
            batch: int = 100, loss: str = "mse", optimizer: str = "sgd", lr: float = 0.01,
            weight_decay: float = 0.0, clip: float | None = None,
            find_unused: bool = False) -> dict[str, torch.Tensor]:
    """Final state_dict of the DDP run of the job (no shuffling), rank 0's model.

    ``clip``: ``clip_grad_norm_`` after backward (DDP has averaged the gradients by then);
    ``find_unused``: DDP's ``find_unused_parameters`` (for models with unused parameters).
    """
    out = str(tmp / "ddp.safetensors")
    job = {"model": model, "data": data, "batch": batch, "loss": loss, "optimizer": optimizer, "lr": lr,
           "weight_decay": weight_decay, "clip": clip, "find_unused": find_unused}
    mp.start_processes(_rank_main, args=(world, _free_port(), epochs, out, job), nprocs=world, start_method="spawn")
    return load_file(out)


if __name__ == "__main__":  # pragma: no cover
    print(run_ddp(int(sys.argv[1]), 1, Path(".")))
