"""A real Prometheus (Debian's `prometheus`) scraping a real `moe-serve serve`, with the deployment's alert rules
loaded: PromQL over its HTTP API sees the request rate and the expert tokens, every rule evaluates without error,
and every dashboard query runs."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.bench.served import free_port
from tests.e2e.conftest import run_server
from tests.promql import ALERTS, alert_rules, dashboard_queries, declared_metrics, unknown_metrics

pytestmark = pytest.mark.e2e


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    body = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _wait_for(what: str, check: Any, timeout_s: float = 40) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, AssertionError, KeyError):
            if result := check():
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@contextlib.contextmanager
def prometheus(target: str, work: Path) -> Iterator[str]:
    """Prometheus scraping `target` every second with the deployment's alert rules (evaluated every second)."""
    exe = shutil.which("prometheus")
    if not exe:
        pytest.fail("prometheus missing: run `make tools`")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "moe-serve", "static_configs": [{"targets": [target]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [exe, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    with (work / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for("prometheus ready", lambda: proc.poll() is None and urllib.request.urlopen(f"{url}/-/ready").status)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture(scope="module")
def scraped(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    work = tmp_path_factory.mktemp("prometheus")
    with (
        run_server(models_dir, work / "server.log", default_model="tiny") as server,
        prometheus(server.removeprefix("http://"), work) as prom,
    ):
        yield server, prom


def _rules(prom: str) -> list[dict[str, Any]]:
    return [r for g in _get(f"{prom}/api/v1/rules")["data"]["groups"] for r in g["rules"]]


def _evaluated(rule: dict[str, Any]) -> bool:
    return not rule["lastEvaluation"].startswith("0001-")  # Go's zero time: not evaluated yet


def _classify(server: str, n: int) -> None:
    for i in range(n):
        req = urllib.request.Request(
            f"{server}/v1/classify",
            data=json.dumps({"inputs": [f"the market rallied on day {i}", "a late goal won the match"]}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200


def test_promql_sees_request_rate_and_expert_tokens(scraped: tuple[str, str]) -> None:
    server, prom = scraped
    _wait_for("target up", lambda: _query(prom, 'up{job="moe-serve"} == 1'))
    # Requests spread over a few scrapes, so rate() has two samples that differ.
    for _ in range(6):
        _classify(server, 5)
        time.sleep(0.5)
    rate = _wait_for(
        "request rate",
        lambda: _query(prom, 'sum by (model) (rate(moe_requests_total{route="/v1/classify", status="200"}[30s])) > 0'),
    )
    assert rate[0]["metric"]["model"] == "tiny" and float(rate[0]["value"][1]) > 0
    experts = _query(prom, 'sum by (layer, expert) (moe_expert_tokens_total{model="tiny"})')
    assert experts and sum(float(e["value"][1]) for e in experts) > 0
    expert_rate = _query(prom, 'sum(rate(moe_expert_tokens_total{model="tiny"}[30s]))')
    assert float(expert_rate[0]["value"][1]) > 0


def test_alert_rules_evaluate_against_live_metrics(scraped: tuple[str, str]) -> None:
    _, prom = scraped
    rules = _wait_for("every rule evaluated", lambda: (rs := _rules(prom)) and all(_evaluated(r) for r in rs) and rs)
    assert {r["name"] for r in rules} == set(alert_rules())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = [a["labels"]["alertname"] for a in _get(f"{prom}/api/v1/alerts")["data"]["alerts"]]
    assert "MoeServeDown" not in firing


def test_dashboard_and_alerts_read_metrics_the_live_server_declares(scraped: tuple[str, str]) -> None:
    server, prom = scraped
    _classify(server, 1)
    with urllib.request.urlopen(f"{server}/metrics", timeout=5) as r:
        declared = declared_metrics(r.read().decode())
    assert unknown_metrics({**alert_rules(), **dashboard_queries()}, declared) == {}
    for title, expr in dashboard_queries().items():
        _query(prom, expr.replace("$model", ".*"))  # each one parses and evaluates; status checked in _query
        assert title
