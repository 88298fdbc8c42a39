"""Child entry point: one torch DDP/gloo rank of the wan benchmark's job, logging held-out loss.

``python -m benchmarks.wan_ddp --rank k --world K --init file://STORE --model M --data D
--loss L --batch-size B --epochs E --eval-data T --eval-every N --eval-log PATH -- [ps-server
optimizer options]`` trains what a zmqps worker trains (same factories and seed, the same
shard rows per step through :class:`worker.data.ShardPlan`, shuffled as ``ps-worker`` does)
with the optimizer ``ps-server`` would build from the options after ``--`` (through
:func:`ps.optim.build_optimizer`; ``--clip-grad-norm`` clips the averaged gradient, as
there). Rank 0 appends held-out loss records (:mod:`benchmarks.heldout`) at step 0, every N
steps and after the last. Gloo's interface comes from ``GLOO_SOCKET_IFNAME`` (the lab host's
``eth0``).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from benchmarks.heldout import EvalLog, due
from common.config import ServerConfig, parse_config
from ps.optim import build_optimizer
from worker.data import ShardPlan, fetch
from worker.factories import build_data, build_model
from worker.losses import LOSSES


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This rank's options, and the ``ps-server`` options after ``--``."""
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wan_ddp")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True, help="torch.distributed init_method")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--loss", default="cross_entropy")
    ap.add_argument("--batch-size", type=int, required=True, help="global batch")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-log", required=True)
    return ap.parse_args(argv[:cut]), argv[cut + 1:]


def main(argv: list[str]) -> int:
    a, server_args = parse(argv)
    torch.set_num_threads(1)
    scfg = parse_config(ServerConfig, ["--workers", str(a.world), *server_args], prog="ps-server", environ={})
    model = build_model(a.model, a.seed)
    data = build_data(a.data, a.seed)
    plan = ShardPlan(len(data), a.world, a.batch_size, a.rank)
    loss_fn = LOSSES[a.loss]
    evals = EvalLog(a.eval_log, a.eval_data, a.loss, a.seed) if a.rank == 0 else None
    if evals is not None:
        evals.write(0, model)  # θ_0, before the rendezvous (as the zmqps side writes it before registering)
    dist.init_process_group("gloo", init_method=a.init, rank=a.rank, world_size=a.world)
    try:
        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = build_optimizer(list(model.parameters()), scfg)
        total = plan.steps_per_epoch * a.epochs
        for step in range(total):
            x, y = fetch(data, plan.rows(step, True, a.seed))
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            if scfg.clip_grad_norm is not None:  # the server's --clip-grad-norm: on the averaged gradient
                torch.nn.utils.clip_grad_norm_(model.parameters(), scfg.clip_grad_norm)
            opt.step()
            if evals is not None and due(step + 1, a.eval_every, total):
                evals.write(step + 1, model)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
