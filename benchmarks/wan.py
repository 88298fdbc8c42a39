"""zmqps modes vs DDP/gloo across slow links: held-out loss against wall time, bytes on the wire.

    python -m benchmarks wan [--links 1gbit,100mbit] [--workers 2,4] [--modes bsp,bsp/2 shards,bsp+topk,...]
                             [--example digits] [--epochs E] [--target X] [--out DIR] [--quick] [--shards-only]

For every link rate and K, a lab of K+S hosts (network namespaces on a bridge, every host's
link limited to the rate in both directions with ``tc tbf``: :mod:`benchmarks.netlab`) runs,
one after the other: DDP/gloo with K ranks on hosts w0.., then each zmqps mode with its server
on host ``server`` (a mode of S shards: S servers on hosts ``server``, ``server1``, ..., each
behind its own link; the lab has as many server hosts as the most sharded mode) and K workers
on w0.. (:mod:`benchmarks.wanrun`). A mode whose options the
installed ps-server/ps-worker do not have is skipped with the reason. Each run logs held-out
loss records; the report gives wall time, time per step, final held-out loss, bytes on the wire
(every host's, servers' included), the time per step of S shards against one, and the time
to reach DDP's final held-out loss ([Note: target] in :mod:`benchmarks.wanreport`), as a
markdown table (stdout and ``DIR/wan.md``), ``DIR/wan.json`` and one PNG per (link, K).
Needs root (namespaces, tc); every namespace it makes is deleted at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.harness import RESULTS, machine
from benchmarks.linkprobe import measure
from benchmarks.netlab import Lab, cleanup_stale, netns_available
from benchmarks.wanmodes import MODES, SHARDS_MODES, help_texts, select, server_hosts, unsupported
from benchmarks.wanreport import TOL, plot, shard_ratios, summarize, table, time_to
from benchmarks.wanrun import Job, RunResult, run_ddp, run_zmqps
from common.logs import setup_logging

log = logging.getLogger(__name__)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks wan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", default=None, help="tc rates of every host's link, comma-separated "
                                                  "(default 1gbit,100mbit; --quick, --shards-only: 100mbit)")
    ap.add_argument("--workers", default="2,4", help="values of K, comma-separated")
    ap.add_argument("--modes", default=",".join(m.label for m in MODES), help="zmqps modes, comma-separated")
    ap.add_argument("--add-mode", action="append", default=[], metavar="'LABEL;SERVER ARGS;WORKER ARGS;SHARDS'",
                    help="define another mode (name it in --modes too)")
    ap.add_argument("--no-ddp", action="store_true", help="skip DDP/gloo (then give --target)")
    ap.add_argument("--example", default="digits", help="worker.examples.NAME: model, data, test data, presets")
    ap.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                    help="another model for the example's data (default: the example's; e.g. benchmarks.wanwide:model, "
                         "4.5 MB of gradients a step)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the example's")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default: the example's)")
    ap.add_argument("--lr", type=float, default=None,
                    help="the job's learning rate, DDP's and every zmqps mode's (default: the example's; a mode's own "
                         "--lr wins)")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: 20 per run)")
    ap.add_argument("--bench-eval", action="store_true",
                    help="zmqps rank 0 logs held-out loss through benchmarks.evalworker (DDP's own evaluation) even "
                         "where ps-worker has --eval-every")
    ap.add_argument("--target", type=float, default=None, help="held-out loss to reach (default: DDP's final)")
    ap.add_argument("--tol", type=float, default=TOL, help="relative tolerance of reaching the target")
    ap.add_argument("--reps", type=int, default=1,
                    help="repetitions of every run, in alternation; the table gives medians (ratios: of each pair)")
    ap.add_argument("--probe-seconds", type=float, default=2.0, help="length of the link throughput check")
    ap.add_argument("--out", default=None, help="results folder (default: runs/bench/wan-TIME)")
    ap.add_argument("--quick", action="store_true", help="one 100mbit lab, K=2, bsp + DDP, one epoch")
    ap.add_argument("--shards-only", action="store_true",
                    help=f"the server-shards question: modes {' and '.join(SHARDS_MODES)} only, no DDP, "
                         "100mbit unless --links")
    a = ap.parse_args(argv)
    if a.quick:
        a.links, a.workers, a.modes, a.probe_seconds = a.links or "100mbit", "2", "bsp", 0.5
        a.epochs = a.epochs or 1
    if a.shards_only:
        a.modes, a.no_ddp, a.links = ",".join(SHARDS_MODES), True, a.links or "100mbit"
    a.links = a.links or "1gbit,100mbit"
    return a


def job_of(a: argparse.Namespace) -> Job:
    """The example's job with the command line's overrides (``--lr``: DDP's and every mode's, a
    mode's own ``--lr`` coming later wins)."""
    job = Job.from_example(a.example, epochs=a.epochs, batch=a.batch_size, eval_every=a.eval_every or None,
                           model=a.model)
    if a.lr is not None:
        job = dataclasses.replace(job, server_args=(*job.server_args, "--lr", str(a.lr)))
    return job


def _steps(job: Job, k: int) -> int:
    from worker.data import ShardPlan
    from worker.factories import build_data

    return ShardPlan(len(build_data(job.data, job.seed)), k, job.batch, 0).steps_per_epoch * job.epochs


def _result(r: RunResult, steps: int) -> dict[str, Any]:
    return {"label": r.label, "ok": r.ok, "error": r.error[-2000:], "wall_s": r.wall_s, "final_loss": r.final_loss,
            "evals": r.evals, "bytes": r.bytes, "wire_bytes": r.wire_bytes, "family": r.family,
            "shards": r.shards, "steps": steps, "step_s": r.wall_s / steps if steps else None,
            "update_s": r.update_s, "cpu_s": r.cpu_s}


def _scored(rep: dict[str, RunResult], a: argparse.Namespace, link: str, k: int,
            steps: int) -> dict[str, dict[str, Any]]:
    """One repetition's rows, with the time to its target ([Note: target]) and the ratio to DDP's."""
    ddp = rep.get("ddp/gloo")
    target = a.target if a.target is not None else (ddp.final_loss if ddp and ddp.ok else None)
    ddp_tt = time_to(ddp.evals, target, a.tol) if ddp and target is not None else None
    ddp_train = time_to(ddp.evals, target, a.tol, "train_t") if ddp and target is not None else None
    rows = {}
    for name, r in rep.items():
        row = _result(r, steps)
        tt = row["time_to_target"] = time_to(r.evals, target, a.tol) if target is not None else None
        row["vs_ddp"] = tt / ddp_tt if tt is not None and ddp_tt else None
        train = row["train_to_target"] = time_to(r.evals, target, a.tol, "train_t") if target is not None else None
        row["vs_ddp_train"] = train / ddp_train if train is not None and ddp_train else None
        row["target"] = target
        log.info("%s K=%d %s: wall %.1fs (%.1f ms/step, %s between updates, %.1f CPU s), final held-out loss %s, "
                 "%.1f MB on the wire, time to target %s (evaluation excluded: %s)", link, k, name, r.wall_s,
                 1e3 * r.wall_s / max(steps, 1), "-" if r.update_s is None else f"{1e3 * r.update_s:.1f} ms",
                 r.cpu_s, "-" if r.final_loss is None else f"{r.final_loss:.4f}",
                 r.wire_bytes / 1e6, "never" if tt is None else f"{tt:.1f}s",
                 "never" if train is None else f"{train:.1f}s")
        rows[name] = row
    return rows


def run_cell(link: str, k: int, job: Job, modes: list, a: argparse.Namespace, out: Path,
             skipped: dict[str, str], worker_evals: bool) -> dict[str, Any]:
    """Every run of one (link, K) in one lab, ``a.reps`` times in alternation ([Note: fairness])."""
    steps = _steps(job, k)
    job = job if job.eval_every else dataclasses.replace(job, eval_every=max(1, steps // 20))
    shards = max((m.shards for m in modes if m.label not in skipped), default=1)
    hosts = [*server_hosts(shards), *(f"w{i}" for i in range(k))]
    cell: dict[str, Any] = {"link": link, "k": k, "steps": steps, "eval_every": job.eval_every}
    d = out / f"{link}-K{k}"
    with Lab(hosts, {h: link for h in hosts}) as lab:
        mbit = measure(lab, "w0", "server", a.probe_seconds, job.python)
        cell["measured_mbit"] = mbit
        log.info("lab %s: %s, every link %s (tbf both ways); TCP w0 -> server measured %.1f Mbit/s", lab.tag,
                 " ".join(hosts), link, mbit)

        def ddp(path: Path) -> RunResult:
            r = run_ddp(lab, job, k, path)
            if not r.ok:  # gloo aborts a rank now and then on a loaded machine (tests/ddp_job.py retries too)
                log.warning("%s K=%d: DDP/gloo failed; running it again", link, k)
                r = run_ddp(lab, job, k, path.with_name(path.name + "-again"))
            return r

        contenders: dict[str, tuple[str, Callable[[Path], RunResult]]] = {}
        if not a.no_ddp:
            contenders["ddp/gloo"] = ("ddp", ddp)
        for mode in modes:
            if mode.label not in skipped:
                contenders[f"zmqps {mode.label}"] = (
                    mode.folder, lambda path, m=mode: run_zmqps(lab, job, k, m, path, worker_evals))
        names, reps = list(contenders), []
        for rep in range(a.reps if names else 0):
            got = {}
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                folder, run = contenders[name]
                log.info("%s K=%d, repetition %d/%d: %s, %d steps", link, k, rep + 1, a.reps, name, steps)
                got[name] = run(d / (folder if a.reps == 1 else f"{folder}-{rep + 1}"))
            reps.append(_scored({n: got[n] for n in names}, a, link, k, steps))
    cell["runs"] = [summarize([rep[name] for rep in reps]) for name in names]
    targets = [rep[names[0]]["target"] for rep in reps if names and rep[names[0]]["target"] is not None]
    cell["target"] = statistics.median(targets) if targets else None
    cell["shards"] = shard_ratios(cell["runs"])
    path = plot(cell, d.parent / f"heldout-{link}-K{k}.png", f"{job.model.split(':')[0]}: {link} links, K = {k}")
    cell["plot"] = str(path) if path else None
    return cell


def main(argv: list[str]) -> int:
    a = parse(argv)
    out = Path(a.out).resolve() if a.out else RESULTS / f"wan-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    setup_logging("info", "wan")
    fh = logging.FileHandler(out / "wan.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(fh)
    ok, why = netns_available()
    if not ok:
        log.error("the wan benchmark needs network namespaces: %s", why)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the labs are deleted
    cleanup_stale()
    job = job_of(a)
    modes = select([m for m in a.modes.split(",") if m], a.add_mode)
    server_help, worker_help = help_texts(("ps", "worker"))
    skipped = {m.label: why for m in modes if (why := unsupported(m, server_help, worker_help))}
    for label, why in skipped.items():
        log.warning("mode %s skipped: %s", label, why)
    worker_evals = "--eval-every" in worker_help and not a.bench_eval
    if not worker_evals:
        log.info("%s: zmqps rank 0 runs as benchmarks.evalworker to log held-out loss",
                 "--bench-eval" if a.bench_eval else "ps-worker has no --eval-every")
    log.info("job: %s on %s, batch %d, %d epoch(s), %s; results in %s", job.model, job.data, job.batch,
             job.epochs, " ".join(job.server_args), out)
    cells = [run_cell(link, int(k), job, modes, a, out, skipped, worker_evals)
             for link in a.links.split(",") for k in a.workers.split(",")]
    report = table(cells, skipped)
    (out / "wan.md").write_text(report)
    (out / "wan.json").write_text(json.dumps({"benchmark": "wan", "machine": machine(), "args": vars(a),
                                              "job": job.__dict__, "skipped": skipped,
                                              "cells": cells}, indent=2, default=str))
    sys.stdout.write(report)
    log.info("wrote %s, %s and %d plot(s)", out / "wan.json", out / "wan.md", sum(bool(c["plot"]) for c in cells))
    return 0 if all(r.get("ok", True) for c in cells for r in c["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
