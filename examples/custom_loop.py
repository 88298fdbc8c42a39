"""A plain PyTorch training loop that gains the parameter server in two lines (marked ★).

Start a server, then one copy of this script per worker::

    ps-server --bind tcp://127.0.0.1:5555 --workers 2 --optimizer momentum --lr 0.05 &
    python examples/custom_loop.py --server tcp://127.0.0.1:5555 --rank 0 --world-size 2 &
    python examples/custom_loop.py --server tcp://127.0.0.1:5555 --rank 1 --world-size 2

By default it trains the MLP of the digits example (scikit-learn's bundled 8x8 digits) and
prints the held-out accuracy on rank 0. ``--model``/``--data`` take ``MODULE:FACTORY`` like
``ps-worker``; each worker takes its shard and batches exactly as ``ps-worker`` does, so
this loop and the built-in runtime compute the same θ for the same job.
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

from worker import DistributedOptimizer  # ★ 1
from worker.data import ShardPlan, fetch
from worker.factories import build_data, build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--model", default="worker.examples.digits:model")
    p.add_argument("--data", default="worker.examples.digits:train_data")
    p.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "mse"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (each worker: its share)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.05, help="the server's --lr decides; kept for the local SGD")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {args.rank}] %(message)s")

    model = build_model(args.model, args.seed)  # torch.manual_seed(seed), then the factory
    data = build_data(args.data, args.seed)
    plan = ShardPlan(len(data), args.world_size, args.batch_size, args.rank)
    loss_fn = F.cross_entropy if args.loss == "cross_entropy" else F.mse_loss
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    opt = DistributedOptimizer(opt, model, server=args.server, rank=args.rank,  # ★ 2
                               world_size=args.world_size)

    for step in range(opt.next_step, plan.steps_per_epoch * args.epochs):
        x, y = fetch(data, plan.rows(step, shuffle=True, seed=args.seed))
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss=loss)  # loss= is optional: it feeds the server's metrics and plots
        if step % plan.steps_per_epoch == plan.steps_per_epoch - 1:
            logging.info("epoch %d: loss %.4f (mean over workers)", step // plan.steps_per_epoch + 1,
                         opt.last_loss)
    opt.finish()

    if args.rank == 0 and args.data == "worker.examples.digits:train_data":
        from worker.examples.digits import accuracy

        logging.info("held-out accuracy %.4f", accuracy(model.state_dict()))


if __name__ == "__main__":
    main()
