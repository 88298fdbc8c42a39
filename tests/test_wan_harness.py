"""The throttled-link harness of ``python -m benchmarks wan``: the lab's limits and its clean-up,
the stale-lab clean-up after a killed process, the mode checks, server shards, time per step,
and the benchmark end to end (DDP + bsp, and bsp with one and two server shards)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.netlab import Lab, cleanup_stale, lab_namespaces, netns_available, rate_bits
from benchmarks.wan import parse
from benchmarks.wanmodes import SHARDS_MODES, Mode, missing, select, server_hosts, unsupported
from benchmarks.wanreport import shard_ratios, summarize, table, time_to
from benchmarks.wanrun import round_steps, update_interval

ROOT = Path(__file__).resolve().parent.parent
NETNS_OK, NETNS_WHY = netns_available()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"network namespaces unavailable: {NETNS_WHY}")


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _wan(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python -m benchmarks wan ARGS``, and the namespaces of its own labs still there after it.

    Only its own (``zqlab-<its pid>-``, [Note: lab names]): someone else's benchmark may make
    and delete labs on the same machine meanwhile.
    """
    child = subprocess.Popen([sys.executable, "-m", "benchmarks", "wan", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.terminate()  # SIGTERM: it unwinds and deletes its labs
        child.communicate(timeout=60)
        raise
    left = {n for n in _netns() if n.startswith(f"zqlab-{child.pid}-")}
    return subprocess.CompletedProcess(child.args, child.returncode, out, err), left


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@needs_netns
@pytest.mark.netns
def test_the_lab_limits_both_directions_and_deletes_all_it_made_even_when_the_body_raises() -> None:
    before, links = _netns(), _root_links()
    made: list[str] = []
    with pytest.raises(RuntimeError, match="the body failed"):
        with Lab(["a", "b"], {"a": "100mbit", "b": "1gbit"}) as lab:
            made = lab.namespaces()
            assert len(made) == 3 and set(made) <= _netns() - before
            for host, shown in (("a", "100Mbit"), ("b", "1Gbit")):
                own, switch_side = lab.qdiscs(host)  # what the host sends, what it receives
                assert "tbf" in own and f"rate {shown}" in own, own
                assert "tbf" in switch_side and f"rate {shown}" in switch_side, switch_side
            assert set(lab.counters()) == {"a", "b"}
            raise RuntimeError("the body failed")
    assert not set(made) & _netns()
    assert not {n for n in _root_links() - links if n == "br0" or n.startswith(("p0", "p1", "eth0"))}


@needs_netns
@pytest.mark.netns
def test_stale_cleanup_removes_a_killed_processs_lab_and_leaves_live_ones() -> None:
    code = ("import sys, time\nfrom benchmarks.netlab import Lab\nlab = Lab(['x', 'y'], {'x': '100mbit'}).__enter__()\n"
            "print(' '.join(lab.namespaces()), flush=True)\ntime.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None
    names = child.stdout.readline().split()
    child.send_signal(signal.SIGKILL)  # no context manager, no atexit: the lab is left behind
    child.wait(10)
    assert len(names) == 3 and set(names) <= _netns()
    with Lab(["live"]) as live:
        gone = cleanup_stale()
        assert set(names) <= set(gone) and not set(names) & _netns()
        assert set(live.namespaces()) <= set(lab_namespaces())  # this process's lab is not stale


@needs_netns
@pytest.mark.netns
@pytest.mark.timeout(300)
def test_wan_quick_runs_end_to_end_and_writes_its_json_and_png(tmp_path: Path) -> None:
    proc, left = _wan(["--quick", "--out", str(tmp_path)], timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "wan.json").read_text())
    (cell,) = result["cells"]
    assert (cell["link"], cell["k"]) == ("100mbit", 2)
    runs = {r["label"]: r for r in cell["runs"]}
    assert set(runs) == {"ddp/gloo", "zmqps bsp"}
    for r in runs.values():
        assert r["ok"] and r["evals"] and r["final_loss"] is not None and r["wire_bytes"] > 0
        assert set(r["bytes"]) == {"server", "w0", "w1"}
    assert runs["zmqps bsp"]["bytes"]["server"]["rx"] > 0 and runs["ddp/gloo"]["bytes"]["server"]["tx"] < 10_000
    assert runs["zmqps bsp"]["final_loss"] == pytest.approx(runs["ddp/gloo"]["final_loss"], rel=1e-3)  # one math
    assert runs["ddp/gloo"]["time_to_target"] is not None and runs["zmqps bsp"]["time_to_target"] is not None
    assert (tmp_path / "heldout-100mbit-K2.png").stat().st_size > 0
    assert "| 100mbit | 2 | zmqps bsp |" in proc.stdout
    assert not left


@needs_netns
@pytest.mark.netns
def test_a_lab_of_two_server_shards_limits_each_servers_own_link_and_counts_its_bytes() -> None:
    hosts = [*server_hosts(2), "w0"]
    assert hosts == ["server", "server1", "w0"]
    with Lab(hosts, {h: "100mbit" for h in hosts}) as lab:
        assert len(set(lab.addr.values())) == 3
        for host in server_hosts(2):
            own, switch_side = lab.qdiscs(host)
            assert "rate 100Mbit" in own and "rate 100Mbit" in switch_side, (host, own, switch_side)
        assert set(lab.counters()) == set(hosts)
        made = lab.namespaces()
    assert not set(made) & _netns()


@needs_netns
@pytest.mark.netns
@pytest.mark.timeout(200)
def test_wan_shards_only_runs_bsp_on_one_and_two_server_hosts(tmp_path: Path) -> None:
    proc, left = _wan(["--quick", "--shards-only", "--out", str(tmp_path)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cell,) = json.loads((tmp_path / "wan.json").read_text())["cells"]
    runs = {r["label"]: r for r in cell["runs"]}
    assert set(runs) == {"zmqps bsp", "zmqps bsp/2 shards"}  # no DDP
    one, two = runs["zmqps bsp"], runs["zmqps bsp/2 shards"]
    for r in (one, two):
        assert r["ok"] and set(r["bytes"]) == {"server", "server1", "w0", "w1"}
        assert r["steps"] == cell["steps"] > 1 and r["step_s"] == pytest.approx(r["wall_s"] / r["steps"])
        assert 0 < r["update_s"] < r["step_s"]  # start-up excluded
    assert one["bytes"]["server1"]["rx"] < 10_000 < one["bytes"]["server"]["rx"]  # the idle second server host
    assert two["bytes"]["server1"]["rx"] > 10_000 and two["bytes"]["server"]["rx"] > 10_000  # each owns a share
    assert max(c["tx"] for c in two["bytes"].values()) < max(c["tx"] for c in one["bytes"].values())
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)  # sharding changes no math
    (ratio,) = cell["shards"]
    assert (ratio["label"], ratio["vs"]) == ("zmqps bsp/2 shards", "zmqps bsp")
    assert ratio["update_ratio"] == pytest.approx(two["update_s"] / one["update_s"])
    assert (tmp_path / "100mbit-K2" / "bsp-2shards" / "metrics1.jsonl").stat().st_size > 0
    assert "| 100mbit | 2 | zmqps bsp/2 shards |" in proc.stdout and "zmqps bsp/2 shards / zmqps bsp =" in proc.stdout
    assert not left


def test_a_mode_is_skipped_when_the_help_does_not_list_its_options() -> None:
    server_help = "--sync {bsp,async,ssp} consistency --optimizer {sgd,momentum,adam} optimizer --lr LR"
    worker_help = "--server SERVER --bucket-mb BUCKET_MB"
    bsp, topk, diloco = select(["bsp", "bsp+topk", "diloco"])
    assert unsupported(bsp, server_help, worker_help) is None
    assert unsupported(topk, server_help, worker_help) == "ps-worker --help does not list --compress"
    assert "offers --sync {bsp,async,ssp}, not diloco" in unsupported(diloco, server_help, worker_help)
    later = "--sync {bsp,async,ssp,diloco,diloco-async} --inner-steps INNER_STEPS --optimizer {sgd,adam,adamw}"
    assert unsupported(diloco, later, worker_help) is None  # runs once the flags are merged
    assert unsupported(topk, server_help, "--compress COMPRESS") is None
    assert missing(["--sync", "ssp", "--lr", "0.1"], server_help) is None
    assert missing(["--lr=0.1"], server_help) is None
    assert missing(["--bucket-mb", "4"], server_help) == "does not list --bucket-mb"


def test_modes_are_one_line_specs() -> None:
    want = Mode("fp16", ("--lr", "0.1"), ("--wire-dtype", "float16"))
    assert Mode.parse("fp16;--lr 0.1;--wire-dtype float16") == want
    assert Mode.parse("plain") == Mode("plain")
    assert [m.label for m in select(["x", "bsp"], ["x;;--bucket-mb 0"])] == ["x", "bsp"]
    with pytest.raises(ValueError, match="unknown mode"):
        select(["nope"])


def test_a_mode_of_server_shards_and_the_switch_that_runs_only_them() -> None:
    (two,) = select(["bsp/2 shards"])
    assert (two.shards, two.family, two.folder, two.server, two.worker) == (2, "bsp", "bsp-2shards", (), ())
    assert (Mode("bsp").shards, Mode("bsp").family, Mode("bsp+topk").folder) == (1, "bsp", "bsp+topk")
    assert Mode.parse("wide/3 shards;--lr 0.1;;3") == Mode("wide/3 shards", ("--lr", "0.1"), (), 3)
    assert Mode.parse("wide/3 shards;--lr 0.1;;3").family == "wide"
    with pytest.raises(ValueError, match="whole number"):
        Mode.parse("x;;;two")
    with pytest.raises(ValueError, match="at least 1"):
        Mode("x", shards=0)
    assert server_hosts(1) == ["server"] and server_hosts(3) == ["server", "server1", "server2"]
    a = parse(["--shards-only"])
    assert (a.modes.split(","), a.no_ddp, a.links) == (list(SHARDS_MODES), True, "100mbit")
    assert parse(["--shards-only", "--links", "1gbit"]).links == "1gbit"
    assert parse([]).links == "1gbit,100mbit" and "bsp/2 shards" in parse([]).modes.split(",")
    assert (parse(["--quick"]).modes, parse(["--quick"]).no_ddp) == ("bsp", False)


def test_time_per_step_is_the_median_gap_between_updates_and_shards_compare_by_ratio(tmp_path: Path) -> None:
    logs = [tmp_path / "metrics.jsonl", tmp_path / "metrics1.jsonl"]
    logs[0].write_text("\n".join(json.dumps(r) for r in [
        {"t": 100.0, "ev": "start"}, {"t": 105.0, "ev": "update"}, {"t": 105.5, "ev": "push"},
        {"t": 106.0, "ev": "update"}, {"t": 107.0, "ev": "update"}, {"t": 110.0, "ev": "update"}]) + "\n{\"t\": 1")
    logs[1].write_text(json.dumps({"t": 1.0, "ev": "update"}) + "\n")  # one update: no interval
    assert update_interval(logs) == 1.0  # gaps 1, 1, 3; the start and the cut line are not updates
    assert update_interval([tmp_path / "missing.jsonl"]) is None

    def row(label: str, shards: int, step: float, update: float | None) -> dict:
        return {"label": label, "ok": True, "wall_s": 10 * step, "final_loss": 0.5, "time_to_target": None,
                "vs_ddp": None, "wire_bytes": 10, "evals": [], "bytes": {"server": {"tx": 5, "rx": 5}},
                "family": label.split()[1].split("/")[0] if shards else "", "shards": shards, "steps": 10,
                "step_s": step, "update_s": update}

    rows = [row("ddp/gloo", 0, 0.2, None), row("zmqps bsp", 1, 0.4, 0.3), row("zmqps bsp/2 shards", 2, 0.3, 0.15)]
    (ratio,) = shard_ratios(rows)
    assert (ratio["step_ratio"], ratio["update_ratio"]) == (pytest.approx(0.75), pytest.approx(0.5))
    got = summarize([rows[2], {**rows[2], "step_s": 0.5, "update_s": 0.25}])
    assert (got["step_s"], got["update_s"]) == (pytest.approx(0.4), pytest.approx(0.2))
    md = table([{"link": "100mbit", "k": 2, "target": None, "runs": rows}])
    assert "| 100mbit | 2 | zmqps bsp/2 shards | 3.0 | - | 300.0 | 150.0 |" in md
    assert "| 100mbit | 2 | ddp/gloo | 2.0 | - | 200.0 | - |" in md
    assert "zmqps bsp/2 shards / zmqps bsp = 0.75 (wall / steps), 0.50 (median between updates)" in md


def test_a_round_of_local_steps_is_read_from_the_server_options() -> None:
    assert round_steps(["--workers", "2", "--sync", "diloco", "--inner-steps", "7", "--optimizer", "adamw"]) == 7
    assert round_steps(["--workers", "2", "--sync", "diloco-async"]) == 50  # ps-server's default H
    assert round_steps(["--workers", "2", "--lr", "0.1"]) == 0


def test_repetitions_are_summarized_by_medians_and_the_first_ones_curve() -> None:
    def row(wall: float, tt: float | None, ratio: float | None) -> dict:
        return {"label": "zmqps bsp", "ok": True, "wall_s": wall, "final_loss": 0.1, "time_to_target": tt,
                "vs_ddp": ratio, "wire_bytes": 10, "evals": [{"t": wall, "step": 1, "loss": 0.1}], "bytes": {}}

    got = summarize([row(3.0, 2.0, 0.5), row(1.0, None, None), row(2.0, 4.0, 0.7)])
    assert (got["wall_s"], got["time_to_target"], got["vs_ddp"], got["reached"]) == (2.0, 3.0, 0.6, 2)
    assert got["evals"][0]["t"] == 3.0 and len(got["reps"]) == 3
    assert "3.0 (2/3 reached)" in table([{"link": "1gbit", "k": 2, "target": 0.1, "runs": [got]}])


def test_time_to_target_is_the_first_eval_within_the_tolerance() -> None:
    evals = [{"t": 1.0, "loss": 2.0}, {"t": 2.0, "loss": 1.004}, {"t": 3.0, "loss": 0.9}]
    assert time_to(evals, 1.0) == 2.0  # within 0.5 %
    assert time_to(evals, 1.0, tol=0.0) == 3.0
    assert time_to(evals, 0.5) is None
    assert rate_bits("100mbit") == 1e8 and rate_bits("1gbit") == 1e9


def test_the_training_clock_leaves_out_the_evaluations_before_each_record(tmp_path: Path) -> None:
    """[Note: training clock]: a record's ``train_t`` is its wall time less the earlier evaluations' seconds."""
    from benchmarks.wanrun import _curve, children_cpu

    log = tmp_path / "eval.jsonl"
    recs = [{"ev": "eval", "t": 100.0, "step": 0, "heldout_loss": 3.0, "seconds": 2.0, "rank": 0},
            {"ev": "eval", "t": 110.0, "step": 10, "heldout_loss": 2.0, "seconds": 1.5, "rank": 0},
            {"ev": "eval", "t": 111.0, "step": 10, "heldout_loss": 9.0, "seconds": 5.0, "rank": 1},
            {"ev": "eval", "t": 120.0, "step": 20, "heldout_loss": 1.0, "rank": 0}]  # no seconds: counts as 0
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    curve = _curve(log, 99.0)
    assert [(e["t"], e["train_t"]) for e in curve] == [(1.0, 1.0), (11.0, 9.0), (21.0, 17.5)]
    assert time_to(curve, 2.0) == 11.0 and time_to(curve, 2.0, clock="train_t") == 9.0
    before = children_cpu()
    subprocess.run([sys.executable, "-c", "sum(range(3_000_000))"], check=True)
    assert children_cpu() > before  # a reaped child's CPU time counts


def test_lr_sets_the_learning_rate_of_ddp_and_of_every_mode_that_does_not_set_its_own() -> None:
    from benchmarks.wan import job_of
    from common.config import ServerConfig, parse_config

    def lr(args: list[str]) -> float:
        return parse_config(ServerConfig, ["--workers", "4", *args], prog="ps-server", environ={}).lr

    job = job_of(parse(["--example", "charlm"]))
    tuned = job_of(parse(["--example", "charlm", "--lr", "0.005"]))
    assert lr(list(job.server_args)) == 0.003 and lr(list(tuned.server_args)) == 0.005
    assert lr([*tuned.server_args, "--lr", "0.01"]) == 0.01  # a mode's own --lr comes later and wins
