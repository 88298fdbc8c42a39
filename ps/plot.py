"""``ps-plot``: turn server metrics logs (``--metrics-log``, JSONL) into a PNG.

Two panels against wall-clock seconds since each run's first applied gradient: the
server's mean loss at every update, and throughput (samples applied per second, in 30 bins
over the run). Several logs are drawn on the same axes, each labelled by its run (the folder
of a ``metrics.jsonl``, as ``ps-launch`` writes it, else the file name) and its consistency
model, e.g. ``launch-20261130-203744: bsp``; ``benchmarks/consistency.py`` passes its own
labels to compare bsp, ssp and async. Needs matplotlib (``pip install zmqps[plot]``).
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
    """One run's updates: seconds since start, loss, samples."""

    label: str
    t: list[float] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)


def read_log(path: str | Path, label: str | None = None) -> Series:
    """The ``update`` records of one JSONL metrics log.

    Raises:
        ValueError: a line is not JSON, or the file has no records.
    """
    series = Series(label or Path(path).stem)
    t0: float | None = None
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
            if rec.get("ev") == "update" and t0 is not None:
                series.t.append(rec["t"] - t0)
                series.loss.append(rec.get("loss"))
                series.samples.append(float(rec.get("samples", 0.0)))
    if t0 is None:
        raise ValueError(f"{path}: no applied gradients recorded")
    return series


def run_name(path: str | Path) -> str:
    """A run's name: the folder of ``metrics.jsonl`` (``ps-launch``'s runs), else the file's stem."""
    p = Path(path)
    return (p.parent.name or p.stem) if p.stem == "metrics" else p.stem


def legend_labels(logs: Sequence[str | Path]) -> list[str]:
    """``RUN: MODE`` for each log, distinct: runs of one name are told apart by their whole path."""
    labels = [f"{run_name(p)}: {read_log(p).label}" for p in logs]
    return [f"{p}: {read_log(p).label}" if labels.count(lab) > 1 else lab for p, lab in zip(logs, labels)]


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
    """Draw loss and throughput of ``logs`` into the PNG ``out``; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from common.install import install_hint

        raise RuntimeError(f"ps-plot needs matplotlib: {install_hint('plot')}") from e
    fig, (ax_loss, ax_rate) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    labels = list(labels) if labels else legend_labels(logs)
    for i, path in enumerate(logs):
        s = read_log(path, labels[i])
        pts = [(t, v) for t, v in zip(s.t, s.loss) if v is not None]
        if pts:
            ax_loss.plot([p[0] for p in pts], [p[1] for p in pts], label=s.label, lw=1)
        ax_rate.step(*throughput(s), where="post", label=s.label, lw=1)
    ax_loss.set_ylabel("loss (server mean)")
    ax_loss.set_yscale("log")
    ax_rate.set_ylabel("samples/s")
    ax_rate.set_xlabel("seconds since the first applied gradient")
    for ax in (ax_loss, ax_rate):
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_title(title or "zmqps training")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ps-plot``."""
    parser = argparse.ArgumentParser(prog="ps-plot", description="plot loss and throughput from metrics logs")
    parser.add_argument("logs", nargs="+", help="JSONL files written by ps-server --metrics-log")
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
