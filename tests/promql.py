"""The metric names that the deployment's PromQL (alert rules, Grafana dashboard) reads, and those a moe-serve
/metrics page declares, so tests can check one against the other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.conftest import ROOT

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "moe-serve.json"
# Series that Prometheus itself makes for every target.
SYNTHETIC = {"up"}

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
_NOT_NAMES = [
    r'"(?:[^"\\]|\\.)*"',  # strings
    r"\{[^}]*\}",  # label matchers
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",  # label lists
    r"\[[^\]]*\]",  # range selectors
]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left once strings, label matchers and label lists are
    removed, other than functions (followed by '(') and keywords. Grafana variables ($model) sit in strings."""
    for pattern in _NOT_NAMES:
        expr = re.sub(pattern, " ", expr)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    return {n for n in names if n not in _KEYWORDS and not re.fullmatch(r"\d+[smhdwy]?|e\d+|Inf|NaN", n)}


def alert_rules() -> dict[str, str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"] if "alert" in r}


def dashboard_queries() -> dict[str, str]:
    """Panel title (or variable name) -> query, Grafana variables replaced by what they may stand for."""
    dash = json.loads(DASHBOARD.read_text())
    out = {f"{p['title']} [{t['refId']}]": t["expr"] for p in dash["panels"] for t in p.get("targets", [])}
    for var in dash.get("templating", {}).get("list", []):
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        out[f"${var['name']}"] = m.group(1) if m else query
    return {k: v.replace("$layer", "0") for k, v in out.items()}


def declared_metrics(exposition: str) -> set[str]:
    """Every series name a /metrics page can carry, from its # TYPE lines (present even before a labelled metric has
    a sample): counters end in _total (the text format names some by their family), histograms have _bucket, _sum
    and _count."""
    out = set()
    for name, kind in re.findall(r"^# TYPE (\w+) (\w+)", exposition, re.M):
        if kind == "counter":
            out.add(name if name.endswith("_total") else name + "_total")
        elif kind == "histogram":
            out |= {name + s for s in ("_bucket", "_sum", "_count")}
        else:
            out.add(name)
    return out


def unknown_metrics(queries: dict[str, str], exported: set[str]) -> dict[str, set[str]]:
    return {k: bad for k, q in queries.items() if (bad := metric_names(q) - exported - SYNTHETIC)}


def read_yaml(path: Path) -> object:
    return yaml.safe_load(path.read_text())
