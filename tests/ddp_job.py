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

from tests.jobs import data64, linear64
from tests.reference import steps_per_epoch, worker_rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, epochs: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(linear64())
        torch.manual_seed(0)
        x, y = data64().tensors
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        n = len(x)
        for epoch in range(epochs):
            for t in range(steps_per_epoch(n, world, 100)):
                rows = worker_rows(n, world, 100, epoch, t, rank, False, 0)
                opt.zero_grad()
                F.mse_loss(model(x[rows]), y[rows]).backward()
                opt.step()
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.module.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


def run_ddp(world: int, epochs: int, tmp: Path) -> dict[str, torch.Tensor]:
    """Final θ of the DDP run."""
    out = str(tmp / "ddp.safetensors")
    mp.start_processes(_rank_main, args=(world, _free_port(), epochs, out), nprocs=world, start_method="spawn")
    return load_file(out)


if __name__ == "__main__":  # pragma: no cover
    print(run_ddp(int(sys.argv[1]), 1, Path(".")))
