"""BSP vs SSP vs async under jitter: time to finish and final loss, side by side in one run.

Every worker stalls before a random subset of its steps (``--stall P:SECONDS``; the draw
depends on seed, rank and step, so every mode sees the same stalls). Each mode runs the
digits example with K workers through ``ps-launch``; the modes are interleaved over the
repeats so that a change in machine load hits them alike. For each run:

* train time: first to last applied gradient, from the server's JSONL log (process start-up
  excluded); wall: the whole ``ps-launch`` command;
* final loss: cross-entropy of the final θ on all training rows; accuracy on the held-out rows;
* staleness: mean and max over every applied gradient; max lead (steps ahead of the slowest).

Usage: ``python -m benchmarks.consistency [--workers 4] [--epochs 5] [--stall 0.1:0.1]
[--repeats 2] [--out docs/benchmarks-consistency.md] [--plot docs/benchmarks-consistency.png]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from worker.examples import digits


def run_one(sync: list[str], args: argparse.Namespace, out: Path) -> dict:
    """One ps-launch of the digits example; returns its measurements."""
    argv = [sys.executable, "-m", "worker.launch", "--example", "digits", "--workers", str(args.workers),
            "--epochs", str(args.epochs), "--stall", args.stall, "--progress", "off", "--log-level", "warning",
            "--checkpoint-dir", str(out), *sync]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(sync)} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pushes = [r for r in recs if r["ev"] == "push"]
    theta = load_file(str(out / "final.safetensors"))
    net = digits.model()
    net.load_state_dict(theta)
    x, y = digits.train_data().tensors
    with torch.no_grad():
        loss = float(F.cross_entropy(net(x), y))
    stale = [r["staleness"] for r in pushes]
    return {"train_s": pushes[-1]["t"] - pushes[0]["t"], "wall_s": wall, "loss": loss,
            "accuracy": digits.accuracy(theta), "stale_mean": statistics.fmean(stale), "stale_max": max(stale),
            "lead_max": max(r["lead"] for r in pushes), "log": out / "metrics.jsonl"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--stall", default="0.1:0.1", help="P:SECONDS for every worker")
    p.add_argument("--staleness", type=int, default=2, help="S for the ssp run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--plot", help="also draw the first repeat's logs into this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    modes = {"bsp": ["--sync", "bsp"], f"ssp S={args.staleness}": ["--sync", "ssp", "--staleness", str(args.staleness)],
             "async": ["--sync", "async"]}
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="zmqps-bench-") as tmp:
        for rep in range(args.repeats):
            order = list(modes)[rep % 3:] + list(modes)[:rep % 3]
            for mode in order:
                r = run_one(modes[mode], args, Path(tmp) / f"{mode.replace(' ', '_')}-{rep}")
                results[mode].append(r)
                print(f"# {mode} repeat {rep}: train {r['train_s']:.2f}s, loss {r['loss']:.4f}", file=sys.stderr)
        if args.plot:
            from ps.plot import plot

            plot([results[m][0]["log"] for m in modes], args.plot,
                 title=f"digits, {args.workers} workers, stall {args.stall}", labels=list(modes))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "log"} for m, rs in results.items()}
    base = med["bsp"]["train_s"]
    lines = [f"digits MLP, {args.workers} workers, {args.epochs} epochs (batch 64: "
             f"{args.epochs * 23} steps per worker), every worker stalls {args.stall.split(':')[1]} s "
             f"before a step with probability {args.stall.split(':')[0]}; median of {args.repeats} "
             f"interleaved runs.", "",
             "| mode | train time (s) | vs bsp | wall (s) | final train loss | test accuracy "
             "| staleness mean / max | max lead (steps) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, v in med.items():
        lines.append(f"| {m} | {v['train_s']:.2f} | {base / v['train_s']:.2f}x | {v['wall_s']:.1f} | {v['loss']:.4f} "
                     f"| {v['accuracy']:.3f} | {v['stale_mean']:.2f} / {v['stale_max']:.0f} | {v['lead_max']:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
