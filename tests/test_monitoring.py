"""deploy/monitoring: the Prometheus scrape config and alerts, the Grafana dashboard, and the
compose profile that starts them beside the job.

There is no Prometheus or Grafana here, so the files are checked against what they depend on:
every metric name an expression uses is one a real :class:`ps.metrics.ServerMetrics` exports
(scraped as Prometheus text), the scrape target is the compose server's metrics port, the
mounts name files that exist, and the dashboard is a well-formed Grafana dashboard with a
panel for each thing an operator watches (step rate, loss, staleness, per-worker last seen,
checkpoint age and failures).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.config import ServerConfig
from ps.metrics import ServerMetrics
from tests.deployfiles import DEPLOY, compose_env, load_compose

MON = DEPLOY / "monitoring"
DASHBOARD = MON / "grafana" / "dashboards" / "zmqps.json"
NAME = re.compile(r"\b((?:zmqps|process)_[a-z0-9_]+)\b")
PROMQL_FUNCTIONS = {"rate", "increase", "sum", "by", "histogram_quantile", "time", "and", "up"}


def exported_samples() -> set[str]:
    """Every sample name a server exports, from a live registry with one of everything recorded."""
    m = ServerMetrics(ServerConfig(workers=2), lambda: [(0, time.monotonic(), 3, False), (1, time.monotonic(), 3, True)])
    m.push(0, 0, 0, 0, 10.0, 1.0)
    m.nonfinite(1, 0)
    m.update(1, 1.0)
    m.checkpoint(1, 0.1, True)
    m.checkpoint(2, 0.1, False)
    m.request("push_pull", 0.01)
    m.received(10)
    m.sent(10)
    m.step(1)
    text = generate_latest(m.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((MON / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def _balanced(expr: str) -> bool:
    depth = {"(": 0, "[": 0, "{": 0}
    close = {")": "(", "]": "[", "}": "{"}
    for ch in expr:
        if ch in depth:
            depth[ch] += 1
        elif ch in close:
            depth[close[ch]] -= 1
            if depth[close[ch]] < 0:
                return False
    return not any(depth.values())


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_used_is_one_the_server_exports(source: str) -> None:
    samples = exported_samples()
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert exprs
    for where, expr in exprs:
        assert _balanced(expr), (where, expr)
        names = NAME.findall(expr)
        assert names or "up{" in expr, (where, expr)
        for name in names:
            assert name in samples, f"{source} {where!r}: {name} is not exported (have {sorted(samples)})"
        words = set(re.findall(r"\b([a-z_]+)\s*\(", expr))
        assert words <= PROMQL_FUNCTIONS, (where, words - PROMQL_FUNCTIONS)


def test_the_dashboard_shows_what_an_operator_watches() -> None:
    used = " ".join(e for _, e in dashboard_exprs())
    for needed in ("rate(zmqps_updates_total", "zmqps_loss", "zmqps_staleness_bucket",
                   "zmqps_worker_last_seen_seconds", "time() - zmqps_checkpoint_timestamp_seconds",
                   "zmqps_checkpoint_failures_total"):
        assert needed in used, needed
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "zmqps" and dash["title"] == "zmqps"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    var = {v["name"]: v for v in dash["templating"]["list"]}["datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert [t["refId"] for t in p["targets"]] == [chr(65 + i) for i in range(len(p["targets"]))]


def test_the_checkpoint_age_is_exported_and_set_when_a_checkpoint_lands() -> None:
    m = ServerMetrics(ServerConfig(workers=1))
    before = time.time()
    m.checkpoint(3, 0.1, True)
    assert m.registry.get_sample_value("zmqps_checkpoint_timestamp_seconds") >= before
    m.resumed(7, 1234.5)  # a resumed server reports the checkpoint it resumed from
    assert m.registry.get_sample_value("zmqps_checkpoint_timestamp_seconds") == 1234.5
    assert m.registry.get_sample_value("zmqps_checkpoint_step") == 7


def test_compose_starts_prometheus_and_grafana_beside_the_job_with_these_files() -> None:
    compose = load_compose(DEPLOY / "compose.yaml")
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name  # only with --profile monitoring
        for mount in services[name]["volumes"]:
            local, target = mount.split(":")[:2]
            assert (DEPLOY / local).exists(), mount
    assert "profiles" not in services["server"] and "profiles" not in services["worker"]
    port = compose_env(services["server"], {})["PS_METRICS_PORT"]
    prom = yaml.safe_load((MON / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "zmqps"  # the dashboard's process_* queries select job="zmqps"
    assert job["static_configs"][0]["targets"] == [f"server:{port}"]
    mounted = {m.split(":")[1]: m.split(":")[0] for m in services["prometheus"]["volumes"]}
    for rule_file in prom["rule_files"]:
        assert rule_file in mounted, rule_file
    grafana = {m.split(":")[1]: m.split(":")[0] for m in services["grafana"]["volumes"]}
    providers = yaml.safe_load((MON / "grafana" / "provisioning" / "dashboards" / "zmqps.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert path in grafana and (DEPLOY / grafana[path] / "zmqps.json").exists()
    sources = yaml.safe_load((MON / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    home = compose_env(services["grafana"], {})["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path) and Path(home).name == "zmqps.json"
