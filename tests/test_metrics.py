"""Observability: the Prometheus endpoint during a job, the JSONL log, and ps-plot."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.config import ServerConfig
from common.protocol import Op
from common.transport import Requester
from ps import plot
from ps.metrics import ServerMetrics

JOB = ["--model", "tests.consistency_jobs:linear64", "--data", "tests.consistency_jobs:teacher64",
       "--progress", "off", "--epochs", "3", "--batch-size", "80"]
NAMES = {"zmqps_version", "zmqps_step", "zmqps_updates", "zmqps_pushes", "zmqps_samples", "zmqps_loss",
         "zmqps_request_seconds", "zmqps_bytes_received", "zmqps_bytes_sent", "zmqps_staleness",
         "zmqps_lead_steps", "zmqps_worker_last_seen_seconds", "zmqps_worker_clock", "zmqps_worker_done",
         "zmqps_workers_registered", "zmqps_info", "zmqps_checkpoint_step", "zmqps_checkpoint_seconds",
         "zmqps_checkpoint_failures", "zmqps_checkpoint_kept_bytes", "process_resident_memory_bytes"}


def scrape(url: str) -> dict[str, dict]:
    """Families by name; each maps (sample name, sorted labels) -> value. Fails on invalid text."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}


@pytest.mark.timeout(300)
def test_the_metrics_endpoint_serves_prometheus_text_during_a_job(procs, tmp_path, zctx):
    server, ep = procs.server(2, "--lr", "0.05", "--metrics-port", "0", "--checkpoint-every", "2")
    workers = [procs.worker(ep, k, 2, *JOB, "--stall", "1:0.1") for k in range(2)]  # 30 steps x 0.1 s
    ping = Requester(zctx, ep, who="test")
    deadline = time.monotonic() + 150
    while True:
        status = ping.request(Op.PING, {}, timeout_s=10).fields
        if status["pushes"] >= 4 and status["metrics_url"]:
            families = scrape(status["metrics_url"])  # a background checkpoint of step 2 is on disk too
            if families["zmqps_checkpoint_step"][("zmqps_checkpoint_step", ())] >= 2:
                break
        assert time.monotonic() < deadline and server.proc.poll() is None, server.output()
        time.sleep(0.2)
    assert server.proc.poll() is None, "the scrape must happen while the job runs"
    assert NAMES <= set(families), sorted(NAMES - set(families))
    assert families["zmqps_updates"][("zmqps_updates_total", ())] >= 2
    seen = families["zmqps_worker_last_seen_seconds"]
    assert {dict(labels)["rank"] for _, labels in seen} == {"0", "1"} and all(0 <= v < 30 for v in seen.values())
    assert families["zmqps_request_seconds"][("zmqps_request_seconds_count", (("op", "push_pull"),))] >= 2
    assert families["zmqps_bytes_received"][("zmqps_bytes_received_total", ())] > 0
    assert families["zmqps_bytes_sent"][("zmqps_bytes_sent_total", ())] > 0
    stale = families["zmqps_staleness"]  # bsp: every applied gradient has staleness 0
    assert stale[("zmqps_staleness_bucket", (("le", "0.0"),))] == stale[("zmqps_staleness_count", ())] >= 4
    assert families["zmqps_info"][("zmqps_info", (("lr", "0.05"), ("optimizer", "sgd"), ("staleness", "0"),
                                             ("sync", "bsp")))] == 1
    assert families["zmqps_checkpoint_seconds"][("zmqps_checkpoint_seconds_count", ())] >= 2  # θ_0's and step 2's
    assert families["zmqps_checkpoint_failures"][("zmqps_checkpoint_failures_total", ())] == 0
    procs.wait_ok([*workers, server], timeout=240)


def test_the_jsonl_log_records_pushes_and_updates(tmp_path):
    log = tmp_path / "m.jsonl"
    m = ServerMetrics(ServerConfig(workers=2, metrics_log=str(log)))
    m.start()
    m.push(0, 0, 0, 0, 40.0, 1.5)
    m.push(1, 0, 0, 0, 40.0, 0.5)
    m.update(1, 1.0)
    m.checkpoint(1, 0.25, True, 4096)
    m.checkpoint(2, 0.5, False)
    m.close(1, 1.0)
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["ev"] for r in recs] == ["start", "push", "push", "update", "checkpoint", "checkpoint", "end"]
    assert recs[4] == {**recs[4], "step": 1, "ok": True, "kept_bytes": 4096} and recs[5]["ok"] is False
    assert m.registry.get_sample_value("zmqps_checkpoint_step") == 1  # the failed step 2 does not count
    assert m.registry.get_sample_value("zmqps_checkpoint_failures_total") == 1
    assert m.registry.get_sample_value("zmqps_checkpoint_kept_bytes_total") == 4096
    assert recs[0]["sync"] == "bsp" and recs[3]["samples"] == 80.0 and recs[3]["version"] == 1
    assert all(isinstance(r["t"], float) for r in recs)
    assert m.ping_fields()["staleness"] == [[0, 2]]


def fake_log(path: Path, sync: str, rate: float) -> None:
    lines = [{"t": 100.0, "ev": "start", "sync": sync, "staleness": 2}]
    for i in range(50):
        t = 101.0 + i / rate
        lines.append({"t": t, "ev": "push", "rank": i % 2, "step": i // 2, "staleness": 0, "lead": 0,
                      "samples": 10.0, "loss": 1.0 / (i + 1)})
        lines.append({"t": t, "ev": "update", "version": i + 1, "samples": 10.0, "loss": 1.0 / (i + 1)})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_ps_plot_draws_loss_and_throughput_of_several_runs_into_a_png(tmp_path, capsys):
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "cmp.png"
    fake_log(a, "bsp", 10.0)
    fake_log(b, "ssp", 40.0)
    s = plot.read_log(b)
    assert s.label == "ssp (S=2)" and s.t[0] == 0.0 and len(s.t) == 50
    t, v = plot.throughput(s)
    assert sum(v) * (t[1] - t[0]) == pytest.approx(500.0)  # all samples accounted for
    assert plot.main([str(a), str(b), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_ps_plot_reports_a_bad_log(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 1, "ev": "start"}\nnot json\n')
    assert plot.main([str(bad), "-o", str(tmp_path / "x.png")]) == 1
    assert "bad.jsonl:2: not JSON" in capsys.readouterr().err


def test_the_metrics_endpoint_stays_on_this_host_unless_told_and_says_what_it_exposes(procs):
    """The Prometheus endpoint binds 127.0.0.1 by default (it used to follow --bind 0.0.0.0, open to
    any host, even under CURVE); ``--metrics-bind 0.0.0.0`` opens it, with a warning."""
    server, _ep = procs.server(1, "--metrics-port", "0", bind="tcp://0.0.0.0:0")
    deadline = time.monotonic() + 30
    while "Prometheus metrics on" not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    port = int(re.search(r"Prometheus metrics on http://127\.0\.0\.1:(\d+)/metrics", server.output()).group(1))
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    local = [line.split()[3] for line in listening.splitlines()]  # the local address column
    assert local == [f"127.0.0.1:{port}"], listening
    assert "the metrics endpoint listens on" not in server.output()
    server2, _ = procs.server(1, "--metrics-port", "0", "--metrics-bind", "0.0.0.0", ckpt=procs.tmp / "ckpt2")
    deadline = time.monotonic() + 30
    while "the metrics endpoint listens on 0.0.0.0" not in server2.output():
        assert time.monotonic() < deadline, server2.output()
        time.sleep(0.05)
