"""The core job under torch DistributedDataParallel with gloo, for comparison with zmqps.

Each DDP rank takes the same shard and rows as a zmqps worker (no shuffling); DDP averages
gradients over ranks, which equals the server's 1/K Σ g_k when the batches are equal.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.reference import make_optimizer, steps_per_epoch, worker_rows
from worker.factories import load_factory

log = logging.getLogger(__name__)


def _rank_main(rank: int, world: int, store: str, epochs: int, out: str, job: dict) -> None:
    # A file store, not a probed TCP port: a port found free can be taken by another test's
    # process before rank 0 binds it, and gloo then aborts the rank.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
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
    for attempt in (1, 2):
        store = tmp / f"ddp-store-{attempt}"  # a fresh store per attempt: gloo's file store is single-use
        try:
            mp.start_processes(_rank_main, args=(world, str(store), epochs, out, job), nprocs=world,
                               start_method="spawn")
            break
        except mp.ProcessExitedException as e:  # the reference itself crashed (gloo aborts under load)
            if attempt == 2:
                raise
            log.warning("the DDP reference run crashed (%s); running it again", e)
    return load_file(out)


if __name__ == "__main__":  # pragma: no cover
    print(run_ddp(int(sys.argv[1]), 1, Path(".")))
