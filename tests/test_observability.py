"""Metrics, alert rules and the Grafana dashboard, tested like code against a live scrape.

One daemon per module serves real traffic (a forwarded and a denied request, a parser error, an
upstream that refuses, an L3/L4 denial, a rejected and an accepted policy import) and is scraped
at ``GET /metrics``. Against that scrape:

- ``promtool check metrics`` lints names and help texts;
- every metric named in the docs, in ``deploy/prometheus/alerts.yaml`` and in
  ``deploy/grafana/proxyd.json`` exists, and every label value they select on is one the daemon
  emits (an alert on ``result="error"`` would never fire: the value is ``failure``);
- ``promtool check rules`` and ``promtool test rules`` run the alert rules and their unit tests;
- the dashboard is a well-formed dashboard model whose every query is valid PromQL.

New metrics may be added freely: the check is that what is *referenced* exists, not the reverse.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from needs import free_port, need_binary
from prometheus_client.parser import text_string_to_metric_families
from proxyutil import daemon, r2d2_server, tcp_server

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "proxyd.json"
#: Where metric names are referenced: what operators read and what they load into Prometheus/Grafana.
REFERENCING = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), ALERTS, DASHBOARD])
#: proxyd_... identifiers in those files that are not metrics (Python packages of examples).
NOT_METRICS = {"proxyd_c3po"}

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
spec:
  endpointSelector: {{matchLabels: {{app: {app}}}}}
  ingress:
    - toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules: {{l7proto: r2d2, l7: [{{cmd: READ}}]}}
"""


