"""Pipeline benchmark: measured bubble against (P-1)/(M+P-1), and throughput against
torch.distributed.pipelining's ScheduleGPipe on gloo with the same split and M.

Run from the repository root::

    python -m benchmarks.pipeline                 # full grid, writes docs/benchmarks-pipeline.md
    python -m benchmarks.pipeline --stages 2 --micro 4 --no-torch

The model has one layer per stage and every layer costs the same: a tiny Linear plus a
fixed sleep in its forward (``--fwd-ms``) and its backward (``--bwd-ms``), per microbatch.
Sleeping, not computing, makes "equal per-layer cost" hold on a small shared machine where
P processes would otherwise fight over a few cores; what is measured is then the schedule,
the messaging and the per-step parameter-server round trip, not the CPU. Each stage's own
accounting (its ``stage stats`` log line, first step left out as warm-up) gives:

* bubble = 1 - busy(stage) / window(stage 0), averaged over the stages, where busy is the
  stage's forward + backward time and window is the step's makespan (stage 0 runs the first
  action, 0F0, and the last, 0B(M-1));
* throughput = rows per step / whole step time (including the push/pull to the server).

zmqps stage processes come from the test fork server (torch preloaded); torch's run uses
``torch.multiprocessing.spawn``. Neither start-up is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

WIDTH = 16


def _cfg() -> dict[str, float]:
    return {"layers": int(os.environ.get("BENCH_LAYERS", "2")), "fwd": float(os.environ.get("BENCH_FWD_MS", "20")),
            "bwd": float(os.environ.get("BENCH_BWD_MS", "40")), "rows": int(os.environ.get("BENCH_ROWS", "640"))}


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd: float, bwd: float) -> torch.Tensor:
        ctx.bwd = bwd
        if x.device.type != "meta":
            time.sleep(fwd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.bwd)
        return g, None, None


class SleepLayer(nn.Module):
    """A Linear(16, 16) whose forward and backward each take a fixed time per microbatch."""

    def __init__(self, fwd_s: float, bwd_s: float) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.fwd_s, self.bwd_s = fwd_s, bwd_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(self.lin(x), self.fwd_s, self.bwd_s)


def sleep_model() -> nn.Sequential:
    """``BENCH_LAYERS`` equal-cost layers (the zmqps model factory of this benchmark)."""
    c = _cfg()
    return nn.Sequential(*[SleepLayer(c["fwd"] / 1e3, c["bwd"] / 1e3) for _ in range(int(c["layers"]))])


def bench_data() -> TensorDataset:
    """``BENCH_ROWS`` random rows of width 16."""
    n = int(_cfg()["rows"])
    return TensorDataset(torch.randn(n, WIDTH), torch.randn(n, WIDTH))


# ---------------------------------------------------------------------- zmqps
def run_zmqps(fs: Any, tmp: Path, P: int, M: int, schedule: str, batch: int, steps: int) -> dict[str, float]:
    """One pipeline job; returns bubble and throughput from the stages' own accounting."""
    from tests.pipeline_run import stage_stats
    from tests.procs import Procs

    procs = Procs(tmp)
    name = f"P{P}-M{M}-{schedule}"
    env = {"BENCH_LAYERS": str(P), "BENCH_ROWS": str(batch * steps), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for k in ("BENCH_FWD_MS", "BENCH_BWD_MS"):
        env[k] = os.environ[k]
    ready = tmp / f"{name}.ready"
    try:
        server = fs.spawn(f"{name} server", "ps", ["--bind", "tcp://127.0.0.1:0", "--workers", str(P),
                                                   "--ready-file", str(ready), "--checkpoint-dir", str(tmp / name),
                                                   "--log-level", "warning"], tmp / f"{name}-server.log", env)
        procs.children.append(server)
        while not (ready.exists() and ready.read_text().strip()):
            if server.poll() is not None:
                raise RuntimeError(server.output())
            time.sleep(0.02)
        part = ",".join(f"{i}:{i + 1}" for i in range(P))
        stages = []
        for k in range(P):
            args = ["--server", ready.read_text().strip(), "--rank", str(k), "--world-size", str(P),
                    "--mode", "pipeline", "--stages", str(P), "--partition", part, "--microbatches", str(M),
                    "--schedule", schedule, "--model", "benchmarks.pipeline:sleep_model",
                    "--data", "benchmarks.pipeline:bench_data", "--batch-size", str(batch), "--epochs", "1",
                    "--no-shuffle", "--device", "cpu", "--progress", "off", "--timeout", "120"]
            stages.append(fs.spawn(f"{name} stage {k}", "worker", args, tmp / f"{name}-stage-{k}.log", env))
            procs.children.append(stages[-1])
        procs.wait_ok([*stages, server], timeout=600)
        stats = [stage_stats(s.output(tail=100_000)) for s in stages]
    finally:
        procs.cleanup()
    window0 = stats[0]["steady_window_s"]
    bubble = 1 - sum(s["steady_busy_s"] for s in stats) / (P * window0)
    loop = max(s["steady_loop_s"] for s in stats)
    return {"bubble": bubble, "ideal": (P - 1) / (M + P - 1), "samples_s": batch * (steps - 1) / loop,
            "window_ms": 1e3 * window0 / (steps - 1), "step_ms": 1e3 * loop / (steps - 1),
            "peak": max(s["peak_held"] for s in stats)}


# ---------------------------------------------------------------------- torch.distributed.pipelining
def _torch_stage(rank: int, P: int, M: int, batch: int, steps: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=P)
    torch.manual_seed(0)
    model = sleep_model()
    torch.manual_seed(0)
    data = bench_data()
    stage_mod = model[rank:rank + 1]
    opt = torch.optim.SGD(stage_mod.parameters(), lr=0.01)
    sched = ScheduleGPipe(PipelineStage(stage_mod, rank, P, torch.device("cpu")), n_microbatches=M,
                          loss_fn=nn.functional.mse_loss)
    x_all, y_all = data.tensors
    t0 = 0.0
    for step in range(steps):
        if step == 1:
            dist.barrier()
            t0 = time.perf_counter()
        x, y = x_all[step * batch:(step + 1) * batch], y_all[step * batch:(step + 1) * batch]
        opt.zero_grad()
        if rank == 0:
            sched.step(x)
        elif rank == P - 1:
            sched.step(target=y, losses=[])
        else:
            sched.step()
        opt.step()
    dist.barrier()
    if rank == 0:
        Path(out).write_text(str(time.perf_counter() - t0))
    dist.destroy_process_group()


def run_torch(tmp: Path, P: int, M: int, batch: int, steps: int, port: int) -> dict[str, float]:
    """ScheduleGPipe on gloo, same model, split, M and batches; samples/s over steps 2..N."""
    import torch.multiprocessing as mp

    os.environ.update(BENCH_LAYERS=str(P), BENCH_ROWS=str(batch * steps))
    out = tmp / f"torch-P{P}-M{M}.txt"
    mp.spawn(_torch_stage, args=(P, M, batch, steps, port, str(out)), nprocs=P, join=True)
    secs = float(out.read_text())
    return {"samples_s": batch * (steps - 1) / secs, "step_ms": 1e3 * secs / (steps - 1)}


# ---------------------------------------------------------------------- report
def main(argv: list[str] | None = None) -> int:
    """Run the grid and write the markdown report."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="2,4", help="comma-separated P values")
    ap.add_argument("--micro", default="1,2,4,8", help="comma-separated M values")
    ap.add_argument("--schedules", default="gpipe,1f1b")
    ap.add_argument("--torch-micro", default="4,8", help="M values compared with torch's ScheduleGPipe")
    ap.add_argument("--steps", type=int, default=6, help="steps per run (the first is warm-up)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fwd-ms", type=float, default=20.0)
    ap.add_argument("--bwd-ms", type=float, default=40.0)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default="docs/benchmarks-pipeline.md")
    args = ap.parse_args(argv)
    os.environ.update(BENCH_FWD_MS=str(args.fwd_ms), BENCH_BWD_MS=str(args.bwd_ms))
    Ps = [int(p) for p in args.stages.split(",")]
    Ms = [int(m) for m in args.micro.split(",")]
    from tests.forkserver import ForkServer

    rows: list[str] = []
    cmp_rows: list[str] = []
    fs = ForkServer()
    try:
        with tempfile.TemporaryDirectory(prefix="zmqps-bench-") as d:
            tmp = Path(d)
            for P in Ps:
                for M in Ms:
                    for sched in args.schedules.split(","):
                        r = run_zmqps(fs, tmp, P, M, sched, args.batch, args.steps)
                        line = (f"| {P} | {M} | {sched} | {r['ideal']:.3f} | {r['bubble']:.3f} | "
                                f"{r['bubble'] - r['ideal']:+.3f} | {r['window_ms']:.0f} | {r['step_ms']:.0f} | "
                                f"{r['peak']} |")
                        rows.append(line)
                        print(line, flush=True)
                        if sched == "gpipe" and not args.no_torch and str(M) in args.torch_micro.split(","):
                            t = run_torch(tmp, P, M, args.batch, args.steps, 29500 + 10 * P + M)
                            c = (f"| {P} | {M} | {r['samples_s']:.0f} | {t['samples_s']:.0f} | "
                                 f"{r['samples_s'] / t['samples_s']:.2f} | {r['step_ms']:.0f} | {t['step_ms']:.0f} |")
                            cmp_rows.append(c)
                            print(c, flush=True)
    finally:
        fs.close()
    report = [
        "# Pipeline benchmark", "",
        f"`python -m benchmarks.pipeline` on this machine ({os.cpu_count()} cores, shared), torch {torch.__version__}. "
        f"Model: one layer per stage, each layer a Linear(16, 16) whose forward sleeps {args.fwd_ms:g} ms and "
        f"backward {args.bwd_ms:g} ms per microbatch (equal per-layer cost, independent of CPU contention); "
        f"batch {args.batch}, {args.steps} steps of which the first is warm-up.", "",
        "## Bubble", "",
        "Measured from each stage's own accounting: 1 - busy / makespan (stage 0's step window), averaged "
        "over stages; ideal = (P-1)/(M+P-1). window = makespan per step; step = the whole step including "
        "push/pull to the server; peak = most microbatches of activations any stage held.", "",
        "| P | M | schedule | ideal | measured | Δ | window ms | step ms | peak held |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
    ]
    if cmp_rows:
        report += [
            "## Throughput against torch.distributed.pipelining", "",
            "ScheduleGPipe on gloo (CPU), the same model, split (one layer per stage), M and batches, with a "
            "local SGD step per stage; zmqps runs GPipe with the server applying SGD. samples/s over the "
            "measured steps; ratio = zmqps / torch.", "",
            "| P | M | zmqps samples/s | torch samples/s | ratio | zmqps step ms | torch step ms |",
            "|---|---|---|---|---|---|---|", *cmp_rows, "",
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
