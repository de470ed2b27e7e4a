"""rules.http through the real policy loader, engine, explain and CLI, with the real http parser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxyd.errors import PolicyError
from proxyd.parsers.http.rules import HttpRequest
from proxyd.policy.engine import PolicySet
from proxyd.policy.loader import parse_text
from proxyd.registry import Registry

REGISTRY = Registry.load(entry_point_plugins=False)

# Cilium's deathstar example (docs/security/http.rst), in its own words: the empire's ships may
# only request a landing; the alliance is let in to look at everything (visibility, `http: []`).
DEATHSTAR = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: rule1
spec:
  endpointSelector:
    matchLabels: {org: empire, class: deathstar}
  ingress:
  - fromEndpoints:
    - matchLabels: {org: empire}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - method: POST
          path: /v1/request-landing
        - method: GET
          path: "/v1/.*"
          headers: ["X-Has-Force: true"]
          headerMatches:
          - {name: X-Token, value: sith, mismatch: LOG}
"""


def req(method: str, path: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpRequest:
    return HttpRequest(method, path, "deathstar", "1.1", headers)


def test_deathstar_policy_with_the_real_http_parser() -> None:
    docs = parse_text(DEATHSTAR, "p.yaml", REGISTRY)
    ps = PolicySet(docs, REGISTRY)
    cp = ps.connection_policy(
        "ingress", {"org": "empire", "class": "deathstar"}, "10.0.0.2", {"org": "empire"}, 80, "http"
    )
    assert cp.decide(req("POST", "/v1/request-landing")).allowed
    assert not cp.decide(req("PUT", "/v1/exhaust-port")).allowed
    assert not cp.decide(req("POST", "/v1/request-landing/extra")).allowed  # full match
    assert not cp.decide(req("GET", "/v1/plans")).allowed
    r = HttpRequest("GET", "/v1/plans", "deathstar", "1.1", (("x-has-force", "true"),), [])
    assert cp.decide(r).allowed and [a.name for a in r.actions] == ["X-Token"]  # LOG mismatch


AT = "p.yaml:15: spec.ingress[0].toPorts[0].rules.http[0]."


@pytest.mark.parametrize(
    ("rule", "where"),
    [
        ("        - {method: GET, colour: red}\n", AT + "colour: unknown"),
        ("        - method: '(a'\n", AT + "method: bad regular"),
        ("        - headerMatches:\n          - {name: X, secret: {name: s}}\n",
         AT + "headerMatches: [0].secret: not supported"),
    ],
)  # fmt: skip
def test_rule_errors_are_reported_at_their_line(rule: str, where: str) -> None:
    text = DEATHSTAR[: DEATHSTAR.index("        - method: POST")] + rule
    with pytest.raises(PolicyError) as exc:
        parse_text(text, "p.yaml", REGISTRY)
    assert any(p.startswith(where) for p in exc.value.problems), exc.value.problems


def test_proxyd_parsers_lists_the_http_rule_keys() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "proxyd", "parsers"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("http "))
    assert "method,path,host,headers,headerMatches" in line.replace(", ", ",")


def test_explain_shows_http_rules(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(DEATHSTAR)
    (tmp_path / "proxyd.yaml").write_text(
        "listeners:\n  - name: web\n    address: '127.0.0.1:0'\n    l7proto: http\n"
        "    upstream: '10.0.0.1:80'\n"
        "identities:\n  - cidr: 10.0.0.1/32\n    labels: {org: empire, class: deathstar}\n"
        "  - cidr: 10.0.0.2/32\n    labels: {org: empire}\npolicy:\n  paths: [policy.yaml]\n"
    )
    cmd = ["explain", "--config", str(tmp_path / "proxyd.yaml"), "--src", "10.0.0.2", "--dst", "10.0.0.1:80"]
    res = subprocess.run([sys.executable, "-m", "proxyd", *cmd], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "/v1/request-landing" in res.stdout and "X-Has-Force: true" in res.stdout, res.stdout
    assert "X-Token" in res.stdout