async def _exchange(host: str, port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection(host, port)
    try:
        w.write(data)
        w.write_eof()
        return await asyncio.wait_for(r.read(), 5)
    except ConnectionError:
        return b""
    finally:
        w.close()


async def _live_scrape(tmp: Path) -> str:
    async with tcp_server(r2d2_server) as up:
        dead = free_port("127.0.0.3")
        files = {
            "policy/r2d2.yaml": POLICY.format(name="r2d2", app="r2d2", port=up[1]),
            # selects the "locked" upstream and allows only port 1: its connections are denied at L3/L4
            "policy/locked.yaml": POLICY.format(name="locked", app="locked", port=1),
        }
        config = f"""
listeners:
  - name: r2d2
    address: "127.0.0.1:0"
    l7proto: r2d2
    upstream: "{up[0]}:{up[1]}"
  - name: dead
    address: "127.0.0.1:0"
    upstream: "127.0.0.3:{dead}"  # no identity, so no policy: allowed, and nothing listens there
  - name: locked
    address: "127.0.0.1:0"
    upstream: "127.0.0.2:{up[1]}"
identities:
  - cidr: {up[0]}/32
    labels: {{app: r2d2}}
  - cidr: 127.0.0.2/32
    labels: {{app: locked}}
policy:
  paths: [policy/]
access_log:
  path: access.log
admin:
  address: "127.0.0.1:0"
  token_file: admin.token
limits:
  connect_timeout: 2s
"""
        files["admin.token"] = "observability-token\n"
        async with daemon(config, tmp, files=files) as d:
            lst = {name: lr.bound_address() for name, lr in d.listeners.items()}
            got = await _exchange(*lst["r2d2"], b"READ /public/x\r\nHALT\r\n")
            assert got == b"OK READ /public/x\r\nERROR\r\n"  # one forwarded, one denied
            await _exchange(*lst["r2d2"], b"X" * 5000)  # no line end within r2d2's limit: ERROR
            assert await _exchange(*lst["dead"], b"hello\r\n") == b""  # upstream refuses
            assert await _exchange(*lst["locked"], b"READ /x\r\n") == b""  # denied at accept
            admin = d.admin_address()
            assert admin is not None
            base = f"http://127.0.0.1:{admin[1]}"
            headers = {"Content-Type": "application/yaml", "Authorization": "Bearer observability-token"}
            async with aiohttp.ClientSession() as http:
                bad = POLICY.format(name="extra", app="r2d2", port=up[1]).replace("cmd: READ", "colour: red")
                async with http.post(f"{base}/v1/policy", data=bad, headers=headers) as resp:
                    assert resp.status == 400
                good = POLICY.format(name="extra", app="r2d2", port=up[1])
                async with http.post(f"{base}/v1/policy", data=good, headers=headers) as resp:
                    assert resp.status == 200
                for _ in range(100):  # connection counters settle as the connections end
                    if not d.active_connections():
                        break
                    await asyncio.sleep(0.02)
                async with http.get(f"{base}/metrics") as resp:
                    assert resp.status == 200
                    return await resp.text()


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> str:
    return uvloop.run(_live_scrape(tmp_path_factory.mktemp("scrape")))


def _samples(scrape: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets it has in the scrape."""
    out: dict[str, list[dict[str, str]]] = defaultdict(list)
    for family in text_string_to_metric_families(scrape):
        for s in family.samples:
            out[s.name].append(dict(s.labels))
    return out


def _referenced_names(path: Path) -> set[str]:
    return set(re.findall(r"\bproxyd_[a-z][a-z0-9_]*", path.read_text())) - NOT_METRICS


def test_the_scrape_has_the_traffic_it_was_given(scrape: str) -> None:
    samples = _samples(scrape)

    def value(name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(scrape):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        raise AssertionError(f"no {name}{labels} in the scrape")

    assert value("proxyd_l7_requests_total", l7proto="r2d2", verdict="forwarded") == 1
    assert value("proxyd_l7_requests_total", l7proto="r2d2", verdict="denied") == 1
    assert value("proxyd_parser_errors_total", l7proto="r2d2") == 1
    assert value("proxyd_upstream_connect_failures_total", listener="dead") == 1
    assert value("proxyd_connection_denials_total", listener="locked") == 1
    assert value("proxyd_policy_reloads_total", result="failure") == 1
    assert value("proxyd_policy_reloads_total", result="success") == 1
    assert value("proxyd_bytes_total", listener="r2d2", direction="in") > 0
    assert value("proxyd_connections_max") == 10000
    assert "proxyd_policy_revision" in samples


def test_promtool_check_metrics_is_clean(scrape: str) -> None:
    need_binary("promtool")
    res = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == res.stderr.strip() == "", res.stdout + res.stderr


def test_every_metric_named_in_docs_alerts_and_dashboard_exists_in_a_live_scrape(scrape: str) -> None:
    samples = _samples(scrape)
    named: dict[str, set[str]] = {}
    for path in REFERENCING:
        for name in _referenced_names(path):
            named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    # the three kinds of file all take part: the check is not vacuous
    assert {"proxyd_policy_reloads_total", "proxyd_l7_requests_total"} <= set(named)
    assert any(str(ALERTS.relative_to(ROOT)) in w for w in named.values())
    assert any(str(DASHBOARD.relative_to(ROOT)) in w for w in named.values())
    missing = {n: sorted(w) for n, w in named.items() if n not in samples}
    assert not missing, f"named but not in /metrics: {missing}"


#: Labels whose values are names the operator chose (listeners, hosts), that need traffic of a
#: protocol the scrape did not see, or that depend on the build (``data_path`` is "python" when
#: the suite runs with PROXYD_PURE=1, as CI's second pass does); the others are fixed
#: vocabularies the daemon must emit.
FREE_LABELS = {"instance", "job", "listener", "l7proto", "data_path", "version"}


def _selected_label_values(path: Path) -> list[tuple[str, str, str]]:
    """(metric, label, value) for every exact matcher ``metric{label="value"}`` in the file."""
    text = path.read_text().replace('\\"', '"')
    out = []
    for name, body in re.findall(r"\b(proxyd_[a-z][a-z0-9_]*)\{([^}]*)\}", text):
        for label, value in re.findall(r'(\w+)\s*=\s*"([^"]*)"', body):  # =~ and != are skipped
            out.append((name, label, value))
    return out


def test_every_label_value_selected_on_is_emitted(scrape: str) -> None:
    samples = _samples(scrape)
    problems, checked = [], 0
    for path in REFERENCING:
        for name, label, value in _selected_label_values(path):
            if label in FREE_LABELS or name not in samples:
                continue
            checked += 1
            seen = {s.get(label) for s in samples[name]}
            if value not in seen:
                problems.append(f'{path.relative_to(ROOT)}: {name}{{{label}="{value}"}}: '
                                f"the daemon emits {sorted(map(str, seen))}")  # fmt: skip
    assert checked >= 5  # result="failure" in docs and alerts, verdict="denied" in docs, alerts, dashboard
    assert not problems, "\n".join(problems)


def test_the_label_value_check_catches_the_old_docs_mistake(scrape: str, tmp_path: Path) -> None:
    """deployment.md once alerted on result="error": the check above must see that as a problem."""
    old = tmp_path / "old.md"
    old.write_text('`increase(proxyd_policy_reloads_total{result="error"}[10m]) > 0`')
    ((name, label, value),) = _selected_label_values(old)
    emitted = {s[label] for s in _samples(scrape)[name]}
    assert emitted == {"success", "failure"} and value not in emitted


# --- alert rules -------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    need_binary("promtool")
    res = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 9 rules found" in res.stdout


def test_promtool_test_rules() -> None:
    need_binary("promtool")
    res = subprocess.run(["promtool", "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_is_unit_tested_and_labelled() -> None:
    import yaml

    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    tested = {t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}  # fmt: skip
    names = {r["alert"] for r in rules}
    assert names == tested, f"alerts without a firing test: {names - tested}"
    for r in rules:
        assert r["labels"]["severity"] in ("page", "warning"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    wanted = ["ProxydDown", "ProxydPolicyReloadFailing", "ProxydParserErrorsRising", "ProxydDenialsSpiking",
              "ProxydUpstreamConnectFailures", "ProxydConnectionsNearLimit", "ProxydOutOfFileDescriptors",
              "ProxydAccessLogDropping"]  # fmt: skip
    assert set(wanted) <= names


# --- the Grafana dashboard ---------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _targets(dash: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in dash["panels"] for t in p.get("targets", [])]


PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "text", "row", "heatmap"}


def test_dashboard_is_a_well_formed_model() -> None:
    dash = _dashboard()
    for key, kind in (("title", str), ("uid", str), ("schemaVersion", int), ("panels", list),
                      ("templating", dict), ("time", dict), ("tags", list)):  # fmt: skip
        assert isinstance(dash.get(key), kind), key
    assert 0 < len(dash["uid"]) <= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", dash["uid"])
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        assert p["type"] in PANEL_TYPES, p["title"]
        assert p["title"].strip()
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["w"] > 0 and g["h"] > 0
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] in ("row", "text"):
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            for var in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), f"{p['title']}: undefined ${var}"


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(t["expr"] for _, t in _targets(_dashboard()))
    for metric in ("proxyd_connections_total", "proxyd_connections_active", "proxyd_bytes_total",
                   "proxyd_l7_requests_total", "proxyd_connection_denials_total",
                   "proxyd_parser_errors_total", "proxyd_policy_revision", "proxyd_policy_reloads_total",
                   "proxyd_upstream_connect_failures_total"):  # fmt: skip
        assert metric in exprs, metric
    assert 'verdict="denied"' in exprs


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables replaced) as a recording rule."""
    need_binary("promtool")
    import yaml

    rules = []
    for i, (title, t) in enumerate(_targets(_dashboard())):
        expr = t["expr"].replace("$__rate_interval", "5m").replace("$__interval", "1m")
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr, "labels": {"panel": title}})
    f = tmp_path / "dashboard-queries.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules)} rules found" in res.stdout
