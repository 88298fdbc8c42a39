"""Child entry points: a torch DDP/gloo worker and a compute-only worker on the same job.

``python -m benchmarks.peers ddp|compute --rank k --world K ...`` trains exactly the job a
zmqps worker trains (same model factory and seed, same shard rows per step via
:class:`worker.data.ShardPlan`, same loss, SGD with the same lr) and writes the end time of
every step to ``--out`` as JSON. ``compute`` skips all communication: each process updates
its own copy, which is the floor the distributed runs are measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from worker.data import ShardPlan, fetch
from worker.factories import build_data, build_model
from worker.runtime import LOSSES, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["ddp", "compute"])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", default="")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--loss", default="cross_entropy")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    device = resolve_device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_model(a.model, a.seed).to(device)
    data = build_data(a.data, a.seed)
    plan = ShardPlan(len(data), a.world, a.batch_size, a.rank)
    loss_fn = LOSSES[a.loss]
    net: torch.nn.Module = model
    if a.kind == "ddp":
        dist.init_process_group("gloo", init_method=a.init, rank=a.rank, world_size=a.world)
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr)
    total = plan.steps_per_epoch * a.epochs
    times = [time.perf_counter()]
    for step in range(total):
        x, y = fetch(data, plan.rows(step, True, a.seed))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    if a.kind == "ddp":
        dist.barrier()
        dist.destroy_process_group()
    with open(a.out, "w") as f:
        json.dump({"times": times, "pid": os.getpid()}, f)


if __name__ == "__main__":
    main()
