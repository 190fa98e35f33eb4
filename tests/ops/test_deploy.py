"""deploy/ stays consistent: dashboards and alerts use metrics the code defines, the compose file
parses and builds every Shoal service from deploy/Dockerfile, Prometheus scrapes every service."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
SMOKE = DEPLOY / "docker-compose.smoke.yml"
CLUSTER = DEPLOY / "docker-compose.cluster.yml"

# Series Prometheus makes itself rather than a Shoal service.
BUILTIN_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

# Metrics the dashboards and alerts may expect from services still being built: a name here may
# be missing from the code for now; once a service defines it, delete it here. Nothing else may
# be missing. (Empty: every metric issue 7 lists exists; tests/ops/test_metrics.py checks them.)
PENDING_METRICS: set[str] = set()
METRICS_MODULES = (
    "shoal_common.telemetry",
    "shoal_requester.metrics",
    "shoal_compute.metrics",
    "shoal_verifier.metrics",
    "shoal_publisher.metrics",
)

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels or keywords)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables ($__rate_interval)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", s):
        name, call = match.group(1), match.group(2)
        if not call and name not in _KEYWORDS:
            names.add(name)
    return names


def _panel_exprs(panels: list[dict[str, Any]]) -> list[str]:
    exprs: list[str] = []
    for panel in panels:
        exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        exprs += _panel_exprs(panel.get("panels", []))  # panels inside collapsed rows
    return exprs


def dashboard_exprs() -> dict[str, list[str]]:
    return {p.name: _panel_exprs(json.loads(p.read_text())["panels"]) for p in DASHBOARDS}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@cache
def defined_names() -> frozenset[str]:
    """Every series name Shoal exports, as Prometheus will scrape it (``_total``, ``_bucket``...):
    read from the registries the services and the canary really register their metrics in."""
    from shoal_cli.canary import CanaryMetrics

    for module in METRICS_MODULES:
        importlib.import_module(module)  # each registers its metrics in the default registry
    registries = (REGISTRY, CanaryMetrics().registry)
    names = {n for r in registries for n in r._names_to_collectors}
    return frozenset(n for n in names if n.startswith("shoal_"))


def is_defined(name: str) -> bool:
    return name in defined_names()


def all_referenced() -> dict[str, set[str]]:
    """metric name -> where it is used."""
    used: dict[str, set[str]] = {}
    for dash, exprs in dashboard_exprs().items():
        for expr in exprs:
            for name in metric_names(expr):
                used.setdefault(name, set()).add(dash)
    for rule in alert_rules():
        for name in metric_names(str(rule["expr"])):
            used.setdefault(name, set()).add(f"alerts.yml:{rule['alert']}")
    return used


# --- the PromQL reader itself ---------------------------------------------------------------------


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(shoal_x_seconds_bucket{a="b"}'
        "[$__rate_interval]))) / on (job) group_left () shoal_y_total offset 5m > 1e-9 "
        'and absent(up{job=~"shoal-.*"}) or vector(0) unless time() - shoal_z[5m:1m]'
    )
    assert metric_names(expr) == {"shoal_x_seconds_bucket", "shoal_y_total", "up", "shoal_z"}


# --- dashboards and alerts ------------------------------------------------------------------------


def test_dashboards_and_alerts_use_only_metrics_that_exist() -> None:
    used = all_referenced()
    assert used, "no PromQL found"
    foreign = {n: w for n, w in used.items() if not n.startswith("shoal_")}
    assert set(foreign) <= BUILTIN_SERIES, f"not Shoal metrics: {foreign}"
    missing = {
        name: sorted(where)
        for name, where in used.items()
        if name.startswith("shoal_") and not is_defined(name) and name not in PENDING_METRICS
    }
    assert not missing, f"metrics used in deploy/ that no Shoal service exports: {missing}"


def test_pending_metrics_are_really_used() -> None:
    # Keeps the allowance honest: it may only name metrics the dashboards or alerts read.
    assert set(PENDING_METRICS) <= set(all_referenced())


def test_canary_and_common_metrics_are_defined() -> None:
    for name in (
        "shoal_canary_runs_total",
        "shoal_canary_latency_seconds_bucket",
        "shoal_canary_last_run_success",
        "shoal_http_requests_total",
        "shoal_outbox_lag_seconds_bucket",
    ):
        assert is_defined(name), name


def test_dashboards_are_provisionable() -> None:
    titles = {}
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    ds_uid = ds["datasources"][0]["uid"]
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        titles[board["title"]] = board["uid"]
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == ds_uid, (path.name, panel["title"])
                assert panel["targets"], (path.name, panel["title"])
    assert {"Shoal cluster overview", "Shoal canary"} <= set(titles)
    assert len(set(titles.values())) == len(titles)


def test_alerts_cover_canary_and_cluster_health() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    exprs = {r["alert"]: str(r["expr"]) for r in rules}
    canary_failure = ("shoal_canary_last_run_success", 'outcome="failure"')
    assert any(marker in e for marker in canary_failure for e in exprs.values())
    assert any("latency" in e for n, e in exprs.items() if n.startswith("ShoalCanary"))
    assert {"ShoalJobFailureRateHigh", "ShoalNoLiveComputeNodes"} <= names


# --- compose --------------------------------------------------------------------------------------


def _compose(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _shoal_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if "SHOAL_IMAGE" in str(svc.get("image", ""))
    }


def test_compose_builds_every_shoal_service_from_the_dockerfile() -> None:
    compose = _compose(COMPOSE)
    shoal = _shoal_services(compose)
    assert {"requester", "verifier", "publisher", "canary"} <= set(shoal)
    assert len([n for n in shoal if n.startswith("compute-")]) == 3
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if name in shoal:
            assert build, f"{name} has no build section"
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
                DEPLOY / "Dockerfile"
            ), name
            assert "BASE_IMAGE" in build.get("args", {}), name
    assert "ARG BASE_IMAGE" in (DEPLOY / "Dockerfile").read_text()
    for name, svc in _compose(SMOKE)["services"].items():  # the smoke run builds its Postgres
        if svc.get("build"):
            assert name in compose["services"], name
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name


def test_compute_nodes_have_different_labels_and_own_databases() -> None:
    shoal = _shoal_services(_compose(COMPOSE))
    computes = {n: s["environment"] for n, s in shoal.items() if n.startswith("compute-")}
    labels = {env.get("SHOAL_COMPUTE_LABELS") for env in computes.values()}
    dbs = {env.get("SHOAL_COMPUTE_DATABASE_URL") for env in computes.values()}
    assert len(labels) == len(computes) == len(dbs)  # anchors did not hide a missing override
    for env in computes.values():
        assert all(k.startswith(("SHOAL_COMPUTE_", "OTEL_")) for k in env)


def test_each_service_uses_its_own_settings_prefix() -> None:
    for name, svc in _shoal_services(_compose(COMPOSE)).items():
        kind = "compute" if name.startswith("compute-") else name
        for key in svc.get("environment", {}):
            if key.startswith("SHOAL_") and name != "canary":
                assert key.startswith(f"SHOAL_{kind.upper()}_"), (name, key)


def test_prometheus_scrapes_every_shoal_service() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    for name, svc in _shoal_services(_compose(COMPOSE)).items():
        env = svc.get("environment", {})
        ports = [str(v) for k, v in env.items() if k.endswith("_PORT") and k != "SHOAL_API_PORT"]
        command = [str(c) for c in svc.get("command", [])]
        if "--metrics-port" in command:
            ports.append(command[command.index("--metrics-port") + 1])
        assert ports, f"{name} serves no /metrics port"
        assert f"{name}:{ports[0]}" in targets, f"Prometheus does not scrape {name}:{ports[0]}"


def test_nats_fsyncs_every_write() -> None:
    for conf in ("nats.conf", "cluster.conf"):
        assert re.search(r"sync_interval:\s*always", (DEPLOY / "nats" / conf).read_text()), conf
    compose = _compose(COMPOSE)
    for name in ("nats", "nats-1", "nats-2", "nats-3"):
        assert "--jetstream" in compose["services"][name]["command"], name
    assert {compose["services"][n].get("profiles", [None])[0] for n in ("nats-1", "kubo")} == {
        "cluster",
        "ipfs",
    }


needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="needs Debian's docker-compose (make docker-setup installs it)",
)


@needs_compose
def test_docker_compose_accepts_the_files() -> None:
    for files in ([COMPOSE], [COMPOSE, SMOKE], [COMPOSE, CLUSTER], [COMPOSE, SMOKE, CLUSTER]):
        args = [a for f in files for a in ("-f", str(f))]
        if CLUSTER in files:
            args += ["--profile", "cluster"]
        subprocess.run(["docker-compose", *args, "config", "-q"], check=True, timeout=60)


@needs_compose
def test_cluster_profile_replicates_streams_three_times_on_fsyncing_nodes() -> None:
    args = ["-f", str(COMPOSE), "-f", str(CLUSTER), "--profile", "cluster", "config"]
    done = subprocess.run(["docker-compose", *args], check=True, timeout=60, capture_output=True)
    services = yaml.safe_load(done.stdout)["services"]
    for name in ("nats-1", "nats-2", "nats-3"):
        assert "/etc/nats/cluster.conf" in services[name]["command"], name
    for name in _shoal_services(_compose(COMPOSE)):
        env = services[name]["environment"]
        if name == "canary":
            continue  # a client of the HTTP API only
        kind = "COMPUTE" if name.startswith("compute-") else name.upper()
        assert env[f"SHOAL_{kind}_NATS_STREAM_REPLICAS"] == "3", name
        assert env[f"SHOAL_{kind}_NATS_URL"].count("nats://nats-") == 3, name
        assert {"nats-1", "nats-2", "nats-3"} <= set(services[name]["depends_on"]), name
    # Without the cluster file every service keeps one replica on the single server.
    plain = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        check=True,
        timeout=60,
        capture_output=True,
    )
    env = yaml.safe_load(plain.stdout)["services"]["requester"]["environment"]
    assert env["SHOAL_REQUESTER_NATS_STREAM_REPLICAS"] == "1"
