"""The wan benchmark's results: time to a target held-out loss, the markdown table, the plots.

[Note: target] The target of a (link, K) cell is DDP/gloo's final held-out loss there unless
``--target`` gives one. A run reaches it at its first eval record with a held-out loss within
``tol`` (relative, default 0.5 %) of it: zmqps bsp computes DDP's math, and its loss differs
from DDP's in the last digits only, which must not count as never reaching it. The clock of
every run starts when its first process (a DDP rank, or a zmqps server) is spawned, so process start-up is in every time.

[Note: time per step] Two per run: wall time over the run's steps (start-up and the final
evaluation included; DDP has only this one), and, for zmqps, the median interval between the
servers' ``update`` records (one per step under bsp; start-up excluded). A mode of S server
shards is compared with the mode of one shard of the same family (its label without ``/S
shards``) by the ratio of each: below 1, the shards made a step faster (:func:`shard_ratios`).

[Note: training clock] The held-out evaluations are the benchmark's instrument, not training,
yet rank 0 runs them inline and the others wait for it (DDP at the next allreduce, zmqps at the
next step or round). An eval record carries its own ``seconds``; a run's ``train_t`` at a record
is its wall time there less the seconds of every evaluation before it, and the table gives the
time to target on both clocks. ``CPU (s)`` is the CPU time of every process of the run on every
host (``RUSAGE_CHILDREN`` after minus before): on this one machine the hosts share its cores,
so CPU time over the core count bounds the wall time from below whatever the links do.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

TOL = 0.005


def time_to(evals: Sequence[dict[str, float]], target: float, tol: float = TOL, clock: str = "t") -> float | None:
    """Seconds until the first eval at or below ``target`` (within ``tol``), or None if never.

    ``clock``: ``"t"`` (wall time since the run started) or ``"train_t"`` (the same, less the
    evaluations before it: [Note: training clock]).
    """
    bound = target + tol * abs(target)
    return next((e.get(clock, e["t"]) for e in evals if e["loss"] <= bound), None)


def _median(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None and v == v]
    return statistics.median(got) if got else None


def summarize(reps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One run's row over its repetitions: medians (the ratio to DDP: of each repetition's pair).

    The curve and per-host bytes shown are the first repetition's; every repetition is kept
    under ``"reps"``. A time to target is the median over the repetitions that reached it
    (``"reached"`` says how many did).
    """
    first = reps[0]
    return {**first, "ok": all(r["ok"] for r in reps),
            "wall_s": _median([r["wall_s"] for r in reps]), "final_loss": _median([r["final_loss"] for r in reps]),
            "time_to_target": _median([r["time_to_target"] for r in reps]),
            "vs_ddp": _median([r["vs_ddp"] for r in reps]),
            "train_to_target": _median([r.get("train_to_target") for r in reps]),
            "vs_ddp_train": _median([r.get("vs_ddp_train") for r in reps]),
            "cpu_s": _median([r.get("cpu_s") for r in reps]),
            "wire_bytes": int(_median([r["wire_bytes"] for r in reps]) or 0),
            "step_s": _median([r.get("step_s") for r in reps]), "update_s": _median([r.get("update_s") for r in reps]),
            "reached": sum(r["time_to_target"] is not None for r in reps), "reps": list(reps)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b and a == a and b == b else None


def shard_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every zmqps row of S > 1 shards against the one-shard row of its family ([Note: time per step])."""
    one = {r["family"]: r for r in rows if r.get("shards") == 1}
    out = []
    for r in rows:
        base = one.get(r.get("family", ""))
        if (r.get("shards") or 0) > 1 and base is not None:
            out.append({"family": r["family"], "shards": r["shards"], "label": r["label"], "vs": base["label"],
                        "step_ratio": _ratio(r.get("step_s"), base.get("step_s")),
                        "update_ratio": _ratio(r.get("update_s"), base.get("update_s"))})
    return out


def _reached(row: dict[str, Any]) -> str:
    n = len(row.get("reps", ()))
    return f" ({row['reached']}/{n} reached)" if n > 1 and row["reached"] < n else ""


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def table(cells: Sequence[dict[str, Any]], skipped: Mapping[str, str] | None = None) -> str:
    """A markdown table: one row per run of every (link, K) cell; then the modes skipped, and why."""
    lines = ["| link | K | run | wall (s) | CPU (s) | ms/step (wall) | ms/update (median) | final held-out loss "
             "| target | time to target (s) | vs DDP | same, evaluation excluded (s) | vs DDP | MB on the wire "
             "| MB sent by the busiest host |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ms = (lambda x: None if x is None else 1e3 * x)
    for cell in cells:
        for r in cell["runs"]:
            busiest = max((c["tx"] for c in r["bytes"].values()), default=0)
            label = r["label"] + ("" if r["ok"] else " (failed)")
            ratio = _fmt(r["vs_ddp"], ".2f") + ("x" if r["vs_ddp"] else "")
            train_ratio = _fmt(r.get("vs_ddp_train"), ".2f") + ("x" if r.get("vs_ddp_train") else "")
            lines.append(f"| {cell['link']} | {cell['k']} | {label} | {_fmt(r['wall_s'], '.1f')} "
                         f"| {_fmt(r.get('cpu_s'), '.1f')} "
                         f"| {_fmt(ms(r.get('step_s')), '.1f')} | {_fmt(ms(r.get('update_s')), '.1f')} "
                         f"| {_fmt(r['final_loss'], '.4f')} | {_fmt(cell['target'], '.4f')} "
                         f"| {_fmt(r['time_to_target'], '.1f')}{_reached(r)} | {ratio} "
                         f"| {_fmt(r.get('train_to_target'), '.1f')} | {train_ratio} "
                         f"| {r['wire_bytes'] / 1e6:.1f} | {busiest / 1e6:.1f} |")
    lines.append("")
    for cell in cells:
        for c in cell.get("shards") or shard_ratios(cell["runs"]):
            lines.append(f"{cell['link']}, K = {cell['k']}: time per step of {c['label']} / {c['vs']} = "
                         f"{_fmt(c['step_ratio'], '.2f')} (wall / steps), {_fmt(c['update_ratio'], '.2f')} "
                         "(median between updates); below 1: the shards are faster.")
    lines += [f"Skipped {label}: {why}." for label, why in (skipped or {}).items()]
    return "\n".join(lines).rstrip("\n") + "\n"


def plot(cell: dict[str, Any], path: Path, title: str) -> Path | None:
    """Held-out loss against wall time, one curve per run of the cell; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no matplotlib (pip install -e '.[plot]'): %s not drawn", path)
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in cell["runs"]:
        if r.get("evals"):
            ax.plot([e["t"] for e in r["evals"]], [e["loss"] for e in r["evals"]], marker=".", lw=1,
                    label=r["label"])
    if cell.get("target") is not None:
        ax.axhline(cell["target"], color="grey", ls="--", lw=0.8, label="target")
    ax.set_xlabel("wall time since the run started (s)")
    ax.set_ylabel("held-out loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
