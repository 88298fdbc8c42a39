"""Small things a newcomer trips over, each now said out loud.

An indivisible global batch is named with its split; ``--help`` shows what a default really
is and starts with the options a first run needs; a missing extra names a command that keeps
the editable install of a checkout; ``ps-plot`` tells overlaid runs apart; the default job
says why its loss does not fall and what to run next.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import LaunchConfig, ServerConfig, WorkerConfig, build_parser
from common.errors import ConfigError
from ps import plot
from tests.procs import ROOT, Procs, child_env
from worker.data import ShardPlan

ROLES = [(ServerConfig, "ps-server"), (WorkerConfig, "ps-worker"), (LaunchConfig, "ps-launch")]


def test_an_uneven_batch_split_is_described() -> None:
    assert ShardPlan(1000, 2, 100, 0).uneven() is None
    text = ShardPlan(1000, 2, 101, 0).uneven()
    assert text is not None and "rank 0 takes 51 rows per step, rank 1 50" in text
    assert "ranks 0-2 take 11 rows per step, ranks 3-9 10" in (ShardPlan(1000, 10, 103, 0).uneven() or "")


@pytest.mark.timeout(240)
def test_the_default_job_warns_of_an_uneven_batch_and_says_what_to_try_next(procs: Procs, tmp_path: Path) -> None:
    child = procs.spawn("launch", [sys.executable, "-m", "worker.launch", "--batch-size", "101", "--epochs", "1",
                                   "--progress", "off", "--checkpoint-dir", str(tmp_path / "ck")])
    assert child.wait(180) == 0, child.output()
    out = child.output(40000)
    warned = [ln for ln in out.splitlines() if "is not a multiple of" in ln]
    assert len(warned) == 1 and "WARNING [worker 0] --batch-size 101" in warned[0], warned
    assert "rank 0 takes 51 rows per step, rank 1 50" in warned[0]
    last = out.strip().splitlines()[-1]
    assert "[launch]" in last and "random targets" in last and "ps-launch --example digits" in last


@pytest.mark.parametrize("cls, prog", ROLES)
def test_help_shows_real_defaults_and_starts_with_a_first_runs_options(cls, prog) -> None:
    text = build_parser(cls, prog, "").format_help()
    assert "default: None" not in text
    assert text.splitlines()[0] == f"usage: {prog} [OPTIONS]"
    head = "\n".join(text.splitlines()[:12])
    assert "start here:" in head
    first = {"ps-server": "--bind", "ps-worker": "--server", "ps-launch": "--workers"}[prog]
    assert f"  {first} " in head, head


def test_ps_launch_help_names_the_defaults_it_applies() -> None:
    out = subprocess.run([sys.executable, "-m", "worker.launch", "--help"], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(out.split())
    assert "[PS_WORKERS; default: 2 (pipeline: stages x replicas)]" in flat
    assert "[PS_MODEL; default: nn.Linear(10, 1)]" in flat
    assert "[PS_CHECKPOINT_DIR; default: runs/launch-TIME]" in flat
    assert LaunchConfig().workers == 2  # what the help says is what the config does


def test_a_missing_extra_names_a_command_that_keeps_the_editable_install(monkeypatch) -> None:
    from worker.examples import digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(ConfigError) as e:
        digits._split()
    text = str(e.value)
    assert "pip install -e '" in text and "[examples]'" in text and "make setup" in text
    assert "pip install '.[" not in text


def _log(path: Path, sync: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = [{"t": 1.0, "ev": "start", "sync": sync, "staleness": 0},
            {"t": 2.0, "ev": "push", "rank": 0, "step": 0, "staleness": 0, "lead": 0, "samples": 10.0, "loss": 1.0},
            {"t": 2.0, "ev": "update", "version": 1, "samples": 10.0, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_ps_plot_tells_two_runs_of_one_mode_apart(tmp_path: Path) -> None:
    a = _log(tmp_path / "runs" / "launch-a" / "metrics.jsonl", "bsp")
    b = _log(tmp_path / "runs" / "launch-b" / "metrics.jsonl", "bsp")
    assert plot.legend_labels([a, b]) == ["launch-a: bsp", "launch-b: bsp"]
    c = _log(tmp_path / "other" / "launch-a" / "metrics.jsonl", "bsp")
    labels = plot.legend_labels([a, c])
    assert len(set(labels)) == 2 and all("launch-a" in x for x in labels)
    assert plot.main([str(a), str(b), "-o", str(tmp_path / "x.png")]) == 0
