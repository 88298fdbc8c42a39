"""``ps-plot``: turn server metrics logs (``--metrics-log``, JSONL) into a PNG.

Two panels against wall-clock seconds since each run's first applied gradient: the
server's mean loss at every update, and throughput (samples applied per second, in 30 bins
over the run). Several logs are drawn on the same axes, each labelled by its run (the folder
of a ``metrics.jsonl``, as ``ps-launch`` writes it, else the file name) and its consistency
model, e.g. ``launch-20261130-203744: bsp``; ``benchmarks/consistency.py`` passes its own
labels to compare bsp, ssp and async. Needs matplotlib (``pip install zmqps[plot]``).

A log with held-out evaluations (``"ev": "eval"`` records: a worker's ``--eval-log``, which
``ps-launch`` writes as ``eval.jsonl`` beside ``metrics.jsonl``) adds a third panel: the
held-out loss against seconds since that log's first evaluation (the one before the first
step). Give both files of a run, e.g. ``ps-plot runs/*/metrics.jsonl runs/*/eval.jsonl``; a log
may hold either kind of record or both.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

BINS = 30


@dataclass
class Series:
    """One run's updates (seconds since start, loss, samples) and held-out evaluations."""

    label: str
    t: list[float] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)
    eval_t: list[float] = field(default_factory=list)
    """Seconds since the log's first evaluation."""
    eval_step: list[int] = field(default_factory=list)
    heldout: list[float] = field(default_factory=list)


def read_log(path: str | Path, label: str | None = None) -> Series:
    """The ``update`` and ``eval`` records of one JSONL log.

    The label is ``label``, else the consistency model of a ``start`` record, else the file's
    stem; a log with evaluations only (a worker's ``--eval-log``) has the label ``""``.

    Raises:
        ValueError: a line is not JSON, or the file has neither kind of record.
    """
    series = Series(label or Path(path).stem)
    t0: float | None = None
    e0: float | None = None
    named = label is not None
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            if t0 is None and rec.get("ev") in ("push", "update"):
                t0 = rec["t"]
            if rec.get("ev") == "start" and label is None:
                s = rec.get("sync", "")
                series.label = f"{s} (S={rec.get('staleness')})" if s == "ssp" else s or series.label
                named = True
            if rec.get("ev") == "update" and t0 is not None:
                series.t.append(rec["t"] - t0)
                series.loss.append(rec.get("loss"))
                series.samples.append(float(rec.get("samples", 0.0)))
            if rec.get("ev") == "eval":
                e0 = rec["t"] if e0 is None else e0
                series.eval_t.append(rec["t"] - e0)
                series.eval_step.append(int(rec["step"]))
                series.heldout.append(float(rec["heldout_loss"]))
    if t0 is None and e0 is None:
        raise ValueError(f"{path}: no applied gradients or held-out evaluations recorded")
    if t0 is None and not named:
        series.label = ""
    return series


def run_name(path: str | Path) -> str:
    """A run's name: the folder of ``metrics.jsonl`` or ``eval.jsonl`` (``ps-launch``'s runs), else the file's stem."""
    p = Path(path)
    return (p.parent.name or p.stem) if p.stem in ("metrics", "eval") else p.stem


def legend_labels(logs: Sequence[str | Path]) -> list[str]:
    """``RUN: MODE`` for each log (``RUN`` for evaluations only), distinct: runs of one name are told
    apart by their whole path."""
    modes = [read_log(p).label for p in logs]

    def name(run: str | Path, mode: str) -> str:
        return f"{run}: {mode}" if mode else str(run)

    labels = [name(run_name(p), m) for p, m in zip(logs, modes)]
    return [name(p, m) if labels.count(lab) > 1 else lab for p, m, lab in zip(logs, modes, labels)]


def throughput(series: Series, bins: int = BINS) -> tuple[list[float], list[float]]:
    """Samples per second in ``bins`` equal time bins over the run: (bin starts, rates)."""
    if not series.t:
        return [], []
    width = max(series.t[-1] / bins, 1e-3)
    totals = [0.0] * bins
    for t, n in zip(series.t, series.samples):
        totals[min(int(t / width), bins - 1)] += n
    return [i * width for i in range(bins)], [n / width for n in totals]


def plot(logs: Sequence[str | Path], out: str | Path, title: str = "", labels: Sequence[str] | None = None) -> Path:
    """Draw loss and throughput of ``logs`` (and held-out loss, if any) into the PNG ``out``; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from common.install import install_hint

        raise RuntimeError(f"ps-plot needs matplotlib: {install_hint('plot')}") from e
    labels = list(labels) if labels else legend_labels(logs)
    runs = [read_log(path, labels[i]) for i, path in enumerate(logs)]
    trained, evaluated = [s for s in runs if s.t], [s for s in runs if s.eval_t]
    panels = 2 * bool(trained) + bool(evaluated)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.25 * panels), squeeze=False)
    axes = list(axes[:, 0])
    if trained:
        ax_loss, ax_rate = axes[0], axes[1]
        ax_rate.sharex(ax_loss)
        for s in trained:
            pts = [(t, v) for t, v in zip(s.t, s.loss) if v is not None]
            if pts:
                ax_loss.plot([p[0] for p in pts], [p[1] for p in pts], label=s.label, lw=1)
            ax_rate.step(*throughput(s), where="post", label=s.label, lw=1)
        ax_loss.set_ylabel("loss (server mean)")
        ax_loss.set_yscale("log")
        ax_rate.set_ylabel("samples/s")
        ax_rate.set_xlabel("seconds since the first applied gradient")
    if evaluated:
        ax_eval = axes[-1]
        for s in evaluated:
            ax_eval.plot(s.eval_t, s.heldout, marker=".", label=s.label, lw=1)
        ax_eval.set_ylabel("held-out loss")
        ax_eval.set_xlabel("seconds since the first held-out evaluation (before the first step)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title(title or "zmqps training")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ps-plot``."""
    parser = argparse.ArgumentParser(prog="ps-plot", description="plot loss and throughput from metrics logs, "
                                     "and held-out loss from evaluation logs")
    parser.add_argument("logs", nargs="+", help="JSONL files written by ps-server --metrics-log or "
                        "ps-worker --eval-log")
    parser.add_argument("-o", "--output", default="metrics.png", help="PNG to write [default: metrics.png]")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    try:
        path = plot(args.logs, args.output, args.title)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        sys.stderr.write(f"ps-plot: error: {e}\n")
        return 1
    sys.stderr.write(f"ps-plot: wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
